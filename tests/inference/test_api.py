"""The inference API: object-level authorisation on every endpoint route, bad input refused with
nothing written, external endpoints with a sealed credential, stop and start, revocations that
tear endpoints down, the pool, lead-time statistics and the routes snapshot."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select
from starlette.types import Receive, Scope, Send

from libs.common.events.inference import open_credential
from libs.common.settings import Settings
from services.inference.models import Endpoint, bus_tables
from services.inference.simulator import SimulatorConfig
from services.inference.simulator import create_app as simulator_app
from tests.approval.support import catalog_yaml, eventually, import_yaml, model, uname
from tests.helpers import bearer, member_key, ok, serve
from tests.inference.support import (
    Team,
    approved_model,
    endpoints,
    listening,
    team,
    wait_status,
)


@pytest.fixture(scope="module")
async def two_teams(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
) -> tuple[Team, Team, str]:
    a = await team(authz, admin_key)
    b = await team(authz, admin_key)
    name = await approved_model(authz, catalog, approval, admin_key, a)
    return a, b, name


async def _create(
    inference: httpx.AsyncClient, who: Team, body: dict[str, Any], key: str | None = None
) -> httpx.Response:
    return await inference.post(
        f"/v1/projects/{who.project}/endpoints", json=body, headers=bearer(key or who.admin)
    )


async def test_bola_every_endpoint_route_keeps_projects_apart(
    authz: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
    two_teams: tuple[Team, Team, str],
) -> None:
    a, b, name = two_teams
    body = {"model_name": name, "version": "1.0.0", "runtime": "kubernetes", "gpus": 0}
    created = await ok(await _create(inference, a, body), 201)
    eid = created["id"]
    routes: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", "/endpoints", None),
        ("POST", "/endpoints", body),
        ("GET", f"/endpoints/{eid}", None),
        ("POST", f"/endpoints/{eid}/scale", {"replicas": 2}),
        ("POST", f"/endpoints/{eid}/stop", None),
        ("DELETE", f"/endpoints/{eid}", None),
    ]
    # B's project-admin, on A's project: no role there.
    for method, path, json in routes:
        r = await inference.request(
            method, f"/v1/projects/{a.project}{path}", json=json, headers=bearer(b.admin)
        )
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["detail"] == f"no role in project '{a.project}'"
    # B's project-admin, naming A's endpoint under B's project: it does not exist there.
    for method, path, json in routes[2:]:
        r = await inference.request(
            method, f"/v1/projects/{b.project}{path}", json=json, headers=bearer(b.admin)
        )
        assert r.status_code == 404, (method, path, r.text)
    # In A: a viewer reads but does not manage; a developer does not manage either.
    viewer = await member_key(authz, admin_key, a.project, "viewer", ["endpoints:manage"])
    for key in (viewer, a.dev):
        assert (
            await inference.get(f"/v1/projects/{a.project}/endpoints/{eid}", headers=bearer(key))
        ).status_code == 200
        for method, path, json in [routes[1], *routes[3:]]:
            r = await inference.request(
                method, f"/v1/projects/{a.project}{path}", json=json, headers=bearer(key)
            )
            assert r.status_code == 403, (method, path, r.text)
            assert "needs role project-admin" in r.json()["detail"]
    # A project-admin key without the endpoints:manage scope.
    unscoped = await member_key(authz, admin_key, a.project, "project-admin", ["catalog:read"])
    r = await inference.get(f"/v1/projects/{a.project}/endpoints", headers=bearer(unscoped))
    assert r.status_code == 403
    assert r.json()["detail"] == "the credential lacks the scope 'endpoints:manage'"
    # No credential at all.
    assert (await inference.get(f"/v1/projects/{a.project}/endpoints")).status_code == 401
    # The gateway's snapshot is for platform admins only.
    assert (await inference.get("/v1/routes", headers=bearer(a.admin))).status_code == 403
    # After all of that, the endpoint is untouched.
    after = await ok(
        await inference.get(f"/v1/projects/{a.project}/endpoints/{eid}", headers=bearer(a.admin))
    )
    assert (after["replicas"], after["owner"]) == (1, created["owner"])
    assert after["status"] in ("provisioning", "ready")
    # Pool and lead-time views are filtered to the caller's projects.
    pool = await ok(await inference.get("/v1/gpu-pool", headers=bearer(b.admin)))
    assert set(pool["projects"]) <= {b.project}
    await ok(
        await inference.delete(
            f"/v1/projects/{a.project}/endpoints/{eid}", headers=bearer(a.admin)
        ),
        202,
    )
    await wait_status(inference, a.dev, a.project, eid, "deleted")


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"runtime": "local", "surprise": 1}, 422, "surprise: Extra inputs are not permitted"),
        ({"runtime": "external"}, 422, "an external endpoint needs upstream_url"),
        (
            {"runtime": "external", "upstream_url": "http://user:pw@example.com/v1"},
            422,
            "must not carry a credential",
        ),
        ({"runtime": "external", "upstream_url": "ftp://example.com"}, 422, "http:// or https://"),
        (
            {"runtime": "external", "upstream_url": "http://169.254.169.254/latest"},
            422,
            "169.254.169.254 is link-local, metadata",
        ),
        (
            {"runtime": "external", "upstream_url": "http://[fe80::1]:80/v1"},
            422,
            "fe80::1 is link-local",
        ),
        ({"runtime": "kubernetes", "upstream_api_key": "x"}, 422, "for external endpoints only"),
        ({"runtime": "local", "replicas": 9}, 422, "the local runtime runs at most 8 replicas"),
        ({"runtime": "kubernetes", "profile": "simulator"}, 422, "profile is for local"),
        ({"runtime": "local", "profile": "nope"}, 422, "no local runtime profile 'nope'"),
        ({"runtime": "kubernetes", "gpus": 65}, 422, "gpus: Input should be less than"),
        ({"runtime": "kubernetes", "gpus": 1, "gpu_type": "tpu"}, 422, "has no type 'tpu'"),
        ({"runtime": "kubernetes", "route_name": "has space"}, 422, "route_name"),
        ({"runtime": "kubernetes", "version": "9.9.9"}, 422, "the catalog has no"),
        ({"runtime": "kubernetes", "model_name": "no/such-model"}, 422, "the catalog has no"),
        ({"runtime": "mainframe"}, 422, "runtime: Input should be"),
    ],
)
async def test_bad_input_is_a_4xx_and_writes_nothing(
    inference: httpx.AsyncClient,
    inference_app: FastAPI,
    two_teams: tuple[Team, Team, str],
    body: dict[str, Any],
    status: int,
    detail: str,
) -> None:
    a, _, name = two_teams
    before = await _counts(inference_app)
    payload = {"model_name": name, "version": "1.0.0", **body}
    r = await _create(inference, a, payload)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert detail in r.json()["detail"]
    assert await _counts(inference_app) == before


async def test_steward_s_own_services_are_never_upstreams(
    inference: httpx.AsyncClient,
    inference_app: FastAPI,
    inference_settings: Settings,
    two_teams: tuple[Team, Team, str],
) -> None:
    """An external endpoint naming Steward's authz, in any spelling, is a 422 that writes
    nothing, although loopback itself is allowed (a local Ollama works)."""
    a, _, name = two_teams
    port = httpx.URL(inference_settings.authz_url).port
    before = await _counts(inference_app)
    for host in ("127.0.0.1", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "2130706433", "localhost"):
        url = f"http://{host}:{port}/v1"
        payload = {"model_name": name, "version": "1.0.0", "runtime": "external"}
        r = await _create(inference, a, {**payload, "upstream_url": url})
        assert r.status_code == 422, (url, r.text)
        assert "Steward's own services" in r.json()["detail"], url
    assert await _counts(inference_app) == before


async def _counts(app: FastAPI) -> tuple[frozenset[str], int]:
    """The endpoints, and the events that are about none of them. Endpoints made by earlier
    tests go on living (a runtime retrying writes its notes): their events are not a write."""
    async with app.state.ctx.sessionmaker() as session:
        ids = frozenset((await session.scalars(select(Endpoint.id))).all())
        events = (await session.scalars(select(bus_tables.outbox.c.event))).all()
    return ids, sum(1 for event in events if not any(i in event for i in ids))


async def test_only_approved_versions_deploy_and_scale_input_is_checked(
    catalog: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    inference_app: FastAPI,
    admin_key: str,
    two_teams: tuple[Team, Team, str],
) -> None:
    a, _, name = two_teams
    draft = f"{uname('draft')}/llm"
    await import_yaml(catalog, admin_key, catalog_yaml([model(draft)]))
    before = await _counts(inference_app)
    r = await _create(inference, a, {"model_name": draft, "version": "1.0.0", "runtime": "local"})
    assert r.status_code == 409
    assert r.json()["detail"] == f"{draft}@1.0.0 is draft; only approved versions deploy"
    assert await _counts(inference_app) == before

    created = await ok(
        await _create(
            inference,
            a,
            {
                "model_name": name,
                "version": "1.0.0",
                "runtime": "kubernetes",
                "gpus": 0,
                "route_name": f"{a.project}/explicit",
            },
        ),
        201,
    )
    await wait_status(inference, a.dev, a.project, created["id"], "ready")
    before = await _counts(inference_app)
    base = f"/v1/projects/{a.project}/endpoints"
    for bad in (
        {"replicas": -1},
        {"replicas": 65},
        {"replicas": "two"},
        {},
        {"replicas": 1, "x": 1},
    ):
        r = await inference.post(f"{base}/{created['id']}/scale", json=bad, headers=bearer(a.admin))
        assert r.status_code == 422, (bad, r.text)
    r = await inference.get(f"{base}/not-an-id", headers=bearer(a.admin))
    assert r.status_code == 422
    # The same explicit route name, while the first is live, is a conflict.
    again = await _create(
        inference,
        a,
        {
            "model_name": name,
            "version": "1.0.0",
            "runtime": "kubernetes",
            "route_name": f"{a.project}/explicit",
        },
    )
    assert again.status_code == 409
    assert "is taken by a live endpoint" in again.json()["detail"]
    assert await _counts(inference_app) == before
    await ok(await inference.delete(f"{base}/{created['id']}", headers=bearer(a.admin)), 202)
    await wait_status(inference, a.dev, a.project, created["id"], "deleted")


class _RequiresKey:
    """An upstream that answers only with the right bearer credential (and records what came)."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key
        self.seen: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            auth = dict(scope["headers"]).get(b"authorization", b"").decode()
            self.seen.append(auth)
            if auth != f"Bearer {self.key}":
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b"{}"})
                return
        await self.app(scope, receive, send)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, _RequiresKey]]:
    guarded = _RequiresKey(simulator_app(SimulatorConfig("hosted-model", 1, 1)), "sk-upstream-42")
    async with serve(guarded) as url:
        yield url + "/v1", guarded


