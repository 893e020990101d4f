"""The ``local`` runtime: an OpenAI-compatible server process on this host, supervised; or, for
an MCP server, its stdio package behind the bridge (services/inference/mcp_bridge.py), served at
``/mcp``, with its environment opened from the endpoint's sealed one.

Each replica of an endpoint is one process (``ReplicaSet``), started from a runtime profile's
command on its own port, health-checked, restarted with exponential backoff when it dies, and
stopped cleanly (SIGTERM to its process group, then SIGKILL). The endpoint is ready while any
replica is, at each ready replica's URL: the gateway balances them and fails over. Output goes
to ``<data_dir>/inference/logs/<endpoint id>[-r<n>].log``.

The child's environment is this process's minus every ``STEWARD_*`` variable: a model server
has no business with Steward's secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import httpx

from libs.common.artifacts import LOCAL_SCHEMES, NotLocal, local_path
from libs.common.db import utcnow
from libs.common.mcp_packages import PackageProblem, StdioPackage
from services.inference.config import InferenceConfig, LocalProfile
from services.inference.runtimes.base import (
    EndpointSpec,
    RuntimeFailure,
    RuntimeStatus,
    clip,
    dies_with_parent,
    environment_of,
)

log = logging.getLogger("steward.inference.local")


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEWARD_")}
    env.update(extra)
    return env


def _model_arg(spec: EndpointSpec) -> str:
    """What a server takes as the model: a local file's path (``file://``, ``pkg://``: a GGUF
    for llama.cpp), else the source without its ``hf://`` scheme (vLLM)."""
    uri = spec.source_uri
    if not uri:
        return spec.asset_name
    if uri.startswith(tuple(f"{s}://" for s in LOCAL_SCHEMES)):
        try:
            path = local_path(uri)
        except NotLocal as exc:
            raise RuntimeFailure(f"the model's artifact is not on this host: {exc}") from None
        if not path.is_file():
            raise RuntimeFailure(f"the model's artifact {uri} is not a file on this host")
        return str(path)
    return uri.removeprefix("hf://")


