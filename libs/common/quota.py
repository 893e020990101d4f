"""Quota arithmetic, shared by metering (which counts) and the gateway (which enforces).

A quota limits tokens (input, output, total) and calls (``requests``: a model call, an MCP tool
call) of a project, one of its keys and/or one model or MCP server, per window.

Metering owns the truth: it counts every usage event once and publishes each quota's state
(``libs.common.events.metering``). A gateway replica decides locally with a ``QuotaLedger``:

- ``reserve`` before forwarding a call sets aside an estimate (prompt estimate + ``max_tokens``,
  and the calls it makes) and refuses the call when it would take any applicable limit it adds
  to past its budget;
- ``settle`` after the call replaces the estimate with the real usage, counted locally for the
  rest of the window;
- ``apply`` merges states from the snapshot and from events: within one window counts only grow,
  so the newest read wins and the order of arrival does not matter.

Each call is counted exactly once. A replica's usage of a window is metering's count of the
*other* replicas' calls (its count minus the part that this replica's calls make up,
``QuotaState.by_gateway``, read with it) plus the replica's own exact local count, plus what its
calls in flight hold. No reconciliation by time: whether metering has counted a call of this
replica yet or not, it appears once.

Windows are UTC and aligned: a minute, an hour, a day from midnight, a calendar month.

Worst-case overshoot with R gateway replicas sharing one budget (see README "Quotas"):

- one replica alone admits a call iff used + in flight + its reservation <= limit, so it never
  admits past a limit, except by its own estimate error (an upstream that reports more prompt
  tokens than the gateway estimated), and never refuses a call that fits;
- replicas see each other's calls only once metering has counted and published them: the lag
  ``L`` = publish + ingest batch + ``metering_quota_publish_seconds`` + delivery (about 1 s), plus
  the duration ``D`` of a call (others see its tokens only when it ends). In that time the other
  R-1 replicas may admit what they believe is left, so the overshoot is at most the tokens the
  other replicas admit in ``L + D``: ``(R - 1) x rate x (L + D)``, and never more than
  ``(R - 1) x limit``;
- that last figure is also the bound while replicas are cut off from metering (NATS down): each
  one enforces the whole budget on what it sees, so R replicas admit at most R x limit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from libs.common.db import Clock, utcnow
from libs.common.events.metering import (
    Dimension,
    QuotaLimits,
    QuotaState,
    QuotaStatus,
    Window,
)

WINDOWS: tuple[Window, ...] = ("minute", "hour", "day", "month")
DIMENSIONS: tuple[Dimension, ...] = ("input", "output", "total", "requests")
DEFAULT_SOFT_THRESHOLD = 0.8

# Usage of a window: (input tokens, output tokens, requests).
Used = tuple[int, int, int]


def window_bounds(window: Window, at: datetime) -> tuple[datetime, datetime]:
    """The UTC window ``[start, end)`` of this kind that contains ``at``."""
    if at.tzinfo is None:
        raise ValueError("window_bounds needs an aware datetime")
    at = at.astimezone(UTC)
    if window == "minute":
        start = at.replace(second=0, microsecond=0)
        return start, start + timedelta(minutes=1)
    if window == "hour":
        start = at.replace(minute=0, second=0, microsecond=0)
        return start, start + timedelta(hours=1)
    if window == "day":
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    if window == "month":
        start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else None
        return start, end or start.replace(month=start.month + 1)
    raise ValueError(f"unknown window {window!r}")


def window_start(window: Window, at: datetime) -> datetime:
    return window_bounds(window, at)[0]


def seconds_until(end: datetime, now: datetime) -> int:
    """Whole seconds until ``end``, at least 1: ``Retry-After`` and ``RateLimit-Reset``."""
    return max(1, math.ceil((end - now).total_seconds()))


def limit_of(limits: QuotaLimits, dimension: Dimension) -> int | None:
    if dimension == "input":
        return limits.input_tokens
    if dimension == "output":
        return limits.output_tokens
    if dimension == "requests":
        return limits.requests
    return limits.total_tokens


def used_of(dimension: Dimension, used: Sequence[int]) -> int:
    """One dimension of a (input, output, requests) amount."""
    if dimension == "input":
        return used[0]
    if dimension == "output":
        return used[1]
    if dimension == "requests":
        return used[2]
    return used[0] + used[1]


def level(limit: int, fraction: float) -> int:
    """Tokens at which ``fraction`` of ``limit`` is reached (80% of 7 tokens is reached at 6)."""
    return max(1, math.ceil(limit * fraction - 1e-9))


def dimensions_reached(
    limits: QuotaLimits, used: Sequence[int], fraction: float
) -> list[Dimension]:
    """The limited dimensions whose usage reached ``fraction`` of their limit."""
    reached: list[Dimension] = []
    for dimension in DIMENSIONS:
        limit = limit_of(limits, dimension)
        if limit is not None and used_of(dimension, used) >= level(limit, fraction):
            reached.append(dimension)
    return reached


def status_of(limits: QuotaLimits, soft_threshold: float, used: Sequence[int]) -> QuotaStatus:
    if dimensions_reached(limits, used, 1.0):
        return "exceeded"
    if dimensions_reached(limits, used, soft_threshold):
        return "warning"
    return "ok"


def used_in(state: QuotaState) -> Used:
    return state.input_used, state.output_used, state.requests_used


def applies(state: QuotaState, project: str, credential_id: str, model: str) -> bool:
    """Does a call by this key on this model count against the quota?"""
    return (
        state.project == project
        and (state.key_id is None or state.key_id == credential_id)
        and (state.model is None or state.model == model)
    )


def describe(state: QuotaState) -> str:
    """``project p`` / ``key k of project p`` / ``... on model m``: for messages people read."""
    who = f"key {state.key_id} of project {state.project}" if state.key_id else None
    who = who or f"project {state.project}"
    return f"{who} on model {state.model}" if state.model else who


def rate_limit_headers(
    limit: int, remaining: int, reset_seconds: int, *, refused: bool
) -> dict[str, str]:
    """Kong's rate-limiting header names; ``Retry-After`` only on a refusal."""
    headers = {
        "RateLimit-Limit": str(limit),
        "RateLimit-Remaining": str(max(0, remaining)),
        "RateLimit-Reset": str(reset_seconds),
    }
    if refused:
        headers["Retry-After"] = str(reset_seconds)
    return headers


