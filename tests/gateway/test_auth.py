"""Every way a call can fail authentication or authorisation at the gateway, and how fast
changes made in authz and the catalog reach it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest

from gateway.admin import create_admin_app
from gateway.app import ProxyApp
from gateway.state import Gateway
from libs.common.bus import Bus
from libs.common.events.catalog import VersionApproved, VersionRevoked
from libs.common.settings import Settings
from tests.authz.support import ManualClock
from tests.gateway.conftest import RunningGateway, tenant, version
from tests.gateway.support import eventually, publish
from tests.helpers import bearer, ok, serve

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}


async def chat(gw: RunningGateway, headers: dict[str, str], body: object = CHAT) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.url) as client:
        return await client.post("/v1/chat/completions", json=body, headers=headers)


def error_of(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, object] = body["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    return error


async def test_a_key_is_accepted_from_each_header_the_gateway_reads(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    for headers in (bearer(t.key), {"apikey": t.key}, {"x-api-key": t.key}):
        response = await chat(gw, headers)
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "No API key found in request"),
        ({"Authorization": "Basic dXNlcjpwdw=="}, "No API key found in request"),
        (bearer("stw_short"), "Invalid authentication credentials"),
        (bearer("stw_AAAAAAAA_" + "B" * 32), "Invalid authentication credentials"),
        (bearer("not-a-key-nor-a-token"), "Invalid authentication credentials"),
    ],
)
async def test_missing_malformed_and_unknown_credentials_are_401(
    gw: RunningGateway, headers: dict[str, str], message: str
) -> None:
    response = await chat(gw, headers)
    assert response.status_code == 401
    error = error_of(response)
    assert error["message"] == message
    assert error["type"] == "authentication_error"


async def test_a_known_key_id_with_a_wrong_secret_is_401(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    assert (await chat(gw, bearer(t.key))).status_code == 200  # now cached as verified
    forged = t.key[:-4] + ("AAAA" if not t.key.endswith("AAAA") else "BBBB")
    response = await chat(gw, bearer(forged))
    assert response.status_code == 401
    assert (await chat(gw, bearer(t.key))).status_code == 200


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def clocked_gw(
    gateway_settings: Settings, clock: ManualClock, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningGateway]:
    """A gateway like ``gw`` but on ``clock`` (and with a data directory of its own)."""
    data_dir = tmp_path_factory.mktemp("clocked-gateway")
    settings = gateway_settings.model_copy(update={"data_dir": data_dir})
    gateway = await Gateway.start(settings, clock=clock)
    try:
        async with (
            serve(ProxyApp(gateway)) as url,
            serve(create_admin_app(gateway)) as admin_url,
        ):
            await gateway.wait_loaded(10)
            yield RunningGateway(gateway, url, admin_url, settings)
    finally:
        await gateway.stop()


async def test_an_expired_key_is_refused(
    clocked_gw: RunningGateway, clock: ManualClock, authz: httpx.AsyncClient, admin_key: str
) -> None:
    """The replica decides expiry on the gateway's clock, without a word from authz."""
    gw = clocked_gw
    t = await tenant(authz, admin_key, gw, ["echo"])
    project, subject = t.project, "expiring"
    await ok(
        await authz.put(
            f"/v1/projects/{project}/members/{subject}",
            json={"role": "developer"},
            headers=bearer(admin_key),
        )
    )
    expires = clock() + timedelta(hours=1)
    created = await ok(
        await authz.post(
            f"/v1/projects/{project}/keys",
            json={
                "name": "short",
                "scopes": ["inference:invoke"],
                "owner": subject,
                "expires_at": expires.isoformat(),
            },
            headers=bearer(admin_key),
        ),
        201,
    )
    await eventually(lambda: gw.gateway.auth.key(created["id"]) is not None)
    assert (await chat(gw, bearer(created["key"]))).status_code == 200
    clock.advance(expires - timedelta(seconds=1) - clock())
    assert (await chat(gw, bearer(created["key"]))).status_code == 200
    clock.advance(timedelta(seconds=1))  # the instant it expires
    response = await chat(gw, bearer(created["key"]))
    assert response.status_code == 401
    assert error_of(response)["message"] == "API key expired"


