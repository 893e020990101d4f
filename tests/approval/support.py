"""Helpers for catalog/approval tests: catalog files with unique names, waiting on events, and an
approval service on a clock the test moves."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import httpx
import yaml
from fastapi import FastAPI

from libs.common.db import utcnow
from libs.common.settings import Settings
from services.approval.config import ApprovalConfig
from tests.conftest import running
from tests.helpers import bearer, ok

T = TypeVar("T")
DEV_SCOPES = ["catalog:read", "requests:write"]


async def eventually(
    probe: Callable[[], Awaitable[T | None]], *, within: float = 15.0, what: str = "condition"
) -> T:
    """Poll until ``probe`` returns something truthy (events travel through real NATS)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await probe()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


class Clock:
    """A clock that stands still until the test moves it: what approval reads as "now" when
    built with ``create_app(clock=...)``. It starts at the wall time it was made and only ever
    goes forward."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, by: timedelta) -> datetime:
        self.now += by
        return self.now


async def clocked_approval(
    settings: Settings, authz_app: FastAPI, catalog_app: FastAPI, clock: Clock
) -> AsyncIterator[FastAPI]:
    """The approval service with production SLA settings on ``clock``; its expiry loop looks
    every 0.1 s instead of every minute, so a test moving the clock waits milliseconds."""
    from services.approval.app import create_app

    app = create_app(
        settings,
        config=ApprovalConfig(expiry_poll_seconds=0.1),
        transports={
            "authz": httpx.ASGITransport(app=authz_app),
            "catalog": httpx.ASGITransport(app=catalog_app),
        },
        clock=clock,
    )
    async for started in running(app):
        yield started


def model(name: str, **extra: Any) -> dict[str, Any]:
    """A Kubeflow catalog model entry pinned by digest, with a licence."""
    entry: dict[str, Any] = {
        "name": name,
        "provider": "Acme AI Labs",
        "description": f"{name}: a model for tests",
        "license": "apache-2.0",
        "licenseLink": "https://www.apache.org/licenses/LICENSE-2.0.txt",
        "tasks": ["text-generation"],
        "artifacts": [
            {"uri": f"oci://registry.example.com/{name}:v1@sha256:{'a' * 64}"},
        ],
        "version": "1.0.0",
    }
    entry.update(extra)
    return entry


def mcp_server(name: str, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "description": "An MCP server for tests",
        "provider": "Tools Inc",
        "version": "1.0.0",
        "license": "MIT",
        "deploymentMode": "remote",
        "transports": ["http"],
        "endpoints": {"http": "https://mcp.example.com/api"},
        "tags": ["tools"],
        "tools": [
            {"name": "search", "description": "Search", "accessType": "read_only"},
            {"name": "write_note", "description": "Write", "accessType": "read_write"},
        ],
    }
    entry.update(extra)
    return entry


def catalog_yaml(models: list[dict[str, Any]], mcp: list[dict[str, Any]] | None = None) -> str:
    doc: dict[str, Any] = {"source": "tests", "models": models}
    if mcp is not None:
        doc["mcp_servers"] = mcp
    return yaml.safe_dump(doc, sort_keys=False)


def uname(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


async def import_yaml(catalog: httpx.AsyncClient, key: str, text: str) -> dict[str, Any]:
    response = await catalog.post(
        "/v1/imports/catalog",
        content=text.encode(),
        headers={**bearer(key), "content-type": "application/yaml"},
    )
    result: dict[str, Any] = await ok(response)
    return result


async def asset(
    catalog: httpx.AsyncClient, key: str, kind: str, name: str
) -> dict[str, Any] | None:
    response = await catalog.get(f"/v1/assets/{kind}/{name}", headers=bearer(key))
    if response.status_code == 404:
        return None
    found: dict[str, Any] = await ok(response)
    return found


async def version_status(
    catalog: httpx.AsyncClient, key: str, kind: str, name: str, version: str
) -> str | None:
    found = await asset(catalog, key, kind, name)
    if found is None:
        return None
    return next((v["status"] for v in found["versions"] if v["version"] == version), None)


async def wait_status(
    catalog: httpx.AsyncClient, key: str, kind: str, name: str, version: str, status: str
) -> None:
    async def probe() -> bool:
        return await version_status(catalog, key, kind, name, version) == status

    await eventually(probe, what=f"{name}@{version} to be {status}")


async def file_request(
    approval: httpx.AsyncClient,
    key: str,
    project: str,
    kind: str,
    payload: dict[str, Any],
    status: int = 201,
) -> dict[str, Any]:
    response = await approval.post(
        f"/v1/projects/{project}/requests",
        json={"kind": kind, "payload": payload},
        headers=bearer(key),
    )
    body: dict[str, Any] = await ok(response, status)
    return body


async def approve(
    approval: httpx.AsyncClient, key: str, request_id: str, comment: str = "ok"
) -> dict[str, Any]:
    body: dict[str, Any] = await ok(
        await approval.post(
            f"/v1/requests/{request_id}/approve", json={"comment": comment}, headers=bearer(key)
        )
    )
    return body


async def admitted(
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
    dev_key: str,
    project: str,
    kind: str,
    name: str,
    version: str = "1.0.0",
) -> None:
    """The developer asks for the version to be admitted, the admin approves, catalog follows."""
    request = await file_request(
        approval,
        dev_key,
        project,
        "asset",
        {"asset_kind": kind, "asset_name": name, "version": version},
    )
    await wait_status(catalog, admin_key, kind, name, version, "submitted")
    await approve(approval, admin_key, request["id"])
    await wait_status(catalog, admin_key, kind, name, version, "approved")
