"""Leadership among replicas on real PostgreSQL: one holder at a time, however many race for it;
a leader that dies (its session ends) is replaced at the next try; a clean stop hands over at
once; a replica cut from the database stops leading."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from libs.common.lease import Lease
from tests.helpers import unique


@pytest.fixture
async def engines(database_url: str) -> AsyncIterator[list[AsyncEngine]]:
    """Five replicas' engines on one database."""
    made = [create_async_engine(database_url) for _ in range(5)]
    yield made
    for engine in made:
        await engine.dispose()


async def test_one_of_racing_replicas_leads_and_a_dead_leader_is_replaced(
    engines: list[AsyncEngine],
) -> None:
    name = unique("loop")
    leases = [Lease(engine, name) for engine in engines]
    held = await asyncio.gather(*(lease.hold() for lease in leases))
    assert held.count(True) == 1
    leader = leases[held.index(True)]
    others = [lease for lease in leases if lease is not leader]
    assert not any(await asyncio.gather(*(lease.hold() for lease in others)))
    assert await leader.hold()  # it keeps it

    # The leader dies: its database session ends (as when its process or node goes).
    assert leader._connection is not None
    pid = await leader._connection.scalar(text("SELECT pg_backend_pid()"))
    async with engines[0].connect() as admin:
        await admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    taken = await asyncio.gather(*(lease.hold() for lease in others))
    assert taken.count(True) == 1
    successor = others[taken.index(True)]
    assert not await leader.hold()  # it knows it lost, and the successor keeps it

    # A clean stop hands over at once.
    await successor.release()
    assert await leader.hold()
    for lease in leases:
        await lease.release()


async def test_a_leader_cancelled_mid_statement_steps_down_cleanly(
    engines: list[AsyncEngine],
) -> None:
    """A shutdown that cancels the leader in the middle of a statement leaves its connection
    unusable; stepping down then drops it (its session ends, the lock with it)."""
    name = unique("cancelled")
    leader, other = Lease(engines[0], name), Lease(engines[1], name)
    assert await leader.hold()
    assert leader._connection is not None
    busy = asyncio.create_task(leader._connection.execute(text("SELECT pg_sleep(30)")))
    for _ in range(500):  # until the server runs it
        if await _running_sleep(engines[2]):
            break
        await asyncio.sleep(0.01)
    busy.cancel()
    await asyncio.gather(busy, return_exceptions=True)
    await leader.release()  # no error
    assert not leader.leading
    for _ in range(100):
        if await other.hold():
            break
        await asyncio.sleep(0.05)
    assert other.leading
    await other.release()


async def _running_sleep(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        found = await conn.scalar(
            text("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'")
        )
    return bool(found)


async def test_another_lease_name_is_another_leader(engines: list[AsyncEngine]) -> None:
    first, second = Lease(engines[0], unique("a")), Lease(engines[1], unique("b"))
    assert await first.hold() and await second.hold()
    await first.release()
    await second.release()


async def test_the_embedded_default_has_one_process_and_it_leads(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'one.db'}")
    try:
        assert await Lease(engine, "loop").hold()
    finally:
        await engine.dispose()