class Supervised:
    """One endpoint's server process and everything needed to start it again."""

    def __init__(
        self,
        spec: EndpointSpec,
        profile: LocalProfile,
        config: InferenceConfig,
        log_path: Path,
        http: httpx.AsyncClient,
    ) -> None:
        self.spec = spec
        self.profile = profile
        self.config = config
        self.log_path = log_path
        self.http = http
        self.host = config.local_host
        self.port = free_port(self.host)
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def upstream_url(self) -> str:
        return (
            f"{self.base_url}/mcp"
            if self.spec.asset_kind == "mcp_server"
            else f"{self.base_url}/v1"
        )

    def command(self) -> list[str]:
        if self.spec.asset_kind == "mcp_server":
            return self._bridge_command()
        values = {
            "python": sys.executable,
            "host": self.host,
            "port": str(self.port),
            "served_model_name": self.spec.served_model_name,
            "model": _model_arg(self.spec),
            "data_dir": str(self.log_path.parent.parent),
            "endpoint_id": self.spec.endpoint_id,
        }
        try:
            return [part.format(**values) for part in self.profile.command]
        except (KeyError, IndexError, ValueError) as exc:
            raise RuntimeFailure(f"the profile's command has a bad placeholder: {exc}") from exc

    def _bridge_command(self) -> list[str]:
        if self.spec.package is None:
            raise RuntimeFailure("the MCP server endpoint has no package to run")
        package = StdioPackage.from_dict(self.spec.package)
        try:
            serves = package.command(self.config.mcp_runners, sorted(self.profile.env))
        except PackageProblem as problem:
            raise RuntimeFailure(str(problem)) from None
        bridge = [sys.executable, "-m", "services.inference.mcp_bridge"]
        return [*bridge, "--host", self.host, "--port", str(self.port), "--", *serves]

    async def start(self) -> None:
        command = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with self.log_path.open("ab") as out:
            out.write(
                f"=== steward: start {self.starts} at {utcnow().isoformat()}: "
                f"{' '.join(command)}\n".encode()
            )
            out.flush()
            try:
                self.process = await asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env=_child_env(self.profile.env),
                    start_new_session=True,
                    preexec_fn=dies_with_parent(),
                )
            except OSError as exc:
                raise RuntimeFailure(f"cannot start {command[0]!r}: {exc}") from exc
        log.info(
            "local server started",
            extra={"endpoint_id": self.spec.endpoint_id, "pid": self.process.pid},
        )

    async def healthy(self) -> bool:
        try:
            response = await self.http.get(self.base_url + self.profile.health_path, timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def _exited(self) -> int | None:
        return None if self.process is None else self.process.returncode

    async def _wait_exit(self, seconds: float) -> int | None:
        assert self.process is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self.process.wait()), seconds)
        except TimeoutError:
            return None

    async def until_healthy(self) -> str | None:
        """None once healthy, else why it never got there (it exited, or took too long)."""
        deadline = time.monotonic() + self.profile.startup_timeout_seconds
        delay = 0.05
        while time.monotonic() < deadline:
            code = await self._wait_exit(delay)
            if code is not None:
                return f"exited with code {code} before it was healthy"
            if await self.healthy():
                return None
            delay = min(delay * 1.5, 1.0)
        await self.kill()
        return f"was not healthy after {self.profile.startup_timeout_seconds:.0f}s"

    async def monitor(self) -> str:
        """Return (why) when the healthy server dies or stops answering its health check."""
        misses = 0
        while True:
            code = await self._wait_exit(self.config.health_interval_seconds)
            if code is not None:
                return f"exited with code {code}"
            if await self.healthy():
                misses = 0
                continue
            misses += 1
            if misses >= 3:
                await self.kill()
                return "stopped answering its health check"

    def log_tail(self, lines: int = 5) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                tail = f.read().decode("utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(line for line in tail[-lines:] if line.strip())

    async def supervise(self) -> AsyncIterator[RuntimeStatus]:
        restarts = 0
        delay = self.config.restart_initial_seconds
        while True:
            if self.process is None or self._exited() is not None:
                await self.start()
            problem = await self.until_healthy()
            if problem is None:
                yield RuntimeStatus("ready", url=self.upstream_url)
                healthy_since = time.monotonic()
                problem = await self.monitor()
                if time.monotonic() - healthy_since >= self.config.stable_after_seconds:
                    restarts, delay = 0, self.config.restart_initial_seconds
            restarts += 1
            if restarts > self.config.max_restarts:
                yield RuntimeStatus(
                    "failed",
                    reason=clip(
                        f"the server {problem}; gave up after {self.config.max_restarts} "
                        f"restarts (log {self.log_path}: {self.log_tail()})"
                    ),
                )
                return
            yield RuntimeStatus(
                "pending",
                reason=f"the server {problem}; restart {restarts} of "
                f"{self.config.max_restarts} in {delay:g}s",
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.restart_max_seconds)

    async def kill(self) -> None:
        """SIGTERM to the process group, SIGKILL after the grace period."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.config.stop_grace_seconds)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        # Children that outlived the leader (a server's workers) go with the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


class ReplicaSet:
    """An endpoint's replicas on this host: one supervised server process each, their states
    merged into the endpoint's. Ready while any replica is, at every ready replica's URL (the
    gateway balances them); failed once every replica has failed for good."""

    def __init__(self, runtime: LocalRuntime, spec: EndpointSpec, profile: LocalProfile) -> None:
        self.runtime = runtime
        self.spec = spec
        self.profile = profile
        self.replicas: list[Supervised] = []
        self.states: dict[int, RuntimeStatus] = {}  # by id(replica)
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.changed = asyncio.Event()
        self.watching = False
        self._made = 0

    def add(self) -> Supervised:
        server = Supervised(
            self.spec,
            self.profile,
            self.runtime.config,
            self.runtime.log_path(self.spec.endpoint_id, self._made),
            self.runtime.http,
        )
        server.command()  # a bad placeholder fails now, not in the supervisor
        self._made += 1
        self.replicas.append(server)
        if self.watching:
            self._start(server)
        return server

    def _start(self, server: Supervised) -> None:
        self.tasks[id(server)] = asyncio.create_task(self._supervise(server))

    async def _supervise(self, server: Supervised) -> None:
        try:
            async for status in server.supervise():
                self.states[id(server)] = status
                self.changed.set()
        except RuntimeFailure as failure:  # it cannot start at all: retrying will not help
            self.states[id(server)] = RuntimeStatus("failed", reason=failure.reason)
            self.changed.set()
        finally:
            # Cancelled (scaled down, deleted, stopped, shutting down) or failed: it goes too.
            await asyncio.shield(server.kill())

    def status(self) -> RuntimeStatus:
        states = [
            self.states.get(id(r), RuntimeStatus("pending", reason="starting"))
            for r in self.replicas
        ]
        urls = tuple(
            r.upstream_url
            for r, st in zip(self.replicas, states, strict=True)
            if st.state == "ready"
        )
        if urls:
            return RuntimeStatus("ready", url=urls[0], urls=urls)
        failed = [st for st in states if st.state == "failed"]
        if states and len(failed) == len(states):
            return RuntimeStatus("failed", reason=failed[0].reason)
        waiting = next((st for st in states if st.state == "pending"), None)
        return RuntimeStatus("pending", reason=waiting.reason if waiting else "no replica")

    async def watch(self) -> AsyncGenerator[RuntimeStatus, None]:
        self.watching = True
        for server in self.replicas:
            if id(server) not in self.tasks:
                self._start(server)
        last: RuntimeStatus | None = None
        try:
            while True:
                self.changed.clear()
                status = self.status()
                if status != last:
                    last = status
                    yield status
                if status.state == "failed":
                    return
                await self.changed.wait()
        finally:
            self.watching = False
            await self.stop(self.replicas)

    async def scale(self, replicas: int) -> None:
        """Start or stop replicas. One going away leaves the routes first, then gets the drain
        time before SIGTERM (its server finishes what it is answering within the grace)."""
        while len(self.replicas) < replicas:
            self.add()
        leaving = self.replicas[replicas:]
        if not leaving:
            return
        del self.replicas[replicas:]
        self.changed.set()  # the merged state loses their URLs: the gateway stops sending
        await asyncio.sleep(self.runtime.config.scale_down_drain_seconds)
        await self.stop(leaving)

    async def stop(self, servers: list[Supervised]) -> None:
        tasks = [self.tasks.pop(id(s)) for s in servers if id(s) in self.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(s.kill() for s in servers), return_exceptions=True)
        for server in servers:
            self.states.pop(id(server), None)


class LocalRuntime:
    name = "local"

    def __init__(
        self, config: InferenceConfig, data_dir: Path, credential_key: bytes | None = None
    ) -> None:
        self.config = config
        # Opens an MCP server endpoint's sealed environment (the upstream credential key).
        self.credential_key = credential_key
        self.logs = data_dir / "inference" / "logs"
        self.http = httpx.AsyncClient(trust_env=False)
        self.sets: dict[str, ReplicaSet] = {}

    def log_path(self, endpoint_id: str, replica: int = 0) -> Path:
        suffix = f"-r{replica}" if replica else ""
        return self.logs / f"{endpoint_id}{suffix}.log"

    def _profile(self, spec: EndpointSpec) -> LocalProfile:
        if spec.asset_kind == "mcp_server":
            return LocalProfile(
                command=["(the MCP bridge)"],
                env=environment_of(spec, self.credential_key),
                health_path="/health",
                startup_timeout_seconds=self.config.mcp_startup_timeout_seconds,
            )
        name = spec.profile or self.config.local_default_profile
        profile = self.config.local_profiles.get(name)
        if profile is None:
            known = sorted(self.config.local_profiles)
            raise RuntimeFailure(f"no local runtime profile {name!r}; configured: {known}")
        return profile

    async def provision(self, spec: EndpointSpec) -> None:
        check_replicas(spec.replicas, self.config)
        if spec.endpoint_id in self.sets:
            return
        replicas = ReplicaSet(self, spec, self._profile(spec))
        for _ in range(spec.replicas):
            replicas.add()
        self.sets[spec.endpoint_id] = replicas

    async def watch(self, spec: EndpointSpec) -> AsyncGenerator[RuntimeStatus, None]:
        replicas = self.sets.get(spec.endpoint_id)
        if replicas is None:
            raise RuntimeFailure("the endpoint was not provisioned on this host")
        async with contextlib.aclosing(replicas.watch()) as statuses:
            async for status in statuses:
                yield status

    async def status(self, spec: EndpointSpec) -> RuntimeStatus:
        replicas = self.sets.get(spec.endpoint_id)
        running = [
            r
            for r in (replicas.replicas if replicas else [])
            if r.process is not None and r.process.returncode is None
        ]
        healthy = [r.upstream_url for r in running if await r.healthy()]
        if healthy:
            return RuntimeStatus("ready", url=healthy[0], urls=tuple(healthy))
        return RuntimeStatus("pending", reason="not running" if not running else "not healthy")

    def replicas(self, endpoint_id: str) -> list[Supervised]:
        """The endpoint's replica servers on this host (none if it runs elsewhere)."""
        found = self.sets.get(endpoint_id)
        return list(found.replicas) if found else []

    async def scale(self, spec: EndpointSpec, replicas: int) -> None:
        check_replicas(replicas, self.config)
        found = self.sets.get(spec.endpoint_id)
        if found is not None:
            await found.scale(replicas)

    async def delete(self, spec: EndpointSpec) -> None:
        found = self.sets.pop(spec.endpoint_id, None)
        if found is not None:
            await found.stop(found.replicas)

    async def aclose(self) -> None:
        sets, self.sets = list(self.sets.values()), {}
        await asyncio.gather(*(r.stop(r.replicas) for r in sets), return_exceptions=True)
        await self.http.aclose()


def check_replicas(replicas: int, config: InferenceConfig) -> None:
    if not 1 <= replicas <= config.local_max_replicas:
        raise RuntimeFailure(
            f"the local runtime runs 1 to {config.local_max_replicas} replicas of an endpoint "
            "on this host (STEWARD_INFERENCE_LOCAL_MAX_REPLICAS)"
        )
