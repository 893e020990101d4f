"""``steward_gateway_added_seconds``, what the chart's latency SLO alert reads: one sample per
call that went upstream, the gateway's own time, within the call's whole duration."""

from __future__ import annotations

import httpx
from prometheus_client import REGISTRY

from tests.gateway.conftest import RunningGateway, tenant
from tests.gateway.test_openai import client


def sample(name: str, kind: str = "chat") -> float:
    return REGISTRY.get_sample_value(name, {"kind": kind}) or 0.0


async def test_each_call_upstream_adds_one_sample_within_its_duration(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    before = {
        n: sample(n)
        for n in (
            "steward_gateway_added_seconds_count",
            "steward_gateway_added_seconds_sum",
            "steward_gateway_call_duration_seconds_sum",
        )
    }
    await client(gw, t.key).chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "how long did you take"}]
    )
    added = (
        sample("steward_gateway_added_seconds_sum") - before["steward_gateway_added_seconds_sum"]
    )
    whole = (
        sample("steward_gateway_call_duration_seconds_sum")
        - before["steward_gateway_call_duration_seconds_sum"]
    )
    count = sample("steward_gateway_added_seconds_count")
    assert count - before["steward_gateway_added_seconds_count"] == 1
    assert 0 < added < whole
