"""Watching the bus from a test: a test decides on what the outbox, the stream and the consumers
say — every committed event relayed, a durable consumer with nothing left to deliver or
acknowledge, a subscription that has heard everything stored — never on a sleep.

This is how a test proves that something did NOT happen (no duplicate, no redelivery, no second
warning): it waits until everything that could have caused it has been processed, then looks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js.api import DeliverPolicy
from sqlalchemy import MetaData, select

from libs.common.bus import Bus
from libs.common.db import make_engine
from libs.common.outbox import define_bus_tables
from libs.common.settings import Settings

# Every service's outbox has this shape (``define_bus_tables``); the engine picks the service.
_OUTBOX = define_bus_tables(MetaData()).outbox


async def until(
    check: Callable[[], Awaitable[bool]], seconds: float = 15.0, what: str = "condition"
) -> None:
    """Poll ``check`` until it holds; ``seconds`` only bounds a failure."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached in {seconds}s")
        await asyncio.sleep(0.02)


async def outbox_relayed(settings: Settings, service: str, seconds: float = 15.0) -> None:
    """Wait until every event ``service`` had committed to its outbox when this was called is in
    JetStream (its relay marks a row only once the stream has acknowledged it)."""
    engine = make_engine(settings.database_url_for(service), service)
    c = _OUTBOX.c

    async def unpublished(among: set[str] | None = None) -> set[str]:
        query = select(c.id).where(c.published_at.is_(None))
        if among is not None:
            query = query.where(c.id.in_(among))
        async with engine.connect() as conn:  # a new transaction each time: fresh commits
            return set((await conn.scalars(query)).all())

    try:
        waiting = await unpublished()

        async def relayed() -> bool:
            nonlocal waiting
            waiting = await unpublished(waiting) if waiting else waiting
            return not waiting

        await until(relayed, seconds, f"the {service} outbox relayed")
    finally:
        await engine.dispose()


async def consumer_done(bus: Bus, stream: str, durable: str) -> bool:
    """Has the durable consumer been given, and acknowledged, every message of ``stream`` that it
    filters? Nothing left to deliver, nothing awaiting an acknowledgement or a redelivery: what
    was stored before this call has been applied, and nothing of it can come back."""
    info = await bus.js.consumer_info(bus.stream(stream), durable)
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


async def consumer_caught_up(
    bus: Bus, stream: str, durable: str, seconds: float = 15.0, what: str | None = None
) -> None:
    """Wait until ``consumer_done``: the durable consumer has acknowledged everything stored."""

    async def done() -> bool:
        return await consumer_done(bus, stream, durable)

    await until(done, seconds, what or f"consumer {durable} caught up with {stream}")


class Listener:
    """The messages stored on a subject pattern from now on (or, with ``DeliverPolicy.ALL``,
    ever), in stream order (a JetStream ordered consumer), and whether it has heard all of them
    yet. Subclasses keep what they need of each message (``handle``)."""

    def __init__(
        self,
        bus: Bus,
        pattern: str,
        stream: str = "EVENTS",
        deliver_policy: DeliverPolicy = DeliverPolicy.NEW,
    ) -> None:
        self.bus = bus
        self.pattern = pattern
        self.stream = stream
        self.deliver_policy = deliver_policy
        self._sub: Any = None
        # The last message handled: (consumer name, its consumer sequence). An ordered consumer
        # is recreated under a new name if it ever misses a message.
        self._last: tuple[str, int] = ("", 0)

    async def start(self) -> None:
        self._sub = await self.bus.js.subscribe(
            self.bus.subject(self.pattern),
            cb=self._on_msg,
            stream=self.bus.stream(self.stream),
            ordered_consumer=True,
            deliver_policy=self.deliver_policy,
        )

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    def handle(self, body: bytes) -> None:
        raise NotImplementedError

    async def _on_msg(self, msg: Any) -> None:
        try:
            self.handle(msg.data)
        finally:
            self._last = (msg.metadata.consumer, msg.metadata.sequence.consumer)

    async def heard_all(self) -> bool:
        """Has every message stored on the pattern before this call been handled here?"""
        try:
            info = await self._sub.consumer_info()
        except Exception:  # the ordered consumer is being recreated: not yet
            return False
        if info.num_pending:
            return False
        delivered = info.delivered.consumer_seq
        return delivered == 0 or self._last == (info.name, delivered)

    async def caught_up(self, seconds: float = 15.0) -> None:
        await until(self.heard_all, seconds, f"every {self.pattern} event heard")