async def test_external_endpoint_keeps_its_credential_sealed_at_rest_and_on_the_bus(
    inference: httpx.AsyncClient,
    inference_app: FastAPI,
    admin_key: str,
    settings: Settings,
    two_teams: tuple[Team, Team, str],
    upstream: tuple[str, _RequiresKey],
) -> None:
    a, _, name = two_teams
    url, guarded = upstream
    secret = "sk-upstream-42"
    async with listening(settings) as heard:
        created = await ok(
            await _create(
                inference,
                a,
                {
                    "model_name": name,
                    "version": "1.0.0",
                    "runtime": "external",
                    "upstream_url": url + "/",
                    "upstream_api_key": secret,
                    "served_model_name": "hosted-model",
                    "route_name": f"{a.project}/hosted",
                },
            ),
            201,
        )
        assert created["has_upstream_credential"] is True
        assert secret not in str(created)
        ready = await wait_status(inference, a.dev, a.project, created["id"], "ready")
    assert ready["upstream_url"] == url
    assert f"Bearer {secret}" in guarded.seen  # the probe sent the opened credential

    key = inference_app.state.plane.credential_key
    event = next(e for e in heard.about(created["id"]) if e["data"]["status"] == "ready")
    token = event["data"]["upstream_credential"]
    assert token and secret not in token
    assert open_credential(key, token) == secret  # what the gateway does with the shared key

    # Nowhere at rest in plaintext: not the row, not the outbox (events and audit records).
    async with inference_app.state.ctx.sessionmaker() as session:
        row = await session.get(Endpoint, created["id"])
        assert row is not None and row.upstream_credential and secret not in row.upstream_credential
        events = (await session.scalars(select(bus_tables.outbox.c.event))).all()
    assert not any(secret in e for e in events)

    snapshot = await ok(await inference.get("/v1/routes", headers=bearer(admin_key)))
    route = next(r for r in snapshot["routes"] if r["endpoint_id"] == created["id"])
    assert open_credential(key, route["upstream_credential"]) == secret
    await ok(
        await inference.delete(
            f"/v1/projects/{a.project}/endpoints/{created['id']}", headers=bearer(a.admin)
        ),
        202,
    )
    await wait_status(inference, a.dev, a.project, created["id"], "deleted")


