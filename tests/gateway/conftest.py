"""Gateway fixtures: authz and the catalog snapshot on real sockets, the test upstream as a
process, and the gateway itself listening on free ports (proxy and admin)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI
from pydantic import SecretStr

from gateway.admin import create_admin_app
from gateway.app import ProxyApp
from gateway.state import Gateway
from libs.common.bus import Bus
from libs.common.events.catalog import ToolRef, VersionState
from libs.common.settings import Settings
from tests.gateway.support import CatalogStub, Process, eventually, python_process
from tests.helpers import bearer, new_project, ok, serve, snapshot_key, unique

# Route name → behaviour of the test upstream (see tests/gateway/upstream.py).
MODELS = [
    "echo",
    "echo-nousage",
    "echo-malformed",
    "echo-slow",
    "echo-cut",
    "echo-error",
    "echo-hang",
    "echo-linger",
    "revocable",
    "unapproved",
    "uncatalogued",
    "public-name",
    "tokenized-nousage",
    "sealed-broken",  # its upstream credential cannot be unsealed
    "unreachable",  # nothing listens at its upstream
    "echo-busy",  # its upstream answers 429
]
# A published tokenizer (see tests/fixtures/README.md), named by the catalog version of the
# route "tokenized-nousage", whose upstream reports no usage.
TOKENIZERS = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizers"
TOKENIZER = TOKENIZERS / "all-MiniLM-L6-v2.tokenizer.json"


@dataclass
class RunningGateway:
    gateway: Gateway
    url: str
    admin_url: str
    settings: Settings

    @property
    def v1(self) -> str:
        return self.url + "/v1"


@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[str]:
    process = python_process("tests.gateway.upstream")
    await process.start()
    yield f"http://127.0.0.1:{process.port}"
    await process.stop()


@pytest.fixture(scope="module")
async def mcp_upstream() -> AsyncIterator[str]:
    process = python_process("tests.gateway.mcp_server")
    await process.start()
    yield f"http://127.0.0.1:{process.port}/mcp"
    await process.stop()


@pytest.fixture(scope="module")
async def authz_url(authz_app: FastAPI) -> AsyncIterator[str]:
    async with serve(authz_app) as url:
        yield url


def version(name: str, status: str = "approved", kind: str = "model", **extra: Any) -> VersionState:
    return VersionState(
        asset_id=f"asset-{name}",
        asset_kind=kind,
        asset_name=name,
        version_id=f"v-{name}-1",
        version="1.0",
        status=status,
        **extra,
    )


@pytest.fixture(scope="module")
async def catalog_stub() -> AsyncIterator[tuple[CatalogStub, str]]:
    stub = CatalogStub()
    for name in MODELS:
        if name == "unapproved":
            stub.versions[name] = version(name, "submitted")
        elif name == "tokenized-nousage":
            stub.versions[name] = version(name, tokenizer=TOKENIZER.as_uri())
        elif name != "uncatalogued":
            stub.versions[name] = version(name)
    tools = [ToolRef(name="echo", access="read_only")]
    stub.versions["tools"] = version("tools", kind="mcp_server", tools=tools)
    stub.versions["unapproved-tools"] = version("unapproved-tools", "draft", kind="mcp_server")
    async with serve(stub.app()) as url:
        yield stub, url


@pytest.fixture(scope="module")
async def gateway_key(authz: httpx.AsyncClient, admin_key: str) -> str:
    return await snapshot_key(authz, admin_key, "gateway")


@pytest.fixture(scope="module")
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    bus = Bus(settings.nats_url, settings.event_namespace, name="gateway-tests")
    await bus.connect(wait=True)
    yield bus
    await bus.close()


def write_routes(path: Path, upstream: str, mcp: str) -> Path:
    models: list[dict[str, Any]] = []
    for name in MODELS:
        route: dict[str, Any] = {"name": name, "upstream": f"{upstream}/v1"}
        if name == "echo-hang":
            route["timeout_seconds"] = 0.5
        if name == "public-name":
            route["upstream_model"] = "echo-internal"
            route["api_key"] = "upstream-secret"
        if name == "sealed-broken":
            route["sealed_api_key"] = "gAAAAAB-sealed-with-another-key"
        if name == "unreachable":
            route["upstream"] = "http://127.0.0.1:9/v1"  # the discard port: closed here
        models.append(route)
    servers = [
        {"name": "tools", "upstream": mcp},
        {"name": "unapproved-tools", "upstream": mcp},
    ]
    path.write_text(yaml.safe_dump({"models": models, "mcp_servers": servers}))
    return path


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[RunningGateway]:
    gateway = await Gateway.start(settings)
    try:
        async with (
            serve(ProxyApp(gateway)) as url,
            serve(create_admin_app(gateway)) as admin_url,
        ):
            yield RunningGateway(gateway, url, admin_url, settings)
    finally:
        await gateway.stop()


@pytest.fixture(scope="module")
async def gateway_settings(
    settings: Settings,
    authz_url: str,
    catalog_stub: tuple[CatalogStub, str],
    gateway_key: str,
    upstream: str,
    mcp_upstream: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Settings:
    data_dir = tmp_path_factory.mktemp("gateway")
    return settings.model_copy(
        update={
            "data_dir": data_dir,
            "authz_url": authz_url,
            "catalog_url": catalog_stub[1],
            "gateway_api_key": SecretStr(gateway_key),
            "gateway_routes_file": write_routes(data_dir / "routes.yaml", upstream, mcp_upstream),
            "gateway_max_request_bytes": 64 * 1024,
            "gateway_max_tokens": 4096,
            "gateway_tokenizer_roots": [TOKENIZERS],
        }
    )


@pytest.fixture(scope="module")
async def gw(gateway_settings: Settings) -> AsyncIterator[RunningGateway]:
    async with running_gateway(gateway_settings) as running:
        await running.gateway.wait_loaded(10)
        yield running


@dataclass
class Tenant:
    project: str
    key: str
    key_id: str


async def tenant(
    authz: httpx.AsyncClient,
    admin_key: str,
    gw: RunningGateway,
    models: list[str],
    *,
    scopes: list[str] | None = None,
    role: str = "developer",
    kind: str = "model",
) -> Tenant:
    """A project entitled to ``models``, a member's key, and the gateway aware of both."""
    project = await new_project(authz, admin_key, "gw")
    subject = unique(role)
    await ok(
        await authz.put(
            f"/v1/projects/{project}/members/{subject}",
            json={"role": role},
            headers=bearer(admin_key),
        )
    )
    created = await ok(
        await authz.post(
            f"/v1/projects/{project}/keys",
            json={
                "name": unique("k"),
                "scopes": scopes or ["inference:invoke", "mcp:invoke"],
                "owner": subject,
            },
            headers=bearer(admin_key),
        ),
        201,
    )
    for model in models:
        await ok(
            await authz.put(
                f"/v1/projects/{project}/entitlements/{kind}/{model}",
                headers=bearer(admin_key),
            ),
            201,
        )
    replica = gw.gateway.auth
    await eventually(lambda: replica.key(created["id"]) is not None)
    await eventually(lambda: all(replica.entitled(project, kind, m) for m in models))
    return Tenant(project=project, key=created["key"], key_id=created["id"])


def token() -> str:
    return secrets.token_hex(4)


__all__ = ["Process", "RunningGateway", "Tenant", "tenant", "version"]
