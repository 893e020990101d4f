"""Helpers shared by the tests: connection settings and short API calls."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import nats
import uvicorn
from nats.js.errors import NotFoundError
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

PG_ADMIN_DSN = os.environ.get(
    "STEWARD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
NATS_URL = os.environ.get("STEWARD_TEST_NATS_URL", "nats://127.0.0.1:4222")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


async def delete_streams(namespace: str) -> None:
    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        for name in ("EVENTS", "USAGE", "KV_" + f"{namespace}_AUDIT_CHECKPOINTS"):
            stream = name if name.startswith("KV_") else f"{namespace}_{name}"
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(stream.upper().replace("-", "_"))
    finally:
        await nc.close()


async def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    return response.json() if response.content else None


async def new_project(client: httpx.AsyncClient, admin_key: str, prefix: str = "p") -> str:
    name = unique(prefix)
    await ok(await client.post("/v1/projects", json={"name": name}, headers=bearer(admin_key)), 201)
    return name


async def add_member(
    client: httpx.AsyncClient, admin_key: str, project: str, subject: str, role: str
) -> None:
    await ok(
        await client.put(
            f"/v1/projects/{project}/members/{subject}",
            json={"role": role},
            headers=bearer(admin_key),
        )
    )


async def issue_key(
    client: httpx.AsyncClient,
    creator_key: str,
    project: str,
    scopes: list[str],
    *,
    owner: str | None = None,
    role: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"name": unique("key"), "scopes": scopes, **extra}
    if owner:
        body["owner"] = owner
    if role:
        body["role"] = role
    created: dict[str, Any] = await ok(
        await client.post(f"/v1/projects/{project}/keys", json=body, headers=bearer(creator_key)),
        201,
    )
    return created


async def member_key(
    client: httpx.AsyncClient,
    admin_key: str,
    project: str,
    role: str,
    scopes: list[str],
    subject: str | None = None,
) -> str:
    """A member with ``role`` in ``project`` and a key of theirs carrying ``scopes``."""
    subject = subject or unique(role)
    await add_member(client, admin_key, project, subject, role)
    created = await issue_key(client, admin_key, project, scopes, owner=subject)
    return str(created["key"])


class SpanRecorder(SpanProcessor):
    """Keeps finished spans only while a test listens: the process's tracer provider (which can
    be set only once) outlives the test, and every later request would otherwise pile up here."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.listening = False

    def on_end(self, span: ReadableSpan) -> None:
        if self.listening:
            self.exporter.export([span])


CHILD_LOGS: list[Path] = []
_LOG_DIR = Path(tempfile.mkdtemp(prefix="steward-test-logs-"))


def child_log(name: str) -> BinaryIO:
    """A file to take a child process's stdout and stderr. What a child writes while a test
    runs is attached to that test's failure report (tests/conftest.py), so a crashed child says
    why, not only that it "did not become ready"."""
    path = _LOG_DIR / f"{len(CHILD_LOGS):03d}-{name.replace('/', '_')}.log"
    CHILD_LOGS.append(path)
    return path.open("ab")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def serve(app: Any, port: int | None = None) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a real loopback socket; yields its base URL."""
    port = port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


class NatsProcess:
    """A private nats-server (from the wheel) that a test can stop and start again."""

    def __init__(self, store: Path) -> None:
        self.port = free_port()
        self.store = store
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        binary = str(Path(sys.executable).parent / "nats-server")
        with child_log("nats-server") as log:
            self.process = await asyncio.create_subprocess_exec(
                *(binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)),
                stdout=log,
                stderr=log,
            )
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError("nats-server did not start")

    async def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            await asyncio.wait_for(self.process.wait(), 10)
            self.process = None


def alive(pid: int) -> bool:
    """The process runs (not a zombie waiting for its reaper)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                # pid (comm) state ppid …: comm may hold spaces, so split after the last ')'.
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid and alive(int(entry.name)):
                    found.append(int(entry.name))
    return found


async def snapshot_key(authz: httpx.AsyncClient, admin_key: str, name: str) -> str:
    """A platform key holding ``snapshots:read`` alone: what a gateway loads its replicas with."""
    created = await ok(
        await authz.post(
            "/v1/platform/keys",
            json={"name": name, "scopes": ["snapshots:read"]},
            headers=bearer(admin_key),
        ),
        201,
    )
    return str(created["key"])


@dataclass
class LiveGateway:
    services: dict[str, str]  # service → its base URL
    url: str  # the gateway's proxy
    settings: Any  # the gateway's Settings


@contextlib.asynccontextmanager
async def live_gateway(
    apps: dict[str, Any], settings: Any, key: str, data_dir: Path, **overrides: Any
) -> AsyncIterator[LiveGateway]:
    """Each service app on a loopback socket of its own, then a real gateway in front of them
    (its replicas loaded, ``key`` its snapshot key). ``overrides`` are further gateway
    settings. The servers stop together at the end (one after another, uvicorn's stop ticks
    add up)."""
    from pydantic import SecretStr

    from gateway.app import ProxyApp
    from gateway.state import Gateway

    served: list[contextlib.AbstractAsyncContextManager[str]] = []
    urls: dict[str, str] = {}
    try:
        for name, app in apps.items():
            server = serve(app)
            urls[name] = await server.__aenter__()
            served.append(server)
        gateway_settings = settings.model_copy(
            update={
                "data_dir": data_dir,
                **{f"{name}_url": url for name, url in urls.items()},
                "gateway_api_key": SecretStr(key),
                **overrides,
            }
        )
        gateway = await Gateway.start(gateway_settings)
        try:
            await gateway.wait_loaded(10)
            async with serve(ProxyApp(gateway)) as proxy:
                yield LiveGateway(urls, proxy, gateway_settings)
        finally:
            await gateway.stop()
    finally:
        await asyncio.gather(*(s.__aexit__(None, None, None) for s in served))
