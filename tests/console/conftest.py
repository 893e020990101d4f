"""Console fixtures: the real services and the real gateway on loopback sockets, serving the
console from the repository, and Debian's Chromium driven by Playwright (never a downloaded
browser: ``scripts/test-tools.sh`` installs ``chromium`` with apt).

Screenshots go to ``.steward/artifacts/console/`` for people (and CI) to look at.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from libs.common.settings import Settings
from tests.helpers import free_port, live_gateway, snapshot_key

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
async def stack(
    settings: Settings,
    authz_app: FastAPI,
    catalog_app: FastAPI,
    approval_app: FastAPI,
    authz: httpx.AsyncClient,
    admin_key: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    key = await snapshot_key(authz, admin_key, "console-gateway")
    apps = {"authz": authz_app, "catalog": catalog_app, "approval": approval_app}
    # Inference and metering do not run here (test_endpoint_journey starts its own): a closed
    # port, not their default one, where a local `steward up` may be answering.
    nowhere = f"http://127.0.0.1:{free_port()}"
    async with live_gateway(
        apps,
        settings,
        key,
        tmp_path_factory.mktemp("console-gateway"),
        inference_url=nowhere,
        metering_url=nowhere,
        gateway_console_dir=CONSOLE,
    ) as live:
        yield Stack(url=live.url, services=live.services, settings=live.settings)


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