async def test_stop_releases_process_and_gpus_and_scaling_up_starts_it_again(
    inference: httpx.AsyncClient,
    admin_key: str,
    two_teams: tuple[Team, Team, str],
    settings: Settings,
) -> None:
    a, _, name = two_teams
    body = {
        "model_name": name,
        "version": "1.0.0",
        "runtime": "local",
        "gpus": 1,
        "route_name": f"{a.project}/stoppable",
    }
    created = await ok(await _create(inference, a, body), 201)
    base = f"/v1/projects/{a.project}/endpoints/{created['id']}"
    ready = await wait_status(inference, a.dev, a.project, created["id"], "ready")
    async with listening(settings) as heard:
        stopped = await ok(await inference.post(f"{base}/stop", headers=bearer(a.admin)))
        assert stopped["status"] == "stopped"
        pool = await ok(await inference.get("/v1/gpu-pool", headers=bearer(a.admin)))
        assert pool["projects"].get(a.project, {}).get("nvidia-a100", 0) == 0

        async def port_closed() -> bool:
            try:
                async with httpx.AsyncClient() as client:
                    await client.get(ready["upstream_url"] + "/models", timeout=0.5)
            except httpx.TransportError:
                return True
            return False

        await eventually(port_closed, what="the stopped server to be gone")
        refused = await inference.post(
            f"{base}/scale", json={"replicas": 9}, headers=bearer(a.admin)
        )
        assert refused.status_code == 422  # local: at most 8 replicas on this host
        started = await ok(
            await inference.post(f"{base}/scale", json={"replicas": 1}, headers=bearer(a.admin))
        )
        assert started["status"] == "provisioning"
        await wait_status(inference, a.dev, a.project, created["id"], "ready")
    statuses = heard.statuses(created["id"])  # (a late "ready" of the first start may lead)
    assert statuses[statuses.index("stopped") :][:3] == ["stopped", "provisioning", "ready"]
    await ok(await inference.delete(base, headers=bearer(a.admin)), 202)
    await wait_status(inference, a.dev, a.project, created["id"], "deleted")
    # A deleted endpoint is listed only on request, and cannot be scaled.
    assert created["id"] not in [e["id"] for e in await endpoints(inference, a.dev, a.project)]
    listed = await endpoints(inference, a.dev, a.project, include_deleted=True)
    assert created["id"] in [e["id"] for e in listed]
    r = await inference.post(f"{base}/scale", json={"replicas": 1}, headers=bearer(a.admin))
    assert r.status_code == 409


