"""Helpers for inference tests: an approved model, an endpoint request, waiting on status, and
listening to the endpoint events on the real bus."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from libs.common.bus import Bus
from libs.common.settings import Settings
from tests.approval.support import (
    DEV_SCOPES,
    admitted,
    approve,
    catalog_yaml,
    eventually,
    file_request,
    import_yaml,
    model,
    uname,
)
from tests.common.support import Listener, outbox_relayed
from tests.helpers import bearer, child_log, free_port, issue_key, member_key, new_project, ok

ADMIN_SCOPES = ["catalog:read", "requests:write", "endpoints:manage"]


@dataclass
class Team:
    project: str
    dev: str  # developer: catalog:read, requests:write, endpoints:manage (reads endpoints)
    admin: str  # project-admin: may manage endpoints


async def team(authz: httpx.AsyncClient, admin_key: str, name: str | None = None) -> Team:
    if name is None:
        project = await new_project(authz, admin_key, "inf")
    else:
        project = name
        await ok(
            await authz.post("/v1/projects", json={"name": name}, headers=bearer(admin_key)), 201
        )
    dev = await member_key(
        authz, admin_key, project, "developer", [*DEV_SCOPES, "endpoints:manage"]
    )
    admin = await member_key(authz, admin_key, project, "project-admin", ADMIN_SCOPES)
    return Team(project, dev, admin)


async def approved_model(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
    who: Team,
    prefix: str = "model",
    **entry: Any,
) -> str:
    """A model imported and admitted to the catalog (its version 1.0.0 is approved); ``entry``
    adds to or replaces fields of its catalog entry (``artifacts``, ``serving``…)."""
    name = f"{uname(prefix)}/llm"
    await import_yaml(catalog, admin_key, catalog_yaml([{**model(name), **entry}]))
    await admitted(catalog, approval, admin_key, who.dev, who.project, "model", name)
    return name


def plan(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "gpus": 1,
        "gpu_type": "nvidia-a100",
        "replicas": 1,
        "hours": 8,
        "gpu_hour_rate": 2.5,
        "data_classification": "internal",
        "network_exposure": "project",
    }
    values.update(overrides)
    return values


async def request_endpoint(
    approval: httpx.AsyncClient,
    admin_key: str,
    who: Team,
    name: str,
    runtime: str,
    **plan_overrides: Any,
) -> dict[str, Any]:
    """The developer files an endpoint request; Pat approves it. Returns the decided request."""
    filed = await file_request(
        approval,
        who.dev,
        who.project,
        "endpoint",
        {
            "model_name": name,
            "version": "1.0.0",
            "runtime": runtime,
            "plan": plan(**plan_overrides),
        },
    )
    decided: dict[str, Any] = await approve(approval, admin_key, filed["id"])
    return decided


async def endpoints(
    inference: httpx.AsyncClient, key: str, project: str, **params: Any
) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = await ok(
        await inference.get(f"/v1/projects/{project}/endpoints", params=params, headers=bearer(key))
    )
    return listed


async def endpoint_of_request(
    inference: httpx.AsyncClient, key: str, project: str, request_id: str
) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        found = [
            e for e in await endpoints(inference, key, project) if e["request_id"] == request_id
        ]
        return found[0] if found else None

    found: dict[str, Any] = await eventually(probe, what=f"the endpoint of request {request_id}")
    return found


async def wait_status(
    inference: httpx.AsyncClient,
    key: str,
    project: str,
    endpoint_id: str,
    *statuses: str,
    within: float = 20.0,
) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        found: dict[str, Any] = await ok(
            await inference.get(
                f"/v1/projects/{project}/endpoints/{endpoint_id}", headers=bearer(key)
            )
        )
        return found if found["status"] in statuses else None

    found: dict[str, Any] = await eventually(
        probe, within=within, what=f"endpoint {endpoint_id} to be {'/'.join(statuses)}"
    )
    return found


class Heard(Listener):
    """The ``inference.endpoint.*`` events stored in the stream, in its order."""

    def __init__(self, bus: Bus) -> None:
        super().__init__(bus, "inference.endpoint.>")
        self.events: list[dict[str, Any]] = []

    def handle(self, body: bytes) -> None:
        self.events.append(json.loads(body))

    def about(self, endpoint_id: str) -> list[dict[str, Any]]:
        """Events about one endpoint, once each: a relay cut short publishes an event again,
        and past JetStream's duplicate window the stream keeps both copies."""
        seen: set[str] = set()
        out = []
        for e in self.events:
            if e["data"]["endpoint_id"] == endpoint_id and e["id"] not in seen:
                seen.add(e["id"])
                out.append(e)
        return out

    def statuses(self, endpoint_id: str) -> list[str]:
        return [e["data"]["status"] for e in self.about(endpoint_id)]


@asynccontextmanager
async def listening(settings: Settings) -> AsyncIterator[Heard]:
    """Every ``inference.endpoint.*`` event published while the block runs, in ``settings``'
    world. When the block ends, all of them have been heard: every event the inference service
    committed by then has left its outbox, and the subscription has caught up with the stream."""
    bus = Bus(settings.nats_url, settings.event_namespace, name="test-listener")
    await bus.connect()  # and the streams, if no service has made them yet
    await bus.wait_ready(10)
    heard = Heard(bus)
    try:
        await heard.start()
        yield heard
        await outbox_relayed(settings, "inference")
        await heard.caught_up()
    finally:
        await heard.stop()
        await bus.close()


@asynccontextmanager
async def bridge(*command: str, env: dict[str, str] | None = None) -> AsyncIterator[str]:
    """The stdio bridge as a real process in front of ``command``, until healthy; its URL."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.inference.mcp_bridge",
        "--port",
        str(port),
        "--",
        *command,
        stdout=child_log("mcp-bridge"),
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as http:
            for _ in range(400):
                if process.returncode is not None:
                    raise AssertionError(f"the bridge exited with {process.returncode}")
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the bridge never became healthy")
        yield base
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()


async def entitled_key(
    authz: httpx.AsyncClient, approval: httpx.AsyncClient, admin_key: str, who: Team, name: str
) -> str:
    """The project may use the model (the gateway checks the entitlement on every call), and an
    application key of it may call models."""
    access = await file_request(
        approval, who.dev, who.project, "access", {"asset_kind": "model", "asset_name": name}
    )
    await approve(approval, admin_key, access["id"])
    return str((await issue_key(authz, admin_key, who.project, ["inference:invoke"]))["key"])
