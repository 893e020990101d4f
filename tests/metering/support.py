"""Helpers for the metering tests: usage events as the gateway publishes them, and waiting."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from libs.common.bus import Bus
from libs.common.db import new_id, utcnow
from libs.common.events import CloudEvent
from libs.common.events.usage import UsageRecorded
from libs.common.settings import Settings
from services.metering.background import USAGE_DURABLE
from tests.common.support import Listener, consumer_caught_up, outbox_relayed


def credential() -> str:
    """An API key id (8 base62 characters), as the gateway puts in ``credential_id``."""
    return secrets.token_hex(4)


def usage(
    project: str,
    *,
    model: str = "llama-3-8b",
    credential_id: str = "cred0001",
    endpoint: str = "llama-3-8b-ep",
    prompt: int = 10,
    completion: int = 5,
    time: datetime | None = None,
    status: str = "ok",
    ttft_ms: float | None = None,
    duration_ms: float = 120.0,
    **extra: Any,
) -> UsageRecorded:
    return UsageRecorded(
        event_id=new_id(),
        time=time or utcnow(),
        project=project,
        credential_id=credential_id,
        subject_id="alice",
        model=model,
        endpoint=endpoint,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        ttft_ms=ttft_ms,
        duration_ms=duration_ms,
        http_status=200 if status == "ok" else 502,
        status=status,
        error_type=None if status == "ok" else "upstream_error",
        stream=ttft_ms is not None,
        **extra,
    )


def envelope(u: UsageRecorded) -> bytes:
    """The CloudEvent the gateway publishes: its id is the usage event's id."""
    event = CloudEvent.wrap(u, source="gateway", entity=u.project)
    event.id = u.event_id
    event.time = u.time
    return event.model_dump_json().encode()


async def publish(
    bus: Bus, usages: Sequence[UsageRecorded], *, fresh_msg_id: bool = False, pause: float = 0
) -> None:
    """Publish like the gateway (``Nats-Msg-Id`` = event id), 200 at a time (``pause`` seconds
    apart: a stream that is still flowing when a test stops metering).

    ``fresh_msg_id`` gives each message a new ``Nats-Msg-Id``: JetStream then stores a re-sent
    event again (as after its de-duplication window), so only metering can drop it.
    """
    for start in range(0, len(usages), 200):
        chunk = usages[start : start + 200]
        await asyncio.gather(
            *(
                bus.publish(
                    UsageRecorded.subject, envelope(u), new_id() if fresh_msg_id else u.event_id
                )
                for u in chunk
            )
        )
        if pause:
            await asyncio.sleep(pause)


async def publish_raw(bus: Bus, body: bytes) -> None:
    await bus.publish(UsageRecorded.subject, body, new_id())


async def eventually(
    check: Callable[[], Awaitable[bool]], seconds: float = 15.0, what: str = "condition"
) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached in {seconds}s")
        await asyncio.sleep(0.05)


async def db_totals(dsn: str, project: str) -> tuple[int, int, int]:
    """(requests, prompt tokens, completion tokens) of a project, straight from the aggregates."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT coalesce(sum(requests), 0) r, coalesce(sum(prompt_tokens), 0) p, "
            "coalesce(sum(completion_tokens), 0) c FROM metering.usage_minutes WHERE project = $1",
            project,
        )
        assert row is not None
        return int(row["r"]), int(row["p"]), int(row["c"])
    finally:
        await conn.close()


async def db_count(dsn: str, sql: str, *args: Any) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql, *args))
    finally:
        await conn.close()


def asyncpg_dsn(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://")


class Heard(Listener):
    """The events heard on a subscription, found by subject and the id of what they are about."""

    def __init__(self, bus: Bus, pattern: str, key: str) -> None:
        super().__init__(bus, pattern)
        self.key = key
        self.received: list[CloudEvent] = []

    def handle(self, body: bytes) -> None:
        self.received.append(CloudEvent.model_validate_json(body))

    def of(self, subject: str, entity: str) -> list[CloudEvent]:
        return [
            e
            for e in self.received
            if e.relative_subject == subject and e.data.get(self.key) == entity
        ]


@contextlib.asynccontextmanager
async def hearing(bus: Bus, pattern: str, key: str) -> AsyncIterator[Heard]:
    """Every event on ``pattern`` published from now on (a real JetStream subscription)."""
    heard = Heard(bus, pattern, key)
    await heard.start()
    try:
        yield heard
    finally:
        await heard.stop()


async def usage_applied(bus: Bus, seconds: float = 15.0) -> None:
    """Wait until metering's usage consumer on ``bus``'s namespace has applied and acknowledged
    every usage event published so far: none is left to deliver or to redeliver."""
    await consumer_caught_up(bus, "USAGE", USAGE_DURABLE, seconds, "every usage event applied")


async def metering_settled(bus: Bus, settings: Settings, heard: Heard | None = None) -> None:
    """Everything the usage published so far can cause has happened: the events applied, the
    alerts they raised relayed from metering's outbox, and (``heard``) heard."""
    await usage_applied(bus)
    await outbox_relayed(settings, "metering")
    if heard is not None:
        await heard.caught_up()
