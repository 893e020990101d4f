"""All SQL of the approval service. Which requests a principal may see is decided here, once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.auth import Principal
from libs.common.errors import BadRequest, NotFound
from services.approval.models import AuditHead, AuditRecord, Comment, Policy, Request

# -- requests ---------------------------------------------------------------------------------


def visible(query: Select[Request], principal: Principal) -> Select[Request]:
    """Tenant filter: platform-admins see every request, others those of their projects."""
    if principal.platform_admin:
        return query
    return query.where(Request.project.in_(list(principal.project_roles)))


async def request_for(
    session: AsyncSession, principal: Principal, request_id: str, *, for_update: bool = False
) -> Request:
    """A request the principal may see; any other reads as absent (no hint that it exists).
    ``for_update`` locks its row (PostgreSQL; SQLite has one writer) so a decision is taken on
    the last committed status: approve, reject, withdraw and expiry racing end in one decision,
    and the others see it (409)."""
    query = visible(select(Request), principal).where(Request.id == request_id)
    found = await session.scalar(query.with_for_update(of=Request) if for_update else query)
    if found is None:
        raise NotFound(f"no request {request_id!r} here")
    return found


async def pending_duplicate(
    session: AsyncSession,
    kind: str,
    project: str | None,
    asset_kind: str,
    asset_name: str,
    asset_version: str | None,
) -> Request | None:
    query = select(Request).where(
        Request.status == "pending",
        Request.kind == kind,
        Request.asset_kind == asset_kind,
        Request.asset_name == asset_name,
    )
    if project is not None:
        query = query.where(Request.project == project)
    if asset_version is not None:
        query = query.where(Request.asset_version == asset_version)
    return await session.scalar(query.limit(1))


async def recently_rejected(session: AsyncSession, project: str, since: datetime) -> int:
    count = await session.scalar(
        select(func.count())
        .select_from(Request)
        .where(
            Request.project == project,
            Request.status == "rejected",
            Request.decided_at >= since,
        )
    )
    return int(count or 0)


@dataclass(frozen=True)
class RequestFilters:
    status: Sequence[str] = ()
    kind: Sequence[str] = ()
    project: str | None = None
    requester: str | None = None
    overdue: bool | None = None


async def list_requests(
    session: AsyncSession,
    principal: Principal,
    filters: RequestFilters,
    *,
    newest_first: bool,
    cursor: str | None,
    limit: int,
    now: datetime,
) -> Sequence[Request]:
    """Requests by age (ids are time-ordered); ``limit + 1`` rows tell whether more follow.
    ``overdue`` is judged at ``now`` (as ``domain.overdue`` does)."""
    query = visible(select(Request), principal)
    if filters.status:
        query = query.where(Request.status.in_(list(filters.status)))
    if filters.kind:
        query = query.where(Request.kind.in_(list(filters.kind)))
    if filters.project:
        query = query.where(Request.project == filters.project)
    if filters.requester:
        query = query.where(Request.requester == filters.requester)
    if filters.overdue is True:
        query = query.where(Request.status == "pending", Request.due_at < now)
    elif filters.overdue is False:
        query = query.where(or_(Request.status != "pending", Request.due_at >= now))
    if cursor:
        query = query.where(Request.id < cursor if newest_first else Request.id > cursor)
    order = Request.id.desc() if newest_first else Request.id.asc()
    return (await session.scalars(query.order_by(order).limit(limit + 1))).all()


async def expiring(session: AsyncSession, now: datetime, limit: int = 500) -> Sequence[Request]:
    query = (
        select(Request)
        .where(Request.status == "pending", Request.expires_at <= now)
        .order_by(Request.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return (await session.scalars(query)).all()


async def for_stats(
    session: AsyncSession, principal: Principal, since: datetime
) -> Sequence[Request]:
    query = visible(select(Request), principal).where(
        or_(Request.status == "pending", Request.decided_at >= since)
    )
    return (await session.scalars(query)).all()


async def comments_of(session: AsyncSession, request: Request) -> Sequence[Comment]:
    query = select(Comment).where(Comment.request_id == request.id).order_by(Comment.id)
    return (await session.scalars(query)).all()


# -- policies ---------------------------------------------------------------------------------


async def policies(session: AsyncSession, kind: str | None = None) -> Sequence[Policy]:
    query = select(Policy).order_by(Policy.name)
    if kind is not None:
        query = query.where(Policy.kind == kind)
    return (await session.scalars(query)).all()


async def policy(session: AsyncSession, name: str) -> Policy | None:
    return await session.get(Policy, name)


# -- audit ------------------------------------------------------------------------------------


async def lock_audit_head(session: AsyncSession) -> AuditHead | None:
    return await session.scalar(select(AuditHead).where(AuditHead.id == 1).with_for_update())


async def audit_head(session: AsyncSession) -> AuditHead | None:
    return await session.scalar(select(AuditHead).where(AuditHead.id == 1))


async def audit_record(session: AsyncSession, seq: int) -> AuditRecord | None:
    return await session.get(AuditRecord, seq)


async def audit_batch(session: AsyncSession, after_seq: int, limit: int) -> Sequence[AuditRecord]:
    query = (
        select(AuditRecord)
        .where(AuditRecord.seq > after_seq)
        .order_by(AuditRecord.seq)
        .limit(limit)
    )
    return (await session.scalars(query)).all()


@dataclass(frozen=True)
class AuditFilters:
    service: str | None = None
    actor: str | None = None
    action: str | None = None
    project: str | None = None
    target_prefix: str | None = None
    since: datetime | None = None
    until: datetime | None = None


async def audit_page(
    session: AsyncSession,
    filters: AuditFilters,
    *,
    newest_first: bool,
    cursor: int | None,
    limit: int,
) -> Sequence[AuditRecord]:
    query = select(AuditRecord)
    conditions = []
    if filters.service:
        conditions.append(AuditRecord.service == filters.service)
    if filters.actor:
        conditions.append(AuditRecord.actor == filters.actor)
    if filters.action:
        conditions.append(AuditRecord.action == filters.action)
    if filters.project:
        conditions.append(AuditRecord.project == filters.project)
    if filters.target_prefix:
        escaped = filters.target_prefix.replace("\\", "\\\\").replace("%", "\\%")
        escaped = escaped.replace("_", "\\_")
        conditions.append(AuditRecord.target.like(f"{escaped}%", escape="\\"))
    if filters.since:
        conditions.append(AuditRecord.at >= filters.since)
    if filters.until:
        conditions.append(AuditRecord.at < filters.until)
    if cursor is not None:
        conditions.append(AuditRecord.seq < cursor if newest_first else AuditRecord.seq > cursor)
    if conditions:
        query = query.where(and_(*conditions))
    order = AuditRecord.seq.desc() if newest_first else AuditRecord.seq.asc()
    return (await session.scalars(query.order_by(order).limit(limit + 1))).all()


def parse_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    if not cursor.isdigit():
        raise BadRequest("invalid cursor; pass back next_cursor unchanged")
    return int(cursor)


async def overdue_by_kind(session: AsyncSession, now: datetime) -> dict[str, int]:
    """Pending requests past their due date at ``now``, by kind."""
    query = (
        select(Request.kind, func.count())
        .where(Request.status == "pending", Request.due_at < now)
        .group_by(Request.kind)
    )
    return {kind: int(n) for kind, n in await session.execute(query)}


async def decided_between(
    session: AsyncSession, start: datetime, end: datetime
) -> Sequence[Request]:
    """Requests decided (approved, rejected, expired, withdrawn) in ``[start, end)``."""
    query = (
        select(Request)
        .where(Request.decided_at >= start, Request.decided_at < end)
        .order_by(Request.decided_at, Request.id)
    )
    return (await session.scalars(query)).all()


async def open_at(session: AsyncSession, end: datetime) -> Sequence[Request]:
    """Requests filed before ``end`` and not decided by then."""
    query = (
        select(Request)
        .where(
            Request.created_at < end,
            or_(Request.decided_at.is_(None), Request.decided_at >= end),
        )
        .order_by(Request.created_at, Request.id)
    )
    return (await session.scalars(query)).all()


async def audit_between(
    session: AsyncSession, start: datetime, end: datetime, limit: int
) -> Sequence[AuditRecord]:
    """Audit records of ``[start, end)`` in chain order, at most ``limit``."""
    query = (
        select(AuditRecord)
        .where(AuditRecord.at >= start, AuditRecord.at < end)
        .order_by(AuditRecord.seq)
        .limit(limit)
    )
    return (await session.scalars(query)).all()
