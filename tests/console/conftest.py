"""Console fixtures: the real services and the real gateway on loopback sockets, serving the
console from the repository, and Debian's Chromium driven by Playwright (never a downloaded
browser: ``scripts/test-tools.sh`` installs ``chromium`` with apt).

Screenshots go to ``.steward/artifacts/console/`` for people (and CI) to look at.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from libs.common.settings import Settings
from tests.helpers import bearer, free_port, ok, serve

ROOT = Path(__file__).resolve().parents[2]
CONSOLE = ROOT / "console"
ARTIFACTS = ROOT / ".steward" / "artifacts" / "console"
CHROMIUM = os.environ.get("STEWARD_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A laptop screen.
VIEWPORT = {"width": 1366, "height": 800}


@dataclass
class Stack:
    """The gateway's proxy URL (console at /console/, APIs at /api/…) and the services'."""

    url: str
    services: dict[str, str]
    settings: Settings


@pytest.fixture(scope="module")
async def console_gateway_key(authz: httpx.AsyncClient, admin_key: str) -> str:
    created = await ok(
        await authz.post(
            "/v1/platform/keys",
            json={"name": "console-gateway", "scopes": ["snapshots:read"]},
            headers=bearer(admin_key),
        ),
        201,
    )
    return str(created["key"])


@pytest.fixture(scope="module")
async def stack(
    settings: Settings,
    authz_app: FastAPI,
    catalog_app: FastAPI,
    approval_app: FastAPI,
    console_gateway_key: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    from gateway.app import ProxyApp
    from gateway.state import Gateway

    async with contextlib.AsyncExitStack() as stack:
        urls = {
            "authz": await stack.enter_async_context(serve(authz_app)),
            "catalog": await stack.enter_async_context(serve(catalog_app)),
            "approval": await stack.enter_async_context(serve(approval_app)),
        }
        # Inference and metering do not run here (test_endpoint_journey starts its own): a
        # closed port, not their default one, where a local `steward up` may be answering.
        nowhere = f"http://127.0.0.1:{free_port()}"
        gateway_settings = settings.model_copy(
            update={
                "data_dir": tmp_path_factory.mktemp("console-gateway"),
                "authz_url": urls["authz"],
                "catalog_url": urls["catalog"],
                "approval_url": urls["approval"],
                "inference_url": nowhere,
                "metering_url": nowhere,
                "gateway_api_key": SecretStr(console_gateway_key),
                "gateway_console_dir": CONSOLE,
            }
        )
        gateway = await Gateway.start(gateway_settings)
        stack.push_async_callback(gateway.stop)
        await gateway.wait_loaded(10)
        url = await stack.enter_async_context(serve(ProxyApp(gateway)))
        yield Stack(url=url, services=urls, settings=gateway_settings)


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Any]:
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 - once per session
        reason = f"{CHROMIUM} is missing: run scripts/test-tools.sh (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    playwright_api = pytest.importorskip("playwright.async_api")
    async with playwright_api.async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
