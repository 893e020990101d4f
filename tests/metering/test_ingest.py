"""Usage events from JetStream are counted exactly once: through duplicates, redelivery, a
metering restart in the middle of the stream and a killed process; bad events are refused alone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from libs.common.bus import Bus
from libs.common.consumer import BatchConsumer
from libs.common.db import make_engine, make_sessionmaker, utcnow
from libs.common.events import CloudEvent
from libs.common.outbox import Outbox
from libs.common.settings import Settings
from tests.conftest import make_settings, running
from tests.helpers import bearer, delete_streams, free_port, unique
from tests.metering.support import (
    asyncpg_dsn,
    db_count,
    db_totals,
    envelope,
    eventually,
    publish,
    publish_raw,
    usage,
    usage_applied,
)


async def totals(client: httpx.AsyncClient, key: str, **params: str) -> dict[str, Any]:
    response = await client.get("/v1/usage", params=params, headers=bearer(key))
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()["rows"]
    assert len(rows) == 1
    return rows[0]


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of a histogram's ``_sum`` samples matching ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_sum" and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


async def test_every_published_event_is_counted_once_in_usage_and_metrics(
    metering: httpx.AsyncClient, gateway_bus: Bus, admin_key: str
) -> None:
    project = unique("count")
    events = [
        usage(project, prompt=7 + i % 5, completion=3 + i % 3, ttft_ms=40.0 + i, model=m)
        for i in range(300)
        for m in ("llama-3-8b", "mistral-7b")
    ]
    events += [usage(project, prompt=4, completion=0, status="error")]
    await publish(gateway_bus, events)

    async def all_counted() -> bool:
        body = await totals(metering, admin_key, project=project)
        return bool(body["requests"] == len(events))

    await eventually(all_counted, what="every event counted")
    body = await totals(metering, admin_key, project=project)
    assert body["prompt_tokens"] == sum(u.prompt_tokens for u in events)
    assert body["completion_tokens"] == sum(u.completion_tokens for u in events)
    assert body["errors"] == 1
    assert body["ttft_ms"]["count"] == 600
    assert body["ttft_ms"]["mean"] == pytest.approx(sum(40.0 + i for i in range(300)) / 300)

    text = (await metering.get("/metrics")).text
    assert metric_sum(
        text, "gen_ai_client_token_usage", project=project, gen_ai_token_type="input"
    ) == sum(u.prompt_tokens for u in events)
    assert metric_sum(
        text,
        "gen_ai_client_token_usage",
        project=project,
        model="mistral-7b",
        gen_ai_token_type="output",
    ) == sum(u.completion_tokens for u in events if u.model == "mistral-7b")
    assert metric_sum(text, "gen_ai_server_time_to_first_token", project=project) == (
        pytest.approx(sum(u.ttft_ms or 0 for u in events) / 1000)
    )
    assert metric_sum(
        text, "gen_ai_server_request_duration", project=project, error_type="upstream_error"
    ) == pytest.approx(0.12)
    assert 'gen_ai_server_time_per_output_token_count{gen_ai_operation_name="chat"' in text


async def test_a_re_sent_event_is_counted_once_even_past_jetstream_deduplication(
    metering: httpx.AsyncClient, gateway_bus: Bus, admin_key: str, database_url: str
) -> None:
    """JetStream drops a re-send with the same Nats-Msg-Id within two minutes; after that (a
    spool replayed late) it stores it again, and only metering's inbox stands in the way."""
    project = unique("dup")
    events = [usage(project, prompt=10, completion=1) for _ in range(50)]
    await publish(gateway_bus, events)
    await publish(gateway_bus, events, fresh_msg_id=True)  # the same events, stored again
    await publish(gateway_bus, events[:10] * 3, fresh_msg_id=True)  # repeats within one batch
    await publish(gateway_bus, [usage(project, prompt=1, completion=0)])
    # Every copy delivered and acknowledged: none is left to be counted later.
    await usage_applied(gateway_bus)
    assert await db_totals(asyncpg_dsn(database_url), project) == (51, 501, 50)
    raw = await db_count(
        asyncpg_dsn(database_url),
        "SELECT count(*) FROM metering.usage_events WHERE project = $1",
        project,
    )
    assert raw == 51


