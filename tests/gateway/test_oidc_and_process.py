"""OIDC bearer tokens verified at the gateway against a real JWKS server, and the gateway as
the process operators run (``python -m gateway``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from cli.stack import SERVICES
from libs.common.settings import Settings
from tests.authz.oidc_issuer import Issuer, new_key
from tests.gateway.conftest import RunningGateway, running_gateway, tenant
from tests.gateway.support import ROOT, eventually, port_open
from tests.helpers import bearer, child_log, free_port, ok, serve

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "token"}]}


@pytest.fixture(scope="module")
async def issuer() -> AsyncIterator[Issuer]:
    idp = Issuer()
    async with serve(idp.app()) as url:
        idp.base_url = url
        yield idp


@pytest.fixture(scope="module")
async def oidc_gw(
    issuer: Issuer, gateway_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningGateway]:
    """A gateway, and an authz it asks ``whoami``, both trusting the test identity provider."""
    from services.authz.app import create_app
    from tests.conftest import running

    trusting = {"oidc_issuer": issuer.issuer, "oidc_audience": "steward"}
    async for authz_app in running(create_app(gateway_settings.model_copy(update=trusting))):
        async with serve(authz_app) as authz_url:
            settings = gateway_settings.model_copy(
                update={
                    **trusting,
                    "authz_url": authz_url,
                    "data_dir": tmp_path_factory.mktemp("oidc-gw"),
                }
            )
            async with running_gateway(settings) as gateway:
                await gateway.gateway.wait_loaded(10)
                yield gateway


async def test_an_oidc_token_with_a_project_group_and_the_scope_may_call(
    oidc_gw: RunningGateway,
    gw: RunningGateway,
    issuer: Issuer,
    authz: httpx.AsyncClient,
    admin_key: str,
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    await eventually(lambda: oidc_gw.gateway.auth.entitled(t.project, "model", "echo"))
    key = issuer.keys.get("gw-rsa") or issuer.add(new_key("gw-rsa"))
    # A subject of its own: authz's members for a shared one ("user-1") vary with other tests.
    sub = f"user-{t.project}"
    good = issuer.token(
        key, sub=sub, scope="openid inference:invoke", groups=[f"/steward/{t.project}/developer"]
    )
    async with httpx.AsyncClient(base_url=oidc_gw.url) as client:
        ok = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(good))
        assert ok.status_code == 200, ok.text
        listed = await client.get("/v1/models", headers=bearer(good))
        assert [m["id"] for m in listed.json()["data"]] == ["echo"]

        no_scope = issuer.token(
            key, sub=sub, scope="openid", groups=[f"/steward/{t.project}/developer"]
        )
        refused = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(no_scope))
        assert refused.status_code == 403

        no_role = issuer.token(key, sub=sub, scope="openid inference:invoke")
        unbound = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(no_role))
        assert unbound.status_code == 400  # no project to count the call against
        named = {**bearer(no_role), "X-Steward-Project": t.project}
        outsider = await client.post("/v1/chat/completions", json=CHAT, headers=named)
        assert outsider.status_code == 403

        expired = issuer.token(
            key,
            sub=sub,
            lifetime=-120,
            scope="inference:invoke",
            groups=[f"/steward/{t.project}/developer"],
        )
        late = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(expired))
        assert late.status_code == 401
        assert "expired" in late.json()["error"]["message"]

        other_audience = issuer.token(
            key, sub=sub, audience="someone-else", scope="inference:invoke"
        )
        wrong = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(other_audience))
        assert wrong.status_code == 401


async def test_a_project_role_from_authz_members_counts_for_a_token_without_groups(
    oidc_gw: RunningGateway,
    gw: RunningGateway,
    issuer: Issuer,
    authz: httpx.AsyncClient,
    admin_key: str,
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    await eventually(lambda: oidc_gw.gateway.auth.entitled(t.project, "model", "echo"))
    subject = f"member-{t.project}"
    await ok(
        await authz.put(
            f"/v1/projects/{t.project}/members/{subject}",
            json={"role": "developer"},
            headers=bearer(admin_key),
        )
    )
    key = issuer.keys.get("gw-rsa") or issuer.add(new_key("gw-rsa"))  # JWKS is cached
    token = issuer.token(key, sub=subject, scope="openid inference:invoke")
    async with httpx.AsyncClient(base_url=oidc_gw.url) as client:
        answer = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(token))
    assert answer.status_code == 200, answer.text


async def test_removing_a_member_evicts_their_cached_token_at_the_gateway(
    oidc_gw: RunningGateway,
    gw: RunningGateway,
    issuer: Issuer,
    authz: httpx.AsyncClient,
    admin_key: str,
) -> None:
    """A token's principal is cached for minutes; the member event drops it, so the next call
    asks authz again and finds no role."""
    t = await tenant(authz, admin_key, gw, ["echo"])
    await eventually(lambda: oidc_gw.gateway.auth.entitled(t.project, "model", "echo"))
    subject = f"leaver-{t.project}"
    members = f"/v1/projects/{t.project}/members/{subject}"
    await ok(await authz.put(members, json={"role": "developer"}, headers=bearer(admin_key)))
    key = issuer.keys.get("gw-rsa") or issuer.add(new_key("gw-rsa"))
    token = issuer.token(key, sub=subject, scope="openid inference:invoke")
    headers = {**bearer(token), "X-Steward-Project": t.project}
    authn = oidc_gw.gateway.authn
    async with httpx.AsyncClient(base_url=oidc_gw.url) as client:
        before = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert before.status_code == 200, before.text
        assert subject in authn._by_subject  # cached

        await ok(await authz.delete(members, headers=bearer(admin_key)), 204)
        await eventually(lambda: subject not in authn._by_subject)
        after = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert after.status_code == 403, after.text


async def test_python_dash_m_gateway_serves_both_ports_and_stops_on_sigterm(
    gateway_settings: Settings, tmp_path: Path
) -> None:
    proxy, admin = free_port(), free_port()
    env = {
        **os.environ,
        "STEWARD_DATA_DIR": str(tmp_path),
        "STEWARD_NATS_URL": gateway_settings.nats_url,
        "STEWARD_EVENT_NAMESPACE": gateway_settings.event_namespace,
        "STEWARD_API_KEY_PEPPER": "unused-here",
        **{
            f"STEWARD_{service.upper()}_URL": getattr(gateway_settings, f"{service}_url")
            for service in SERVICES  # none left at a default port a local stack may answer on
        },
        "STEWARD_GATEWAY_API_KEY": "stw_AAAAAAAA_" + "B" * 32,
        "STEWARD_GATEWAY_PROXY_PORT": str(proxy),
        "STEWARD_GATEWAY_ADMIN_PORT": str(admin),
    }
    # Its output goes to a log file (attached to a failure), never to a pipe nobody reads: a
    # full pipe blocks the gateway's next log line, and then its shutdown.
    with child_log("gateway") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", cwd=ROOT, env=env, stdout=log, stderr=log
        )
    try:
        await eventually(lambda: port_open(proxy) and port_open(admin), within=20, every=0.1)
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{admin}/healthz")).status_code == 200
            # The snapshot key is refused by authz: not ready, and says why.
            ready = await client.get(f"http://127.0.0.1:{admin}/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["authz_replica"] == "not loaded"
            refused = await client.post(
                f"http://127.0.0.1:{proxy}/v1/chat/completions",
                json=CHAT,
                headers=bearer("stw_AAAAAAAA_" + "C" * 32),
            )
            assert refused.status_code == 503
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            # Stuck: have it print its tasks' stacks into its log (attached to this failure),
            # then kill it, never leaving it running for the rest of the run.
            process.send_signal(signal.SIGUSR1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 2)
            process.kill()
            await process.wait()
            raise
    assert code == 0
