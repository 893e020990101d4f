"""All SQL of the inference service. Tenant filtering lives here, keyed by the principal."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import Select, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.auth import Principal
from libs.common.errors import NotFound
from libs.common.events.inference import HOLDS_GPUS
from services.inference.models import LIVE, Endpoint, RevokedVersion

# Statuses the reconciler acts on: running ones, deleting ones, and failed or stopped ones
# whose runtime is still to clean.
_ACTIVE = ("provisioning", "ready", "deleting")
_TO_RELEASE = ("failed", "stopped")


async def endpoint_in(
    session: AsyncSession, project: str, endpoint_id: str, *, for_update: bool = False
) -> Endpoint:
    """An endpoint of this project; another project's reads as absent (no hint it exists).

    ``for_update`` locks the row (PostgreSQL) so a change does not overwrite what the
    reconciler committed meanwhile."""
    query = select(Endpoint).where(Endpoint.id == endpoint_id, Endpoint.project == project)
    found = await session.scalar(query.with_for_update() if for_update else query)
    if found is None:
        raise NotFound(f"project {project!r} has no endpoint {endpoint_id!r}")
    return found


async def endpoint_for_update(session: AsyncSession, endpoint_id: str) -> Endpoint | None:
    return await session.scalar(
        select(Endpoint).where(Endpoint.id == endpoint_id).with_for_update()
    )


async def endpoints_of(
    session: AsyncSession, project: str, *, include_deleted: bool = False
) -> Sequence[Endpoint]:
    query = select(Endpoint).where(Endpoint.project == project)
    if not include_deleted:
        query = query.where(Endpoint.status != "deleted")
    return (await session.scalars(query.order_by(Endpoint.created_at, Endpoint.id))).all()


async def by_request(session: AsyncSession, request_id: str) -> Endpoint | None:
    return await session.scalar(select(Endpoint).where(Endpoint.request_id == request_id))


async def live_route_taken(session: AsyncSession, route_name: str) -> bool:
    found = await session.scalar(
        select(Endpoint.id).where(Endpoint.route_name == route_name, Endpoint.status.in_(LIVE))
    )
    return found is not None


async def live_of_version(
    session: AsyncSession,
    kind: str,
    asset_name: str,
    version: str | None,
    project: str | None = None,
) -> Sequence[Endpoint]:
    """Endpoints still holding a route or resources for a version (or any version)."""
    query = select(Endpoint).where(
        Endpoint.asset_kind == kind,
        Endpoint.asset_name == asset_name,
        Endpoint.status.in_(("provisioning", "ready", "stopped", "failed")),
    )
    if version is not None:
        query = query.where(Endpoint.version == version)
    if project is not None:
        query = query.where(Endpoint.project == project)
    return (await session.scalars(query.order_by(Endpoint.id).with_for_update())).all()


async def routes(session: AsyncSession) -> Sequence[Endpoint]:
    query = select(Endpoint).where(Endpoint.status == "ready").order_by(Endpoint.route_name)
    return (await session.scalars(query)).all()


async def to_reconcile(session: AsyncSession) -> Sequence[Endpoint]:
    query = select(Endpoint).where(
        Endpoint.status.in_(_ACTIVE)
        | (Endpoint.status.in_(_TO_RELEASE) & Endpoint.released.is_(False))
    )
    return (await session.scalars(query.order_by(Endpoint.id))).all()


@dataclass
class PoolUsage:
    by_type: dict[str, int] = field(default_factory=dict)
    by_project: dict[str, dict[str, int]] = field(default_factory=dict)

    def project_total(self, project: str) -> int:
        return sum(self.by_project.get(project, {}).values())


async def lock_pool(session: AsyncSession) -> None:
    """Serialise capacity decisions across replicas (PostgreSQL; SQLite has one writer)."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(8104)"))


async def pool_usage(session: AsyncSession) -> PoolUsage:
    """GPUs held by live endpoints, by type and by project."""
    held = func.sum(Endpoint.gpus * Endpoint.replicas)
    rows = await session.execute(
        select(Endpoint.project, Endpoint.gpu_type, held)
        .where(Endpoint.status.in_(HOLDS_GPUS), Endpoint.gpu_type.is_not(None), Endpoint.gpus > 0)
        .group_by(Endpoint.project, Endpoint.gpu_type)
    )
    usage = PoolUsage()
    for project, gpu_type, count in rows.all():
        gpu_type = str(gpu_type)
        usage.by_type[gpu_type] = usage.by_type.get(gpu_type, 0) + int(count)
        usage.by_project.setdefault(project, {})[gpu_type] = int(count)
    return usage


def _visible(query: Select[Endpoint], principal: Principal) -> Select[Endpoint]:
    if principal.platform_admin:
        return query
    return query.where(Endpoint.project.in_(list(principal.project_roles)))


async def ready_once(session: AsyncSession, principal: Principal) -> Sequence[Endpoint]:
    """Endpoints that reached ready at least once, among those the principal may see."""
    query = select(Endpoint).where(Endpoint.ready_at.is_not(None))
    return (await session.scalars(_visible(query, principal))).all()


async def is_revoked(session: AsyncSession, asset_name: str, version: str) -> bool:
    found = await session.scalar(
        select(RevokedVersion.version).where(
            RevokedVersion.asset_name == asset_name, RevokedVersion.version == version
        )
    )
    return found is not None


async def remember_revoked(session: AsyncSession, asset_name: str, version: str) -> None:
    if not await is_revoked(session, asset_name, version):
        session.add(RevokedVersion(asset_name=asset_name, version=version))
        await session.flush()
