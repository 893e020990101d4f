"""The whole stack the docs talk to, as a reader's `make run` would give it: every service and
the gateway on real loopback sockets, on this module's PostgreSQL database and NATS namespace.
Inference runs local endpoints as simulator processes and Kubernetes ones on the API double."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from libs.common.settings import Settings
from tests.conftest import running
from tests.helpers import bearer, live_gateway, ok, snapshot_key
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

    def fill(self, code: str, project: str) -> str:
        """A block as it runs here: the default URLs a doc writes where each service answers,
        and this run's project for the doc's ``fraud-detection``."""
        for name, url in self.urls.items():
            code = code.replace(DEFAULT_URLS[name], url)
        return code.replace("fraud-detection", project)

    async def get(self, http: httpx.AsyncClient, service: str, path: str, key: str = "") -> Any:
        """A service's JSON answer (200) to ``key``, by default the admin's."""
        headers = bearer(key or self.admin_key)
        return await ok(await http.get(self.urls[service] + path, headers=headers))


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
    key = await snapshot_key(authz, admin_key, "docs-gateway")
    apps = {
        "authz": authz_app,
        "catalog": catalog_app,
        "approval": approval_app,
        "inference": inference_app,
        "metering": metering_app,
    }
    data_dir = tmp_path_factory.mktemp("docs-gateway")
    async with live_gateway(apps, inference_settings, key, data_dir) as live:
        yield Stack({**live.services, "gateway": live.url}, admin_key)
