"""Failure paths: a model that fails to load, a process that crashes (restarted with backoff, or
given up on), a command that does not exist, and GPU capacity exceeded (refused with what is
free, or, for an approval that cannot be refused any more, a failed endpoint and its event)."""

from __future__ import annotations

import re
from typing import Any

import httpx

from libs.common.settings import Settings
from tests.helpers import bearer, ok
from tests.inference.support import (
    Team,
    approved_model,
    endpoint_of_request,
    endpoints,
    listening,
    request_endpoint,
    team,
    wait_status,
)


async def create(
    inference: httpx.AsyncClient, who: Team, name: str, status: int = 201, **body: Any
) -> dict[str, Any]:
    payload = {"model_name": name, "version": "1.0.0", "runtime": "local", **body}
    created: dict[str, Any] = await ok(
        await inference.post(
            f"/v1/projects/{who.project}/endpoints", json=payload, headers=bearer(who.admin)
        ),
        status,
    )
    return created


async def _setup(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
) -> tuple[Team, str]:
    who = await team(authz, admin_key)
    return who, await approved_model(authz, catalog, approval, admin_key, who)


async def test_a_model_that_fails_to_load_is_retried_then_failed_with_its_log(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
    settings: Settings,
) -> None:
    who, name = await _setup(authz, catalog, approval, admin_key)
    async with listening(settings) as heard:
        created = await create(inference, who, name, profile="broken")
        failed = await wait_status(inference, who.dev, who.project, created["id"], "failed")
    assert "exited with code 1 before it was healthy" in failed["reason"]
    assert "gave up after 2 restarts" in failed["reason"]
    assert "failed to load the model weights" in failed["reason"]  # the log's tail
    assert heard.statuses(created["id"]) == ["provisioning", "failed"]


async def test_a_crashed_server_is_restarted_with_backoff_and_the_route_follows(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
    settings: Settings,
) -> None:
    who, name = await _setup(authz, catalog, approval, admin_key)
    async with listening(settings) as heard:
        created = await create(inference, who, name, profile="crash-once")
        first = await wait_status(inference, who.dev, who.project, created["id"], "ready")

        async def twice_ready() -> bool:
            return heard.statuses(created["id"]).count("ready") >= 2

        from tests.approval.support import eventually

        # A generous bound (a failure limit only): the restart starts a fresh interpreter,
        # which a loaded machine running coverage makes slow.
        await eventually(twice_ready, within=60, what="the restarted server to be ready again")
        again = await wait_status(inference, who.dev, who.project, created["id"], "ready")
    # ready → provisioning (route dropped, with why) → ready (route back, same URL).
    assert heard.statuses(created["id"])[:4] == ["provisioning", "ready", "provisioning", "ready"]
    restarting = heard.about(created["id"])[2]["data"]["reason"]
    assert re.fullmatch(r"the server exited with code 3; restart 1 of 2 in 0\.2s", restarting)
    assert again["upstream_url"] == first["upstream_url"]
    assert again["ready_at"] == first["ready_at"]  # lead time counts the first ready only
    await ok(
        await inference.delete(
            f"/v1/projects/{who.project}/endpoints/{created['id']}", headers=bearer(who.admin)
        ),
        202,
    )
    await wait_status(inference, who.dev, who.project, created["id"], "deleted")


async def test_a_server_that_keeps_crashing_fails_after_the_restart_budget(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
    settings: Settings,
) -> None:
    who, name = await _setup(authz, catalog, approval, admin_key)
    async with listening(settings) as heard:
        created = await create(inference, who, name, profile="crashy")
        failed = await wait_status(
            inference, who.dev, who.project, created["id"], "failed", within=30
        )
    assert failed["reason"].startswith("the server exited with code 3; gave up after 2 restarts")
    reasons = [e["data"]["reason"] for e in heard.about(created["id"])]
    delays = [float(m) for r in reasons for m in re.findall(r" in ([0-9.]+)s$", r)]
    assert delays == [0.2, 0.4]  # exponential backoff between restarts
    # The log holds every start.
    log = settings.data_dir / "inference" / "logs" / f"{created['id']}.log"
    assert log.read_text().count("=== steward: start") == 3


async def test_a_command_that_does_not_exist_fails_at_once(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
) -> None:
    who, name = await _setup(authz, catalog, approval, admin_key)
    created = await create(inference, who, name, profile="missing-binary")
    failed = await wait_status(inference, who.dev, who.project, created["id"], "failed")
    assert failed["reason"].startswith("cannot start '/nonexistent/steward-model-server'")


