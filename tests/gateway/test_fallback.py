"""A project's fallback chain for a model (set in authz, replicated to the gateway): used when
the model has no replica that takes the call or its upstream answers 429/503; the usage event
names the model that served and the one asked for; never a model the project is not entitled
to or that has no approved version."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from libs.common.bus import Bus
from libs.common.db import new_id
from libs.common.events.inference import EndpointProvisioning
from libs.common.settings import Settings
from tests.gateway.conftest import RunningGateway, Tenant, tenant
from tests.gateway.support import eventually, publish, usage_events
from tests.gateway.test_endpoints import endpoint
from tests.gateway.test_openai import client
from tests.helpers import bearer, ok


async def chain(
    authz: httpx.AsyncClient, key: str, gw: RunningGateway, t: Tenant, model: str, to: list[str]
) -> dict[str, Any]:
    """Set the project's chain for ``model`` and wait until the gateway has it."""
    body: dict[str, Any] = await ok(
        await authz.put(
            f"/v1/projects/{t.project}/fallbacks/{model}", json={"chain": to}, headers=bearer(key)
        )
    )
    await eventually(lambda: gw.gateway.auth.fallbacks(t.project, model) == tuple(to))
    return body


@pytest.mark.parametrize("model", ["echo-busy", "unreachable"])
async def test_a_model_that_cannot_serve_falls_back_and_the_event_says_so(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    settings: Settings,
    model: str,
) -> None:
    t = await tenant(authz, admin_key, gw, [model, "echo"])
    saved = await chain(authz, admin_key, gw, t, model, ["echo"])
    assert saved["fallbacks"] == ["echo"]
    answer = await client(gw, t.key).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "fall back please"}]
    )
    assert answer.model == "echo"  # the fallback's upstream answered
    [event] = await usage_events(settings.nats_url, settings.event_namespace, t.project, 1)
    data = event["data"]
    assert (data["model"], data["fallback_from"], data["asset"], data["status"]) == (
        "echo",
        model,
        "echo",
        "ok",
    )


async def test_no_fallback_to_a_model_the_project_may_not_use(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    settings: Settings,
) -> None:
    """Entitled to the busy model alone: its chain names models it may not use (not entitled,
    not approved), so the upstream's own 429 reaches the client."""
    t = await tenant(authz, admin_key, gw, ["echo-busy", "unapproved"])
    await chain(authz, admin_key, gw, t, "echo-busy", ["echo", "unapproved"])
    with pytest.raises(openai.RateLimitError):
        await client(gw, t.key).chat.completions.create(
            model="echo-busy", messages=[{"role": "user", "content": "anyone?"}]
        )
    [event] = await usage_events(settings.nats_url, settings.event_namespace, t.project, 1)
    assert (event["data"]["model"], event["data"]["http_status"]) == ("echo-busy", 429)
    assert event["data"]["fallback_from"] is None


async def test_a_chain_is_the_project_admins_to_set_for_a_model_it_is_entitled_to(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    base = f"/v1/projects/{t.project}/fallbacks"
    forbidden = await authz.put(f"{base}/echo", json={"chain": ["x"]}, headers=bearer(t.key))
    assert forbidden.status_code == 403  # a developer's key
    missing = await authz.put(
        f"{base}/echo-busy", json={"chain": ["echo"]}, headers=bearer(admin_key)
    )
    assert missing.status_code == 404
    itself = await authz.put(f"{base}/echo", json={"chain": ["echo"]}, headers=bearer(admin_key))
    assert itself.status_code == 422
    long = await authz.put(
        f"{base}/echo", json={"chain": [f"m{i}" for i in range(6)]}, headers=bearer(admin_key)
    )
    assert long.status_code == 422
    await chain(authz, admin_key, gw, t, "echo", ["echo-slow"])
    cleared = await ok(
        await authz.put(f"{base}/echo", json={"chain": []}, headers=bearer(admin_key))
    )
    assert cleared["fallbacks"] is None
    await eventually(lambda: gw.gateway.auth.fallbacks(t.project, "echo") == ())


async def test_a_model_being_started_is_served_by_its_fallback(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    bus: Bus,
    upstream: str,
    settings: Settings,
) -> None:
    """No replica yet (provisioning, or again after a failover): the chain takes the call, as
    when none is healthy; without a chain the caller hears 503 model_not_ready."""
    t = await tenant(authz, admin_key, gw, ["echo-busy", "echo"])
    await chain(authz, admin_key, gw, t, "echo-busy", ["echo"])
    name = f"ep-{new_id()[-8:]}"
    state = endpoint(t.project, upstream, name, asset_name="echo-busy", upstream_url=None)
    await publish(bus, EndpointProvisioning(**{**state, "status": "provisioning"}), "inference")
    await eventually(lambda: gw.gateway.routes.starting(name, t.project) is not None)
    answer = await client(gw, t.key).chat.completions.create(
        model=name, messages=[{"role": "user", "content": "are you up?"}]
    )
    assert answer.model == "echo"
    [event] = await usage_events(settings.nats_url, settings.event_namespace, t.project, 1)
    data = event["data"]
    assert (data["model"], data["fallback_from"], data["status"]) == ("echo", name, "ok")
