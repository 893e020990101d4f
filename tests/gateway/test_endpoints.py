"""Routes fed by the inference service's endpoint events: ready routes, anything else removes."""

from __future__ import annotations

import httpx
import openai
import pytest

from libs.common.bus import Bus
from libs.common.db import new_id, utcnow
from libs.common.events.inference import (
    EndpointFailed,
    EndpointProvisioning,
    EndpointReady,
    EndpointState,
    EndpointStopped,
    seal_credential,
)
from libs.common.settings import Settings
from tests.gateway.conftest import RunningGateway, tenant
from tests.gateway.support import eventually, publish, upstream_json, usage_events
from tests.gateway.test_openai import client
from tests.helpers import bearer


def endpoint(project: str, upstream: str, name: str, **extra: object) -> dict[str, object]:
    values: dict[str, object] = {
        "endpoint_id": new_id(),
        "project": project,
        "status": "ready",
        "route_name": name,
        "served_model_name": "echo-served",
        "asset_name": "echo",
        "version": "1.0",
        "runtime": "external",
        "upstream_url": f"{upstream}/v1",
        "network_exposure": "project",
        "replicas": 1,
        "gpus": 1,
        "gpu_type": None,
        "changed_at": utcnow(),
    }
    values.update(extra)
    return values


async def test_a_ready_endpoint_is_routed_for_its_project_until_it_stops(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    bus: Bus,
    upstream: str,
    settings: Settings,
) -> None:
    owner = await tenant(authz, admin_key, gw, ["echo"])
    neighbour = await tenant(authz, admin_key, gw, ["echo"])
    name = f"ep-{new_id()[-8:]}"
    sealed = seal_credential(gw.gateway.settings.upstream_credential_fernet_key, "sk-upstream")
    state = endpoint(owner.project, upstream, name, upstream_credential=sealed)
    await publish(bus, EndpointReady(**state), source="inference")
    await eventually(lambda: name in gw.gateway.routes.models)

    answer = await client(gw, owner.key).chat.completions.create(
        model=name, messages=[{"role": "user", "content": "routed"}]
    )
    assert answer.model == "echo-served"
    seen = [
        r for r in await upstream_json(upstream, "/_log") if r["body"].get("model") == "echo-served"
    ]
    assert seen[-1]["headers"]["authorization"] == "Bearer sk-upstream"
    # Metered under the route name, and carrying the catalog asset and version it is priced by.
    [event] = await usage_events(settings.nats_url, settings.event_namespace, owner.project, 1)
    assert {k: event["data"][k] for k in ("model", "endpoint", "asset", "asset_version")} == {
        "model": name,
        "endpoint": name,
        "asset": "echo",
        "asset_version": "1.0",
    }
    listed = await client(gw, owner.key).models.list()
    assert name in {m.id for m in listed.data}

    # Exposed to its project only: another project (entitled to the asset) does not see it.
    with pytest.raises(openai.NotFoundError):
        await client(gw, neighbour.key).chat.completions.create(
            model=name, messages=[{"role": "user", "content": "x"}]
        )
    assert name not in {m.id for m in (await client(gw, neighbour.key).models.list()).data}

    stopped = EndpointStopped(**{**state, "status": "stopped"})
    await publish(bus, stopped, source="inference")
    await eventually(lambda: name not in gw.gateway.routes.models, within=1.0)
    with pytest.raises(openai.NotFoundError):
        await client(gw, owner.key).chat.completions.create(
            model=name, messages=[{"role": "user", "content": "x"}]
        )


def test_only_ready_states_with_an_upstream_make_routes() -> None:
    from gateway.routes import RouteTable

    table = RouteTable()
    base = endpoint("p", "http://127.0.0.1:1", "m")
    table.replace_endpoints(
        [
            EndpointState(**base),
            EndpointState(**{**base, "endpoint_id": "2", "route_name": "n", "status": "failed"}),
            EndpointState(**{**base, "endpoint_id": "3", "route_name": "o", "upstream_url": None}),
        ]
    )
    assert set(table.models) == {"m"}
    assert table.models["m"].visible_to("p") and not table.models["m"].visible_to("q")
    public = EndpointState(
        **{**base, "endpoint_id": "4", "route_name": "pub", "network_exposure": "public"}
    )
    table.apply_endpoint(public)
    assert table.models["pub"].visible_to("q")


async def test_a_model_being_started_again_answers_503_retryable_not_404(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, bus: Bus, upstream: str
) -> None:
    """A new inference leader starts a lost leader's model again: while it is provisioning the
    caller hears "not ready, retry" (a 503 SDKs retry), never "no such model"; other projects
    still hear 404, and a failed endpoint is gone (404)."""
    owner = await tenant(authz, admin_key, gw, ["echo"])
    neighbour = await tenant(authz, admin_key, gw, ["echo"])
    name = f"ep-{new_id()[-8:]}"
    state = endpoint(owner.project, upstream, name)
    await publish(bus, EndpointReady(**state), source="inference")
    await eventually(lambda: name in gw.gateway.routes.models)
    again = {**state, "status": "provisioning", "upstream_url": None}
    await publish(bus, EndpointProvisioning(**again), source="inference")
    await eventually(lambda: name not in gw.gateway.routes.models)

    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:

        async def call(key: str) -> httpx.Response:
            body = {"model": name, "messages": [{"role": "user", "content": "there?"}]}
            return await http.post("/v1/chat/completions", json=body, headers=bearer(key))

        starting = await call(owner.key)
        assert starting.status_code == 503
        assert starting.json()["error"]["code"] == "model_not_ready"
        assert starting.headers["retry-after"] == "5"
        assert (await call(neighbour.key)).status_code == 404

        await publish(bus, EndpointReady(**state), source="inference")
        await eventually(lambda: name in gw.gateway.routes.models)
        assert (await call(owner.key)).status_code == 200

        failed = {**state, "status": "failed", "upstream_url": None}
        await publish(bus, EndpointFailed(**failed), source="inference")
        await eventually(lambda: name not in gw.gateway.routes.models)
        assert (await call(owner.key)).status_code == 404
