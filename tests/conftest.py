"""Test fixtures: one freshly migrated PostgreSQL database and one NATS namespace per test run.

Both are real servers (see scripts/test-services.sh); nothing here is mocked.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr

from cli.stack import SERVICES
from libs.common.migrate import upgrade_async
from libs.common.settings import Settings
from tests.helpers import NATS_URL, PG_ADMIN_DSN, SpanRecorder, delete_streams


@pytest.fixture(scope="session")
def run_id() -> str:
    return secrets.token_hex(4)


@pytest.fixture(scope="session")
async def database_url(run_id: str) -> AsyncIterator[str]:
    name = f"steward_test_{run_id}"
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    yield f"{base}/{name}"
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def metric_reader() -> InMemoryMetricReader:
    """The process-wide SDK meter provider, read in memory. It can be set only once per process,
    so every test reading OpenTelemetry metrics shares it; instruments made earlier (the API's
    proxies) record into it from now on. Readings are cumulative: filter by a unique attribute."""
    if isinstance(metrics.get_meter_provider(), MeterProvider):
        pytest.fail("an SDK MeterProvider is already installed, without this fixture's reader")
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return reader


@pytest.fixture(scope="session")
def span_recorder() -> SpanRecorder:
    """The process-wide SDK tracer provider (settable only once), with a recorder on it.

    FastAPI apps trace from the next request on; a gateway reads the provider when it starts,
    so one started before this fixture ran does not trace.
    """
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    recorder = SpanRecorder()
    provider.add_span_processor(recorder)
    return recorder


@pytest.fixture
def spans(span_recorder: SpanRecorder) -> Iterator[InMemorySpanExporter]:
    """The spans finished during this test."""
    span_recorder.exporter.clear()
    span_recorder.listening = True
    yield span_recorder.exporter
    span_recorder.listening = False
    span_recorder.exporter.clear()


def make_settings(
    database_url: str, namespace: str, data_dir: Path, **overrides: object
) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "nats_url": NATS_URL,
        "event_namespace": namespace,
        "api_key_pepper": SecretStr("test-pepper-" + namespace),
        "data_dir": data_dir,
        "key_last_used_flush_seconds": 0.2,
        "outbox_poll_seconds": 0.2,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
async def settings(
    database_url: str, run_id: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Settings]:
    namespace = f"t{run_id}"
    settings = make_settings(database_url, namespace, tmp_path_factory.mktemp("steward"))
    for service in SERVICES:
        await upgrade_async(service, settings)
    yield settings
    await delete_streams(namespace)


async def running(app: FastAPI) -> AsyncIterator[FastAPI]:
    async with app.router.lifespan_context(app):
        await app.state.ctx.bus.wait_ready(10)
        yield app


@pytest.fixture(scope="session")
async def authz_app(settings: Settings) -> AsyncIterator[FastAPI]:
    from services.authz.app import create_app

    async for app in running(create_app(settings)):
        yield app


@pytest.fixture(scope="session")
async def authz(authz_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=authz_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://authz") as client:
        yield client


@pytest.fixture(scope="session")
async def admin_key(settings: Settings) -> str:
    from services.authz.app import bootstrap

    key = await bootstrap(settings)
    assert key is not None, "bootstrap must mint a key on a fresh database"
    return key


@pytest.fixture(scope="session")
async def catalog_app(settings: Settings, authz_app: FastAPI) -> AsyncIterator[FastAPI]:
    from services.catalog.app import create_app

    transports = {"authz": httpx.ASGITransport(app=authz_app)}
    async for app in running(create_app(settings, transports=transports)):
        yield app


@pytest.fixture(scope="session")
async def catalog(catalog_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=catalog_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://catalog") as client:
        yield client


@pytest.fixture(scope="session")
async def approval_app(
    settings: Settings, authz_app: FastAPI, catalog_app: FastAPI
) -> AsyncIterator[FastAPI]:
    from services.approval.app import create_app

    transports = {
        "authz": httpx.ASGITransport(app=authz_app),
        "catalog": httpx.ASGITransport(app=catalog_app),
    }
    async for app in running(create_app(settings, transports=transports)):
        yield app


@pytest.fixture(scope="session")
async def approval(approval_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=approval_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://approval") as client:
        yield client
