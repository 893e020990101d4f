"""Events published by the catalog service about asset versions.

Every lifecycle change carries the version's full usable state, so a consumer (the gateway's
replica, inference) can apply it without calling back.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel

from libs.common.events.envelope import EventPayload

ToolAccess = Literal["read_only", "read_write", "execute"]


class ToolRef(BaseModel):
    """An MCP tool the catalog lists for a server version, with what it may do."""

    name: str
    access: ToolAccess


class VersionState(EventPayload):
    asset_id: str
    asset_kind: Literal["model", "mcp_server"]
    asset_name: str
    version_id: str
    version: str
    status: Literal["draft", "submitted", "approved", "deprecated", "revoked"]
    tags: list[str] = []
    tools: list[ToolRef] = []
    # A model's own tokenizer (serving.tokenizer), for exact counts where an engine reports none.
    tokenizer: str | None = None
    # An MCP server's streamable-HTTP URL (server.json remotes): the gateway routes it while the
    # version is approved, with no routes file and no restart.
    remote: str | None = None


class VersionSubmitted(VersionState):
    subject: ClassVar[str] = "catalog.version.submitted"


class VersionApproved(VersionState):
    subject: ClassVar[str] = "catalog.version.approved"


class VersionDeprecated(VersionState):
    subject: ClassVar[str] = "catalog.version.deprecated"


class VersionRevoked(VersionState):
    """Revocation must cut traffic: the gateway drops the version from its routes at once."""

    subject: ClassVar[str] = "catalog.version.revoked"