async def test_revoked_key_is_rejected_within_one_second(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    assert (await chat(gw, bearer(t.key))).status_code == 200
    await ok(
        await authz.delete(f"/v1/projects/{t.project}/keys/{t.key_id}", headers=bearer(admin_key))
    )
    revoked_at = time.monotonic()
    async with httpx.AsyncClient(base_url=gw.url) as client:
        while True:
            response = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(t.key))
            if response.status_code == 401:
                break
            assert time.monotonic() - revoked_at < 1.0, "revoked key still accepted after 1 s"
            await asyncio.sleep(0.01)
    assert time.monotonic() - revoked_at < 1.0


async def test_revoked_entitlement_cuts_traffic_within_one_second(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    assert (await chat(gw, bearer(t.key))).status_code == 200
    await ok(
        await authz.delete(
            f"/v1/projects/{t.project}/entitlements/model/echo", headers=bearer(admin_key)
        ),
        204,
    )
    started = time.monotonic()
    await eventually(
        lambda: not gw.gateway.auth.entitled(t.project, "model", "echo"), within=1.0, every=0.005
    )
    response = await chat(gw, bearer(t.key))
    assert response.status_code == 403
    assert error_of(response)["code"] == "not_entitled"
    assert time.monotonic() - started < 1.0


async def test_revoked_catalog_version_cuts_traffic_and_reapproval_restores_it(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, bus: Bus
) -> None:
    t = await tenant(authz, admin_key, gw, ["revocable"])
    body = {**CHAT, "model": "revocable"}
    assert (await chat(gw, bearer(t.key), body)).status_code == 200
    started = time.monotonic()
    await publish(bus, VersionRevoked(**version("revocable", "revoked").model_dump()))
    await eventually(
        lambda: gw.gateway.catalog.approved("model", "revocable") is None, within=1.0, every=0.005
    )
    assert time.monotonic() - started < 1.0
    refused = await chat(gw, bearer(t.key), body)
    assert refused.status_code == 403
    assert error_of(refused)["code"] == "not_approved"
    async with httpx.AsyncClient(base_url=gw.url) as client:
        listed = await client.get("/v1/models", headers=bearer(t.key))
    assert listed.json()["data"] == []
    await publish(bus, VersionApproved(**version("revocable").model_dump()))
    await eventually(lambda: gw.gateway.catalog.approved("model", "revocable") is not None)
    assert (await chat(gw, bearer(t.key), body)).status_code == 200


async def test_a_key_without_the_invoke_scope_is_403(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"], scopes=["catalog:read"])
    response = await chat(gw, bearer(t.key))
    assert response.status_code == 403
    error = error_of(response)
    assert error["type"] == "permission_error"
    assert "inference:invoke" in str(error["message"])


async def test_a_viewer_may_not_invoke_models_even_with_the_scope(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"], role="viewer")
    response = await chat(gw, bearer(t.key))
    assert response.status_code == 403
    assert "developer" in str(error_of(response)["message"])


async def test_a_platform_key_must_name_the_project_it_calls_for(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    created = await ok(
        await authz.post(
            "/v1/platform/keys",
            json={"name": "ops", "scopes": ["inference:invoke"]},
            headers=bearer(admin_key),
        ),
        201,
    )
    await eventually(lambda: gw.gateway.auth.key(created["id"]) is not None)
    unnamed = await chat(gw, bearer(created["key"]))
    assert unnamed.status_code == 400
    assert error_of(unnamed)["code"] == "project_required"
    named = await chat(gw, {**bearer(created["key"]), "X-Steward-Project": t.project})
    assert named.status_code == 200, named.text
