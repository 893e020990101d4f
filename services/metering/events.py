"""What metering publishes, and the events it handles (explicit maps).

Two consumers: usage events arrive by thousands per second on their own stream and are applied
a batch per transaction (``Ingest``); control-plane events one by one: approved quota requests
(applied), approved endpoint requests (their cost plans kept) and ``inference.endpoint.*`` (the
GPU-hours of dedicated endpoints). The handlers need the service's settings and clock, so the
maps are built in the lifespan by ``control_handlers``/``usage_handlers`` rather than declared
on the ``ServiceSpec``.
"""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.consumer import BatchHandler, Handler
from libs.common.db import Clock
from libs.common.events import CloudEvent, EventPayload
from libs.common.events.approval import RequestApproved
from libs.common.events.audit import AuditRecorded
from libs.common.events.inference import EVENTS_BY_STATUS, EndpointState
from libs.common.events.metering import (
    EndpointOverPlan,
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
from services.metering import domain, endpoints
from services.metering.ingest import Ingest
from services.metering.models import bus_tables

PUBLISHES: tuple[type[EventPayload], ...] = (
    EndpointOverPlan,
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
        if approved.kind == "endpoint":
            await endpoints.record_plan(session, approved)
            return
        if approved.kind != "quota":
            return
        uow = UnitOfWork(session, Outbox(bus_tables.outbox, "metering"), actor=approved.decided_by)
        quota = await domain.apply_approved_quota(uow, settings, approved, clock())
        log.info(
            "quota set by an approved request",
            extra={"request_id": approved.request_id, "quota_id": quota.id},
        )

    async def on_endpoint(session: AsyncSession, event: CloudEvent) -> None:
        """Follow an endpoint's GPUs, then hold it to its plan as of the event's time: events
        replayed after an outage must not judge an old state by today's clock (``PlanWatch``
        judges the present)."""
        state = EndpointState.model_validate(event.data)
        await endpoints.apply_endpoint_event(session, state, event.time)
        uow = UnitOfWork(
            session, Outbox(bus_tables.outbox, "metering"), actor=endpoints.SYSTEM_ACTOR
        )
        as_of = min(event.time, clock())
        await endpoints.check_over_plan(uow, settings, as_of, [state.endpoint_id])

    return {
        RequestApproved.subject: on_request_approved,
        **{e.subject: on_endpoint for e in EVENTS_BY_STATUS.values()},
    }


def usage_handlers(ingest: Ingest) -> dict[str, BatchHandler]:
    return {UsageRecorded.subject: ingest}
