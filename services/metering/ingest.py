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
from libs.common.db import Clock
from libs.common.events import CloudEvent
from libs.common.events.usage import UsageRecorded
from libs.common.outbox import Outbox
from libs.common.settings import Settings
from services.metering import domain, metrics, pricing, sketch
from services.metering import repository as repo
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


# Where each per-minute sum sits in an accumulator list (see ``Ingest.minutes``): list slots
# instead of one dict per aggregate row, because the loop runs for every event.
_SLOT = {name: i for i, name in enumerate(MINUTE_SUMS)}
_REQUESTS, _ERRORS, _PROMPT, _COMPLETION, _COST = (
    _SLOT[c] for c in ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_nanos")
)
_REQUEST_BYTES, _RESPONSE_BYTES = _SLOT["request_bytes"], _SLOT["response_bytes"]
_RATE_LIMITED, _CLIENT_ERRORS, _SERVER_ERRORS = (
    _SLOT[c] for c in ("rate_limited", "client_errors", "server_errors")
)


def error_slot(http_status: int) -> int:
    """Which cause an error counts under: 429, another 4xx, or anything else (5xx, none)."""
    if http_status == 429:
        return _RATE_LIMITED
    if 400 <= http_status < 500:
        return _CLIENT_ERRORS
    return _SERVER_ERRORS


_DURATION_SUM, _TTFT_COUNT, _TTFT_SUM = (
    _SLOT[c] for c in ("duration_sum_ms", "ttft_count", "ttft_sum_ms")
)
_DURATION_SLOTS = tuple(_SLOT[c] for c in DURATION_BUCKETS)
_TTFT_SLOTS = tuple(_SLOT[c] for c in TTFT_BUCKETS)
_ZERO_SUMS: list[Any] = [0] * len(MINUTE_SUMS)
_ZERO_SUMS[_DURATION_SUM] = _ZERO_SUMS[_TTFT_SUM] = 0.0  # float8 columns
_MINUTE_KEY = ("minute", "project", "model", "credential_id", "endpoint")


def raw_values(event_id: str, u: UsageRecorded, cost_nanos: int) -> tuple[Any, ...]:
    """The raw usage row one event becomes, in ``repository.EVENT_COLUMNS`` order (a tuple:
    the ingest builds one per event, and the collector stops tracking a tuple of plain values
    at its first pass)."""
    return (
        event_id,
        u.time,
        u.project,
        u.credential_id,
        u.subject_id,
        u.model,
        u.endpoint,
        u.kind,
        u.prompt_tokens,
        u.completion_tokens,
        u.ttft_ms,
        u.duration_ms,
        u.http_status,
        u.status,
        (u.error_type or None) and u.error_type[:64],
        u.usage_source,
        u.stream,
        cost_nanos,
        u.request_bytes,
        u.response_bytes,
        u.request_id,
    )


