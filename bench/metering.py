"""Usage ingest throughput: events/s from JetStream into PostgreSQL, against bare asyncpg writes
of the same rows measured in the same run (the machines are shared; only ratios travel).

Run: ``.venv/bin/python bench/metering.py [--events 100000] [--batch 1000]`` with PostgreSQL and
NATS on loopback (``scripts/test-services.sh`` starts them). Everything it creates (a database,
a NATS namespace) is removed at the end.

- ingest: the metering service's own lifespan (``create_app``) consumes events already stored in
  the USAGE stream: fetch, parse and validate, inbox de-duplication, raw event rows, per-minute
  aggregates, quota counters (each project has a quota), acks after commit; timed from start to
  the last event counted.
- baseline COPY: ``copy_records_to_table`` of the same raw event rows into a bare table.
- baseline executemany: ``INSERT`` of the same rows with asyncpg's ``executemany``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import time
from datetime import timedelta
from typing import Any

import asyncpg
import nats
from nats.js.errors import NotFoundError
from pydantic import SecretStr

from libs.common.bus import Bus
from libs.common.db import make_engine, make_sessionmaker, new_id, utcnow
from libs.common.events.usage import UsageRecorded
from libs.common.migrate import upgrade_async
from libs.common.service import settle_heap
from libs.common.settings import Settings
from services.metering import metrics
from services.metering.app import create_app
from services.metering.ingest import raw_row
from services.metering.models import Quota
from services.metering.repository import EVENT_COLUMNS

PG_ADMIN_DSN = os.environ.get(
    "STEWARD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
NATS_URL = os.environ.get("STEWARD_TEST_NATS_URL", "nats://127.0.0.1:4222")
PROJECTS, MODELS, KEYS = 20, 5, 50
TIMEOUT_SECONDS = 600.0


def events(n: int) -> list[tuple[str, bytes, dict[str, Any]]]:
    """(event id, CloudEvent JSON as the gateway publishes it, the raw row metering keeps)."""
    from libs.common.events import CloudEvent

    now = utcnow()
    out = []
    for i in range(n):
        u = UsageRecorded(
            event_id=new_id(),
            time=now - timedelta(milliseconds=n - i),
            project=f"bench-{i % PROJECTS}",
            credential_id=f"key{i % KEYS:05d}",
            subject_id="bench",
            model=f"model-{i % MODELS}",
            endpoint=f"endpoint-{i % MODELS}",
            prompt_tokens=100 + i % 400,
            completion_tokens=20 + i % 200,
            total_tokens=120 + i % 400 + i % 200,
            ttft_ms=50.0 + i % 300 if i % 2 else None,
            duration_ms=200.0 + i % 2000,
            http_status=200,
            status="ok",
            stream=bool(i % 2),
        )
        event = CloudEvent.wrap(u, source="gateway", entity=u.project)
        event.id, event.time = u.event_id, u.time
        row = raw_row(u.event_id, u, 0)
        out.append((u.event_id, event.model_dump_json().encode(), row))
    return out


async def publish(bus: Bus, items: list[tuple[str, bytes, dict[str, Any]]]) -> float:
    start = time.perf_counter()
    for i in range(0, len(items), 500):
        chunk = items[i : i + 500]
        await asyncio.gather(
            *(bus.publish(UsageRecorded.subject, body, event_id) for event_id, body, _ in chunk)
        )
    return len(items) / (time.perf_counter() - start)


def counted() -> float:
    return float(metrics.EVENTS.labels("counted")._value.get())


async def ingest(settings: Settings, n: int) -> float:
    """Events/s through the metering service: from the moment it is connected to NATS (its
    consumer starts pulling then) to the last event counted."""
    app = create_app(settings)
    before = counted()
    async with app.router.lifespan_context(app):
        await app.state.ctx.bus.wait_ready(30)
        settle_heap()  # as ``python -m services.metering`` does once started
        start = time.perf_counter()
        deadline = start + TIMEOUT_SECONDS
        while counted() - before < n:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"only {counted() - before:.0f} of {n} events in time")
            await asyncio.sleep(0.002)
        elapsed = time.perf_counter() - start
    return n / elapsed


async def baselines(dsn: str, rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(COPY, executemany) rows/s of the same raw rows into a bare table, no index but its key."""
    names = [c for c, _ in EVENT_COLUMNS] + ["received_at"]
    now = utcnow()
    records = [(*(r[c] for c in names[:-1]), now) for r in rows]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE bench_copy (LIKE metering.usage_events INCLUDING DEFAULTS);"
            "ALTER TABLE bench_copy ADD PRIMARY KEY (event_id);"
            "CREATE TABLE bench_insert (LIKE bench_copy INCLUDING ALL)"
        )
        start = time.perf_counter()
        for i in range(0, len(records), 1000):
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "bench_copy", records=records[i : i + 1000], columns=names
                )
        copy_rate = len(records) / (time.perf_counter() - start)
        placeholders = ", ".join(f"${i}" for i in range(1, len(names) + 1))
        insert = f"INSERT INTO bench_insert ({', '.join(names)}) VALUES ({placeholders})"  # noqa: S608
        start = time.perf_counter()
        for i in range(0, len(records), 1000):
            async with conn.transaction():
                await conn.executemany(insert, records[i : i + 1000])
        insert_rate = len(records) / (time.perf_counter() - start)
    finally:
        await conn.close()
    return copy_rate, insert_rate


