"""Metering's background work besides the consumers: publishing quota usage, holding running
endpoints to their plans, and retention."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.bus import Bus, BusUnavailable
from libs.common.db import Clock
from libs.common.events import CloudEvent
from libs.common.events.metering import QuotaConsumed
from libs.common.outbox import Outbox
from libs.common.settings import Settings
from libs.common.uow import UnitOfWork
from services.metering import domain, endpoints, metrics
from services.metering import repository as repo
from services.metering.ingest import Ingest
from services.metering.models import (
    QuotaAlert,
    QuotaCounter,
    QuotaGatewayCounter,
    WebhookDelivery,
    bus_tables,
    usage_events,
    usage_latency_bins,
    usage_minutes,
)

log = logging.getLogger("steward.metering")

USAGE_DURABLE = "metering-usage"


def stop_if_cancelled() -> None:
    """Raise the cancellation a library's ``wait_for`` may have swallowed (Python 3.11), so a
    loop that keeps going round still stops at shutdown."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class QuotaPublisher:
    """Tells the gateways how much of each quota is used, every ``every`` seconds at most, for
    the quotas whose usage changed, and again for ``TRAIL_SECONDS`` after their last change
    whenever the consumer's watermark moves: that is what lets a gateway's ledger drop the
    usage it counted locally (``counted_through``) even once the traffic has stopped.

    ``metering.quota.consumed`` is a state broadcast, published straight to JetStream rather
    than through the outbox: each one supersedes the previous, the gateway merges them
    monotonically, and the snapshot covers anything lost. Crossing a threshold is different:
    warning/exceeded events go through the outbox with the counts that crossed it.
    """

    # Longer than a ledger's confirm margin plus its one-second buckets (QuotaLedger's default
    # margin is 1 s): by then every gateway has dropped its local copy of the last calls.
    TRAIL_SECONDS = 3.0

    def __init__(
        self,
        ingest: Ingest,
        sessionmaker: async_sessionmaker[AsyncSession],
        bus: Bus,
        clock: Clock,
        watermark: Callable[[], datetime | None],
        every: float,
    ) -> None:
        self.ingest = ingest
        self.sessionmaker = sessionmaker
        self.bus = bus
        self.clock = clock
        self.watermark = watermark
        self.every = every
        self.recent: dict[str, datetime] = {}  # quota id -> when its usage last changed
        self.last_through: datetime | None = None

    async def publish_once(self) -> int:
        if not self.bus.connected:
            return 0
        now = self.clock()
        dirty, self.ingest.dirty = self.ingest.dirty, set()
        for quota_id in dirty:
            self.recent[quota_id] = now
        # Taken before reading the counts: they then include everything it promises.
        through = self.watermark()
        moved = through is not None and (self.last_through is None or through > self.last_through)
        due = dirty | (set(self.recent) if moved else set())
        if not due:
            return 0
        try:
            async with self.sessionmaker() as session:
                quotas = await repo.quotas_by_id(session, sorted(due))
                states = await domain.current_states(
                    session, quotas, self.clock(), through, model=QuotaConsumed
                )
            for state in states:
                event = CloudEvent.wrap(state, source="metering", entity=state.quota_id)
                await self.bus.publish(state.subject, event.model_dump_json().encode(), event.id)
                metrics.observe_quota(state)
        except BaseException as exc:
            self.ingest.dirty |= dirty  # published next time
            if isinstance(exc, BusUnavailable):
                return 0
            raise
        self.last_through = through
        alive = {s.quota_id for s in states}
        self.recent = {
            quota_id: changed
            for quota_id, changed in self.recent.items()
            if quota_id in alive
            and (through is None or through < changed + timedelta(seconds=self.TRAIL_SECONDS))
        }
        return len(states)

    async def run(self) -> None:
        while True:
            stop_if_cancelled()
            await asyncio.sleep(self.every)
            try:
                await self.publish_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("quota usage publication failed; retrying")


class Periodic:
    """Work done every ``interval`` seconds until cancelled, first at start; a failure is logged
    and tried again at the next round."""

    what = "background work"

    def __init__(
        self, sessionmaker: async_sessionmaker[AsyncSession], settings: Settings, clock: Clock
    ) -> None:
        self.sessionmaker = sessionmaker
        self.settings = settings
        self.clock = clock

    @property
    def interval(self) -> float:
        raise NotImplementedError

    async def run_once(self) -> object:
        raise NotImplementedError

    async def run(self) -> None:
        while True:
            stop_if_cancelled()
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(f"{self.what} failed; retrying at the next round")
            await asyncio.sleep(self.interval)


class PlanWatch(Periodic):
    """Checks the endpoints that hold GPUs against their approved plans every
    ``metering_plan_check_seconds``: an endpoint's events say when it started, but only time says
    when it ran past its plan.

    It judges what metering knows now: while the control consumer is catching up after an
    outage, an endpoint already scaled down (in events not yet applied) is judged at its older,
    larger size until they are, so an early announcement is possible then, never a missed one.
    """

    what = "checking endpoints against their plans"

    @property
    def interval(self) -> float:
        return self.settings.metering_plan_check_seconds

    async def run_once(self) -> int:
        async with self.sessionmaker() as session, session.begin():
            uow = UnitOfWork(
                session, Outbox(bus_tables.outbox, "metering"), actor=endpoints.SYSTEM_ACTOR
            )
            return await endpoints.check_over_plan(uow, self.settings, self.clock())


class Retention(Periodic):
    """Deletes what has outlived its retention, in small transactions, every
    ``metering_retention_interval_seconds``."""

    CHUNK = 5000
    what = "retention"

    @property
    def interval(self) -> float:
        return self.settings.metering_retention_interval_seconds

    async def run_once(self) -> dict[str, int]:
        s = self.settings
        now = self.clock()
        inbox = bus_tables.inbox
        plan = [
            (
                "usage_events",
                usage_events,
                "event_id",
                "received_at",
                s.metering_raw_retention_days,
                None,
            ),
            (
                "usage_minutes",
                usage_minutes,
                "minute",
                "minute",
                s.metering_aggregate_retention_days,
                None,
            ),
            (
                "usage_latency_bins",
                usage_latency_bins,
                "minute",
                "minute",
                s.metering_aggregate_retention_days,
                None,
            ),
            (
                "inbox",
                inbox,
                "event_id",
                "processed_at",
                s.metering_inbox_retention_days,
                inbox.c.consumer == USAGE_DURABLE,
            ),
            (
                "quota_counters",
                QuotaCounter.__table__,
                "window_start",
                "window_start",
                s.metering_aggregate_retention_days,
                None,
            ),
            (
                "quota_gateway_counters",
                QuotaGatewayCounter.__table__,
                "window_start",
                "window_start",
                s.metering_aggregate_retention_days,
                None,
            ),
            (
                "quota_alerts",
                QuotaAlert.__table__,
                "window_start",
                "window_start",
                s.metering_aggregate_retention_days,
                None,
            ),
            ("webhook_deliveries", WebhookDelivery.__table__, "id", "created_at", 30, None),
        ]
        deleted: dict[str, int] = {}
        for name, table, key, column, days, where in plan:
            cutoff = now - timedelta(days=days)
            total = 0
            while True:
                async with self.sessionmaker() as session, session.begin():
                    n = await repo.delete_older(
                        session, table, key, column, cutoff, chunk=self.CHUNK, where=where
                    )
                total += n
                if n < self.CHUNK:
                    break
            deleted[name] = total
        if any(deleted.values()):
            log.info("retention", extra={"deleted": deleted})
        return deleted
