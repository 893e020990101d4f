"""Events published by the authz service."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar

from pydantic import Field

from libs.common.events.catalog import ToolAccess, ToolRef
from libs.common.events.envelope import EventPayload
from libs.common.names import ToolName


class ProjectCreated(EventPayload):
    subject: ClassVar[str] = "authz.project.created"

    project: str
    display_name: str


class ProjectUpdated(EventPayload):
    subject: ClassVar[str] = "authz.project.updated"

    project: str
    display_name: str


class MemberChanged(EventPayload):
    """A role binding in a project was added, changed or removed (role is None when removed)."""

    subject: ClassVar[str] = "authz.member.changed"

    project: str
    member: str
    role: str | None


class KeyState(EventPayload):
    """What the gateway's replica needs to verify a key locally: never the secret itself."""

    key_id: str
    digest: str
    project: str | None
    owner: str
    role: str
    scopes: list[str]
    expires_at: datetime | None


class KeyCreated(KeyState):
    subject: ClassVar[str] = "authz.key.created"


class KeyUpdated(KeyState):
    """Expiry or scopes changed (rotation shortens the old key's life to the grace period)."""

    subject: ClassVar[str] = "authz.key.updated"


class KeyRevoked(EventPayload):
    subject: ClassVar[str] = "authz.key.revoked"

    key_id: str
    project: str | None


# What of an MCP server a grant covers, when less than all of it (request bodies and events).
ToolAccessLimit = Annotated[
    list[ToolAccess] | None,
    Field(default=None, min_length=1, max_length=3, description="Only tools of these types"),
]
ToolLimit = Annotated[
    list[ToolName] | None,
    Field(default=None, min_length=1, max_length=500, description="Only these tools"),
]


def check_tool_limits(kind: str, tool_access: object, tools: object) -> None:
    """Only an MCP server's access can be limited to some of its tools (ValueError if not)."""
    if kind != "mcp_server" and (tool_access or tools):
        raise ValueError("tool_access and tools limit access to an MCP server only")


class EntitlementState(EventPayload):
    project: str
    asset_kind: str
    asset_name: str
    # An MCP server's grant may be narrower than the server: only tools of these access types,
    # and/or only these named tools (None: no such limit).
    tool_access: ToolAccessLimit = None
    tools: ToolLimit = None
    # A model's fallback chain, set by the project: the gateway's model names to try, in
    # order, when this model cannot serve a call (each still needs its own entitlement and an
    # approved version at the moment it is used).
    fallbacks: list[str] | None = None

    @property
    def limited(self) -> bool:
        return self.tool_access is not None or self.tools is not None

    def allows(self, tool: ToolRef) -> bool:
        """Whether the grant covers a catalogued tool."""
        if self.tool_access is not None and tool.access not in self.tool_access:
            return False
        return self.tools is None or tool.name in self.tools

    def allows_reading(self) -> bool:
        """Resources and prompts only read: a grant limited to named tools alone does not
        cover them; one that allows read-only tools does."""
        if not self.limited:
            return True
        return self.tool_access is not None and "read_only" in self.tool_access


class EntitlementGranted(EntitlementState):
    subject: ClassVar[str] = "authz.entitlement.granted"


class EntitlementRevoked(EntitlementState):
    subject: ClassVar[str] = "authz.entitlement.revoked"
