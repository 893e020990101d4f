"""Every service's OpenAPI document, fuzzed by schemathesis over real sockets: no request, however
malformed, gets a 5xx, and every status a route answers is one its document declares.

Each service runs in this module's world (its own database and NATS namespace) and is called
with the platform admin's key, so the fuzzer reaches past authentication into the routes.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from libs.common.auth import SCOPES
from libs.common.settings import Settings
from tests.conftest import running
from tests.helpers import bearer, child_log, ok, serve

CHECKS = "not_a_server_error,status_code_conformance"
# Per service: generated cases per operation; the whole module stays well under a minute.
EXAMPLES = os.environ.get("STEWARD_FUZZ_EXAMPLES", "15")


@pytest.fixture(scope="module")
async def metering_app(settings: Settings, authz_app: FastAPI) -> AsyncIterator[FastAPI]:
    from services.metering.app import create_app

    app = create_app(settings, transports={"authz": httpx.ASGITransport(app=authz_app)})
    async for started in running(app):
        yield started


@pytest.fixture(scope="module")
async def inference_app(
    settings: Settings, authz_app: FastAPI, catalog_app: FastAPI, admin_key: str
) -> AsyncIterator[FastAPI]:
    from pydantic import SecretStr

    from services.inference.app import create_app

    transports = {
        "authz": httpx.ASGITransport(app=authz_app),
        "catalog": httpx.ASGITransport(app=catalog_app),
    }
    configured = settings.model_copy(update={"inference_api_key": SecretStr(admin_key)})
    async for started in running(create_app(configured, transports=transports)):
        yield started


async def fuzz(app: FastAPI, name: str, key: str, workdir: Path) -> None:
    async with serve(app) as url:
        log = child_log(f"schemathesis-{name}")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{url}/openapi.json",
            "--checks",
            CHECKS,
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            EXAMPLES,
            "--workers",
            "1",
            "--header",
            f"Authorization: Bearer {key}",
            "--seed",
            "1",
            "--no-color",
            "--generation-database",
            "none",
            "--generation-with-security-parameters",
            "false",
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            cwd=workdir,
        )
        code = await process.wait()
    assert code == 0, f"schemathesis found failures in {name}: see the attached child log"


@pytest.fixture(scope="module")
def apps(
    authz_app: FastAPI,
    catalog_app: FastAPI,
    approval_app: FastAPI,
    metering_app: FastAPI,
    inference_app: FastAPI,
) -> dict[str, FastAPI]:
    return {
        "authz": authz_app,
        "catalog": catalog_app,
        "approval": approval_app,
        "metering": metering_app,
        "inference": inference_app,
    }


SERVICES = ["authz", "catalog", "approval", "metering", "inference"]


@pytest.fixture(scope="module")
async def keys(authz: httpx.AsyncClient, admin_key: str) -> dict[str, str]:
    """A platform key per service, minted before any fuzzing: fuzzing authz rotates and revokes
    what it finds, and must not take the other services' runs (or the admin key) down with it."""
    keys = {}
    for service in SERVICES:
        body = {"name": f"fuzz-{service}", "scopes": sorted(SCOPES)}
        response = await authz.post("/v1/platform/keys", json=body, headers=bearer(admin_key))
        keys[service] = (await ok(response, 201))["key"]
    return keys


@pytest.mark.parametrize("service", SERVICES)
async def test_no_operation_answers_a_5xx_or_an_undeclared_status(
    service: str, apps: dict[str, FastAPI], keys: dict[str, str], tmp_path: Path
) -> None:
    await fuzz(apps[service], service, keys[service], tmp_path)
