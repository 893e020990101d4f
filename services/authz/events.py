"""What authz publishes, and the events it handles (an explicit map, empty until other services
publish something authz must act on)."""

from __future__ import annotations

from libs.common.consumer import Handler
from libs.common.events import EventPayload
from libs.common.events.audit import AuditRecorded
from libs.common.events.authz import (
    EntitlementGranted,
    EntitlementRevoked,
    KeyCreated,
    KeyRevoked,
    KeyUpdated,
    MemberChanged,
    ProjectCreated,
)

PUBLISHES: tuple[type[EventPayload], ...] = (
    ProjectCreated,
    MemberChanged,
    KeyCreated,
    KeyUpdated,
    KeyRevoked,
    EntitlementGranted,
    EntitlementRevoked,
    AuditRecorded,
)

HANDLERS: dict[str, Handler] = {}
