"""Durable JetStream consumers whose handlers run exactly once per event (inbox table)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from pydantic import ValidationError
from sqlalchemy import Table, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.bus import Bus
from libs.common.db import utcnow
from libs.common.events import CloudEvent, stream_for

log = logging.getLogger("steward.consumer")
tracer = trace.get_tracer("steward.consumer")

Handler = Callable[[AsyncSession, CloudEvent], Awaitable[None]]


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

    async def _subscribe(self) -> object:
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=30,
            max_ack_pending=1000,
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
                    try:
                        msgs = await sub.fetch(self.batch, timeout=1)  # type: ignore[attr-defined]
                    except TimeoutError:
                        continue
                    for msg in msgs:
                        await self.handle(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("consumer interrupted; resubscribing", extra={"error": str(exc)})
                await asyncio.sleep(1)

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