async def test_capacity_exceeded_is_refused_naming_what_is_free_and_nothing_is_written(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
) -> None:
    who, name = await _setup(authz, catalog, approval, admin_key)
    # The "tiny" type has 2 GPUs; one endpoint takes both.
    held = await create(
        inference, who, name, runtime="kubernetes", gpus=2, gpu_type="tiny", route_name=None
    )
    refused = await inference.post(
        f"/v1/projects/{who.project}/endpoints",
        json={
            "model_name": name,
            "version": "1.0.0",
            "runtime": "kubernetes",
            "gpus": 1,
            "gpu_type": "tiny",
        },
        headers=bearer(who.admin),
    )
    assert refused.status_code == 409
    problem = refused.json()
    assert problem["type"] == "urn:steward:problem:capacity-exceeded"
    assert "this needs 1 (1 replica(s) x 1 of type tiny)" in problem["detail"]
    assert "tiny: 0 of 2" in problem["detail"]
    assert problem["free"]["tiny"] == 0
    assert [e["id"] for e in await endpoints(inference, who.dev, who.project)] == [held["id"]]

    # The pool shows it, per type and per project.
    pool = await ok(await inference.get("/v1/gpu-pool", headers=bearer(admin_key)))
    assert pool["types"]["tiny"] == {"total": 2, "used": 2, "free": 0}
    assert pool["projects"][who.project] == {"tiny": 2}

    # An unknown GPU type is a 422 naming the types there are.
    unknown = await inference.post(
        f"/v1/projects/{who.project}/endpoints",
        json={
            "model_name": name,
            "version": "1.0.0",
            "runtime": "kubernetes",
            "gpus": 1,
            "gpu_type": "tpu",
        },
        headers=bearer(who.admin),
    )
    assert unknown.status_code == 422
    assert "['nvidia-a100', 'tiny']" in unknown.json()["detail"]

    # Deleting frees the GPUs.
    await ok(
        await inference.delete(
            f"/v1/projects/{who.project}/endpoints/{held['id']}", headers=bearer(who.admin)
        ),
        202,
    )
    await wait_status(inference, who.dev, who.project, held["id"], "deleted")
    pool = await ok(await inference.get("/v1/gpu-pool", headers=bearer(admin_key)))
    assert pool["types"]["tiny"]["free"] == 2


async def test_an_approved_request_that_does_not_fit_becomes_failed_with_an_event(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
    settings: Settings,
) -> None:
    who, name = await _setup(authz, catalog, approval, admin_key)
    async with listening(settings) as heard:
        decided = await request_endpoint(
            approval, admin_key, who, name, "kubernetes", gpus=2, gpu_type="tiny", replicas=2
        )
        found = await endpoint_of_request(inference, who.dev, who.project, decided["id"])
        failed = await wait_status(inference, who.dev, who.project, found["id"], "failed")
    assert failed["reason"].startswith("not enough free GPUs: this needs 4")
    assert failed["gpu_type"] is None
    assert heard.statuses(found["id"]) == ["provisioning", "failed"]
    assert heard.about(found["id"])[-1]["data"]["reason"] == failed["reason"]


async def test_a_projects_gpu_allowance_is_enforced(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
    limited_project: str,
) -> None:
    who = await team(authz, admin_key, limited_project)
    name = await approved_model(authz, catalog, approval, admin_key, who)
    await create(inference, who, name, runtime="kubernetes", gpus=2)
    refused = await inference.post(
        f"/v1/projects/{who.project}/endpoints",
        json={
            "model_name": name,
            "version": "1.0.0",
            "runtime": "kubernetes",
            "gpus": 1,
            "route_name": f"{who.project}/second",
        },
        headers=bearer(who.admin),
    )
    assert refused.status_code == 409
    assert refused.json()["detail"].startswith(
        f"project '{who.project}' may hold 2 GPUs and holds 2; this needs 1"
    )


async def test_approved_requests_the_runtime_cannot_run_fail_with_a_reason(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
) -> None:
    who, name = await _setup(authz, catalog, approval, admin_key)
    external = await request_endpoint(approval, admin_key, who, name, "external", gpus=0)
    local = await request_endpoint(approval, admin_key, who, name, "local", gpus=0, replicas=9)
    expected = {
        external["id"]: "an external endpoint needs its base URL",
        local["id"]: "the local runtime runs 1 to 8 replicas of an endpoint on this host",
    }
    for request_id, reason in expected.items():
        found = await endpoint_of_request(inference, who.dev, who.project, request_id)
        failed = await wait_status(inference, who.dev, who.project, found["id"], "failed")
        assert failed["reason"].startswith(reason)
