"""GPU-hours and cost of dedicated endpoints against their approved plans: metering follows the
endpoint events inference publishes and the approval of the endpoint request (real NATS and
PostgreSQL), prices the GPU-time, and announces once when an endpoint goes over its plan."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from libs.common.bus import Bus
from libs.common.db import new_id
from libs.common.events import CloudEvent, EventPayload
from libs.common.events.approval import RequestApproved
from libs.common.events.inference import EVENTS_BY_STATUS
from tests.cli.test_gitops import steward
from tests.helpers import bearer, member_key, new_project, ok, serve, unique
from tests.metering.conftest import Clock
from tests.metering.support import Heard, eventually, hearing

HOUR = timedelta(hours=1)


async def send(
    bus: Bus, payload: EventPayload, at: datetime, *, event_id: str | None = None
) -> str:
    """Publish as the owning service's outbox relay does, with the event's time set."""
    event = CloudEvent.wrap(payload, source="test", entity=getattr(payload, "endpoint_id", None))
    event.id = event_id or event.id
    event.time = at
    await bus.publish(payload.subject, event.model_dump_json().encode(), new_id())
    return event.id


def approved_endpoint_request(
    project: str, *, gpus: int, replicas: int, hours: float, rate: float
) -> RequestApproved:
    now = datetime.now().astimezone()
    return RequestApproved(
        request_id=new_id(),
        kind="endpoint",
        project=project,
        requester="dev",
        status="approved",
        payload={
            "model_name": "llama-3-8b",
            "version": "1.0.0",
            "runtime": "kubernetes",
            "plan": {
                "gpus": gpus,
                "gpu_type": "nvidia-a100",
                "replicas": replicas,
                "hours": hours,
                "gpu_hour_rate": rate,
                "currency": "USD",
                "data_classification": "internal",
                "network_exposure": "project",
            },
        },
        created_at=now,
        due_at=now + timedelta(days=5),
        decided_by="pat",
        decided_at=now,
        lead_time_seconds=60.0,
    )


def endpoint_state(
    status: str,
    project: str,
    endpoint_id: str,
    *,
    route: str,
    gpus: int = 2,
    replicas: int = 1,
    request_id: str | None = None,
    asset: str = "llama-3-8b",
    version: str = "1.0.0",
) -> EventPayload:
    """An ``inference.endpoint.<status>`` event as the inference service publishes it."""
    return EVENTS_BY_STATUS[status](
        endpoint_id=endpoint_id,
        project=project,
        status=status,
        route_name=route,
        served_model_name=route,
        asset_name=asset,
        version=version,
        runtime="kubernetes",
        upstream_url="http://llama.example/v1" if status == "ready" else None,
        replicas=replicas,
        gpus=gpus,
        gpu_type="nvidia-a100",
        request_id=request_id,
        changed_at=datetime.now().astimezone(),
    )


async def report(
    metering: httpx.AsyncClient, key: str, project: str | None = None, **params: Any
) -> dict[str, Any]:
    query = {**params, **({"project": project} if project else {})}
    result: dict[str, Any] = await ok(
        await metering.get("/v1/usage/endpoints", params=query, headers=bearer(key))
    )
    return result


async def endpoint_in(
    metering: httpx.AsyncClient, key: str, project: str, endpoint_id: str
) -> dict[str, Any] | None:
    found = [
        e
        for e in (await report(metering, key, project))["endpoints"]
        if e["endpoint_id"] == endpoint_id
    ]
    return found[0] if found else None


OVER_PLAN = "metering.endpoint.over_plan"


@pytest.fixture
async def over_plan_events(gateway_bus: Bus) -> AsyncIterator[Heard]:
    async with hearing(gateway_bus, OVER_PLAN, "endpoint_id") as heard:
        yield heard


async def test_gpu_hours_follow_starts_scales_and_stops_and_are_held_to_the_plan(
    authz: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    metering: httpx.AsyncClient,
    gateway_bus: Bus,
    admin_key: str,
    clock: Clock,
    over_plan_events: Heard,
) -> None:
    project = await new_project(authz, admin_key, "gpu")
    viewer = await member_key(authz, admin_key, project, "viewer", ["usage:read"])
    # Approved: 2 GPUs x 1 replica for 2 hours at 3.0 per GPU-hour = 4 GPU-hours, 12.0.
    approved = approved_endpoint_request(project, gpus=2, replicas=1, hours=2, rate=3.0)
    endpoint, route = new_id(), unique("llama")
    t0 = clock() - 3 * HOUR

    def state(status: str, **kw: Any) -> EventPayload:
        return endpoint_state(
            status, project, endpoint, route=route, request_id=approved.request_id, **kw
        )

    await send(gateway_bus, state("provisioning"), t0)
    await send(gateway_bus, state("ready"), t0 + timedelta(minutes=1))
    # Scaled to two replicas after an hour (same status, new event), stopped half an hour later.
    await send(gateway_bus, state("ready", replicas=2), t0 + HOUR)
    await send(gateway_bus, state("stopped", replicas=2), t0 + 1.5 * HOUR)

    async def stopped() -> bool:
        found = await endpoint_in(metering, viewer, project, endpoint)
        return found is not None and found["status"] == "stopped"

    await eventually(stopped, what="the stopped endpoint")
    # The plan is heard last here, so that no check judges the history before it is all in
    # (the watch judges what holds GPUs now; a replayed history is judged at its own times).
    await send(gateway_bus, approved, approved.decided_at)

    async def planned() -> bool:
        found = await endpoint_in(metering, viewer, project, endpoint)
        return found is not None and found["plan"] is not None

    await eventually(planned, what="the approved plan")
    found = await endpoint_in(metering, viewer, project, endpoint)
    assert found is not None
    # 2 GPUs for an hour, then 4 GPUs for half an hour: exactly the plan, not over it.
    assert found["gpu_hours"] == pytest.approx(4.0)
    assert found["cost"] == pytest.approx(12.0)
    assert found["gpus_held"] == 0
    assert found["plan"]["request_id"] == approved.request_id
    assert found["plan"]["estimated_cost"] == 12.0
    assert found["plan"]["gpu_hours"] == 4.0
    assert found["plan_used"] == pytest.approx(1.0)
    assert found["over_plan"] is None
    assert found["planned_until"] == (t0 + 2 * HOUR).isoformat().replace("+00:00", "Z")
    assert over_plan_events.of(OVER_PLAN, endpoint) == []

    # Started again 2.5 hours in (2 GPUs); the clock says now is 3 hours in: one GPU-hour more.
    await send(gateway_bus, state("provisioning"), t0 + 2.5 * HOUR)

    async def announced() -> bool:
        return bool(over_plan_events.of(OVER_PLAN, endpoint))

    await eventually(announced, what="the over-plan event")
    [heard] = over_plan_events.of(OVER_PLAN, endpoint)
    event = heard.data
    assert event["reason"] == "cost"
    assert event["request_id"] == approved.request_id
    assert event["estimated_cost"] == "12"
    assert float(event["cost"]) == pytest.approx(15.0, abs=0.05)
    found = await endpoint_in(metering, viewer, project, endpoint)
    assert found is not None
    assert found["gpus_held"] == 2
    assert found["gpu_hours"] == pytest.approx(5.0, abs=0.02)
    assert found["over_plan"] == "cost"
    assert found["over_plan_at"] is not None

    async def audited() -> bool:
        page = await ok(
            await approval.get(
                "/v1/audit",
                params={"service": "metering", "target": f"project/{project}/endpoint/{endpoint}"},
                headers=bearer(admin_key),
            )
        )
        return [item["action"] for item in page["items"]] == ["endpoint.over_plan"]

    await eventually(audited, what="the audit record")

    # Ready after provisioning: the same GPUs, so the same open period, and no second event.
    await send(gateway_bus, state("ready"), t0 + 2.6 * HOUR)

    async def ready() -> bool:
        found = await endpoint_in(metering, viewer, project, endpoint)
        return found is not None and found["status"] == "ready"

    await eventually(ready, what="the ready event")
    found = await endpoint_in(metering, viewer, project, endpoint)
    assert found is not None
    assert found["gpu_hours"] == pytest.approx(5.0, abs=0.02)
    assert found["first_held_at"] == t0.isoformat().replace("+00:00", "Z")
    assert len(over_plan_events.of(OVER_PLAN, endpoint)) == 1


async def test_the_assets_gpu_hour_price_wins_over_the_plans_rate(
    authz: httpx.AsyncClient,
    metering: httpx.AsyncClient,
    gateway_bus: Bus,
    admin_key: str,
    clock: Clock,
) -> None:
    """The price is set on the catalog asset; the endpoint serves it under a route name of its
    own, and its GPU-hours are priced by the asset all the same."""
    project = await new_project(authz, admin_key, "gpuprice")
    asset = unique("acme/priced")
    route = f"{project}/{asset}"
    await ok(
        await metering.put(
            f"/v1/prices/{asset}",
            json={"input_per_1k": "0", "output_per_1k": "0", "gpu_hour": "2.5"},
            headers=bearer(admin_key),
        )
    )
    # The endpoint runs after the price took effect: move the clock past its whole life.
    t0 = clock() + timedelta(minutes=1)
    clock.travel(5 * 3600)
    approved = approved_endpoint_request(project, gpus=1, replicas=1, hours=20, rate=1.0)
    await send(gateway_bus, approved, approved.decided_at)
    endpoint = new_id()
    kw: dict[str, Any] = {
        "route": route,
        "asset": asset,
        "gpus": 1,
        "request_id": approved.request_id,
    }
    await send(gateway_bus, endpoint_state("provisioning", project, endpoint, **kw), t0)
    await send(gateway_bus, endpoint_state("deleting", project, endpoint, **kw), t0 + 2 * HOUR)
    await send(gateway_bus, endpoint_state("deleted", project, endpoint, **kw), t0 + 3 * HOUR)

    async def deleted() -> bool:
        found = await endpoint_in(metering, admin_key, project, endpoint)
        return found is not None and found["status"] == "deleted"

    await eventually(deleted, what="the deleted endpoint")
    found = await endpoint_in(metering, admin_key, project, endpoint)
    assert found is not None
    assert (found["model"], found["asset_name"]) == (route, asset)
    # Held while provisioning; not from the moment the deletion began (the runtime's cleanup
    # took an hour more: not billed).
    assert found["gpu_hours"] == pytest.approx(2.0)
    assert found["cost"] == pytest.approx(5.0)  # at 2.5 from the asset's price, not the plan's 1.0
    assert found["plan"]["estimated_cost"] == 20.0
    assert found["plan_used"] == pytest.approx(0.25)
    assert found["over_plan"] is None


async def test_late_and_redelivered_endpoint_events_change_nothing(
    authz: httpx.AsyncClient,
    metering: httpx.AsyncClient,
    gateway_bus: Bus,
    admin_key: str,
    clock: Clock,
) -> None:
    project = await new_project(authz, admin_key, "gpulate")
    endpoint, route, t0 = new_id(), unique("late"), clock() - 2 * HOUR
    ready = endpoint_state("ready", project, endpoint, route=route, gpus=1)
    stopped = endpoint_state("stopped", project, endpoint, route=route, gpus=1)
    first = await send(gateway_bus, ready, t0)
    await send(gateway_bus, stopped, t0 + HOUR)
    # The same ready event again (JetStream redelivery), and an older one arriving late.
    await send(gateway_bus, ready, t0, event_id=first)
    late = endpoint_state("provisioning", project, endpoint, route=route, gpus=1)
    await send(gateway_bus, late, t0 - HOUR)
    marker = endpoint_state("stopped", project, new_id(), route=unique("marker"), gpus=1)
    await send(gateway_bus, marker, t0)

    async def marker_seen() -> bool:
        seen = {e["endpoint_id"] for e in (await report(metering, admin_key, project))["endpoints"]}
        return marker.endpoint_id in seen  # type: ignore[attr-defined]

    await eventually(marker_seen, what="the events published after the duplicates")
    found = await endpoint_in(metering, admin_key, project, endpoint)
    assert found is not None
    assert found["status"] == "stopped"
    assert found["gpu_hours"] == pytest.approx(1.0)
    assert found["plan"] is None and found["plan_used"] is None and found["over_plan"] is None


async def test_endpoint_costs_are_filtered_to_the_callers_projects(
    authz: httpx.AsyncClient,
    metering: httpx.AsyncClient,
    gateway_bus: Bus,
    admin_key: str,
    clock: Clock,
) -> None:
    mine, theirs = (
        await new_project(authz, admin_key, "gpumine"),
        await new_project(authz, admin_key, "gputheirs"),
    )
    dev = await member_key(authz, admin_key, mine, "developer", ["usage:read"])
    no_scope = await member_key(authz, admin_key, mine, "developer", ["inference:invoke"])
    ids = {p: new_id() for p in (mine, theirs)}
    for p, endpoint in ids.items():
        await send(
            gateway_bus,
            endpoint_state("ready", p, endpoint, route=unique("tenant"), gpus=1),
            clock() - HOUR,
        )

    async def both_in() -> bool:
        return all([await endpoint_in(metering, admin_key, p, e) for p, e in ids.items()])

    await eventually(both_in, what="both endpoints")
    seen = {e["endpoint_id"] for e in (await report(metering, dev))["endpoints"]}
    assert ids[mine] in seen and ids[theirs] not in seen
    assert {e["project"] for e in (await report(metering, dev))["endpoints"]} == {mine}
    refused = await metering.get(
        "/v1/usage/endpoints", params={"project": theirs}, headers=bearer(dev)
    )
    assert refused.status_code == 403
    assert refused.headers["content-type"] == "application/problem+json"
    scopeless = await metering.get("/v1/usage/endpoints", headers=bearer(no_scope))
    assert scopeless.status_code == 403
    for bad in ({"status": "running"}, {"limit": "0"}, {"project": "Not A Name"}, {"x": "1"}):
        answer = await metering.get("/v1/usage/endpoints", params=bad, headers=bearer(dev))
        assert answer.status_code == 422, bad
    only_ready = await report(metering, admin_key, mine, status="ready")
    assert [e["endpoint_id"] for e in only_ready["endpoints"]] == [ids[mine]]


async def test_the_cli_shows_endpoint_costs_beside_their_plans(
    authz: httpx.AsyncClient,
    metering_app: FastAPI,
    metering: httpx.AsyncClient,
    gateway_bus: Bus,
    admin_key: str,
    clock: Clock,
) -> None:
    project = await new_project(authz, admin_key, "gpucli")
    viewer = await member_key(authz, admin_key, project, "viewer", ["usage:read"])
    approved = approved_endpoint_request(project, gpus=4, replicas=1, hours=1, rate=2.0)
    await send(gateway_bus, approved, approved.decided_at)
    endpoint = new_id()
    state = endpoint_state(
        "stopped", project, endpoint, route=unique("cli"), gpus=4, request_id=approved.request_id
    )
    t0 = clock() - HOUR
    # A first attempt failed before holding anything; the second ran for half an hour.
    failed = endpoint_state(
        "failed", project, new_id(), route=unique("cli"), gpus=4, request_id=approved.request_id
    )
    await send(gateway_bus, failed, t0)
    await send(gateway_bus, replace_status(state, "ready"), t0)
    await send(gateway_bus, state, t0 + 0.5 * HOUR)

    async def stopped() -> bool:
        found = await endpoint_in(metering, viewer, project, endpoint)
        return found is not None and found["status"] == "stopped" and found["plan"] is not None

    await eventually(stopped, what="the stopped endpoint and its plan")
    async with serve(metering_app) as url:
        env = {"STEWARD_METERING_URL": url, "STEWARD_API_KEY": viewer, "COLUMNS": "200"}
        table = await steward(env, "endpoint", "costs", "--project", project)
        as_json = await steward(env, "endpoint", "costs", "--project", project, "-o", "json")
    assert table.exit_code == 0, table.output
    assert endpoint in table.output and "50%" in table.output  # 2 of 4 planned GPU-hours
    assert "2.00 GPU-hours, 4.00 USD (planned 8.00)" in table.output
    # Both attempts show the plan; the totals count it once. (A running inference service may
    # act on the approval too, and fail the same way: nothing is in the catalog.)
    [row] = [e for e in json.loads(as_json.output)["endpoints"] if e["endpoint_id"] == endpoint]
    assert row["gpu_hours"] == pytest.approx(2.0) and row["cost"] == pytest.approx(4.0)


def replace_status(state: EventPayload, status: str) -> EventPayload:
    return EVENTS_BY_STATUS[status](**{**state.model_dump(), "status": status})
