"""The syncer stops even when something under it swallows the cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from gateway.sync import Feed, Syncer
from libs.common.bus import Bus
from tests.helpers import NATS_URL


async def test_stop_ends_a_feed_whose_load_swallowed_the_cancel() -> None:
    entered = asyncio.Event()

    async def load(_: bool) -> Callable[[], None]:
        entered.set()
        # A snapshot that never comes, and a library that eats the cancel (as one did at shutdown).
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        return lambda: None

    bus = Bus(NATS_URL, "unused-never-connected", name="sync-stop-test")
    syncer = Syncer(bus, [Feed(name="stuck", handlers={}, load=load)], resync_seconds=3600)
    await syncer.start()
    await asyncio.wait_for(entered.wait(), 10)
    # Before: the feed went on to sleep its hour-long resync interval, and stop() waited on it.
    await asyncio.wait_for(syncer.stop(), 10)
