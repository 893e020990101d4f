"""What inference publishes, and the events it handles (an explicit map)."""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.consumer import Handler
from libs.common.events import CloudEvent, EventPayload
from libs.common.events.approval import RequestApproved
from libs.common.events.audit import AuditRecorded
from libs.common.events.authz import EntitlementRevoked
from libs.common.events.catalog import VersionRevoked
from libs.common.events.inference import (
    EndpointDeleted,
    EndpointDeleting,
    EndpointFailed,
    EndpointProvisioning,
    EndpointReady,
    EndpointStopped,
)
from libs.common.outbox import Outbox
from libs.common.uow import UnitOfWork
from services.inference import domain
from services.inference.models import bus_tables
from services.inference.plane import PlaneRef

PUBLISHES: tuple[type[EventPayload], ...] = (
    EndpointProvisioning,
    EndpointReady,
    EndpointFailed,
    EndpointStopped,
    EndpointDeleting,
    EndpointDeleted,
    AuditRecorded,
)

log = logging.getLogger("steward.inference")
_outbox = Outbox(bus_tables.outbox, "inference")


def make_handlers(ref: PlaneRef) -> dict[str, Handler]:
    """The handler map; each writes its effect with the inbox row (the consumer's transaction)."""

    async def on_request_approved(session: AsyncSession, event: CloudEvent) -> None:
        """An approved ``endpoint`` request provisions, once: the inbox drops a redelivered
        event, and the unique request id drops a re-sent decision under a new event id."""
        approved = RequestApproved.model_validate(event.data)
        if approved.kind != "endpoint":
            return
        plane = ref.get()
        uow = UnitOfWork(session, _outbox, actor=approved.decided_by)
        endpoint = await domain.provision_approved(
            uow, plane.pool, approved, plane.service_lookup(), plane.config.profile_for
        )
        if endpoint is not None:
            log.info(
                "endpoint from approval",
                extra={"request_id": approved.request_id, "endpoint_id": endpoint.id},
            )
        plane.reconciler.wake_on_commit(session)

    async def on_version_revoked(session: AsyncSession, event: CloudEvent) -> None:
        """A revoked version (a model's, an MCP server's) is torn down everywhere it runs."""
        revoked = VersionRevoked.model_validate(event.data)
        uow = UnitOfWork(session, _outbox, actor=domain.SYSTEM)
        await domain.on_version_revoked(
            uow, revoked.asset_kind, revoked.asset_name, revoked.version
        )
        ref.get().reconciler.wake_on_commit(session)

    async def on_entitlement_revoked(session: AsyncSession, event: CloudEvent) -> None:
        """A project that may no longer use a model (or MCP server) loses its endpoints of it."""
        revoked = EntitlementRevoked.model_validate(event.data)
        uow = UnitOfWork(session, _outbox, actor=domain.SYSTEM)
        await domain.on_entitlement_revoked(
            uow, revoked.project, revoked.asset_kind, revoked.asset_name
        )
        ref.get().reconciler.wake_on_commit(session)

    return {
        RequestApproved.subject: on_request_approved,
        VersionRevoked.subject: on_version_revoked,
        EntitlementRevoked.subject: on_entitlement_revoked,
    }
