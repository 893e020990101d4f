"""One price resolution: calls and GPU-hours are priced by the catalog asset (and version) that
served them, whatever route or endpoint name a client called, at the price in force at the
time of the usage; a price change applies from its effective time and never to the past."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from libs.common.bus import Bus
from libs.common.db import new_id
from tests.helpers import bearer, new_project, ok, unique
from tests.metering.conftest import Clock
from tests.metering.support import eventually, metering_settled, publish, usage
from tests.metering.test_endpoint_costs import endpoint_in, endpoint_state, send

MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


async def put_price(
    metering: httpx.AsyncClient,
    key: str,
    asset: str,
    input_per_1k: str,
    *,
    gpu_hour: str | None = None,
    version: str | None = None,
    effective_from: datetime | None = None,
) -> httpx.Response:
    body: dict[str, Any] = {"input_per_1k": input_per_1k, "output_per_1k": "0"}
    if gpu_hour is not None:
        body["gpu_hour"] = gpu_hour
    if effective_from is not None:
        body["effective_from"] = iso(effective_from)
    params = {"version": version} if version else {}
    return await metering.put(f"/v1/prices/{asset}", json=body, params=params, headers=bearer(key))


async def costs_by_event(
    metering: httpx.AsyncClient, key: str, project: str, count: int, **params: Any
) -> dict[str, Decimal]:
    """Each counted event's cost, by event id, once ``count`` of them are counted."""
    found: dict[str, Decimal] = {}

    async def counted() -> bool:
        response = await metering.get(
            "/v1/usage/events", params={"project": project, **params}, headers=bearer(key)
        )
        found.clear()
        found.update(
            {e["event_id"]: Decimal(e["cost_nanos"]) / 10**9 for e in (await ok(response))}
        )
        return len(found) >= count

    await eventually(counted, what=f"{count} events of {project} counted")
    return found


async def test_a_call_through_an_endpoint_route_is_priced_by_its_catalog_asset(
    authz: httpx.AsyncClient, metering: httpx.AsyncClient, gateway_bus: Bus, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "routeprice")
    asset = unique("acme/chat-8b")
    route = f"{project}/{asset}"
    await ok(await put_price(metering, admin_key, asset, "2"))
    through_route = usage(
        project,
        model=route,
        endpoint=route,
        asset=asset,
        asset_version="1.0",
        prompt=1000,
        completion=0,
    )
    # An event of a gateway from before the asset was carried: priced by its model name.
    older_gateway = usage(project, model=asset, endpoint=asset, prompt=500, completion=0)
    await publish(gateway_bus, [through_route, older_gateway])
    costs = await costs_by_event(metering, admin_key, project, 2)
    assert costs[through_route.event_id] == Decimal("2")
    assert costs[older_gateway.event_id] == Decimal("1")

    # The reports show it under the route name clients called, at the asset's price.
    report = await ok(
        await metering.get(
            "/v1/usage", params={"project": project, "group_by": "model"}, headers=bearer(admin_key)
        )
    )
    assert {r["model"]: r["cost"] for r in report["rows"]} == {route: 2.0, asset: 1.0}
    # The same figures in /metrics, for the dashboard's cost by project (after the commit).

    def cost(model: str) -> float | None:
        labels = {"project": project, "model": model, "currency": "USD"}
        return REGISTRY.get_sample_value("steward_metering_cost_total", labels)

    await eventually(lambda: _now(cost(route) == 2.0 and cost(asset) == 1.0), what="cost metrics")


async def test_a_version_price_beats_the_asset_price(
    authz: httpx.AsyncClient, metering: httpx.AsyncClient, gateway_bus: Bus, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "versionprice")
    asset = unique("acme/chat-8b")
    await ok(await put_price(metering, admin_key, asset, "1"))
    set_ = await ok(await put_price(metering, admin_key, asset, "3", version="2.0"))
    assert (set_["model"], set_["version"]) == (asset, "2.0")

    calls = {
        version: usage(
            project,
            model=f"{project}/{asset}",
            asset=asset,
            asset_version=version,
            prompt=1000,
            completion=0,
        )
        for version in ("2.0", "1.0", None)
    }
    await publish(gateway_bus, list(calls.values()))
    costs = await costs_by_event(metering, admin_key, project, 3)
    assert costs[calls["2.0"].event_id] == Decimal("3")  # the version's own price
    assert costs[calls["1.0"].event_id] == Decimal("1")  # no price of its own: the asset's
    assert costs[calls[None].event_id] == Decimal("1")

    listed = await ok(
        await metering.get("/v1/prices", params={"model": asset}, headers=bearer(admin_key))
    )
    assert {(p["version"], p["input_per_1k"]) for p in listed} == {(None, "1"), ("2.0", "3")}