# -- the gateway's local ledger ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hold:
    """Tokens and calls set aside in one quota's window for calls in flight."""

    quota_id: str
    window_start: datetime
    input_tokens: int
    output_tokens: int
    requests: int = 0


@dataclass(frozen=True, slots=True)
class Reservation:
    """The ledger's answer to one call. ``allowed`` False means 429 with ``headers``."""

    allowed: bool
    at: datetime
    holds: tuple[Hold, ...] = ()
    reason: str = ""
    retry_after_seconds: int | None = None
    # Soft-threshold notice for the client (e.g. an ``x-steward-quota-warning`` header).
    warning: str | None = None
    # RateLimit-* for the tightest applicable quota (and Retry-After on a refusal).
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass
class _Entry:
    state: QuotaState
    # This replica's gateway id (``UsageRecorded.gateway_id``), None for a ledger of no gateway.
    me: str | None = None
    # Reserved for calls in flight, by window start: [input, output, requests].
    inflight: dict[datetime, list[int]] = field(default_factory=dict)
    # Settled by this replica, by window start: [input, output, requests], for the whole window.
    mine: dict[datetime, list[int]] = field(default_factory=dict)

    def settled(self, start: datetime) -> Used:
        """Usage of finished calls in the window starting at ``start``, each counted once."""
        used = [0, 0, 0]
        state = self.state
        if state.window_start == start:
            used = [state.input_used, state.output_used, state.requests_used]
            if self.me:
                counted_in, counted_out = state.by_gateway.get(self.me, (0, 0))
                used[0] -= counted_in
                used[1] -= counted_out
                used[2] -= state.requests_by_gateway.get(self.me, 0)
        own = self.mine.get(start)
        if own is not None:
            used = [u + o for u, o in zip(used, own, strict=True)]
        return used[0], used[1], used[2]

    def used(self, start: datetime) -> Used:
        """Usage in the window starting at ``start`` as this replica knows it, holds included."""
        used = self.settled(start)
        held = self.inflight.get(start)
        if held is None:
            return used
        return used[0] + held[0], used[1] + held[1], used[2] + held[2]

    def forget_before(self, start: datetime) -> None:
        """Drop local amounts of windows that have ended."""
        for local in (self.mine, self.inflight):
            # A hold left behind is a call never settled; its window is over.
            for stale in [w for w in local if w < start]:
                del local[stale]


@dataclass(frozen=True, slots=True)
class _Verdict:
    entry: _Entry
    start: datetime
    end: datetime
    blocked: list[Dimension]
    # The limited dimension with the least left (None: the call is judged by no limit here).
    dimension: Dimension | None
    limit: int
    remaining: int
    fraction_left: float
    # Blocked only by what calls in flight hold: it may pass as soon as they settle.
    held_only: bool = False


# Retry-After when only calls in flight stand in the way: they settle within a call's duration.
HELD_RETRY_SECONDS = 1


