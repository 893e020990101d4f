"""Fixtures for inference: the service on the shared PostgreSQL and NATS, its runtimes pointed
at a Kubernetes API double (real socket, real client) and at simulator processes on this host.

One inference app serves the whole session (its durable consumer and the local processes belong
to one process, as in production); tests keep apart by project and model names.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from kubernetes_asyncio import client as kube_client
from pydantic import SecretStr

from libs.common.settings import Settings
from services.inference.config import SIMULATOR_COMMAND, InferenceConfig, LocalProfile
from services.inference.simulator import SimulatorConfig
from services.inference.simulator import create_app as simulator_app
from tests.conftest import running
from tests.helpers import live_gateway, serve, snapshot_key
from tests.inference.kube_double import TOKEN, KubeDouble
from tests.inference.support import bridge

FAST = ["--ttft-ms", "5", "--itl-ms", "1"]


MCP_STDIO_SERVER = Path(__file__).with_name("mcp_stdio_server.py")


def _profile(*command: str) -> LocalProfile:
    return LocalProfile(command=list(command), startup_timeout_seconds=20.0)


def _profiles(tmp: str) -> dict[str, LocalProfile]:
    crash_once = ["--exit-after", "0.3", "--crash-once-file", tmp + "/{endpoint_id}.crashed"]
    return {
        "simulator": _profile(*SIMULATOR_COMMAND, *FAST),
        "no-usage": _profile(*SIMULATOR_COMMAND, *FAST, "--usage", "never"),
        "broken": _profile(*SIMULATOR_COMMAND, "--fail-to-load"),
        "crashy": _profile(*SIMULATOR_COMMAND, *FAST, "--exit-after", "0.3"),
        "crash-once": _profile(*SIMULATOR_COMMAND, *FAST, *crash_once),
        "missing-binary": _profile("/nonexistent/steward-model-server"),
        # The real engine, as shipped (a catalog version served by llama.cpp maps to it).
        "llama-cpp": InferenceConfig().local_profiles["llama-cpp"],
    }


@pytest.fixture(scope="module")
async def kube() -> AsyncIterator[tuple[KubeDouble, str]]:
    """The API double, whose pretend KServe starts a simulator per ready InferenceService (and
    pretend ToolHive the test's stdio MCP server per MCPServer)."""
    async with contextlib.AsyncExitStack() as pods:

        async def start_pod(obj: dict[str, Any]) -> str:
            annotations = obj["metadata"].get("annotations") or {}
            name = annotations.get("steward.dev/served-model-name") or obj["metadata"]["name"]
            config = SimulatorConfig(served_model_name=name, ttft_ms=5, itl_ms=1)
            return await pods.enter_async_context(serve(simulator_app(config)))

        async def start_mcp_pod(obj: dict[str, Any], env: dict[str, str]) -> str:
            """ToolHive's proxy in front of the image: the bridge in front of the test server."""
            command = (sys.executable, str(MCP_STDIO_SERVER))
            return await pods.enter_async_context(bridge(*command, env={**os.environ, **env}))

        double = KubeDouble(start_pod=start_pod, start_mcp_pod=start_mcp_pod)
        async with serve(double.app()) as url:
            yield double, url


@pytest.fixture(scope="module")
def limited_project(run_id: str) -> str:
    """A project name whose GPU allowance is 2 (created by the test that needs it)."""
    return f"limited-{run_id}"


@pytest.fixture(scope="module")
def inference_config(
    tmp_path_factory: pytest.TempPathFactory, limited_project: str
) -> InferenceConfig:
    return InferenceConfig(
        local_profiles=_profiles(str(tmp_path_factory.mktemp("crash"))),
        reconcile_seconds=0.2,
        health_interval_seconds=0.2,
        restart_initial_seconds=0.2,
        restart_max_seconds=1.0,
        max_restarts=2,
        stable_after_seconds=30.0,
        stop_grace_seconds=3.0,
        probe_interval_seconds=0.5,
        project_gpu_limits={limited_project: 2},
        # This host "runs" PyPI packages with the test's stdio MCP server: the runner is the
        # operator's to choose (npx, uvx, docker elsewhere), the package is the catalog's.
        mcp_runners={"pypi": [sys.executable, str(MCP_STDIO_SERVER)]},
        mcp_startup_timeout_seconds=20.0,
    )


@pytest.fixture(scope="module")
async def inference_settings(settings: Settings, admin_key: str) -> Settings:
    return settings.model_copy(
        update={
            "gpu_pool": {"nvidia-a100": 64, "tiny": 2},
            "inference_api_key": SecretStr(admin_key),
        }
    )


@pytest.fixture(scope="module")
async def inference_app(
    inference_settings: Settings,
    inference_config: InferenceConfig,
    kube: tuple[KubeDouble, str],
    authz_app: FastAPI,
    catalog_app: FastAPI,
) -> AsyncIterator[FastAPI]:
    from services.inference.app import create_app

    configuration = kube_client.Configuration(host=kube[1])
    configuration.api_key = {"BearerToken": TOKEN}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    transports = {
        "authz": httpx.ASGITransport(app=authz_app),
        "catalog": httpx.ASGITransport(app=catalog_app),
    }
    app = create_app(
        inference_settings,
        config=inference_config,
        kube_configuration=configuration,
        transports=transports,
    )
    async for started in running(app):
        yield started


@pytest.fixture(scope="module")
async def inference(inference_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=inference_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://inference") as client:
        yield client


@pytest.fixture(scope="module")
async def gateway_url(
    authz_app: FastAPI,
    catalog_app: FastAPI,
    approval_app: FastAPI,
    inference_app: FastAPI,
    authz: httpx.AsyncClient,
    admin_key: str,
    inference_settings: Settings,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[str]:
    key = await snapshot_key(authz, admin_key, "inference-test-gateway")
    apps = {
        "authz": authz_app,
        "catalog": catalog_app,
        "approval": approval_app,
        "inference": inference_app,
    }
    data_dir = tmp_path_factory.mktemp("inference-gateway")
    async with live_gateway(apps, inference_settings, key, data_dir) as live:
        yield live.url