async def test_bad_events_are_refused_alone_and_change_nothing(
    metering: httpx.AsyncClient, gateway_bus: Bus, database_url: str
) -> None:
    project = unique("bad")
    good = [usage(project, prompt=5, completion=5) for _ in range(3)]
    negative = usage(project, prompt=-5)
    too_long = usage(project, model="m" * 300)
    await publish(gateway_bus, [good[0], negative, good[1], too_long])
    await publish_raw(gateway_bus, b"{not json")
    not_usage = CloudEvent.wrap(usage(project), source="gateway").model_copy(
        update={"data": {"project": project}}
    )
    await publish_raw(gateway_bus, not_usage.model_dump_json().encode())
    await publish(gateway_bus, [good[2]])

    dsn = asyncpg_dsn(database_url)
    # Every event delivered and acknowledged (or terminated): the good ones applied, the bad
    # ones refused for good rather than waiting to be retried.
    await usage_applied(gateway_bus)
    assert await db_totals(dsn, project) == (3, 15, 15)
    assert (
        await db_count(
            dsn, "SELECT count(*) FROM metering.usage_events WHERE project = $1", project
        )
        == 3
    )


# -- restarts ----------------------------------------------------------------------------------


@pytest.fixture
async def private_settings(
    database_url: str, tmp_path: Path, run_id: str
) -> AsyncIterator[Settings]:
    """A namespace of its own (own streams, own durable consumer) on the session database, and
    a short ack wait so that what a stopped metering held comes back quickly."""
    namespace = f"r{run_id}{unique('x')[-6:]}"
    yield make_settings(
        database_url,
        namespace,
        tmp_path,
        metering_ack_wait_seconds=1.0,
        metering_batch_size=200,
    )
    await delete_streams(namespace)


async def test_restarting_metering_mid_stream_counts_every_event_once(
    private_settings: Settings, authz_app: FastAPI, database_url: str
) -> None:
    from services.metering.app import create_app

    project = unique("restart")
    events = [usage(project, prompt=3, completion=2) for _ in range(4000)]
    dsn = asyncpg_dsn(database_url)
    bus = Bus(private_settings.nats_url, private_settings.event_namespace, name="restart-test")
    await bus.connect(wait=True)
    try:
        transports = {"authz": httpx.ASGITransport(app=authz_app)}
        first = running(create_app(private_settings, transports=transports))
        await first.__anext__()
        # The first half flows while metering runs; the second is published only once it has
        # stopped, so the restart happens mid-stream whatever the machine's speed.
        publisher = asyncio.create_task(publish(bus, events[:2000], pause=0.05))

        async def some_counted() -> bool:
            return (await db_totals(dsn, project))[0] > 0

        await eventually(some_counted, what="ingest under way")
        with pytest.raises(StopAsyncIteration):
            await first.__anext__()  # stops the lifespan, wherever the consumer was
        await publisher
        await publish(bus, events[2000:])
        counted_while_down = (await db_totals(dsn, project))[0]
        assert 0 < counted_while_down < len(events)

        async for _ in running(create_app(private_settings, transports=transports)):
            # Every event acknowledged, the first metering's unacknowledged ones included once
            # redelivered: nothing is left that could still be counted.
            await usage_applied(bus, seconds=30)
        assert await db_totals(dsn, project) == (4000, 12000, 8000)
    finally:
        await bus.close()


