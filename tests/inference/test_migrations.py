"""Inference's migrations run on SQLite (the embedded default) as on PostgreSQL, both ways, and
the constraints that keep provisioning idempotent hold on both engines."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.db import make_engine, make_sessionmaker, utcnow
from libs.common.migrate import upgrade_async
from libs.common.settings import Settings
from services.inference.models import Endpoint


def _endpoint(route: str, status: str = "ready", request_id: str | None = None) -> Endpoint:
    now = utcnow()
    return Endpoint(
        project="p",
        asset_name="m",
        version="1",
        runtime="local",
        replicas=1,
        gpus=0,
        served_model_name="m",
        route_name=route,
        status=status,
        reason="",
        runtime_name="ep-x",
        owner="o",
        request_id=request_id,
        requested_at=now,
        approved_at=now,
    )


async def _constraints_hold(sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    """Inside one transaction that is rolled back (on the shared test database the running
    service must never see these rows), each refused insert in its own savepoint."""
    async with sessionmaker() as session, session.begin():
        session.add(_endpoint("t/route", "deleted"))
        session.add(_endpoint("t/route", "ready"))  # a deleted one frees the name
        await session.flush()
        with pytest.raises(IntegrityError):
            async with session.begin_nested():
                session.add(_endpoint("t/route", "provisioning"))  # two live: refused
        session.add(_endpoint("t/a", request_id="t-request"))
        await session.flush()
        with pytest.raises(IntegrityError):
            async with session.begin_nested():
                session.add(_endpoint("t/b", request_id="t-request"))  # one per approval
        await session.rollback()


async def test_migrations_run_both_ways_on_sqlite(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/{{service}}.db")
    await upgrade_async("inference", settings)
    await upgrade_async("inference", settings, "base")
    await upgrade_async("inference", settings)
    engine = make_engine(settings.database_url_for("inference"), "inference")
    try:
        await _constraints_hold(make_sessionmaker(engine))
    finally:
        await engine.dispose()


async def test_the_same_constraints_hold_on_postgresql(inference_settings: Settings) -> None:
    engine = make_engine(inference_settings.database_url_for("inference"), "inference")
    try:
        await _constraints_hold(make_sessionmaker(engine))
    finally:
        await engine.dispose()
