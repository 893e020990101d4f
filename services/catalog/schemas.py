"""Bodies of the catalog API. Inputs forbid unknown fields (imports read published formats, see
``importers``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from libs.common.events.catalog import ToolRef, VersionState

AssetKind = Literal["model", "mcp_server"]
Status = Literal["draft", "submitted", "approved", "deprecated", "revoked"]


class Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StatusChange(Input):
    reason: str = Field(default="", max_length=500)


class CheckRead(BaseModel):
    check: str
    ok: bool
    detail: str


class VersionRead(BaseModel):
    id: str
    asset_id: str
    kind: AssetKind
    name: str
    version: str
    status: Status
    description: str
    provider: str
    tags: list[str]
    tools: list[ToolRef]
    spec: dict[str, Any] = Field(description="Provenance, serving hints, MCP packages/remotes")
    checklist: list[CheckRead]
    source: str
    created_at: datetime
    created_by: str
    status_changed_at: datetime
    status_reason: str
    request_id: str | None


class AssetRead(BaseModel):
    id: str
    kind: AssetKind
    name: str
    created_at: datetime
    versions: list[VersionRead]


class VersionPage(BaseModel):
    items: list[VersionRead]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page")


class ImportedVersion(BaseModel):
    kind: AssetKind
    name: str
    version: str
    version_id: str | None
    outcome: Literal["created", "updated", "unchanged"]


class ImportResult(BaseModel):
    created: int
    updated: int
    unchanged: int
    versions: list[ImportedVersion]


class Snapshot(BaseModel):
    """Every approved version, as of ``generated_at``; the gateway follows ``catalog.version.*``
    events after it."""

    generated_at: datetime
    versions: list[VersionState]