async def test_a_price_change_applies_from_its_effective_time_and_never_to_the_past(
    authz: httpx.AsyncClient,
    metering: httpx.AsyncClient,
    gateway_bus: Bus,
    settings: Any,
    admin_key: str,
    clock: Clock,
) -> None:
    project = await new_project(authz, admin_key, "pricetime")
    asset = unique("acme/chat-8b")
    t0 = clock()
    change = t0 + HOUR
    await ok(await put_price(metering, admin_key, asset, "1"))
    scheduled = await ok(await put_price(metering, admin_key, asset, "5", effective_from=change))
    assert scheduled["effective_from"] == iso(change)

    # Retroactive: refused, and nothing changes.
    refused = await put_price(metering, admin_key, asset, "9", effective_from=t0 - HOUR)
    assert refused.status_code == 409
    assert "past" in refused.json()["detail"]
    listed = await ok(
        await metering.get("/v1/prices", params={"model": asset}, headers=bearer(admin_key))
    )
    assert [(p["input_per_1k"], p["effective_until"]) for p in listed] == [
        ("1", iso(change)),
        ("5", None),
    ]

    clock.travel(2 * 3600)
    before = usage(project, model=asset, prompt=1000, completion=0, time=change - 30 * MINUTE)
    after = usage(project, model=asset, prompt=1000, completion=0, time=change + 30 * MINUTE)
    await publish(gateway_bus, [before, after])
    window = {"start": iso(t0 - HOUR), "end": iso(clock())}
    costs = await costs_by_event(metering, admin_key, project, 2, **window)
    assert costs[before.event_id] == Decimal("1")
    assert costs[after.event_id] == Decimal("5")

    async def total() -> float:
        report = await ok(
            await metering.get(
                "/v1/usage", params={"project": project, **window}, headers=bearer(admin_key)
            )
        )
        return float(report["rows"][0]["cost"])

    assert await total() == pytest.approx(6.0)
    # A later change (now) re-prices nothing already counted.
    await ok(await put_price(metering, admin_key, asset, "100"))
    await metering_settled(gateway_bus, settings)
    assert await total() == pytest.approx(6.0)
    # The CSV (what `steward usage --csv` prints) says the same as the report.
    exported = await metering.get(
        "/v1/usage/export.csv",
        params={"project": project, "interval": "day", **window},
        headers=bearer(admin_key),
    )
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert sum(Decimal(r["cost_usd"]) for r in rows) == Decimal("6")
    history = await ok(
        await metering.get(
            "/v1/prices", params={"model": asset, "history": "true"}, headers=bearer(admin_key)
        )
    )
    assert [p["input_per_1k"] for p in history] == ["1", "5", "100"]

    # Withdrawn from now: later usage costs nothing, the past keeps its cost.
    gone = await metering.delete(f"/v1/prices/{asset}", headers=bearer(admin_key))
    assert gone.status_code == 204
    free = usage(project, model=asset, prompt=1000, completion=0, time=clock())
    await publish(gateway_bus, [free])
    costs = await costs_by_event(metering, admin_key, project, 3, end=iso(clock() + MINUTE))
    assert costs[free.event_id] == 0
    assert await total() == pytest.approx(6.0)


async def test_token_and_gpu_hour_prices_resolve_by_the_same_rule(
    authz: httpx.AsyncClient,
    metering: httpx.AsyncClient,
    gateway_bus: Bus,
    admin_key: str,
    clock: Clock,
) -> None:
    """Two endpoints serve one asset under route names of their own, one per version; the
    version price changes between two runs. Each call and each GPU-hour is priced the same
    way: by asset and version, at the price in force at the time."""
    project = await new_project(authz, admin_key, "onelookup")
    asset = unique("acme/chat-8b")
    t0 = clock()
    await ok(await put_price(metering, admin_key, asset, "1", gpu_hour="1"))
    await ok(await put_price(metering, admin_key, asset, "2", gpu_hour="4", version="2.0"))
    await ok(
        await put_price(
            metering, admin_key, asset, "3", gpu_hour="8", version="2.0", effective_from=t0 + HOUR
        )
    )
    clock.travel(3 * 3600)

    runs = {  # (version, start): what the run's call and its half GPU-hour must cost
        ("2.0", t0 + 10 * MINUTE): (Decimal("2"), 2.0),
        ("2.0", t0 + 70 * MINUTE): (Decimal("3"), 4.0),
        ("1.0", t0 + 10 * MINUTE): (Decimal("1"), 0.5),
    }
    calls = {}
    endpoints = {}
    for version, start in runs:
        endpoint, route = new_id(), unique(f"{project}/chat")
        kw: dict[str, Any] = {"route": route, "asset": asset, "version": version, "gpus": 1}
        await send(gateway_bus, endpoint_state("ready", project, endpoint, **kw), start)
        await send(
            gateway_bus, endpoint_state("stopped", project, endpoint, **kw), start + HOUR / 2
        )
        endpoints[(version, start)] = endpoint
        calls[(version, start)] = usage(
            project,
            model=route,
            endpoint=route,
            asset=asset,
            asset_version=version,
            prompt=1000,
            completion=0,
            time=start,
        )
    await publish(gateway_bus, list(calls.values()))

    window = {"start": iso(t0), "end": iso(clock())}
    costs = await costs_by_event(metering, admin_key, project, 3, **window)

    async def stopped() -> bool:
        found = [await endpoint_in(metering, admin_key, project, e) for e in endpoints.values()]
        return all(f is not None and f["status"] == "stopped" for f in found)

    await eventually(stopped, what="three stopped endpoints")
    for run, (token_cost, gpu_cost) in runs.items():
        assert costs[calls[run].event_id] == token_cost, run
        found = await endpoint_in(metering, admin_key, project, endpoints[run])
        assert found is not None
        assert found["cost"] == pytest.approx(gpu_cost), run


async def _now(value: bool) -> bool:
    return value
