"""Each service as it really runs: ``python -m services.<name>`` in its own process.

The in-process tests build apps through ``create_app``; this one starts the entry points that
``steward up``, compose and Helm start, on a database and NATS namespace of their own, and calls
an authenticated route of each through authz.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from cli.stack import SERVICES
from libs.common.migrate import upgrade_async
from services.authz.app import bootstrap
from tests.conftest import make_settings
from tests.helpers import PG_ADMIN_DSN, bearer, child_log, delete_streams, free_port

# One authenticated read per service, answered 200 for a platform admin.
ROUTES = {
    "authz": "/v1/projects",
    "catalog": "/v1/catalog?status=approved",
    "approval": "/v1/requests",
    "inference": "/v1/gpu-pool",
    "metering": "/v1/usage",
}


@pytest.fixture(scope="module")
async def stack(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[dict[str, str], str]]:
    name = f"{database_url.rsplit('/', 1)[1]}_procs"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{database_url.rsplit('/', 1)[0]}/{name}"
    namespace = f"p{secrets.token_hex(3)}"
    data_dir = tmp_path_factory.mktemp("procs")
    settings = make_settings(url, namespace, data_dir)
    for service in SERVICES:
        await upgrade_async(service, settings)
    key = await bootstrap(settings)
    assert key is not None
    urls = {service: f"http://127.0.0.1:{free_port()}" for service in SERVICES}
    env = {
        **os.environ,
        "STEWARD_DATABASE_URL": url,
        "STEWARD_NATS_URL": settings.nats_url,
        "STEWARD_EVENT_NAMESPACE": namespace,
        "STEWARD_API_KEY_PEPPER": settings.pepper.decode(),
        "STEWARD_DATA_DIR": str(data_dir),
        **{f"STEWARD_{s.upper()}_URL": u for s, u in urls.items()},
    }
    processes = []
    try:
        for service in SERVICES:
            port = urls[service].rsplit(":", 1)[1]
            with child_log(f"services.{service}") as log:
                processes.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        f"services.{service}",
                        env={**env, "STEWARD_PORT": port},
                        cwd=Path(__file__).parents[2],
                        stdout=log,
                        stderr=log,
                    )
                )
        async with httpx.AsyncClient(timeout=2) as client:
            for service, base in urls.items():
                for _ in range(200):
                    try:
                        if (await client.get(f"{base}/readyz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.1)
                else:
                    pytest.fail(f"{service} did not become ready")
        yield urls, key
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            await asyncio.wait_for(process.wait(), 20)
        await delete_streams(namespace)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.mark.parametrize("service", SERVICES)
async def test_each_service_process_serves_an_authenticated_read(
    stack: tuple[dict[str, str], str], service: str
) -> None:
    urls, key = stack
    async with httpx.AsyncClient(base_url=urls[service], timeout=10) as client:
        response = await client.get(ROUTES[service], headers=bearer(key))
        assert response.status_code == 200, response.text
        refused = await client.get(ROUTES[service])
        assert refused.status_code == 401
