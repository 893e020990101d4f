"""The outbox delivers each event exactly once, through a NATS outage; the inbox applies it once.

These tests use a database of their own (so the session's running services do not relay their
rows) and, for the outage, a private nats-server they can stop and start again.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy
from prometheus_client import REGISTRY
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.bus import Bus
from libs.common.consumer import Consumer
from libs.common.db import make_engine, make_sessionmaker, transaction
from libs.common.events import CloudEvent
from libs.common.events.authz import ProjectCreated
from libs.common.migrate import upgrade_async
from libs.common.outbox import Outbox
from libs.common.settings import Settings
from services.authz.models import Project, bus_tables
from tests.common.support import consumer_caught_up
from tests.helpers import NATS_URL, PG_ADMIN_DSN, NatsProcess, delete_streams


@pytest.fixture(scope="module")
async def sessionmaker(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    name = f"{database_url.rsplit('/', 1)[1]}_bus"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{database_url.rsplit('/', 1)[0]}/{name}"
    await upgrade_async("authz", Settings(database_url=url))
    engine = make_engine(url, "authz")
    try:
        yield make_sessionmaker(engine)
    finally:
        await engine.dispose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def messages(url: str, namespace: str, subject: str) -> list[bytes]:
    """Every message stored on ``subject`` in the events stream."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            f"{namespace}.{subject}",
            stream=f"{namespace}_EVENTS".upper(),
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        found: list[bytes] = []
        while True:
            try:
                batch = await sub.fetch(100, timeout=0.5)
            except TimeoutError:
                return found
            found.extend(m.data for m in batch)
    finally:
        await nc.close()


async def until(condition: object, seconds: float = 10.0) -> None:
    assert callable(condition)
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_an_event_written_while_nats_is_down_is_delivered_once_when_it_returns(
    sessionmaker: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    server = NatsProcess(tmp_path / "nats")
    await server.start()
    namespace = f"o{secrets.token_hex(3)}"
    bus = Bus(server.url, namespace, name="outbox-test")
    await bus.connect(wait=True)
    outbox = Outbox(bus_tables.outbox, "authz")
    relay = asyncio.create_task(outbox.run_relay(sessionmaker, bus, poll_seconds=0.1))
    try:
        await server.stop()
        await until(lambda: not bus.connected)

        async for session in transaction(sessionmaker):
            event = await outbox.add(session, ProjectCreated(project="p1", display_name="P1"))
        # The relay has been round since the commit (a round begun after it, and ended), and
        # could not publish: the event waits in the outbox.
        begun = outbox.rounds
        await until(lambda: outbox.rounds >= begun + 2)
        async with sessionmaker() as session:
            pending = await session.scalar(
                select(func.count()).where(bus_tables.outbox.c.published_at.is_(None))
            )
        assert pending == 1
        # The backlog, as the chart's alert reads it.
        assert await outbox.count_pending(sessionmaker) == 1
        assert REGISTRY.get_sample_value("steward_outbox_pending_events", {"service": "authz"}) == 1

        await server.start()  # same port, same store: the client reconnects by itself
        await bus.wait_ready(10)

        async def published() -> bool:
            async with sessionmaker() as session:
                row = await session.scalar(
                    select(bus_tables.outbox.c.published_at).where(
                        bus_tables.outbox.c.id == event.id
                    )
                )
            return row is not None

        for _ in range(200):
            if await published():
                break
            await asyncio.sleep(0.05)
        assert await published()
        assert await outbox.count_pending(sessionmaker) == 0
        assert REGISTRY.get_sample_value("steward_outbox_pending_events", {"service": "authz"}) == 0

        # Even a relay that re-sends (a crash between publish and mark) adds nothing.
        async for session in transaction(sessionmaker):
            await session.execute(
                bus_tables.outbox.update()
                .where(bus_tables.outbox.c.id == event.id)
                .values(published_at=None)
            )
        assert await outbox.relay_once(sessionmaker, bus) == 1

        stored = await messages(server.url, namespace, "authz.project.created")
        assert [CloudEvent.model_validate_json(m).id for m in stored] == [event.id]
        assert CloudEvent.model_validate_json(stored[0]).data["project"] == "p1"
    finally:
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
        await bus.close()
        await server.stop()


async def test_a_redelivered_event_changes_nothing(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    namespace = f"c{secrets.token_hex(3)}"
    bus = Bus(NATS_URL, namespace, name="inbox-test")
    await bus.connect(wait=True)
    applied: list[str] = []

    async def create_project(session: AsyncSession, event: CloudEvent) -> None:
        payload = event.payload()
        assert isinstance(payload, ProjectCreated)
        session.add(
            Project(name=payload.project, display_name=payload.display_name, created_by="t")
        )
        applied.append(event.id)

    consumer = Consumer(
        bus=bus,
        sessionmaker=sessionmaker,
        inbox=bus_tables.inbox,
        durable="inbox-test",
        handlers={ProjectCreated.subject: create_project},
    )
    running = asyncio.create_task(consumer.run())
    name = f"redelivered-{secrets.token_hex(3)}"
    event = CloudEvent.wrap(ProjectCreated(project=name, display_name=name), source="test")
    body = event.model_dump_json().encode()
    try:
        await bus.publish(ProjectCreated.subject, body, event.id)
        await until(lambda: len(applied) == 1)
        # The same event again under another message id, as a redelivery after a lost ack
        # or a replay would bring it: JetStream cannot de-duplicate it, the inbox must.
        await bus.publish(ProjectCreated.subject, body, f"{event.id}-again")
        # The copy delivered and acknowledged: whatever it was going to do, it has done.
        await consumer_caught_up(bus, "EVENTS", "inbox-test")
        assert await consumer.apply(event, create_project) is False
        async with sessionmaker() as session:
            count = await session.scalar(
                select(func.count()).select_from(Project).where(Project.name == name)
            )
        assert count == 1
        assert applied == [event.id]
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await bus.close()
        await delete_streams(namespace)


async def test_a_failing_handler_rolls_back_its_inbox_row_and_is_retried(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    namespace = f"f{secrets.token_hex(3)}"
    bus = Bus(NATS_URL, namespace, name="retry-test")
    await bus.connect(wait=True)
    attempts: list[int] = []

    async def flaky(session: AsyncSession, event: CloudEvent) -> None:
        attempts.append(1)
        session.add(Project(name=f"flaky-{event.id[-8:]}", display_name="x", created_by="t"))
        if len(attempts) == 1:
            raise RuntimeError("transient failure")

    consumer = Consumer(
        bus=bus,
        sessionmaker=sessionmaker,
        inbox=bus_tables.inbox,
        durable="retry-test",
        handlers={ProjectCreated.subject: flaky},
    )
    running = asyncio.create_task(consumer.run())
    event = CloudEvent.wrap(ProjectCreated(project="flaky", display_name="x"), source="test")
    try:
        await bus.publish(ProjectCreated.subject, event.model_dump_json().encode(), event.id)
        await until(lambda: len(attempts) >= 2, seconds=15)
        # Acknowledged after the retry succeeded: nothing is left to be attempted again.
        await consumer_caught_up(bus, "EVENTS", "retry-test")
        async with sessionmaker() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(Project)
                .where(Project.name == f"flaky-{event.id[-8:]}")
            )
        assert count == 1
        assert len(attempts) == 2
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await bus.close()
        await delete_streams(namespace)
