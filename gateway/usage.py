"""Usage events: recorded on the request path in microseconds, published in the background.

``record`` only queues the payload. A publisher task wraps it in a CloudEvent and publishes it to
JetStream (``Nats-Msg-Id`` = event id); whatever cannot be published now goes to the disk spool,
which is drained in order once NATS is back. Shutdown publishes or spools what is queued.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence

from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from gateway.journal import Journal
from gateway.spool import Spool
from libs.common.bus import Bus, BusUnavailable
from libs.common.events import CloudEvent
from libs.common.events.audit import AuditRecorded
from libs.common.events.usage import UsageRecorded

log = logging.getLogger("steward.gateway.usage")

USAGE_EVENTS = Counter("steward_gateway_usage_events_total", "Usage events by outcome", ["outcome"])
SPOOL_BYTES = Gauge("steward_gateway_usage_spool_bytes", "Undelivered usage events on disk")

BATCH = 256
# Beyond this many queued events, new ones go straight to disk rather than to memory.
MAX_QUEUED = 50_000

# What the gateway records: a call's usage, or an audit record (a tool call that may change
# something). Both need the same guarantee: published once, or on disk until they can be.
Recorded = UsageRecorded | AuditRecorded
# A payload and the W3C traceparent of the request that caused it (None: not traced).
Queued = tuple[Recorded, str | None]


class UsageRecorder:
    def __init__(
        self,
        bus: Bus,
        spool: Spool,
        *,
        source: str = "gateway",
        journal: Journal | None = None,
    ) -> None:
        self.bus = bus
        self.spool = spool
        self.source = source
        # Told when a call's event is safe (published or on disk): it no longer needs its entry.
        self.journal = journal
        self._queue: asyncio.Queue[Queued] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._spool_task: asyncio.Task[None] | None = None
        self._spooled = asyncio.Event()
        self.published = 0  # acknowledged by JetStream, live or from the spool
        self.spooled = 0  # written to disk
        if spool.size():
            self._spooled.set()

    def record(self, payload: Recorded, *, traceparent: str | None = None) -> None:
        """Queue an event; ``traceparent`` puts it in the trace of the call's request."""
        if self._queue.qsize() >= MAX_QUEUED:
            self.spool_now([payload], traceparent)
            return
        self._queue.put_nowait((payload, traceparent))

    def spool_now(self, payloads: Sequence[Recorded], traceparent: str | None = None) -> None:
        """Write events straight to the disk spool (delivered in order once NATS is there)."""
        self.spool.append([self._wrap(p, traceparent)[1] for p in payloads])
        self.spooled += len(payloads)
        USAGE_EVENTS.labels("spooled").inc(len(payloads))
        self._spooled.set()
        self._safe(payloads)

    def _safe(self, payloads: Iterable[Recorded]) -> None:
        if self.journal is not None:
            self.journal.end(p.event_id for p in payloads if isinstance(p, UsageRecorded))

    def _wrap(self, payload: Recorded, traceparent: str | None = None) -> tuple[str, bytes]:
        """The event's id and its CloudEvent bytes."""
        if isinstance(payload, AuditRecorded):
            event = CloudEvent.wrap(
                payload, source=self.source, entity=payload.target, traceparent=traceparent
            )
            event.time = payload.at
        else:
            event = CloudEvent.wrap(
                payload, source=self.source, entity=payload.project, traceparent=traceparent
            )
            # The payload's id is the event's id: one id for JetStream, metering and the spool.
            event.id = payload.event_id
            event.time = payload.time
        return event.id, event.model_dump_json().encode()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._publish_loop(), name="gateway-usage")
        self._spool_task = asyncio.create_task(self._drain_loop(), name="gateway-usage-spool")

    async def stop(self) -> None:
        """Publish what is queued if NATS is there, spool the rest."""
        for task in (self._task, self._spool_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        pending: list[Queued] = []
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        if pending:
            await self._publish_or_spool(pending)

    async def _publish_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._publish_or_spool(batch)
            except asyncio.CancelledError:
                # Shutdown in the middle of a batch: keep it on disk, delivered next start.
                self.spool.append(self._wrap(*queued)[1] for queued in batch)
                self._safe(payload for payload, _ in batch)
                raise

    async def _publish_or_spool(self, batch: Sequence[Queued]) -> None:
        bodies = [(payload.subject, *self._wrap(payload, tp)) for payload, tp in batch]
        if self.bus.connected and not self._spooled.is_set():
            results = await asyncio.gather(
                *(self._publish(subject, event_id, body) for subject, event_id, body in bodies),
                return_exceptions=True,
            )
            failed = [b for (_, _, b), ok in zip(bodies, results, strict=True) if ok is not True]
            self.published += len(bodies) - len(failed)
            USAGE_EVENTS.labels("published").inc(len(bodies) - len(failed))
        else:
            # Events spooled earlier go first: keep the order metering sees.
            failed = [body for _, _, body in bodies]
        if failed:
            self.spool.append(failed)
            self.spooled += len(failed)
            USAGE_EVENTS.labels("spooled").inc(len(failed))
            SPOOL_BYTES.set(self.spool.size())
            self._spooled.set()
        self._safe(payload for payload, _ in batch)

    async def _publish(self, subject: str, event_id: str, body: bytes) -> bool:
        await self.bus.publish(subject, body, event_id)
        return True

    async def _drain_loop(self) -> None:
        """Deliver spooled events, oldest first, whenever NATS is reachable."""
        while True:
            await self._spooled.wait()
            if not self.bus.connected:
                await asyncio.sleep(0.5)
                continue
            try:
                await self.drain_once()
            except BusUnavailable as exc:
                log.warning("usage spool waiting for NATS", extra={"error": str(exc)})
                await asyncio.sleep(1.0)

    async def drain_once(self) -> int:
        """Publish one batch from the spool; returns how many were delivered."""
        lines, end = self.spool.pending()
        if not lines:
            self.spool.delivered(end)
            self._spooled.clear()
            SPOOL_BYTES.set(0)
            return 0
        for line in lines:
            try:
                event = CloudEvent.model_validate_json(line)
            except ValidationError:
                log.error("unreadable spooled usage event dropped")
                continue
            await self.bus.publish(event.relative_subject, line, event.id)
        self.spool.delivered(end)
        self.published += len(lines)
        USAGE_EVENTS.labels("replayed").inc(len(lines))
        SPOOL_BYTES.set(self.spool.size())
        return len(lines)

    def status(self) -> dict[str, int]:
        return {
            "queued": self._queue.qsize(),
            "published": self.published,
            "spooled": self.spooled,
            "spool_bytes": self.spool.size(),
        }
