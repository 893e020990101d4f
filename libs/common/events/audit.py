"""The audit event every state change in every service emits (stored by the approval service)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from libs.common.events.envelope import EventPayload


class AuditRecorded(EventPayload):
    subject: ClassVar[str] = "audit.event.recorded"

    service: str
    actor: str
    action: str
    target: str
    project: str | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    request_id: str | None = None
    at: datetime
