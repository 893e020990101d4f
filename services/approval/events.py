"""What approval publishes, and the audit events (from every service) it stores in the chain."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.consumer import Handler
from libs.common.events import CloudEvent, EventPayload
from libs.common.events.approval import (
    RequestApproved,
    RequestCreated,
    RequestExpired,
    RequestRejected,
    RequestWithdrawn,
)
from libs.common.events.audit import AuditRecorded
from services.approval import audit

PUBLISHES: tuple[type[EventPayload], ...] = (
    RequestCreated,
    RequestApproved,
    RequestRejected,
    RequestWithdrawn,
    RequestExpired,
    AuditRecorded,
)


async def on_audit_recorded(session: AsyncSession, event: CloudEvent) -> None:
    """Append to the chain; the inbox makes a redelivered event a no-op."""
    await audit.append(session, AuditRecorded.model_validate(event.data), event.id)


HANDLERS: dict[str, Handler] = {AuditRecorded.subject: on_audit_recorded}
