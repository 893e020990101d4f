"""The whole stack the docs talk to, as a reader's `make run` would give it: every service and
the gateway on real loopback sockets, on this module's PostgreSQL database and NATS namespace.
Inference runs local endpoints as simulator processes and Kubernetes ones on the API double."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from gateway.app import ProxyApp
from gateway.state import Gateway
from libs.common.settings import Settings
from tests.conftest import running
from tests.helpers import bearer, ok, serve
from tests.inference.conftest import (  # noqa: F401 - fixtures, shared
    inference,
    inference_app,
    inference_config,
    inference_settings,
    kube,
    limited_project,
)

# The ports the docs use (the embedded default's), by service.
DEFAULT_URLS = {
    "authz": "http://127.0.0.1:8101",
    "catalog": "http://127.0.0.1:8102",
    "approval": "http://127.0.0.1:8103",
    "inference": "http://127.0.0.1:8104",
    "metering": "http://127.0.0.1:8105",
    "gateway": "http://127.0.0.1:8000",
}


@dataclass
class Stack:
    urls: dict[str, str]  # service (and "gateway") → its live base URL
    admin_key: str  # the bootstrap platform-admin key: what `make run` prints

    @property
    def env(self) -> dict[str, str]:
        """What a reader's shell has for the CLI's embedded default: each service's URL."""
        return {
            f"STEWARD_{name.upper()}_URL": url
            for name, url in self.urls.items()
            if name != "gateway"
        }

    @property
    def default_urls(self) -> dict[str, str]:
        """Each default URL a doc writes, and where that service answers here."""
        return {DEFAULT_URLS[name]: url for name, url in self.urls.items()}


@pytest.fixture(scope="module")
async def metering_app(settings: Settings, authz_app: FastAPI) -> AsyncIterator[FastAPI]:
    from services.metering.app import create_app

    fast = settings.model_copy(update={"metering_quota_publish_seconds": 0.1})
    app = create_app(fast, transports={"authz": httpx.ASGITransport(app=authz_app)})
    async for started in running(app):
        yield started


@pytest.fixture(scope="module")
async def stack(
    authz_app: FastAPI,
    catalog_app: FastAPI,
    approval_app: FastAPI,
    inference_app: FastAPI,  # noqa: F811 - the imported fixture
    metering_app: FastAPI,
    authz: httpx.AsyncClient,
    admin_key: str,
    inference_settings: Settings,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    """Every service on its own socket, then the gateway in front of them with its own
    snapshot-only key, loaded before the first block runs."""
    key = await ok(
        await authz.post(
            "/v1/platform/keys",
            json={"name": "docs-gateway", "scopes": ["snapshots:read"]},
            headers=bearer(admin_key),
        ),
        201,
    )
    apps = {
        "authz": authz_app,
        "catalog": catalog_app,
        "approval": approval_app,
        "inference": inference_app,
        "metering": metering_app,
    }
    # The services' servers stop together, after the gateway: each takes a few of uvicorn's
    # 0.1 s ticks to stop, which one after another added a second to every module.
    served: list[contextlib.AbstractAsyncContextManager[str]] = []
    urls: dict[str, str] = {}
    try:
        for name, app in apps.items():
            server = serve(app)
            urls[name] = await server.__aenter__()
            served.append(server)
        settings = inference_settings.model_copy(
            update={
                "data_dir": tmp_path_factory.mktemp("docs-gateway"),
                **{f"{name}_url": url for name, url in urls.items()},
                "gateway_api_key": SecretStr(key["key"]),
            }
        )
        gateway = await Gateway.start(settings)
        try:
            await gateway.wait_loaded(10)
            async with serve(ProxyApp(gateway)) as proxy:
                yield Stack({**urls, "gateway": proxy}, admin_key)
        finally:
            await gateway.stop()
    finally:
        await asyncio.gather(*(s.__aexit__(None, None, None) for s in served))
