"""Test fixtures: each test module lives in a world of its own — a freshly migrated PostgreSQL
database (a copy of a template migrated once per run), a NATS namespace, its own service apps —
so no module sees another's state, whatever the order.

Both servers are real (see scripts/test-services.sh); nothing here is mocked.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
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
from tests.helpers import CHILD_LOGS, NATS_URL, PG_ADMIN_DSN, SpanRecorder, delete_streams

# Tests that may skip under CI=true, each with the reason. Any other skip fails a CI run: a
# missing tool must be installed by the CI script, not quietly turn tests off.
SKIPS_ALLOWED_IN_CI: dict[str, str] = {}

_LOG_OFFSETS = pytest.StashKey[dict[Path, int]]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    item.stash[_LOG_OFFSETS] = {p: p.stat().st_size for p in CHILD_LOGS if p.exists()}
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and os.environ.get("CI") and not hasattr(report, "wasxfail"):
        allowed = any(item.nodeid.startswith(node) for node in SKIPS_ALLOWED_IN_CI)
        if not allowed:
            report.outcome = "failed"
            report.longrepr = (
                f"skipped under CI=true ({report.longrepr}); install what it needs in the CI "
                "script or list it in SKIPS_ALLOWED_IN_CI (tests/conftest.py) with a reason"
            )
    if report.failed:
        for title, text in _child_output(item.stash.get(_LOG_OFFSETS, {})):
            report.sections.append((title, text))


def _child_output(offsets: dict[Path, int], limit: int = 4000) -> Iterator[tuple[str, str]]:
    """What each child process wrote since the test began (its last ``limit`` characters)."""
    for path in CHILD_LOGS:
        if not path.exists():
            continue
        with path.open("rb") as log:
            log.seek(offsets.get(path, 0))
            text = log.read().decode(errors="replace")
        if text.strip():
            yield f"child process {path.stem}", text[-limit:]


@pytest.fixture(scope="session")
def run_id() -> str:
    return secrets.token_hex(4)


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _asyncpg_url(name: str) -> str:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return f"{base}/{name}"


@pytest.fixture(scope="session")
async def template_database(
    run_id: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """Every service's migrations, run once per test run into a template database; each test
    module then gets its own copy in milliseconds (CREATE DATABASE … TEMPLATE)."""
    name = f"steward_tmpl_{run_id}"
    await _admin(f'CREATE DATABASE "{name}"')
    try:
        migrating = make_settings(_asyncpg_url(name), "unused", tmp_path_factory.mktemp("tmpl"))
        for service in SERVICES:
            await upgrade_async(service, migrating)
        yield name
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_WORLDS = itertools.count(1)


@pytest.fixture(scope="module")
def world_id(run_id: str) -> str:
    """Names this module's world: its database and its NATS namespace."""
    return f"{run_id}_{next(_WORLDS)}"


@pytest.fixture(scope="module")
async def database_url(template_database: str, world_id: str) -> AsyncIterator[str]:
    """A freshly migrated PostgreSQL database of this test module's own."""
    name = f"steward_test_{world_id}"
    await _admin(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    yield _asyncpg_url(name)
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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


@pytest.fixture(scope="session")
def nowhere() -> Iterator[str]:
    """A loopback URL on which nothing ever answers: a bound socket that never listens, held for
    the whole run so no other server can take its port. Every service URL a test does not set
    points here, never at a default port where a developer's own ``steward up`` may answer."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


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


@pytest.fixture(scope="module")
async def settings(
    database_url: str, world_id: str, nowhere: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Settings]:
    """This module's world: its own database and NATS namespace, and no service URL that
    reaches outside it."""
    namespace = f"t{world_id}"
    services = {f"{service}_url": nowhere for service in SERVICES}
    settings = make_settings(
        database_url, namespace, tmp_path_factory.mktemp("steward"), **services
    )
    yield settings
    await delete_streams(namespace)


async def running(app: FastAPI) -> AsyncIterator[FastAPI]:
    async with app.router.lifespan_context(app):
        await app.state.ctx.bus.wait_ready(10)
        yield app


@pytest.fixture(scope="module")
async def authz_app(settings: Settings) -> AsyncIterator[FastAPI]:
    from services.authz.app import create_app

    async for app in running(create_app(settings)):
        yield app


@pytest.fixture(scope="module")
async def authz(authz_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=authz_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://authz") as client:
        yield client


@pytest.fixture(scope="module")
async def admin_key(settings: Settings) -> str:
    from services.authz.app import bootstrap

    key = await bootstrap(settings)
    assert key is not None, "bootstrap must mint a key on a fresh database"
    return key


@pytest.fixture(scope="module")
async def catalog_app(settings: Settings, authz_app: FastAPI) -> AsyncIterator[FastAPI]:
    from services.catalog.app import create_app

    transports = {"authz": httpx.ASGITransport(app=authz_app)}
    async for app in running(create_app(settings, transports=transports)):
        yield app


@pytest.fixture(scope="module")
async def catalog(catalog_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=catalog_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://catalog") as client:
        yield client


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
async def approval(approval_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=approval_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://approval") as client:
        yield client