async def test_a_batch_committed_but_never_acknowledged_is_redelivered_and_not_recounted(
    private_settings: Settings, authz_app: FastAPI, database_url: str
) -> None:
    """The window a crash can hit: the transaction committed, the acks never left. JetStream
    redelivers the whole batch after the ack wait; the inbox makes it a no-op."""
    from services.metering.app import create_app
    from services.metering.background import USAGE_DURABLE
    from services.metering.events import usage_handlers
    from services.metering.ingest import Ingest
    from services.metering.models import bus_tables

    project = unique("unacked")
    events = [usage(project, prompt=4, completion=4) for _ in range(300)]
    dsn = asyncpg_dsn(database_url)
    bus = Bus(private_settings.nats_url, private_settings.event_namespace, name="unacked-test")
    await bus.connect(wait=True)
    engine = make_engine(private_settings.database_url_for("metering"), "metering")
    try:
        crashed = BatchConsumer(
            bus=bus,
            sessionmaker=make_sessionmaker(engine),
            inbox=bus_tables.inbox,
            durable=USAGE_DURABLE,
            handlers=usage_handlers(
                Ingest(Outbox(bus_tables.outbox, "metering"), private_settings, utcnow)
            ),
            ack_wait=1.0,
        )
        sub: Any = await crashed._subscribe()
        await publish(bus, events)
        msgs: list[Any] = []
        while len(msgs) < len(events):
            msgs += await sub.fetch(len(events) - len(msgs), timeout=5)
        applied = await crashed.apply_batch([CloudEvent.model_validate_json(m.data) for m in msgs])
        assert applied == len(events)
        await sub.unsubscribe()  # and never acknowledge: the process "died" here
        assert await db_totals(dsn, project) == (300, 1200, 1200)

        transports = {"authz": httpx.ASGITransport(app=authz_app)}
        stream = bus.stream("USAGE")

        async def redelivered() -> bool:
            info = await bus.js.consumer_info(stream, USAGE_DURABLE)
            # Delivered twice (consumer sequence past the stream's), all acknowledged now.
            delivered_twice = info.delivered.consumer_seq >= 2 * len(events)
            return bool(info.num_ack_pending == 0 and delivered_twice)

        async for _ in running(create_app(private_settings, transports=transports)):
            await eventually(redelivered, what="the batch redelivered and acknowledged")
        assert await db_totals(dsn, project) == (300, 1200, 1200)
    finally:
        await engine.dispose()
        await bus.close()


async def test_a_killed_metering_process_loses_and_doubles_nothing(
    private_settings: Settings, database_url: str, tmp_path: Path
) -> None:
    """SIGKILL: no shutdown code runs; unacknowledged batches come back after the ack wait and
    the inbox drops those that had committed."""
    project = unique("kill")
    events = [usage(project, prompt=2, completion=1) for _ in range(6000)]
    dsn = asyncpg_dsn(database_url)
    env = {
        **os.environ,
        "STEWARD_DATABASE_URL": private_settings.database_url,
        "STEWARD_NATS_URL": private_settings.nats_url,
        "STEWARD_EVENT_NAMESPACE": private_settings.event_namespace,
        "STEWARD_DATA_DIR": str(tmp_path),
        "STEWARD_PORT": str(free_port()),
        "STEWARD_API_KEY_PEPPER": "unused",
        "STEWARD_METERING_ACK_WAIT_SECONDS": "1",
        "STEWARD_METERING_BATCH_SIZE": "200",
        "STEWARD_LOG_LEVEL": "WARNING",
    }

    async def start() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.metering",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    bus = Bus(private_settings.nats_url, private_settings.event_namespace, name="kill-test")
    await bus.connect(wait=True)
    process = await start()
    # The first half flows while metering runs; the second is published only once it is
    # killed, so the kill happens mid-stream whatever the machine's speed.
    publisher = asyncio.create_task(publish(bus, events[:3000], pause=0.05))
    try:

        async def some_counted() -> bool:
            return (await db_totals(dsn, project))[0] > 0

        await eventually(some_counted, seconds=30, what="ingest under way")
        process.send_signal(signal.SIGKILL)
        await process.wait()
        await publisher
        await publish(bus, events[3000:])
        assert (await db_totals(dsn, project))[0] < len(events)

        process = await start()
        # What the killed process held comes back after the ack wait; once everything is
        # acknowledged nothing can come back again, and the counts are final.
        await usage_applied(bus, seconds=30)
        assert await db_totals(dsn, project) == (6000, 12000, 6000)
    finally:
        publisher.cancel()
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 15)
        await bus.close()


