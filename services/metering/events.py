"""What metering publishes, and the events it handles (explicit maps).

Two consumers: usage events arrive by thousands per second on their own stream and are applied
a batch per transaction (``Ingest``); control-plane events (approved quota requests) one by one.
The handlers need the service's settings and clock, so the maps are built in the lifespan by
``control_handlers``/``usage_handlers`` rather than declared on the ``ServiceSpec``.
"""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.consumer import BatchHandler, Handler
from libs.common.events import CloudEvent, EventPayload
from libs.common.events.approval import RequestApproved
from libs.common.events.audit import AuditRecorded
from libs.common.events.metering import (
    QuotaConsumed,
    QuotaDeleted,
    QuotaExceeded,
    QuotaUpdated,
    QuotaWarning,
)
from libs.common.events.usage import UsageRecorded
from libs.common.outbox import Outbox
from libs.common.settings import Settings
from libs.common.uow import UnitOfWork
from services.metering import domain
from services.metering.domain import Clock
from services.metering.ingest import Ingest
from services.metering.models import bus_tables

PUBLISHES: tuple[type[EventPayload], ...] = (
    QuotaUpdated,
    QuotaDeleted,
    QuotaConsumed,
    QuotaWarning,
    QuotaExceeded,
    AuditRecorded,
)

log = logging.getLogger("steward.metering")


def control_handlers(settings: Settings, clock: Clock) -> dict[str, Handler]:
    async def on_request_approved(session: AsyncSession, event: CloudEvent) -> None:
        """An approved ``quota`` request sets the quota (idempotent: the inbox drops a
        redelivered event, and setting the same limit again changes only the revision)."""
        approved = RequestApproved.model_validate(event.data)
        if approved.kind != "quota":
            return
        uow = UnitOfWork(session, Outbox(bus_tables.outbox, "metering"), actor=approved.decided_by)
        quota = await domain.apply_approved_quota(uow, settings, approved, clock())
        log.info(
            "quota set by an approved request",
            extra={"request_id": approved.request_id, "quota_id": quota.id},
        )

    return {RequestApproved.subject: on_request_approved}


def usage_handlers(ingest: Ingest) -> dict[str, BatchHandler]:
    return {UsageRecorded.subject: ingest}
