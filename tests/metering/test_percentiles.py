"""Latency percentiles are the calls' own, within 1 %: TTFT, duration and time per output token,
over any range and grouping, against the raw events the same calls produced."""

from __future__ import annotations

import math
import random
from datetime import timedelta
from typing import Any

import httpx
import pytest

from libs.common.bus import Bus
from libs.common.db import utcnow
from services.metering import sketch
from tests.helpers import bearer, new_project, ok
from tests.metering.support import eventually, publish, usage

QS = {"p50": 0.5, "p95": 0.95, "p99": 0.99}


def true_quantile(values: list[float], q: float) -> float:
    """Nearest rank, as the report computes it."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def assert_close(latency: dict[str, Any], values: list[float]) -> None:
    assert latency["count"] == len(values)
    for name, q in QS.items():
        truth = true_quantile(values, q)
        assert latency[name] == pytest.approx(truth, rel=sketch.RELATIVE_ACCURACY), (name, truth)


async def test_percentiles_are_within_one_percent_of_the_raw_values(
    authz: httpx.AsyncClient, metering: httpx.AsyncClient, gateway_bus: Bus, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "latency")
    rng = random.Random(7)  # random but reproducible latencies
    start = (utcnow() - timedelta(hours=1)).replace(minute=5, second=0, microsecond=0)
    calls = []
    for i in range(240):
        ttft = rng.uniform(51, 74)
        completion = rng.randint(2, 60)
        calls.append(
            usage(
                project,
                model="fast" if i % 3 else "slow",
                ttft_ms=ttft,
                duration_ms=ttft + rng.uniform(100, 900) * (1 if i % 3 else 4),
                completion=completion,
                time=start + timedelta(minutes=i % 7, seconds=i % 50),
            )
        )
    await publish(gateway_bus, calls)

    async def report(**params: Any) -> dict[str, Any]:
        body: dict[str, Any] = await ok(
            await metering.get(
                "/v1/usage",
                params={"project": project, "start": start.isoformat(), **params},
                headers=bearer(admin_key),
            )
        )
        return body

    async def counted() -> bool:
        rows = (await report())["rows"]
        return bool(rows and rows[0]["requests"] == len(calls))

    await eventually(counted, what="every call counted")

    ttfts = [float(u.ttft_ms or 0) for u in calls]

    def tpot(u: Any) -> float:
        return float((u.duration_ms - u.ttft_ms) / (u.completion_tokens - 1))

    [everything] = (await report())["rows"]
    assert_close(everything["ttft_ms"], ttfts)
    assert_close(everything["duration_ms"], [u.duration_ms for u in calls])
    assert_close(everything["tpot_ms"], [tpot(u) for u in calls])
    assert 51 * 0.99 <= everything["ttft_ms"]["p50"] <= 74 * 1.01  # not a bucket edge

    # Grouped: each model's own calls.
    by_model = {r["model"]: r for r in (await report(group_by="model"))["rows"]}
    for name in ("fast", "slow"):
        mine = [u for u in calls if u.model == name]
        assert_close(by_model[name]["duration_ms"], [u.duration_ms for u in mine])
        assert_close(by_model[name]["ttft_ms"], [float(u.ttft_ms or 0) for u in mine])