class QuotaLedger:
    """A gateway replica's view of every quota; synchronous, so reserve/settle never await.

    ``gateway_id`` is the id this replica's usage events carry (``UsageRecorded.gateway_id``):
    the part of metering's count it names is replaced by the replica's own count.
    """

    def __init__(self, *, gateway_id: str | None = None, clock: Clock | None = None) -> None:
        self.gateway_id = gateway_id
        # "Now" when ``reserve`` or ``settle`` is not told: the wall clock, or a test's.
        self.clock: Clock = clock or utcnow
        self._by_project: dict[str, dict[str, _Entry]] = {}
        self._by_id: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def states(self) -> list[QuotaState]:
        return [e.state for e in self._by_id.values()]

    def replace(self, states: Iterable[QuotaState]) -> None:
        """Install a snapshot: quotas it lacks are gone; local amounts of the others are kept."""
        fresh = {s.quota_id: s for s in states}
        for quota_id in [q for q in self._by_id if q not in fresh]:
            self.remove(quota_id)
        for state in fresh.values():
            self.apply(state)

    def apply(self, state: QuotaState) -> None:
        """Merge a state from the snapshot or an event (any order, any number of times)."""
        entry = self._by_id.get(state.quota_id)
        if entry is None:
            entry = _Entry(state=state, me=self.gateway_id)
            self._by_id[state.quota_id] = entry
            self._by_project.setdefault(state.project, {})[state.quota_id] = entry
        else:
            entry.state = _merge(entry.state, state)

    def remove(self, quota_id: str) -> None:
        entry = self._by_id.pop(quota_id, None)
        if entry is not None:
            project = self._by_project.get(entry.state.project, {})
            project.pop(quota_id, None)
            if not project:
                self._by_project.pop(entry.state.project, None)

    def usage(self, quota_id: str, now: datetime) -> Used:
        """(input, output, requests) used in the current window, as this replica counts it."""
        entry = self._by_id[quota_id]
        return entry.used(window_start(entry.state.window, now))

    def reserve(
        self,
        *,
        project: str,
        credential_id: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        requests: int = 1,
        now: datetime | None = None,
    ) -> Reservation:
        """Admit ``requests`` calls if, for every applicable quota and every limit they add to,
        used + estimate <= limit (a tool call, which asks no tokens, is not refused by a token
        budget)."""
        now = now or self.clock()
        asked: Used = (max(0, input_tokens), max(0, output_tokens), max(0, requests))
        verdicts = [
            _judge(entry, now, asked)
            for entry in self._by_project.get(project, {}).values()
            if applies(entry.state, project, credential_id, model)
        ]
        if not verdicts:
            return Reservation(allowed=True, at=now)
        refused = [v for v in verdicts if v.blocked]
        if refused:
            # Usage only grows within a window: a quota its finished calls already fill lets the
            # call through when its window ends (the last such window says when); one that only
            # calls in flight fill may let it through as soon as they settle.
            full = [v for v in refused if not v.held_only]
            worst = max(full or refused, key=lambda v: v.end)
            retry = seconds_until(worst.end, now) if full else HELD_RETRY_SECONDS
            return Reservation(
                allowed=False,
                at=now,
                reason=_refusal(worst, asked, retry),
                retry_after_seconds=retry,
                headers=rate_limit_headers(worst.limit, worst.remaining, retry, refused=True),
            )
        holds = []
        for v in verdicts:
            held = v.entry.inflight.setdefault(v.start, [0, 0, 0])
            for i, amount in enumerate(asked):
                held[i] += amount
            holds.append(Hold(v.entry.state.quota_id, v.start, *asked))
        measured = [v for v in verdicts if v.dimension is not None]
        if not measured:
            return Reservation(allowed=True, at=now, holds=tuple(holds))
        tightest = min(measured, key=lambda v: v.fraction_left)
        warning = None
        if 1.0 - tightest.fraction_left >= tightest.entry.state.soft_threshold:
            used_pct = round(100 * (1.0 - tightest.fraction_left))
            budget = "call" if tightest.dimension == "requests" else "token"
            warning = (
                f"{describe(tightest.entry.state)} has used {used_pct}% of its "
                f"{tightest.entry.state.window} {budget} budget"
            )
        return Reservation(
            allowed=True,
            at=now,
            holds=tuple(holds),
            warning=warning,
            headers=rate_limit_headers(
                tightest.limit,
                tightest.remaining,
                seconds_until(tightest.end, now),
                refused=False,
            ),
        )

    def settle(
        self,
        reservation: Reservation,
        *,
        input_tokens: int,
        output_tokens: int,
        requests: int = 1,
        at: datetime | None = None,
    ) -> None:
        """Replace the estimate by the real usage (``at``: the usage event's time): the tokens
        and the calls that were made (each admitted call is one usage event metering counts)."""
        at = at or self.clock()
        real = (max(0, input_tokens), max(0, output_tokens), max(0, requests))
        for hold in reservation.holds:
            entry = self._by_id.get(hold.quota_id)
            if entry is None:
                continue  # the quota was removed while the call ran
            held = entry.inflight.get(hold.window_start)
            if held is not None:
                held[0] -= hold.input_tokens
                held[1] -= hold.output_tokens
                held[2] -= hold.requests
                if all(h <= 0 for h in held):
                    del entry.inflight[hold.window_start]
            start = window_start(entry.state.window, at)
            entry.forget_before(start)
            amount = entry.mine.setdefault(start, [0, 0, 0])
            for i, value in enumerate(real):
                amount[i] += value


