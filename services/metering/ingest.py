"""Counting usage: the batch handler of the usage consumer.

One call per JetStream fetch, inside the transaction that also holds the batch's inbox rows
(``libs.common.consumer.BatchConsumer``): the raw events, the per-minute aggregates, the quota
counters and any alert they trigger commit together with the event ids, or not at all. Prometheus
is told only after the commit, so ``/metrics`` never counts an event the database does not.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncSession

from libs.common import quota as q
from libs.common.events import CloudEvent
from libs.common.events.usage import UsageRecorded
from libs.common.outbox import Outbox
from libs.common.settings import Settings
from services.metering import domain, metrics
from services.metering import repository as repo
from services.metering.domain import Clock
from services.metering.models import (
    DURATION_BOUNDS_MS,
    DURATION_BUCKETS,
    MINUTE_SUMS,
    TTFT_BOUNDS_MS,
    TTFT_BUCKETS,
)

log = logging.getLogger("steward.metering.ingest")

# One call cannot plausibly use more; a larger figure is a broken producer, not usage.
MAX_TOKENS_PER_CALL = 100_000_000
# Events stamped further ahead than this are counted at their arrival time instead.
FUTURE_TOLERANCE = timedelta(minutes=5)
# An API key id, or for an OIDC token its ``jti`` or else its subject (up to 255 characters).
_LENGTHS = {"project": 63, "credential_id": 255, "subject_id": 255, "model": 255, "endpoint": 255}


def check(usage: UsageRecorded) -> str | None:
    """Why an event cannot be counted, or None. Checked before any write, so that one bad
    event never fails the batch it came in."""
    for name, length in _LENGTHS.items():
        value = getattr(usage, name)
        if not value or len(value) > length:
            return f"{name} must have 1 to {length} characters"
    for name in ("prompt_tokens", "completion_tokens"):
        value = getattr(usage, name)
        if not 0 <= value <= MAX_TOKENS_PER_CALL:
            return f"{name} must be between 0 and {MAX_TOKENS_PER_CALL}"
    if not 0 <= usage.duration_ms < 1e9 or (usage.ttft_ms is not None and usage.ttft_ms < 0):
        return "durations must be positive"
    if not 0 <= usage.http_status < 1000:
        return "http_status out of range"
    if usage.time.tzinfo is None:
        return "time has no time zone"
    return None


def _zero_minute(key: tuple[Any, ...]) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(MINUTE_SUMS, 0)
    row.update(zip(("minute", "project", "model", "credential_id", "endpoint"), key, strict=True))
    row["ttft_sum_ms"] = row["duration_sum_ms"] = 0.0
    return row


def raw_row(event_id: str, u: UsageRecorded, cost_nanos: int) -> dict[str, Any]:
    """The raw usage row one event becomes (the benchmark's baseline inserts the same rows)."""
    return {
        "event_id": event_id,
        "time": u.time,
        "project": u.project,
        "credential_id": u.credential_id,
        "subject_id": u.subject_id,
        "model": u.model,
        "endpoint": u.endpoint,
        "kind": u.kind,
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "ttft_ms": u.ttft_ms,
        "duration_ms": u.duration_ms,
        "http_status": u.http_status,
        "status": u.status,
        "error_type": (u.error_type or None) and u.error_type[:64],
        "usage_source": u.usage_source,
        "stream": u.stream,
        "cost_nanos": cost_nanos,
    }


class Ingest:
    """The batch handler, and what outlives one batch: which quotas changed since the last
    publication (for ``QuotaPublisher``)."""

    def __init__(self, outbox: Outbox, settings: Settings, clock: Clock) -> None:
        self.outbox = outbox
        self.settings = settings
        self.clock = clock
        self.dirty: set[str] = set()

    async def __call__(self, session: AsyncSession, events: Sequence[CloudEvent]) -> None:
        now = self.clock()
        accepted: list[tuple[str, UsageRecorded]] = []
        for event in events:
            try:
                usage = UsageRecorded.model_validate(event.data)
                reason = check(usage)
            except ValidationError as exc:
                reason = str(exc).replace("\n", " ")
            if reason is not None:
                # Rejecting is final (the inbox keeps its id): a malformed event would only
                # fail again. It stays in JetStream for the stream's retention if needed.
                log.error("usage event rejected", extra={"event_id": event.id, "reason": reason})
                metrics.EVENTS.labels("rejected").inc()
                continue
            if usage.time > now + FUTURE_TOLERANCE:
                usage = usage.model_copy(update={"time": now})
            accepted.append((event.id, usage))
        if not accepted:
            return
        usages = [u for _, u in accepted]
        prices = await repo.prices_for(session, sorted({u.model for u in usages}))
        rows: list[dict[str, Any]] = []
        costs: dict[str, int] = {}
        for event_id, u in accepted:
            price = prices.get(u.model)
            cost = domain.cost_nanos(price, u.prompt_tokens, u.completion_tokens) if price else 0
            costs[event_id] = cost
            rows.append(raw_row(event_id, u, cost))
        kept = await repo.insert_events(session, rows, now)
        if len(kept) < len(rows):
            # Replayed after the inbox forgot them, but still among the raw events: counted once.
            metrics.EVENTS.labels("duplicate").inc(len(rows) - len(kept))
            accepted = [(event_id, u) for event_id, u in accepted if event_id in kept]
            if not accepted:
                return
            usages = [u for _, u in accepted]
        minutes = self.minutes(accepted, costs)
        await repo.add_minutes(session, list(minutes.values()))
        touched = await self.count_quotas(session, usages, now)
        newest = max(u.time for u in usages)

        def committed(_session: object) -> None:
            metrics.observe(usages)
            metrics.EVENTS.labels("counted").inc(len(usages))
            metrics.LAG_SECONDS.set(max(0.0, (self.clock() - newest).total_seconds()))
            self.dirty.update(touched)

        sa_event.listen(session.sync_session, "after_commit", committed, once=True)

    @staticmethod
    def minutes(
        accepted: Sequence[tuple[str, UsageRecorded]], costs: dict[str, int]
    ) -> dict[tuple[Any, ...], dict[str, Any]]:
        """Per-minute aggregate rows of a batch, keyed by (minute, project, model, key,
        endpoint)."""
        minutes: dict[tuple[Any, ...], dict[str, Any]] = {}
        for event_id, u in accepted:
            minute = u.time.replace(second=0, microsecond=0)
            key = (minute, u.project, u.model, u.credential_id, u.endpoint)
            agg = minutes.get(key)
            if agg is None:
                agg = minutes[key] = _zero_minute(key)
            agg["requests"] += 1
            agg["errors"] += u.status != "ok"
            agg["prompt_tokens"] += u.prompt_tokens
            agg["completion_tokens"] += u.completion_tokens
            agg["cost_nanos"] += costs[event_id]
            agg["duration_sum_ms"] += u.duration_ms
            agg[DURATION_BUCKETS[bisect.bisect_left(DURATION_BOUNDS_MS, u.duration_ms)]] += 1
            if u.ttft_ms is not None:
                agg["ttft_count"] += 1
                agg["ttft_sum_ms"] += u.ttft_ms
                agg[TTFT_BUCKETS[bisect.bisect_left(TTFT_BOUNDS_MS, u.ttft_ms)]] += 1
        return minutes

    async def count_quotas(
        self, session: AsyncSession, usages: Sequence[UsageRecorded], now: datetime
    ) -> set[str]:
        """Add the batch to every matching quota's window counter; alert on crossings."""
        quotas = await repo.quotas_of_projects(session, sorted({u.project for u in usages}))
        if not quotas:
            return set()
        # Plain tuples and a window-start cache: this loop runs for every event of every batch.
        scopes: dict[str, list[tuple[str, Any, str | None, str | None]]] = {}
        for quota in quotas:
            scopes.setdefault(quota.project, []).append(
                (quota.id, quota.window, quota.key_id, quota.model)
            )
        starts: dict[tuple[str, datetime], datetime] = {}
        sums: dict[tuple[str, datetime], list[int]] = {}
        for u in usages:
            mine = scopes.get(u.project)
            if not mine:
                continue
            minute = u.time.replace(second=0, microsecond=0)
            for quota_id, window, key_id, model in mine:
                if key_id is not None and key_id != u.credential_id:
                    continue
                if model is not None and model != u.model:
                    continue
                start = starts.get((window, minute))
                if start is None:
                    start = starts[(window, minute)] = q.window_start(window, minute)
                amount = sums.setdefault((quota_id, start), [0, 0, 0])
                amount[0] += u.prompt_tokens
                amount[1] += u.completion_tokens
                amount[2] += 1
        by_id = {quota.id: quota for quota in quotas}
        totals = await repo.add_to_counters(
            session, {k: (v[0], v[1], v[2]) for k, v in sums.items()}, now
        )
        for (quota_id, start), used in sorted(totals.items()):
            tokens_in, tokens_out, _ = sums[(quota_id, start)]
            before = (used[0] - tokens_in, used[1] - tokens_out)
            await domain.raise_alerts(
                session, self.outbox, self.settings, by_id[quota_id], now, start, used, before
            )
        return {quota_id for quota_id, _ in sums}
