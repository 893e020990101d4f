"""A quota created mid-window starts from the usage already counted in that window, its scope's
alone; created while usage is being counted, it counts every call exactly once."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx

from libs.common.bus import Bus
from libs.common.settings import Settings
from tests.helpers import issue_key, new_project
from tests.metering.conftest import Clock
from tests.metering.support import eventually, metering_settled, publish, usage
from tests.metering.test_quotas import align, create, quotas_of


async def test_a_new_quota_starts_from_the_usage_already_in_its_window(
    authz: httpx.AsyncClient,
    metering: httpx.AsyncClient,
    gateway_bus: Bus,
    settings: Settings,
    admin_key: str,
    clock: Clock,
) -> None:
    align(clock, 3600, into=600)
    project = await new_project(authz, admin_key, "backfill")
    other = (await issue_key(authz, admin_key, project, ["inference:invoke"]))["id"]
    now = clock()
    await publish(
        gateway_bus,
        [
            usage(project, prompt=120, completion=80, time=now - timedelta(minutes=5)),
            usage(project, prompt=30, completion=20, time=now, credential_id=other),
            usage(project, prompt=7, completion=3, time=now, model="another-model"),
            # The window before: not this window's usage.
            usage(project, prompt=1000, completion=1000, time=now - timedelta(hours=1)),
        ],
    )
    await metering_settled(gateway_bus, settings)

    hourly = await create(
        metering, admin_key, project, {"window": "hour", "limits": {"total_tokens": 1000}}
    )
    assert (hourly["input_used"], hourly["output_used"]) == (157, 103)
    assert hourly["status"] == "ok"
    one_key = await create(
        metering,
        admin_key,
        project,
        {"window": "hour", "key_id": other, "limits": {"total_tokens": 40}},
    )
    assert (one_key["input_used"], one_key["output_used"]) == (30, 20)
    assert one_key["status"] == "exceeded"  # 50 of 40, at once
    one_model = await create(
        metering,
        admin_key,
        project,
        {"window": "hour", "model": "another-model", "limits": {"total_tokens": 100}},
    )
    assert (one_model["input_used"], one_model["output_used"]) == (7, 3)

    # The usage event that announced each quota carries the same figures.
    listed = {x["id"]: x for x in await quotas_of(metering, admin_key, project)}
    assert listed[hourly["id"]]["input_used"] == 157


async def test_a_quota_created_while_usage_is_counted_counts_every_call_once(
    authz: httpx.AsyncClient,
    metering: httpx.AsyncClient,
    gateway_bus: Bus,
    settings: Settings,
    admin_key: str,
    clock: Clock,
) -> None:
    """Batches land before, during and after the creation: each is in the backfill or counted
    by the ingest, never both, never neither."""
    align(clock, 86400, into=3600)
    project = await new_project(authz, admin_key, "racing")
    now = clock()
    batches = [
        [usage(project, prompt=3, completion=2, time=now) for _ in range(20)] for _ in range(10)
    ]

    async def produce() -> None:
        for batch in batches:
            await publish(gateway_bus, batch)
            await asyncio.sleep(0)

    body: dict[str, Any] = {"window": "day", "limits": {"total_tokens": 10**9}}
    _, created = await asyncio.gather(produce(), create(metering, admin_key, project, body))
    await metering_settled(gateway_bus, settings)

    async def counted() -> bool:
        [read] = await quotas_of(metering, admin_key, project)
        return bool((read["input_used"], read["output_used"]) == (600, 400))

    await eventually(counted, what="every call counted exactly once")
    [read] = await quotas_of(metering, admin_key, project)
    assert read["id"] == created["id"]
