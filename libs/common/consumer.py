"""Durable JetStream consumers whose handlers run exactly once per event (inbox table)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from pydantic import ValidationError
from sqlalchemy import Table, select, text
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.bus import Bus
from libs.common.db import utcnow
from libs.common.events import CloudEvent, stream_for

log = logging.getLogger("steward.consumer")
tracer = trace.get_tracer("steward.consumer")

Handler = Callable[[AsyncSession, CloudEvent], Awaitable[None]]
# Receives, in stream order, the events of one fetched batch that this consumer has not applied
# before (the inbox already holds their ids, in the same transaction).
BatchHandler = Callable[[AsyncSession, Sequence[CloudEvent]], Awaitable[None]]


class Consumer:
    """Pulls events for the subjects in ``handlers`` and applies each one once.

    The inbox row and the handler's writes commit together: a redelivered event finds its
    id already there and is acknowledged without running the handler again.
    """

    def __init__(
        self,
        *,
        bus: Bus,
        sessionmaker: async_sessionmaker[AsyncSession],
        inbox: Table,
        durable: str,
        handlers: Mapping[str, Handler],
        batch: int = 100,
    ) -> None:
        streams = {stream_for(s) for s in handlers}
        if len(streams) != 1:
            raise ValueError("one consumer reads one stream")
        self.stream = streams.pop()
        self.bus = bus
        self.sessionmaker = sessionmaker
        self.inbox = inbox
        self.durable = durable
        self.handlers = dict(handlers)
        self.batch = batch

    # Seconds before JetStream redelivers an unacknowledged message; how many may be in flight.
    ack_wait: float = 30
    max_ack_pending: int = 1000
    # How long a fetch waits for a first message; when the last fetch began (``clock`` time).
    fetch_timeout: float = 1
    fetch_started: datetime | None = None
    clock: Callable[[], datetime] = staticmethod(utcnow)

    async def _subscribe(self) -> object:
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait,
            max_ack_pending=self.max_ack_pending,
            filter_subjects=[self.bus.subject(s) for s in self.handlers],
        )
        stream = self.bus.stream(self.stream)
        await self.bus.js.add_consumer(stream, config)
        return await self.bus.js.pull_subscribe_bind(self.durable, stream=stream)

    async def run(self) -> None:
        while True:
            try:
                await self.bus.wait_ready()
                sub = await self._subscribe()
                while True:
                    self.fetch_started = self.clock()
                    try:
                        msgs = await sub.fetch(self.batch, timeout=self.fetch_timeout)  # type: ignore[attr-defined]
                    except TimeoutError:
                        self.caught_up(self.fetch_started)
                        continue
                    await self.process(msgs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("consumer interrupted; resubscribing", extra={"error": str(exc)})
                await asyncio.sleep(1)

    def caught_up(self, at: datetime) -> None:
        """Every message stored before ``at`` has been applied (a fetch found nothing more)."""

    async def process(self, msgs: Sequence[Msg]) -> None:
        """One fetched batch: here, one transaction per event."""
        for msg in msgs:
            await self.handle(msg)

    async def handle(self, msg: Msg) -> None:
        try:
            event = CloudEvent.model_validate_json(msg.data)
        except ValidationError as exc:
            # A message no handler can ever read: keep it out of the redelivery loop.
            log.error("unreadable event terminated", extra={"error": str(exc)})
            await msg.term()
            return
        handler = self.handlers.get(event.relative_subject)
        if handler is None:
            # NATS before 2.10 ignores filter_subjects and delivers the whole stream.
            await msg.ack()
            return
        parent = propagate.extract({"traceparent": event.traceparent or ""})
        token = otel_context.attach(parent)
        try:
            with tracer.start_as_current_span(f"consume {event.relative_subject}"):
                await self.apply(event, handler)
            await msg.ack()
        except Exception:
            log.exception("event handler failed; will retry", extra={"event_id": event.id})
            delivered = msg.metadata.num_delivered or 1
            with contextlib.suppress(Exception):  # unacked, it comes back after ack_wait anyway
                await msg.nak(delay=min(2.0**delivered, 60.0))
        finally:
            otel_context.detach(token)

    async def apply(self, event: CloudEvent, handler: Handler) -> bool:
        """Run the handler once for this event id; returns False for a duplicate."""
        try:
            async with self.sessionmaker() as session, session.begin():
                if await self._seen(session, event.id):
                    return False
                await session.execute(
                    self.inbox.insert().values(
                        consumer=self.durable, event_id=event.id, processed_at=utcnow()
                    )
                )
                await handler(session, event)
        except IntegrityError:
            async with self.sessionmaker() as session:
                if await self._seen(session, event.id):
                    return False  # another replica committed the same event first
            raise
        return True

    async def _seen(self, session: AsyncSession, event_id: str) -> bool:
        c = self.inbox.c
        found = await session.scalar(
            select(c.event_id).where(c.consumer == self.durable, c.event_id == event_id)
        )
        return found is not None


class BatchConsumer(Consumer):
    """Applies a whole fetched batch in one transaction: for event streams too busy for one
    transaction per event (usage events at thousands per second).

    The new ids of the batch go into the inbox with one statement; the handler receives only the
    events whose ids were new, so a redelivered event is never applied twice, even by another
    replica working on the same durable at the same time. Messages are acknowledged after the
    commit. If the batch fails, each event is retried in a transaction of its own, so one event
    that cannot be applied holds back only itself.
    """

    def __init__(
        self,
        *,
        bus: Bus,
        sessionmaker: async_sessionmaker[AsyncSession],
        inbox: Table,
        durable: str,
        handlers: Mapping[str, BatchHandler],
        batch: int = 1000,
        ack_wait: float = 30,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        super().__init__(
            bus=bus,
            sessionmaker=sessionmaker,
            inbox=inbox,
            durable=durable,
            handlers={subject: _unused for subject in handlers},
            batch=batch,
        )
        self.batch_handlers = dict(handlers)
        self.ack_wait = ack_wait
        self.max_ack_pending = max(self.max_ack_pending, 4 * batch)
        self.fetch_timeout = 0.25
        self.clock = clock
        # Every message the stream stored before this instant has been applied: the start of
        # the last fetch that left nothing pending (one replica; best effort). A reader of the
        # counts it produced then knows they include everything published before it.
        self.watermark: datetime | None = None

    def caught_up(self, at: datetime) -> None:
        self.watermark = at if self.watermark is None else max(self.watermark, at)

    async def process(self, msgs: Sequence[Msg]) -> None:
        events: list[tuple[Msg, CloudEvent]] = []
        done: list[Msg] = []  # acknowledged whatever happens to the batch
        for msg in msgs:
            try:
                event = CloudEvent.model_validate_json(msg.data)
            except ValidationError as exc:
                log.error("unreadable event terminated", extra={"error": str(exc)})
                await msg.term()
                continue
            if event.relative_subject in self.batch_handlers:
                events.append((msg, event))
            else:
                done.append(msg)  # NATS before 2.10 ignores filter_subjects
        try:
            if events:
                await self.apply_batch([e for _, e in events])
        except asyncio.CancelledError:
            # Shutting down mid-batch: nothing was committed; let another consumer have them.
            with contextlib.suppress(Exception):
                await asyncio.shield(_nak_all([m for m, _ in events]))
            raise
        except Exception:
            log.exception("batch failed; applying its events one by one", extra={"n": len(events)})
            for msg, event in events:
                await self._one(msg, event)
        else:
            done.extend(m for m, _ in events)
            if msgs and msgs[-1].metadata.num_pending == 0 and self.fetch_started is not None:
                self.caught_up(self.fetch_started)
        for msg in done:
            await msg.ack()

    async def _one(self, msg: Msg, event: CloudEvent) -> None:
        try:
            await self.apply_batch([event])
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("event handler failed; will retry", extra={"event_id": event.id})
            delivered = msg.metadata.num_delivered or 1
            with contextlib.suppress(Exception):
                await msg.nak(delay=min(2.0**delivered, 60.0))
        else:
            await msg.ack()

    async def apply_batch(self, events: Sequence[CloudEvent]) -> int:
        """Apply the events not applied before, in one transaction; returns how many were new."""
        unique: dict[str, CloudEvent] = {}
        for event in events:
            unique.setdefault(event.id, event)
        async with self.sessionmaker() as session, session.begin():
            fresh = await self.claim(session, sorted(unique))
            new = [e for e in unique.values() if e.id in fresh]
            by_subject: dict[str, list[CloudEvent]] = {}
            for event in new:
                by_subject.setdefault(event.relative_subject, []).append(event)
            for subject, batch in by_subject.items():
                with tracer.start_as_current_span(f"consume {subject} x{len(batch)}"):
                    await self.batch_handlers[subject](session, batch)
        return len(new)

    async def claim(self, session: AsyncSession, event_ids: Sequence[str]) -> set[str]:
        """Insert the ids into the inbox, returning those that were not there yet.

        ``ON CONFLICT DO NOTHING``: an id another transaction is inserting waits for it, then
        counts as seen if it committed. Ids go in sorted, so two replicas never deadlock.
        """
        if not event_ids:
            return set()
        now = utcnow()
        if session.get_bind().dialect.name == "postgresql":
            # One statement whatever the batch size: the ids travel as one array parameter.
            # The table name is ours; every value is a bound parameter.
            sql = f"INSERT INTO {self.inbox.name} (consumer, event_id, processed_at) "
            sql += (
                "SELECT CAST(:consumer AS text), ids.id, CAST(:at AS timestamptz) "
                "FROM unnest(CAST(:ids AS text[])) AS ids(id) "
                "ON CONFLICT DO NOTHING RETURNING event_id"
            )
            rows = await session.execute(
                text(sql), {"consumer": self.durable, "ids": list(event_ids), "at": now}
            )
            return {row[0] for row in rows}
        fresh: set[str] = set()
        statement = (
            sqlite_insert(self.inbox).on_conflict_do_nothing().returning(self.inbox.c.event_id)
        )
        for start in range(0, len(event_ids), 300):  # SQLite's bound-parameter limit
            chunk = event_ids[start : start + 300]
            values = [{"consumer": self.durable, "event_id": i, "processed_at": now} for i in chunk]
            fresh.update(r[0] for r in await session.execute(statement.values(values)))
        return fresh


async def _unused(session: AsyncSession, event: CloudEvent) -> None:
    raise AssertionError("a BatchConsumer applies events through its batch handlers")


async def _nak_all(msgs: Sequence[Msg]) -> None:
    for msg in msgs:
        await msg.nak()
