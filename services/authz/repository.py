"""All SQL of the authz service. Tenant filtering for lists lives here, keyed by the principal."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import Select, event, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from libs.common.auth import Principal, Role
from libs.common.errors import NotFound
from services.authz.models import (
    ApiKey,
    Entitlement,
    Member,
    PlatformAdmin,
    Project,
    ReplicaRevision,
)


async def project_by_name(session: AsyncSession, name: str) -> Project:
    project = await session.scalar(select(Project).where(Project.name == name))
    if project is None:
        raise NotFound(f"project {name!r} does not exist")
    return project


async def project_exists(session: AsyncSession, name: str) -> bool:
    return await session.scalar(select(Project.id).where(Project.name == name)) is not None


async def visible_projects(session: AsyncSession, principal: Principal) -> Sequence[Project]:
    query = select(Project).order_by(Project.name)
    if not principal.platform_admin:
        query = query.where(Project.name.in_(list(principal.project_roles)))
    return (await session.scalars(query)).all()


async def members(session: AsyncSession, project: Project) -> Sequence[Member]:
    query = select(Member).where(Member.project_id == project.id).order_by(Member.subject)
    return (await session.scalars(query)).all()


async def member(session: AsyncSession, project: Project, subject: str) -> Member | None:
    return await session.scalar(
        select(Member).where(Member.project_id == project.id, Member.subject == subject)
    )


async def roles_of(session: AsyncSession, subject: str) -> dict[str, Role]:
    rows = await session.execute(
        select(Project.name, Member.role)
        .join(Member, Member.project_id == Project.id)
        .where(Member.subject == subject)
    )
    return {name: Role(role) for name, role in rows.all()}


async def is_platform_admin(session: AsyncSession, subject: str) -> bool:
    found = await session.scalar(
        select(PlatformAdmin.subject).where(PlatformAdmin.subject == subject)
    )
    return found is not None


async def any_platform_admin(session: AsyncSession) -> bool:
    return await session.scalar(select(PlatformAdmin.subject).limit(1)) is not None


def _keys() -> Select[ApiKey, str]:
    return select(ApiKey, Project.name).outerjoin(Project, Project.id == ApiKey.project_id)


async def key_with_project(
    session: AsyncSession, key_id: str, *, for_update: bool = False
) -> tuple[ApiKey, str | None] | None:
    """``for_update`` locks the key's row (PostgreSQL; SQLite has one writer): a revoke and a
    rotate of one key then run one after the other, the second seeing what the first did."""
    query = _keys().where(ApiKey.id == key_id)
    if for_update:
        query = query.with_for_update(of=ApiKey).execution_options(populate_existing=True)
    row = (await session.execute(query)).first()
    return (row[0], row[1]) if row is not None else None


async def lock_platform_keys(session: AsyncSession) -> Sequence[ApiKey]:
    """Every platform key, locked in id order: changes to platform keys run one at a time, so
    two admins revoking each other's last keys cannot both see the other's as still active
    (and, all locked in one order, they cannot deadlock)."""
    query = (
        select(ApiKey)
        .where(ApiKey.project_id.is_(None))
        .order_by(ApiKey.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return (await session.scalars(query)).all()


async def keys_in(
    session: AsyncSession, project: Project | None, owner: str | None = None
) -> Sequence[ApiKey]:
    """Keys of one project (or the platform keys for None), optionally of one owner."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if project is None:
        query = query.where(ApiKey.project_id.is_(None))
    else:
        query = query.where(ApiKey.project_id == project.id)
    if owner is not None:
        query = query.where(ApiKey.owner == owner)
    return (await session.scalars(query)).all()


async def active_keys(session: AsyncSession, now: datetime) -> Sequence[tuple[ApiKey, str | None]]:
    """Keys neither revoked nor expired at ``now``."""
    query = _keys().where(
        ApiKey.revoked_at.is_(None),
        (ApiKey.expires_at.is_(None)) | (ApiKey.expires_at > now),
    )
    return [(k, p) for k, p in (await session.execute(query)).all()]


async def entitlements_of(session: AsyncSession, project: Project) -> Sequence[Entitlement]:
    query = (
        select(Entitlement)
        .where(Entitlement.project_id == project.id)
        .order_by(Entitlement.asset_kind, Entitlement.asset_name)
    )
    return (await session.scalars(query)).all()


async def entitlement(
    session: AsyncSession, project: Project, kind: str, name: str, *, for_update: bool = False
) -> Entitlement | None:
    """``for_update`` locks the grant's row (PostgreSQL; SQLite has one writer): two changes of
    what it covers are decided one after the other, never merged column by column."""
    query = select(Entitlement).where(
        Entitlement.project_id == project.id,
        Entitlement.asset_kind == kind,
        Entitlement.asset_name == name,
    )
    if for_update:
        query = query.with_for_update().execution_options(populate_existing=True)
    return await session.scalar(query)


async def all_entitlements(session: AsyncSession) -> Sequence[tuple[Entitlement, str]]:
    query = select(Entitlement, Project.name).join(Project, Project.id == Entitlement.project_id)
    return [(e, p) for e, p in (await session.execute(query)).all()]


async def touch_keys(
    sessionmaker: async_sessionmaker[AsyncSession], last_used: Iterable[tuple[str, datetime]]
) -> None:
    """Batch-record when keys were last used (only ever moves the time forward). Rows in id
    order, the order ``lock_platform_keys`` takes them in: the two never deadlock."""
    async with sessionmaker() as session, session.begin():
        for key_id, at in sorted(last_used):
            await session.execute(
                update(ApiKey)
                .where(
                    ApiKey.id == key_id,
                    (ApiKey.last_used_at.is_(None)) | (ApiKey.last_used_at < at),
                )
                .values(last_used_at=at)
            )


# -- the replica revision ---------------------------------------------------------------------

_REVISES = "steward.authz.revises_replica"


async def replica_revision(session: AsyncSession) -> int:
    revision = await session.scalar(select(ReplicaRevision.revision).where(ReplicaRevision.id == 1))
    return revision or 0


def _advance(session: Session) -> None:
    session.info.pop(_REVISES, None)
    advanced = session.execute(
        update(ReplicaRevision)
        .where(ReplicaRevision.id == 1)
        .values(revision=ReplicaRevision.revision + 1)
    )
    if advanced.rowcount == 0:  # type: ignore[attr-defined]  # a database made without 0003
        session.execute(insert(ReplicaRevision).values(id=1, revision=1))


def advance_replica_revision_at_commit(session: AsyncSession) -> None:
    """Advance the revision once, as this transaction commits. Last, so the counter's row lock
    is the last lock taken and held for no more than the commit (no lock-order deadlock with
    the key rows), and atomic with the change: a reader who saw revision N before a change
    commits sees N + 1 after it."""
    if session.info.get(_REVISES):
        return
    session.info[_REVISES] = True
    event.listen(session.sync_session, "before_commit", _advance, once=True)


async def mark_used(session: AsyncSession, key_ids: Sequence[str], at: datetime) -> None:
    """Set ``last_used_at`` of these keys to ``at`` where it is earlier (or unset)."""
    if not key_ids:
        return
    await session.execute(
        update(ApiKey)
        .where(
            ApiKey.id.in_(list(key_ids)),
            or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < at),
        )
        .values(last_used_at=at)
    )
