"""What authz publishes, and the events it handles (an explicit map)."""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.consumer import Handler
from libs.common.events import CloudEvent, EventPayload
from libs.common.events.approval import AccessPayload, RequestApproved
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
from libs.common.events.usage import KeysUsed
from libs.common.outbox import Outbox
from libs.common.uow import UnitOfWork
from services.authz import domain
from services.authz import repository as repo
from services.authz.models import bus_tables

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

log = logging.getLogger("steward.authz")


async def on_request_approved(session: AsyncSession, event: CloudEvent) -> None:
    """An approved ``access`` request grants the project's entitlement (idempotently: the
    inbox drops a redelivered event, and granting what is granted changes nothing)."""
    approved = RequestApproved.model_validate(event.data)
    if approved.kind != "access":
        return
    access = AccessPayload.model_validate(approved.payload)
    if not await repo.project_exists(session, approved.project):
        log.warning(
            "access approved for a project that no longer exists",
            extra={"request_id": approved.request_id, "project": approved.project},
        )
        return
    project = await repo.project_by_name(session, approved.project)
    uow = UnitOfWork(session, Outbox(bus_tables.outbox, "authz"), actor=approved.decided_by)
    await domain.grant_entitlement(
        uow,
        project,
        access.asset_kind,
        access.asset_name,
        f"access request {approved.request_id}",
        domain.ToolLimits(tool_access=access.tool_access, tools=access.tools),
    )


async def on_keys_used(session: AsyncSession, event: CloudEvent) -> None:
    """A gateway's report of the keys it let through: their ``last_used_at`` moves forward
    (never back: reports of several gateways arrive in any order)."""
    used = KeysUsed.model_validate(event.data)
    await repo.mark_used(session, used.key_ids, used.at)


HANDLERS: dict[str, Handler] = {
    RequestApproved.subject: on_request_approved,
    KeysUsed.subject: on_keys_used,
}
