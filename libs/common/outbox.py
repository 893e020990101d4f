"""Transactional outbox and inbox: events leave and arrive exactly once with their state change.

A state change and its events are written in one transaction; a relay publishes the rows to
JetStream (``Nats-Msg-Id`` = event id, so a re-send after a crash is dropped by the stream) and
marks them. Consumers record each event id in the inbox in the same transaction as its effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import timedelta

from opentelemetry import propagate
from prometheus_client import Gauge
from sqlalchemy import Column, Index, MetaData, String, Table, Text, delete, func, select, update
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.bus import Bus, BusUnavailable
from libs.common.db import UTCDateTime, utcnow
from libs.common.events import CloudEvent, EventPayload

log = logging.getLogger("steward.outbox")

PUBLISHED_RETENTION = timedelta(days=1)


@dataclass(frozen=True)
class BusTables:
    outbox: Table
    inbox: Table


def define_bus_tables(metadata: MetaData) -> BusTables:
    """Add the outbox and inbox tables to a service's metadata (so its migrations create them)."""
    outbox = Table(
        "outbox",
        metadata,
        Column("id", String(36), primary_key=True),
        Column("subject", String(200), nullable=False),
        Column("event", Text, nullable=False),
        Column("created_at", UTCDateTime, nullable=False),
        Column("published_at", UTCDateTime, nullable=True),
        Index("ix_outbox_unpublished", "published_at", "id"),
    )
    inbox = Table(
        "inbox",
        metadata,
        Column("consumer", String(100), primary_key=True),
        Column("event_id", String(64), primary_key=True),
        Column("processed_at", UTCDateTime, nullable=False),
    )
    return BusTables(outbox=outbox, inbox=inbox)


def current_traceparent() -> str | None:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


_WAKE: dict[Table, asyncio.Event] = {}

PENDING = Gauge(
    "steward_outbox_pending_events",
    "Events written but not yet relayed to NATS (the outbox backlog), by service",
    ["service"],
)
# The backlog is counted at most this often (a COUNT over the unpublished index).
PENDING_EVERY_SECONDS = 10.0


class Outbox:
    """Writes events into a service's outbox and relays them to JetStream."""

    def __init__(self, table: Table, source: str) -> None:
        self.table = table
        self.source = source
        # One wake-up per outbox table, shared by every Outbox object over it: an event
        # handler that writes through its own Outbox still wakes the service's relay.
        self._wake = _WAKE.setdefault(table, asyncio.Event())
        # Rounds ``run_relay`` has begun (woken by a commit or by its timer), whatever each one
        # found to do: a round begun after a commit has dealt with that commit's events by the
        # time the next one begins. Lets a caller know the relay has been round, without a sleep.
        self.rounds = 0

    async def add(
        self, session: AsyncSession, payload: EventPayload, *, entity: str | None = None
    ) -> CloudEvent:
        event = CloudEvent.wrap(
            payload, source=self.source, entity=entity, traceparent=current_traceparent()
        )
        await session.execute(
            self.table.insert().values(
                id=event.id,
                subject=payload.subject,
                event=event.model_dump_json(),
                created_at=event.time,
            )
        )
        # Wake the relay as soon as the transaction commits: revocations must travel in < 1 s.
        sa_event.listen(session.sync_session, "after_commit", self._on_commit, once=True)
        return event

    def _on_commit(self, _session: object) -> None:
        self._wake.set()

    async def relay_once(
        self, sessionmaker: async_sessionmaker[AsyncSession], bus: Bus, limit: int = 200
    ) -> int:
        """Publish pending rows in order; returns how many were published."""
        published: list[str] = []
        async with sessionmaker() as session, session.begin():
            rows = (
                await session.execute(
                    select(self.table.c.id, self.table.c.subject, self.table.c.event)
                    .where(self.table.c.published_at.is_(None))
                    .order_by(self.table.c.id)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            try:
                for row in rows:
                    await bus.publish(row.subject, row.event.encode(), row.id)
                    published.append(row.id)
            finally:
                # Whatever was acked is marked, even if a later publish failed.
                if published:
                    await session.execute(
                        update(self.table)
                        .where(self.table.c.id.in_(published))
                        .values(published_at=utcnow())
                    )
        return len(published)

    async def count_pending(self, sessionmaker: async_sessionmaker[AsyncSession]) -> int:
        """The backlog, into ``steward_outbox_pending_events``: it grows while NATS is away."""
        async with sessionmaker() as session:
            pending = await session.scalar(
                select(func.count())
                .select_from(self.table)
                .where(self.table.c.published_at.is_(None))
            )
        PENDING.labels(self.source).set(pending or 0)
        return int(pending or 0)

    async def prune(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        async with sessionmaker() as session, session.begin():
            await session.execute(
                delete(self.table).where(self.table.c.published_at < utcnow() - PUBLISHED_RETENTION)
            )

    async def run_relay(
        self, sessionmaker: async_sessionmaker[AsyncSession], bus: Bus, poll_seconds: float
    ) -> None:
        """Relay for ever: on every commit that added events, and on a timer as a safety net."""
        backoff = poll_seconds
        cycles = 0
        counted = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff)
            # Python 3.11's wait_for loses a cancellation that coincides with its timeout or
            # with the wake-up; going round again would hang the service's shutdown.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            self._wake.clear()
            self.rounds += 1
            if time.monotonic() - counted >= PENDING_EVERY_SECONDS:
                counted = time.monotonic()
                with contextlib.suppress(Exception):  # a metric must not stop the relay
                    await self.count_pending(sessionmaker)
            if not bus.connected:
                continue
            try:
                while await self.relay_once(sessionmaker, bus) > 0:
                    pass
                backoff = poll_seconds
                cycles += 1
                if cycles % 3600 == 0:
                    await self.prune(sessionmaker)
            except asyncio.CancelledError:
                raise
            except BusUnavailable as exc:
                log.warning("outbox relay waiting for NATS", extra={"error": str(exc)})
                backoff = min(backoff * 2, 5.0)
            except Exception:
                log.exception("outbox relay failed; retrying")
                backoff = min(backoff * 2, 5.0)