def raw_row(event_id: str, u: UsageRecorded, cost_nanos: int) -> dict[str, Any]:
    """The same row by column name (the benchmark's baseline inserts the same rows)."""
    return dict(zip(repo.EVENT_NAMES, raw_values(event_id, u, cost_nanos), strict=True))


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
        latest = now + FUTURE_TOLERANCE
        validate = UsageRecorded.model_validate
        ids: list[str] = []
        usages: list[UsageRecorded] = []
        for event in events:
            try:
                usage = validate(event.data)
                reason = check(usage)
            except ValidationError as exc:
                reason = str(exc).replace("\n", " ")
            if reason is not None:
                # Rejecting is final (the inbox keeps its id): a malformed event would only
                # fail again. It stays in JetStream for the stream's retention if needed.
                log.error("usage event rejected", extra={"event_id": event.id, "reason": reason})
                metrics.EVENTS.labels("rejected").inc()
                continue
            if usage.time > latest:
                usage = usage.model_copy(update={"time": now})
            ids.append(event.id)
            usages.append(usage)
        if not usages:
            return
        # Priced by the catalog asset and version that served each call (the model name for
        # events without them), at the price in force at the call's time.
        book = await repo.price_book(session, sorted({u.asset or u.model for u in usages}))
        costs = [
            pricing.cost_nanos(
                book.at(u.asset or u.model, u.asset_version, u.time),
                u.prompt_tokens,
                u.completion_tokens,
            )
            for u in usages
        ]
        rows = [raw_values(i, u, c) for i, u, c in zip(ids, usages, costs, strict=True)]
        kept = await repo.insert_events(session, rows, now)
        if len(kept) < len(rows):
            # Replayed after the inbox forgot them, but still among the raw events: counted once.
            metrics.EVENTS.labels("duplicate").inc(len(rows) - len(kept))
            keep = [i in kept for i in ids]
            usages = [u for u, k in zip(usages, keep, strict=True) if k]
            costs = [c for c, k in zip(costs, keep, strict=True) if k]
            if not usages:
                return
        minutes = [u.time.replace(second=0, microsecond=0) for u in usages]
        await repo.add_minutes(session, self.minutes(usages, costs, minutes))
        await repo.add_latency_bins(session, self.latency_bins(usages, minutes))
        touched = await self.count_quotas(session, usages, minutes, now)
        newest = max(u.time for u in usages)

        def committed(_session: object) -> None:
            metrics.observe(usages, costs, self.settings.metering_currency)
            metrics.EVENTS.labels("counted").inc(len(usages))
            metrics.LAG_SECONDS.set(max(0.0, (self.clock() - newest).total_seconds()))
            self.dirty.update(touched)

        sa_event.listen(session.sync_session, "after_commit", committed, once=True)

    @staticmethod
    def minutes(
        usages: Sequence[UsageRecorded], costs: Sequence[int], minutes: Sequence[datetime]
    ) -> list[dict[str, Any]]:
        """Per-minute aggregate rows of a batch, one per (minute, project, model, key,
        endpoint); ``costs`` and ``minutes`` (each event's minute) run alongside ``usages``."""
        sums: dict[tuple[Any, ...], list[Any]] = {}
        duration_bounds, ttft_bounds = DURATION_BOUNDS_MS, TTFT_BOUNDS_MS
        bisect_left = bisect.bisect_left
        for u, cost, minute in zip(usages, costs, minutes, strict=True):
            key = (minute, u.project, u.model, u.credential_id, u.endpoint)
            acc = sums.get(key)
            if acc is None:
                acc = sums[key] = _ZERO_SUMS.copy()
            acc[_REQUESTS] += 1
            if u.status != "ok":
                acc[_ERRORS] += 1
                acc[error_slot(u.http_status)] += 1
            acc[_PROMPT] += u.prompt_tokens
            acc[_COMPLETION] += u.completion_tokens
            acc[_COST] += cost
            if u.request_bytes is not None:
                acc[_REQUEST_BYTES] += u.request_bytes
            if u.response_bytes is not None:
                acc[_RESPONSE_BYTES] += u.response_bytes
            duration = u.duration_ms
            acc[_DURATION_SUM] += duration
            acc[_DURATION_SLOTS[bisect_left(duration_bounds, duration)]] += 1
            ttft = u.ttft_ms
            if ttft is not None:
                acc[_TTFT_COUNT] += 1
                acc[_TTFT_SUM] += ttft
                acc[_TTFT_SLOTS[bisect_left(ttft_bounds, ttft)]] += 1
        return [
            dict(zip(_MINUTE_KEY, key, strict=True)) | dict(zip(MINUTE_SUMS, acc, strict=True))
            for key, acc in sums.items()
        ]

    @staticmethod
    def latency_bins(
        usages: Sequence[UsageRecorded], minutes: Sequence[datetime]
    ) -> dict[repo.BinKey, int]:
        """Each call's time to first token, duration and time per output token, in the latency
        sketch bins of its minute and group (``sketch``)."""
        bins: dict[repo.BinKey, int] = {}
        bin_of = sketch.bin_of
        for u, minute in zip(usages, minutes, strict=True):
            group = (minute, u.project, u.model, u.credential_id, u.endpoint)
            values = (
                ("duration", u.duration_ms),
                ("ttft", u.ttft_ms),
                ("tpot", sketch.tpot_ms(u.duration_ms, u.ttft_ms, u.completion_tokens, u.stream)),
            )
            for metric, value in values:
                if value is not None:
                    key = (*group, metric, bin_of(value))
                    bins[key] = bins.get(key, 0) + 1
        return bins

    async def count_quotas(
        self,
        session: AsyncSession,
        usages: Sequence[UsageRecorded],
        minutes: Sequence[datetime],
        now: datetime,
    ) -> set[str]:
        """Add the batch to every matching quota's window counter; alert on crossings.
        ``minutes`` holds each event's minute, alongside ``usages``."""
        projects = sorted({u.project for u in usages})
        # After this batch's minutes are written: a quota being created waits for the batch
        # (and backfills it) or the batch waits for the quota (and counts into it).
        await repo.hold_projects(session, projects, exclusive=False)
        quotas = await repo.quotas_of_projects(session, projects)
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
        # The part of each sum that each gateway process's calls make up.
        parts: dict[tuple[str, datetime, str], list[int]] = {}
        for u, minute in zip(usages, minutes, strict=True):
            mine = scopes.get(u.project)
            if not mine:
                continue
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
                amount[2] += u.admitted
                if u.gateway_id is not None:
                    part = parts.setdefault((quota_id, start, u.gateway_id), [0, 0, 0])
                    part[0] += u.prompt_tokens
                    part[1] += u.completion_tokens
                    part[2] += u.admitted
        by_id = {quota.id: quota for quota in quotas}
        totals = await repo.add_to_counters(
            session, {k: (v[0], v[1], v[2]) for k, v in sums.items()}, now
        )
        await repo.add_to_gateway_counters(
            session, {k: (v[0], v[1], v[2]) for k, v in parts.items()}
        )
        for (quota_id, start), used in sorted(totals.items()):
            added = sums[(quota_id, start)]
            before = (used[0] - added[0], used[1] - added[1], used[2] - added[2])
            await domain.raise_alerts(
                session, self.outbox, self.settings, by_id[quota_id], now, start, used, before
            )
        return {quota_id for quota_id, _ in sums}
