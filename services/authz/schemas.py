"""Bodies of the authz API. Inputs forbid unknown fields; no Read model carries a secret."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from libs.common.auth import ACTIONS, SCOPES
from libs.common.events.authz import EntitlementState, KeyState, ToolAccessLimit, ToolLimit
from libs.common.names import AssetName, ProjectName, Subject

ProjectRole = Literal["viewer", "developer", "project-admin"]
AssetKind = Literal["model", "mcp_server"]


def _known_scopes(scopes: list[str]) -> list[str]:
    unknown = sorted(set(scopes) - SCOPES)
    if unknown:
        raise ValueError(f"unknown scopes {unknown}; known: {sorted(SCOPES)}")
    if len(set(scopes)) != len(scopes):
        raise ValueError("scopes repeat")
    return sorted(scopes)


Scopes = Annotated[list[str], Field(min_length=1), AfterValidator(_known_scopes)]


def _zoned(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("needs a time zone, e.g. 2027-01-01T00:00:00Z")
    return value


# A key's expiry; that it lies ahead is checked against the service's clock (api.py).
ZonedTime = Annotated[datetime, AfterValidator(_zoned)]


class Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProjectCreate(Input):
    name: ProjectName
    display_name: str | None = Field(default=None, min_length=1, max_length=200)


class ProjectPatch(Input):
    display_name: str = Field(min_length=1, max_length=200)


class ProjectRead(BaseModel):
    name: str
    display_name: str
    created_at: datetime
    created_by: str


class MemberPut(Input):
    role: ProjectRole


class MemberRead(BaseModel):
    subject: str
    role: str
    created_at: datetime


class KeyCreate(Input):
    name: str = Field(min_length=1, max_length=100)
    scopes: Scopes
    role: ProjectRole | None = Field(
        default=None, description="Defaults to the owner's role in the project"
    )
    owner: Subject | None = Field(
        default=None, description="A member to issue the key to; defaults to the caller"
    )
    expires_at: ZonedTime | None = None


class PlatformKeyCreate(Input):
    name: str = Field(min_length=1, max_length=100)
    scopes: Scopes
    expires_at: ZonedTime | None = None


class KeyRotate(Input):
    grace_seconds: int | None = Field(
        default=None, ge=0, le=7 * 24 * 3600, description="How long the old key keeps working"
    )


class KeyRead(BaseModel):
    id: str
    name: str
    project: str | None
    owner: str
    role: str
    scopes: list[str]
    status: Literal["active", "expired", "revoked"]
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    rotated_to: str | None
    service: bool = Field(
        default=False, description="A Steward service's own key (gateway, inference)"
    )


class KeyCreated(KeyRead):
    key: str = Field(description="The API key. Shown once; store it now.")


class EntitlementPut(Input):
    reason: str = Field(default="", max_length=500)
    # An MCP server only: the grant covers tools of these access types and/or these tools.
    tool_access: ToolAccessLimit = None
    tools: ToolLimit = None


class EntitlementRead(BaseModel):
    project: str
    asset_kind: str
    asset_name: str
    granted_at: datetime
    granted_by: str
    reason: str
    tool_access: list[str] | None = None
    tools: list[str] | None = None
    fallbacks: list[str] | None = None


class FallbacksPut(Input):
    chain: list[AssetName] = Field(
        max_length=5,
        description="Gateway model names to try, in order, when the model cannot serve a call "
        "(no healthy replica, or the upstream answers 429/503); empty: none",
    )


class PrincipalRead(BaseModel):
    subject: str
    credential: Literal["api_key", "oidc"]
    credential_id: str
    scopes: list[str]
    platform_admin: bool
    project_roles: dict[str, str]


class AuthorizeRequest(Input):
    action: str = Field(examples=["inference.invoke"])
    project: ProjectName | None = None

    @field_validator("action")
    @classmethod
    def _known_action(cls, value: str) -> str:
        if value not in ACTIONS:
            raise ValueError(f"unknown action; known: {sorted(ACTIONS)}")
        return value


class AuthorizeResponse(BaseModel):
    allowed: bool
    reason: str
    principal: PrincipalRead


class Snapshot(BaseModel):
    """Everything the gateway needs to authorise locally, as of ``generated_at``."""

    generated_at: datetime
    # The replica revision the snapshot is at least as new as (also its ETag).
    revision: int
    keys: list[KeyState]
    entitlements: list[EntitlementState]