def _merge(known: QuotaState, incoming: QuotaState) -> QuotaState:
    """Newest definition (by revision); the newest count of the newest window, taken whole (its
    total and its per-gateway parts were read together). Counts only grow within a window, so
    the larger total is the newer read."""
    base = incoming if incoming.revision > known.revision else known
    if incoming.window != known.window:
        # The window kind changed: only counts of the current definition's window mean anything.
        counts = incoming if incoming.window == base.window else known
    elif incoming.window_start != known.window_start:
        counts = max(incoming, known, key=lambda s: s.window_start)
    else:
        counts = max(known, incoming, key=_read_order)
    through = [t for t in (known.counted_through, incoming.counted_through) if t is not None]
    return base.model_copy(
        update={
            "window_start": counts.window_start,
            "window_end": counts.window_end,
            "input_used": counts.input_used,
            "output_used": counts.output_used,
            "requests_used": counts.requests_used,
            "by_gateway": counts.by_gateway,
            "requests_by_gateway": counts.requests_by_gateway,
            "as_of": max(known.as_of, incoming.as_of),
            "counted_through": max(through) if through else None,
            "status": status_of(base.limits, base.soft_threshold, used_in(counts)),
        }
    )


def _read_order(state: QuotaState) -> tuple[int, int, datetime]:
    """Which of two reads of one window is the newer: counts and their attributed parts only
    grow (a state without the split, from an older metering, loses a tie)."""
    attributed = sum(i + o for i, o in state.by_gateway.values())
    attributed += sum(state.requests_by_gateway.values())
    return state.input_used + state.output_used + state.requests_used, attributed, state.as_of


def _judged(asked: Used) -> tuple[Dimension, ...]:
    """The limits a call is judged by: the token limits when it asks for tokens (a tool call
    does not), the call limit when it makes calls."""
    tokens: tuple[Dimension, ...] = ("input", "output", "total") if asked[0] + asked[1] else ()
    return (*tokens, "requests") if asked[2] else tokens


def _judge(entry: _Entry, now: datetime, asked: Used) -> _Verdict:
    state = entry.state
    start, end = window_bounds(state.window, now)
    entry.forget_before(start)
    used_now = entry.used(start)
    settled = entry.settled(start)
    held_only = True
    blocked: list[Dimension] = []
    tight: Dimension | None = None
    tight_limit, tight_remaining, tight_fraction = 0, 0, math.inf
    for dimension in _judged(asked):
        limit = limit_of(state.limits, dimension)
        if limit is None:
            continue
        used = used_of(dimension, used_now)
        wanted = used_of(dimension, asked)
        if used + wanted > limit:
            blocked.append(dimension)
            if used_of(dimension, settled) + wanted > limit:
                held_only = False
        fraction = (limit - used) / limit if limit > 0 else 0.0
        if fraction < tight_fraction:
            tight, tight_limit, tight_remaining, tight_fraction = (
                dimension,
                limit,
                limit - used,
                fraction,
            )
    return _Verdict(
        entry,
        start,
        end,
        blocked,
        tight,
        tight_limit,
        tight_remaining,
        tight_fraction,
        held_only=bool(blocked) and held_only,
    )


def _refusal(v: _Verdict, asked: Used, retry: int) -> str:
    dimension = v.blocked[0]
    limit = limit_of(v.entry.state.limits, dimension)
    wanted = used_of(dimension, asked)
    unit = "calls" if dimension == "requests" else "tokens"
    what = (
        f"call quota of {limit} per {v.entry.state.window}"
        if dimension == "requests"
        else f"{dimension} token quota of {limit} per {v.entry.state.window}"
    )
    if limit is not None and wanted > limit:
        return (
            f"this request alone may use {wanted} {unit}, over the {what}"
            f" of {describe(v.entry.state)}"
        )
    if v.held_only:
        return (
            f"the rest of the {what} of {describe(v.entry.state)} is held by calls in flight;"
            f" retry in {retry}s"
        )
    return f"{what} reached for {describe(v.entry.state)}; it resets in {retry}s"