async def test_revoking_the_version_or_the_entitlement_tears_endpoints_down(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
) -> None:
    who = await team(authz, admin_key)
    name = await approved_model(authz, catalog, approval, admin_key, who)
    body = {"model_name": name, "version": "1.0.0", "runtime": "kubernetes"}
    by_version = await ok(await _create(inference, who, body), 201)
    # Entitlement: granted, one endpoint runs, the grant is revoked, the endpoint goes.
    other = await ok(
        await _create(inference, who, {**body, "route_name": f"{who.project}/second"}), 201
    )
    grant = f"/v1/projects/{who.project}/entitlements/model/{name}"
    await ok(await authz.put(grant, headers=bearer(admin_key)), 201)
    r = await authz.delete(grant, headers=bearer(admin_key))
    assert r.status_code == 204
    for endpoint in (by_version, other):
        gone = await wait_status(inference, who.dev, who.project, endpoint["id"], "deleted")
        assert gone["reason"] == (f"project '{who.project}' lost its entitlement to '{name}'")

    # Version: a new endpoint, then the catalog revokes the version.
    fresh = await ok(await _create(inference, who, body), 201)
    asset = await ok(await catalog.get(f"/v1/assets/model/{name}", headers=bearer(admin_key)))
    version_id = asset["versions"][0]["id"]
    await ok(await catalog.post(f"/v1/versions/{version_id}/revoke", headers=bearer(admin_key)))
    gone = await wait_status(inference, who.dev, who.project, fresh["id"], "deleted")
    assert gone["reason"] == f"{name}@1.0.0 was revoked in the catalog"
    # And it cannot be deployed again.
    r = await _create(inference, who, body)
    assert r.status_code == 409


