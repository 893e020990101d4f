"""What the catalog publishes, and the approval events it handles (asset requests only)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.consumer import Handler
from libs.common.events import CloudEvent, EventPayload
from libs.common.events.approval import (
    RequestApproved,
    RequestCreated,
    RequestDecided,
    RequestExpired,
    RequestRejected,
    RequestWithdrawn,
)
from libs.common.events.audit import AuditRecorded
from libs.common.events.catalog import (
    VersionApproved,
    VersionDeprecated,
    VersionRevoked,
    VersionSubmitted,
)
from libs.common.outbox import Outbox
from libs.common.uow import UnitOfWork
from services.catalog import domain
from services.catalog.models import bus_tables

PUBLISHES: tuple[type[EventPayload], ...] = (
    VersionSubmitted,
    VersionApproved,
    VersionDeprecated,
    VersionRevoked,
    AuditRecorded,
)

_outbox = Outbox(bus_tables.outbox, "catalog")


async def on_request_created(session: AsyncSession, event: CloudEvent) -> None:
    request = RequestCreated.model_validate(event.data)
    if request.kind == "asset":
        uow = UnitOfWork(session, _outbox, actor=request.requester)
        await domain.on_asset_requested(uow, request)


async def on_request_approved(session: AsyncSession, event: CloudEvent) -> None:
    request = RequestApproved.model_validate(event.data)
    if request.kind == "asset":
        uow = UnitOfWork(session, _outbox, actor=request.decided_by)
        await domain.on_asset_approved(uow, request)


async def on_request_closed(session: AsyncSession, event: CloudEvent) -> None:
    payload = event.payload()
    assert isinstance(payload, RequestDecided)
    if payload.kind == "asset":
        uow = UnitOfWork(session, _outbox, actor=payload.decided_by)
        await domain.on_asset_closed(uow, payload)


HANDLERS: dict[str, Handler] = {
    RequestCreated.subject: on_request_created,
    RequestApproved.subject: on_request_approved,
    RequestRejected.subject: on_request_closed,
    RequestWithdrawn.subject: on_request_closed,
    RequestExpired.subject: on_request_closed,
}
