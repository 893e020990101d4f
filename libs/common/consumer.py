"""Durable JetStream consumers whose handlers run exactly once per event (inbox table)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
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
from libs.common.db import Clock, utcnow
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

    async def _subscribe(self) -> object:
        stream = await self._ensure_consumer()
        return await self.bus.js.pull_subscribe_bind(self.durable, stream=stream)

    async def _ensure_consumer(self) -> str:
        """Create the durable consumer, or bring its settings up to date; returns the stream."""
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
        return stream

    async def run(self) -> None:
        while True:
            try:
                await self.bus.wait_ready()
                sub = await self._subscribe()
                while True:
                    _reraise_cancellation()
                    try:
                        msgs = await sub.fetch(self.batch, timeout=1)  # type: ignore[attr-defined]
                    except TimeoutError:
                        _reraise_cancellation()
                        continue
                    await self.process(msgs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _reraise_cancellation()
                log.warning("consumer interrupted; resubscribing", extra={"error": str(exc)})
                await asyncio.sleep(1)

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
    """Applies a whole batch in one transaction: for event streams too busy for one transaction
    per event (usage events at thousands per second).

    The new ids of the batch go into the inbox with one statement; the handler receives only the
    events whose ids were new, so a redelivered event is never applied twice, even by another
    replica working on the same durable at the same time. Messages are acknowledged after the
    commit. If the batch fails, each event is retried in a transaction of its own, so one event
    that cannot be applied holds back only itself.

    Messages are pulled with JetStream pull requests answered into a subscription callback
    (nats-py's ``fetch`` costs a timer per message, which caps it near 10,000 messages/s on its
    own), and the next request is sent before a batch is applied, so the next batch arrives
    while this one commits.
    """

    # How long one pull request waits for messages before JetStream closes it (408), and how
    # long a partial batch waits for the rest of a request still arriving.
    EXPIRES_SECONDS = 0.25
    LINGER_SECONDS = 0.02
    # Batches in flight at once (each its own transaction; the inbox keeps them apart).
    concurrency = 2

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
        clock: Clock = utcnow,
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
        self.clock = clock
        # Every message the stream stored before this instant has been applied (one replica;
        # best effort): when the last pull request drained the stream, it was sent at this
        # time. Counts read after it include everything published before it.
        self.watermark: datetime | None = None
        self._buffer: list[Msg] = []
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._request_open = False
        self._requested_at: datetime = clock()
        self._delivered = 0
        self._drained_at: datetime | None = None
        self._pause = False

    async def run(self) -> None:
        while True:
            try:
                await self.bus.wait_ready()
                await self._consume(await self._ensure_consumer())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _reraise_cancellation()
                log.warning("consumer interrupted; resubscribing", extra={"error": str(exc)})
                await asyncio.sleep(1)

    async def _consume(self, stream: str) -> None:
        nc = self.bus.client()
        inbox = nc.new_inbox()
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{self.durable}"
        request = json.dumps(
            {"batch": self.batch, "expires": int(self.EXPIRES_SECONDS * 1_000_000_000)}
        ).encode()
        sub = await nc.subscribe(inbox, cb=self._on_msg)
        self._buffer, self._request_open = [], False
        # Batches applied at once: one prepares while another waits for the database.
        slots = asyncio.Semaphore(self.concurrency)
        in_flight: collections.deque[tuple[asyncio.Task[bool] | None, datetime | None]] = (
            collections.deque()
        )
        try:
            while True:
                _reraise_cancellation()
                self._settle(in_flight)
                if self._pause:
                    self._pause = False
                    await asyncio.sleep(1)
                if not self._request_open:
                    # Asked before applying what is here: the next batch travels meanwhile.
                    self._request_open, self._delivered = True, 0
                    self._requested_at = self.clock()
                    await nc.publish(next_subject, request, reply=inbox)
                if not self._buffer:
                    if self._drained_at is not None:
                        # Nothing more arrived: the mark passes once the batches before it do.
                        in_flight.append((None, self._drained_at))
                        self._drained_at = None
                        self._settle(in_flight)
                    # Woken by messages, the end of a request, or a finished batch.
                    if not await _wait(self._wake, self.EXPIRES_SECONDS + 2):
                        self._request_open = False  # lost (a reconnect): ask again
                    self._wake.clear()
                    continue
                if self._request_open and len(self._buffer) < self.batch:
                    # More is on its way: a few milliseconds buy a much larger transaction.
                    self._full.clear()
                    await _wait(self._full, self.LINGER_SECONDS)
                drained, self._drained_at = self._drained_at, None
                msgs, self._buffer = self._buffer, []
                await slots.acquire()
                task = asyncio.create_task(self._process(msgs))
                task.add_done_callback(lambda _: self._finished(slots))
                in_flight.append((task, drained))
                self._settle(in_flight)
        finally:
            running = [t for t, _ in in_flight if t is not None]
            for pending in running:
                pending.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            # What arrived but was not applied goes back at once rather than after ack_wait.
            unapplied, self._buffer = self._buffer, []
            with contextlib.suppress(Exception):
                await asyncio.shield(_nak_all(unapplied))
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _finished(self, slots: asyncio.Semaphore) -> None:
        slots.release()
        self._wake.set()  # the loop settles the watermark

    def _settle(
        self, in_flight: collections.deque[tuple[asyncio.Task[bool] | None, datetime | None]]
    ) -> None:
        """Move the watermark over the batches finished in order (a later batch may commit
        before an earlier one; the mark waits for every batch before it)."""
        while in_flight and (in_flight[0][0] is None or in_flight[0][0].done()):
            task, drained = in_flight.popleft()
            if task is None:  # the stream was drained while idle: no batch of its own
                if drained is not None:
                    self.caught_up(drained)
                continue
            whole = not task.cancelled() and task.exception() is None and task.result()
            if whole and drained is not None:
                self.caught_up(drained)
            elif not task.cancelled() and task.exception() is not None:
                log.error("batch task failed", exc_info=task.exception())

    async def _on_msg(self, msg: Msg) -> None:
        """Buffer a message; a status (408 expired, 404, 409) or a full batch ends the request."""
        status = msg.headers.get("Status") if msg.headers else None
        if status == "100":
            return  # an idle heartbeat
        if status is None:
            self._buffer.append(msg)
            self._delivered += 1
            if self._delivered < self.batch:
                self._wake.set()
                return
            self._full.set()
            if msg.metadata.num_pending == 0:
                self._drained_at = self._requested_at
        elif status in ("404", "408") and self._delivered < self.batch:
            # Fewer than asked before it expired: the stream had nothing more when asked.
            self._drained_at = self._requested_at
        elif status not in ("404", "408"):
            # 409 (consumer deleted, too many waiting requests…): pause before asking again.
            log.warning("pull request refused", extra={"status": status})
            self._pause = True
        self._request_open = False
        self._wake.set()
        self._full.set()

    def caught_up(self, at: datetime) -> None:
        self.watermark = at if self.watermark is None else max(self.watermark, at)

    async def process(self, msgs: Sequence[Msg]) -> None:
        await self._process(msgs)

    async def _process(self, msgs: Sequence[Msg]) -> bool:
        """Apply and acknowledge a batch; True when it was applied whole."""
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
        whole = True
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
            whole = False
            for msg, event in events:
                await self._one(msg, event)
        else:
            done.extend(m for m, _ in events)
        for msg in done:
            await msg.ack()
        return whole

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


def _reraise_cancellation() -> None:
    """Python 3.11's ``wait_for`` (inside nats-py's fetch too) loses a cancellation that arrives
    as its timeout fires or its awaitable completes (it raises TimeoutError or returns the
    result); a loop that goes round again would then never stop and hang the shutdown.
    Re-raise the cancellation the task is owed."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Wait for ``event``; False after ``seconds``. Never swallows a cancellation."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        _reraise_cancellation()
        return False
    _reraise_cancellation()  # 3.11 returns the result if the event came with the cancellation
    return True


async def _unused(session: AsyncSession, event: CloudEvent) -> None:
    raise AssertionError("a BatchConsumer applies events through its batch handlers")


async def _nak_all(msgs: Sequence[Msg]) -> None:
    for msg in msgs:
        await msg.nak()
