"""All SQL of the catalog service.

The catalog is one shared list for every project (what a project may *use* is authz's
entitlement), so reads need no tenant filter; writes are platform-admin only (``catalog.write``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Select, and_, delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.errors import BadRequest, NotFound
from services.catalog.models import Asset, Version, VersionTag

Row = tuple[Version, Asset]


async def asset_by_key(session: AsyncSession, kind: str, name: str) -> Asset | None:
    return await session.scalar(select(Asset).where(Asset.kind == kind, Asset.name == name))


async def version_of(session: AsyncSession, asset: Asset, version: str) -> Version | None:
    return await session.scalar(
        select(Version).where(Version.asset_id == asset.id, Version.version == version)
    )


async def version_by_key(session: AsyncSession, kind: str, name: str, version: str) -> Row | None:
    row = (
        await session.execute(
            _rows().where(Asset.kind == kind, Asset.name == name, Version.version == version)
        )
    ).first()
    return (row[0], row[1]) if row else None


async def version_by_id(session: AsyncSession, version_id: str) -> Row:
    row = (await session.execute(_rows().where(Version.id == version_id))).first()
    if row is None:
        raise NotFound(f"no catalog version {version_id!r}")
    return row[0], row[1]


async def lock_status(session: AsyncSession, version: Version) -> None:
    """Re-read ``version``'s status under a row lock (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite
    has a single writer): a transition then decides on the last committed status, and a concurrent
    one waits for this transaction instead of overwriting it (revoked is never lost)."""
    await session.refresh(version, attribute_names=_STATUS, with_for_update=True)


_STATUS = ["status", "status_changed_at", "status_reason", "request_id"]


async def versions_of(session: AsyncSession, asset: Asset) -> Sequence[Version]:
    query = select(Version).where(Version.asset_id == asset.id).order_by(Version.id)
    return (await session.scalars(query)).all()


async def set_tags(session: AsyncSession, version: Version, tags: Sequence[str]) -> None:
    await session.execute(delete(VersionTag).where(VersionTag.version_id == version.id))
    session.add_all(VersionTag(version_id=version.id, tag=t) for t in tags)


def _rows() -> Select[Version, Asset]:
    return select(Version, Asset).join(Asset, Asset.id == Version.asset_id)


@dataclass(frozen=True)
class Filters:
    kind: str | None = None
    status: Sequence[str] = ()
    tag: Sequence[str] = ()
    provider: str | None = None
    text: str | None = None


def _like(text: str) -> str:
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def encode_cursor(version: Version, asset: Asset) -> str:
    return base64.urlsafe_b64encode(f"{asset.name}\x00{version.id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        name, _, version_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("\x00")
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise BadRequest("invalid cursor; pass back next_cursor unchanged") from exc
    if not version_id:
        raise BadRequest("invalid cursor; pass back next_cursor unchanged")
    return name, version_id


async def search(
    session: AsyncSession, filters: Filters, cursor: str | None, limit: int
) -> Sequence[Row]:
    """Versions matching every filter, by asset name then age; ``limit + 1`` rows tell the
    caller whether another page follows."""
    query = _rows()
    if filters.kind:
        query = query.where(Asset.kind == filters.kind)
    if filters.status:
        query = query.where(Version.status.in_(list(filters.status)))
    for tag in filters.tag:
        query = query.where(
            select(VersionTag.tag)
            .where(VersionTag.version_id == Version.id, VersionTag.tag == tag.lower())
            .exists()
        )
    if filters.provider:
        query = query.where(func.lower(Version.provider) == filters.provider.lower())
    if filters.text:
        pattern = _like(filters.text)
        query = query.where(
            or_(
                func.lower(Asset.name).like(pattern, escape="\\"),
                func.lower(Version.description).like(pattern, escape="\\"),
                func.lower(Version.provider).like(pattern, escape="\\"),
            )
        )
    if cursor:
        name, version_id = _decode_cursor(cursor)
        query = query.where(
            or_(Asset.name > name, and_(Asset.name == name, Version.id > version_id))
        )
    query = query.order_by(Asset.name, Version.id).limit(limit + 1)
    return [(v, a) for v, a in (await session.execute(query)).all()]


async def approved(session: AsyncSession) -> Sequence[Row]:
    query = _rows().where(Version.status == "approved").order_by(Asset.name, Version.id)
    return [(v, a) for v, a in (await session.execute(query)).all()]