async def add_quotas(settings: Settings) -> None:
    """One daily quota per project, so every event also updates a quota counter."""
    engine = make_engine(settings.database_url_for("metering"), "metering")
    try:
        async with make_sessionmaker(engine)() as session, session.begin():
            now = utcnow()
            for p in range(PROJECTS):
                session.add(
                    Quota(
                        scope=f"bench-{p}/*/*/day",
                        project=f"bench-{p}",
                        window="day",
                        total_limit=10**12,
                        soft_threshold=0.8,
                        created_at=now,
                        created_by="bench",
                        updated_at=now,
                        updated_by="bench",
                    )
                )
    finally:
        await engine.dispose()


async def main(n: int, batch: int) -> None:
    name = f"steward_bench_{secrets.token_hex(4)}"
    namespace = f"bench{secrets.token_hex(3)}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    settings = Settings(
        database_url=f"{base.replace('postgresql://', 'postgresql+asyncpg://')}/{name}",
        nats_url=NATS_URL,
        event_namespace=namespace,
        api_key_pepper=SecretStr("bench"),
        metering_batch_size=batch,
        log_level="WARNING",
    )
    bus = Bus(NATS_URL, namespace, name="bench-gateway")
    try:
        await upgrade_async("metering", settings)
        await add_quotas(settings)
        await bus.connect(wait=True)
        print(f"generating {n} usage events…")
        items = events(n)
        publish_rate = await publish(bus, items)
        print(f"published to JetStream at {publish_rate:,.0f} events/s (not part of the ratio)")
        ingest_rate = await ingest(settings, n)
        copy_rate, insert_rate = await baselines(f"{base}/{name}", [row for _, _, row in items])
        conn = await asyncpg.connect(f"{base}/{name}")
        try:
            total = await conn.fetchval("SELECT sum(requests) FROM metering.usage_minutes")
            raw = await conn.fetchval("SELECT count(*) FROM metering.usage_events")
        finally:
            await conn.close()
        assert total == n and raw == n, f"counted {total} aggregates / {raw} raw of {n}"
        print()
        print(f"{'path':<46}{'events/s':>12}{'vs COPY':>10}")
        for label, value in (
            ("baseline: asyncpg COPY of the raw rows", copy_rate),
            ("baseline: asyncpg executemany INSERT", insert_rate),
            (f"metering ingest from JetStream (batch {batch})", ingest_rate),
        ):
            print(f"{label:<46}{value:>12,.0f}{value / copy_rate:>10.2f}")
        print()
        print(f"ingest / executemany = {ingest_rate / insert_rate:.2f}")
        goal = "met" if ingest_rate >= 10_000 else "NOT met"
        print(f"goal >= 10,000 events/s: {goal} ({ingest_rate:,.0f}); all {n} counted once")
    finally:
        await bus.close()
        nc = await nats.connect(NATS_URL)
        try:
            js = nc.jetstream()
            for stream in ("EVENTS", "USAGE"):
                with contextlib.suppress(NotFoundError):
                    await js.delete_stream(f"{namespace}_{stream}".upper())
        finally:
            await nc.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    if not 1 <= args.events <= 2_000_000:
        parser.error("--events must be between 1 and 2,000,000")
    asyncio.run(main(args.events, args.batch))
