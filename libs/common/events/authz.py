"""Events published by the authz service."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from libs.common.events.envelope import EventPayload


class ProjectCreated(EventPayload):
    subject: ClassVar[str] = "authz.project.created"

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


class EntitlementState(EventPayload):
    project: str
    asset_kind: str
    asset_name: str


class EntitlementGranted(EntitlementState):
    subject: ClassVar[str] = "authz.entitlement.granted"


class EntitlementRevoked(EntitlementState):
    subject: ClassVar[str] = "authz.entitlement.revoked"