async def test_events_stamped_in_the_future_count_now(
    metering: httpx.AsyncClient, gateway_bus: Bus, admin_key: str
) -> None:
    project = unique("future")
    await publish(gateway_bus, [usage(project, time=utcnow() + timedelta(days=3))])

    async def counted() -> bool:
        response = await metering.get(
            "/v1/usage", params={"project": project}, headers=bearer(admin_key)
        )
        return bool(response.json()["rows"][0]["requests"] == 1)

    await eventually(counted, what="the event counted in the last day")


async def test_raw_events_staged_by_a_rolled_back_batch_are_not_kept_by_the_next(
    metering_app: FastAPI, metering_settings: Settings
) -> None:
    """PostgreSQL stages raw events in a temporary table (COPY) before moving them: on one
    connection, a rolled-back batch leaves nothing behind, and ids already kept stay refused."""
    from sqlalchemy.ext.asyncio import AsyncSession

    from services.metering import repository as repo
    from services.metering.ingest import raw_values

    project = unique("staged")
    lost, first, second = (usage(project) for _ in range(3))
    now = utcnow()

    def rows(*events: Any) -> list[tuple[Any, ...]]:
        return [raw_values(u.event_id, u, 0) for u in events]

    engine = make_engine(metering_settings.database_url_for("metering"), "metering")
    try:
        async with engine.connect() as connection:
            session = AsyncSession(bind=connection, expire_on_commit=False)
            with pytest.raises(RuntimeError):
                async with session.begin():
                    assert await repo.insert_events(session, rows(lost), now) == {lost.event_id}
                    raise RuntimeError("the batch fails after its raw events")
            async with session.begin():
                kept = await repo.insert_events(session, rows(first), now)
            assert kept == {first.event_id}
            async with session.begin():
                kept = await repo.insert_events(session, rows(first, second), now)
            assert kept == {second.event_id}
    finally:
        await engine.dispose()
    stored = await db_count(
        asyncpg_dsn(metering_settings.database_url),
        "SELECT count(*) FROM metering.usage_events WHERE project = $1",
        project,
    )
    assert stored == 2


def test_envelope_carries_the_usage_event_id() -> None:
    u = usage("p")
    assert CloudEvent.model_validate_json(envelope(u)).id == u.event_id


async def test_the_watermark_passes_every_event_published_before_it_even_once_traffic_stops(
    metering_app: FastAPI, metering: httpx.AsyncClient, gateway_bus: Bus, admin_key: str
) -> None:
    """``counted_through`` (the snapshot's, and each quota event's) promises that everything
    published before it is in the counts: the gateways drop their local copies on that."""
    project = unique("mark")
    await publish(gateway_bus, [usage(project, prompt=3, completion=3) for _ in range(20)])
    published = metering_app.state.metering.clock()  # the time metering's watermark is in

    async def passed() -> bool:
        mark = metering_app.state.metering.usage.watermark
        return mark is not None and mark > published

    await eventually(passed, seconds=5, what="the watermark past the last publication")
    snapshot = (await metering.get("/v1/quotas/snapshot", headers=bearer(admin_key))).json()
    through = datetime.fromisoformat(snapshot["counted_through"])
    assert through > published
    body = await totals(metering, admin_key, project=project)
    assert body["requests"] == 20  # what the watermark promises is there


async def test_a_call_with_an_oidc_token_counts_under_its_long_credential_id(
    metering: httpx.AsyncClient, gateway_bus: Bus, admin_key: str
) -> None:
    """Without a ``jti`` the gateway reports the token's subject (up to 255 characters)."""
    project = unique("oidc")
    subject = "service-account-" + "x" * 200
    await publish(gateway_bus, [usage(project, credential_id=subject, prompt=9, completion=1)])

    async def counted() -> bool:
        response = await metering.get(
            "/v1/usage",
            params={"project": project, "group_by": "credential"},
            headers=bearer(admin_key),
        )
        rows = response.json()["rows"]
        return bool(rows and rows[0]["credential"] == subject and rows[0]["total_tokens"] == 10)

    await eventually(counted, what="the call counted under the subject")