async def test_lead_time_statistics_report_median_and_p90(
    inference: httpx.AsyncClient,
    admin_key: str,
    two_teams: tuple[Team, Team, str],
) -> None:
    a, b, name = two_teams
    created = await ok(
        await _create(
            inference,
            a,
            {
                "model_name": name,
                "version": "1.0.0",
                "runtime": "kubernetes",
                "route_name": f"{a.project}/timed",
            },
        ),
        201,
    )
    await wait_status(inference, a.dev, a.project, created["id"], "ready")
    stats = await ok(await inference.get("/v1/stats/lead-time", headers=bearer(admin_key)))
    assert stats["endpoints"] >= 1
    assert 0 <= stats["request_to_ready_median_seconds"] <= stats["request_to_ready_p90_seconds"]
    assert stats["approval_to_ready_median_seconds"] is not None
    mine = await ok(await inference.get("/v1/stats/lead-time", headers=bearer(b.admin)))
    assert mine["endpoints"] == 0  # B sees only its own projects' endpoints
    await ok(
        await inference.delete(
            f"/v1/projects/{a.project}/endpoints/{created['id']}", headers=bearer(a.admin)
        ),
        202,
    )


async def test_metrics_count_transitions_and_lead_time(
    inference: httpx.AsyncClient, two_teams: tuple[Team, Team, str]
) -> None:
    a, _, name = two_teams
    created = await ok(
        await _create(
            inference,
            a,
            {
                "model_name": name,
                "version": "1.0.0",
                "runtime": "kubernetes",
                "route_name": f"{a.project}/metered",
            },
        ),
        201,
    )
    await wait_status(inference, a.dev, a.project, created["id"], "ready")
    text = (await inference.get("/metrics")).text
    assert (
        'steward_inference_endpoint_transitions_total{runtime="kubernetes",status="ready"}' in text
    )
    assert 'steward_inference_request_to_ready_seconds_count{runtime="kubernetes"}' in text
    await ok(
        await inference.delete(
            f"/v1/projects/{a.project}/endpoints/{created['id']}", headers=bearer(a.admin)
        ),
        202,
    )
    await wait_status(inference, a.dev, a.project, created["id"], "deleted")


async def test_long_project_and_model_names_still_make_a_valid_route_name(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
) -> None:
    project = uname("long").ljust(63, "x")
    who = await team(authz, admin_key, project)
    name = await approved_model(authz, catalog, approval, admin_key, who, prefix="m" * 190)
    body = {"model_name": name, "version": "1.0.0", "runtime": "kubernetes"}
    created = await ok(await _create(inference, who, body), 201)
    assert len(f"{project}/{name}") > 255
    assert len(created["route_name"]) == 255
    assert created["route_name"].startswith(f"{project}/mmm")
    assert created["served_model_name"] == name
    await wait_status(inference, who.dev, who.project, created["id"], "ready")
    await ok(
        await inference.delete(
            f"/v1/projects/{who.project}/endpoints/{created['id']}", headers=bearer(who.admin)
        ),
        202,
    )
    await wait_status(inference, who.dev, who.project, created["id"], "deleted")


async def test_the_cli_lists_and_deletes_a_projects_endpoints(
    inference: httpx.AsyncClient,
    inference_app: FastAPI,
    two_teams: tuple[Team, Team, str],
) -> None:
    """``steward endpoint list|delete`` over a real socket, with the project-admin's key."""
    import asyncio
    import json

    from typer.testing import CliRunner

    from cli.main import app

    a, _, name = two_teams
    body = {"model_name": name, "version": "1.0.0", "runtime": "local", "gpus": 1}
    created = await ok(await _create(inference, a, {**body, "route_name": f"{a.project}/cli"}), 201)
    await wait_status(inference, a.dev, a.project, created["id"], "ready")
    async with serve(inference_app) as url:
        env = {"STEWARD_INFERENCE_URL": url, "STEWARD_API_KEY": a.admin, "STEWARD_URL": ""}

        def steward(*args: str) -> str:
            result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
            assert result.exit_code == 0, result.output
            return result.output

        listed = json.loads(
            await asyncio.to_thread(steward, "endpoint", "list", a.project, "-o", "json")
        )
        assert [(e["id"], e["status"]) for e in listed if e["id"] == created["id"]] == [
            (created["id"], "ready")
        ]
        deleted = await asyncio.to_thread(
            steward, "endpoint", "delete", a.project, created["id"], "-o", "json"
        )
        assert json.loads(deleted)["status"] in ("deleting", "deleted")
    await wait_status(inference, a.dev, a.project, created["id"], "deleted")
