"""Latency percentiles within 1 % of the true value, from counts that merge by addition.

A value ``x`` (milliseconds) falls in bin ``ceil(log(x) / log(GAMMA))``: bin ``i`` holds
``(GAMMA^(i-1), GAMMA^i]``, and its representative ``2 * GAMMA^i / (GAMMA + 1)`` is within
``(GAMMA - 1) / (GAMMA + 1)`` (0.99 %) of every value in it (the DDSketch construction). Bins
are stored per minute and group like any other aggregate; a range's sketch is the sum of its
minutes' bins, so percentiles over any range and grouping keep the same bound: the p50 of calls
taking 51 to 74 ms reads 51 to 74 ms, not a bucket edge.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

RELATIVE_ACCURACY = 0.01
GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
_LOG_GAMMA = math.log(GAMMA)
# Values at or below this (a microsecond) share one bin: nothing Steward times is that fast.
SMALLEST_MS = 0.001
ZERO_BIN = math.ceil(math.log(SMALLEST_MS) / _LOG_GAMMA)

# What is sketched, per call: time to first token, duration, time per output token.
METRICS = ("ttft", "duration", "tpot")


def bin_of(value_ms: float) -> int:
    if value_ms <= SMALLEST_MS:
        return ZERO_BIN
    return math.ceil(math.log(value_ms) / _LOG_GAMMA)


def value_of(bin_: int) -> float:
    """The bin's representative: within RELATIVE_ACCURACY of every value in the bin."""
    if bin_ <= ZERO_BIN:
        return 0.0
    return 2 * GAMMA**bin_ / (GAMMA + 1)


def tpot_ms(
    duration_ms: float, ttft_ms: float | None, completion_tokens: int, stream: bool
) -> float | None:
    """Time per output token after the first, for streamed calls that produced two or more."""
    if not stream or ttft_ms is None or completion_tokens < 2 or duration_ms < ttft_ms:
        return None
    return (duration_ms - ttft_ms) / (completion_tokens - 1)


def quantiles(bins: Mapping[int, int], qs: Iterable[float]) -> list[float | None]:
    """The ``qs`` quantiles of the values counted in ``bins`` (nearest rank); None if empty."""
    total = sum(bins.values())
    ordered = sorted(bins.items())
    found: list[float | None] = []
    for q in qs:
        if total == 0:
            found.append(None)
            continue
        rank, seen = max(1, math.ceil(q * total)), 0
        for bin_, count in ordered:
            seen += count
            if seen >= rank:
                found.append(round(value_of(bin_), 3))
                break
    return found


def mean(bins: Mapping[int, int]) -> float | None:
    total = sum(bins.values())
    if total == 0:
        return None
    return round(sum(value_of(b) * n for b, n in bins.items()) / total, 3)
