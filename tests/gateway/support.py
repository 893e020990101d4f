"""Helpers for the gateway tests: real sockets, real processes, real NATS."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from nats.js.api import DeliverPolicy
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from libs.common.bus import Bus
from libs.common.events import CloudEvent, EventPayload
from libs.common.events.audit import AuditRecorded
from libs.common.events.catalog import VersionState
from libs.common.events.metering import QuotaLimits, QuotaState, Window
from libs.common.events.streams import stream_for
from libs.common.events.usage import UsageRecorded
from libs.common.quota import window_bounds
from libs.common.settings import Settings
from tests.common.support import Listener, until
from tests.helpers import child_log, free_port

ROOT = Path(__file__).resolve().parents[2]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Process:
    """A child process on a port (the test upstream, an MCP server, nats-server)."""

    def __init__(self, args: list[str], port: int) -> None:
        self.args = args
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, seconds: float = 20) -> None:
        name = self.args[2] if self.args[1:2] == ["-m"] else Path(self.args[0]).name
        with child_log(name) as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.args, cwd=ROOT, stdout=log, stderr=log
            )
        deadline = time.monotonic() + seconds
        while not port_open(self.port):
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.args} exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.args} did not listen on {self.port}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.proc = None


def python_process(module: str, *args: str) -> Process:
    port = free_port()
    return Process([sys.executable, "-m", module, str(port), *args], port)


class CatalogStub:
    """A stand-in for the catalog's ``GET /v1/snapshot`` (the catalog service is built
    separately); versions change through real NATS events, as from the real catalog."""

    def __init__(self) -> None:
        self.versions: dict[str, VersionState] = {}
        self.requests = 0
        self.authorizations: list[str | None] = []

    def app(self) -> Starlette:
        async def snapshot(request: Request) -> Response:
            self.requests += 1
            self.authorizations.append(request.headers.get("authorization"))
            return JSONResponse(
                {
                    "generated_at": datetime.now(UTC).isoformat(),
                    "versions": [v.model_dump(mode="json") for v in self.versions.values()],
                }
            )

        return Starlette(routes=[Route("/v1/snapshot", snapshot)])


async def publish(bus: Bus, payload: EventPayload, source: str = "catalog") -> CloudEvent:
    event = CloudEvent.wrap(payload, source=source)
    await bus.publish(payload.subject, event.model_dump_json().encode(), event.id)
    return event


async def eventually(check: Callable[[], Any], within: float = 5.0, every: float = 0.01) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(every)


async def upstream_json(url: str, path: str) -> Any:
    async with httpx.AsyncClient(base_url=url) as client:
        response = await client.get(path)
        response.raise_for_status()
        return response.json()


class _Reader(Listener):
    """The events of one subject whose data hold ``fields``, from the start of their stream."""

    def __init__(self, bus: Bus, subject: str, stream: str, fields: dict[str, str]) -> None:
        super().__init__(bus, subject, stream, DeliverPolicy.ALL)
        self.fields = fields
        self.found: list[dict[str, Any]] = []

    def handle(self, body: bytes) -> None:
        try:
            event = CloudEvent.model_validate_json(body)
        except ValidationError:
            return  # metering's tests publish unreadable events on purpose
        if all(event.data.get(k) == v for k, v in self.fields.items()):
            self.found.append(event.model_dump(mode="json"))


async def usage_events(
    nats_url: str, namespace: str, project: str, count: int, *, within: float = 5.0
) -> list[dict[str, Any]]:
    """The usage events of ``project`` on the USAGE stream: exactly ``count`` of them.

    Reads until ``count`` arrived and every usage event the stream holds by then has been read,
    so that an extra one (a double count) published with them is seen too.
    """
    fields = {"project": project}
    return await _events(nats_url, namespace, UsageRecorded.subject, fields, count, within)


async def audit_events(
    nats_url: str, namespace: str, project: str, service: str, count: int, within: float = 5.0
) -> list[dict[str, Any]]:
    """The audit events a service recorded about ``project``: exactly ``count`` of them (as
    ``usage_events``)."""
    fields = {"project": project, "service": service}
    return await _events(nats_url, namespace, AuditRecorded.subject, fields, count, within)


async def _events(
    nats_url: str,
    namespace: str,
    subject: str,
    fields: dict[str, str],
    count: int,
    within: float,
) -> list[dict[str, Any]]:
    bus = Bus(nats_url, namespace, name="test-event-reader")
    await bus.connect()
    await bus.wait_ready(10)
    reader = _Reader(bus, subject, stream_for(subject), fields)
    try:
        await reader.start()

        async def all_read() -> bool:
            return len(reader.found) >= count and await reader.heard_all()

        with contextlib.suppress(AssertionError):  # the count below says what is wrong
            await until(all_read, within, f"{subject} events")
    finally:
        await reader.stop()
        await bus.close()
    found = reader.found
    assert len(found) == count, f"expected {count} {subject} events, got {len(found)}: {found}"
    return found


def quota(
    project: str, total: int, now: datetime, used: int = 0, window: Window = "hour"
) -> QuotaState:
    """A total-token quota of ``project`` as metering announces it, ``used`` spent already."""
    start, end = window_bounds(window, now)
    return QuotaState(
        quota_id=f"quota-{project}-{window}-{total}",
        project=project,
        window=window,
        limits=QuotaLimits(total_tokens=total),
        soft_threshold=0.8,
        revision=1,
        window_start=start,
        window_end=end,
        input_used=used,
        as_of=now,
    )


@contextlib.asynccontextmanager
async def gateway_process(
    settings: Settings, data_dir: Path, *, workers: int = 1
) -> AsyncIterator[tuple[int, int, asyncio.subprocess.Process]]:
    """``python -m gateway`` on ``data_dir`` (``workers`` of them under a supervisor); yields
    its proxy port, its (first) admin port and the process; SIGTERM at exit unless the test
    killed it."""
    proxy, admin = free_port(), free_port()
    assert settings.gateway_api_key is not None and settings.api_key_pepper is not None
    assert settings.gateway_routes_file is not None
    env = {
        **os.environ,
        "STEWARD_DATA_DIR": str(data_dir),
        "STEWARD_NATS_URL": settings.nats_url,
        "STEWARD_EVENT_NAMESPACE": settings.event_namespace,
        "STEWARD_API_KEY_PEPPER": settings.api_key_pepper.get_secret_value(),
        "STEWARD_AUTHZ_URL": settings.authz_url,
        "STEWARD_CATALOG_URL": settings.catalog_url,
        "STEWARD_INFERENCE_URL": settings.inference_url,
        "STEWARD_METERING_URL": settings.metering_url,
        "STEWARD_APPROVAL_URL": settings.approval_url,
        "STEWARD_GATEWAY_API_KEY": settings.gateway_api_key.get_secret_value(),
        "STEWARD_GATEWAY_ROUTES_FILE": str(settings.gateway_routes_file),
        "STEWARD_GATEWAY_PROXY_PORT": str(proxy),
        "STEWARD_GATEWAY_ADMIN_PORT": str(admin),
        "STEWARD_GATEWAY_WORKERS": str(workers),
        "STEWARD_UPSTREAM_ALLOWED_NETWORKS": '["127.0.0.0/8"]',
    }
    with child_log("gateway") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", cwd=ROOT, env=env, stdout=log, stderr=log
        )
    try:
        admins = range(admin, admin + workers)
        await eventually(
            lambda: port_open(proxy) and all(port_open(a) for a in admins), within=30, every=0.1
        )
        yield proxy, admin, process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 30)
