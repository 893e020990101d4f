"""Steward scaled out on one host, the way a platform team outgrowing one machine runs it.

A 3-node NATS cluster (JetStream, every write synced to disk), every service twice on one
PostgreSQL database, two gateways, and a round-robin TCP balancer in front of each set: the part
a Kubernetes Service plays. Streams and buckets are R3 (``STEWARD_NATS_REPLICAS``). Any process
can be killed with SIGKILL and started again as an orchestrator would: same port, same data
directory (a pod's ``emptyDir`` outlives its container's restarts).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import httpx

from cli.stack import SERVICES, nats_binary
from tests.helpers import child_log

ROOT = Path(__file__).resolve().parents[2]
# Ports for the stack's listeners, below Linux's ephemeral range (32768-60999): a port picked
# there, free now, could be taken by any outgoing connection before its process binds it
# (the stack starts two dozen processes, some of them again later).
_PORTS = range(20000, 32000)
_taken: set[int] = set()


def stack_port() -> int:
    """A port free now, outside the ephemeral range, not handed out before in this run."""
    while True:
        port = random.choice(_PORTS)
        if port in _taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port


@dataclass
class Process:
    """One child process that can be killed and started again the same way."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    # Answers 200 once the process is ready.
    probe: str
    log: BinaryIO = field(init=False)
    process: asyncio.subprocess.Process | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.log = child_log(self.name)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self.starts += 1
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, env=dict(self.env), cwd=ROOT, stdout=self.log, stderr=self.log
        )

    async def ready(self, within: float = 60) -> None:
        deadline = asyncio.get_running_loop().time() + within
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                assert self.process is not None
                if self.process.returncode is not None:
                    raise AssertionError(f"{self.name} exited with {self.process.returncode}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(self.probe)).status_code == 200:
                        return
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"{self.name} was not ready after {within:.0f}s")
                await asyncio.sleep(0.1)

    async def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, nothing is flushed but what the kernel holds."""
        assert self.process is not None
        self.process.kill()
        await self.process.wait()

    async def stop(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


class Balancer:
    """Round robin per connection over backends; one that refuses the connection is skipped,
    as a Service drops a dead pod. A connection to a backend that dies breaks, as it would."""

    def __init__(self, name: str, backends: Sequence[int]) -> None:
        self.name = name
        self.backends = list(backends)
        self.port = stack_port()
        self._turn = itertools.count()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = next(self._turn)
        for i in range(len(self.backends)):
            port = self.backends[(first + i) % len(self.backends)]
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue
            break
        else:
            writer.close()
            return
        pipes = [
            asyncio.create_task(_pipe(reader, up_writer)),
            asyncio.create_task(_pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        try:
            # Either side closing ends the connection (HTTP needs no half-close here).
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
                self._pipes.discard(task)
            for w in (writer, up_writer):
                w.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._pipes):
                task.cancel()
            await asyncio.gather(*self._pipes, return_exceptions=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


@dataclass
class NatsNode:
    name: str
    client: int = field(default_factory=stack_port)
    route: int = field(default_factory=stack_port)
    monitor: int = field(default_factory=stack_port)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client}"


def nats_config(node: NatsNode, nodes: Sequence[NatsNode], store: Path) -> str:
    """One node of a JetStream cluster. ``sync_interval: always``: a publish is acknowledged
    only once it is on disk, so a usage event acknowledged to a gateway survives any node's
    death (with R3, two others hold it too)."""
    routes = ", ".join(f"nats-route://127.0.0.1:{n.route}" for n in nodes if n is not node)
    return (
        f"server_name: {node.name}\n"
        f"listen: 127.0.0.1:{node.client}\n"
        f"http: 127.0.0.1:{node.monitor}\n"
        f'jetstream {{ store_dir: "{store}", sync_interval: always }}\n'
        f"cluster {{ name: steward, listen: 127.0.0.1:{node.route}, routes: [{routes}] }}\n"
    )


class ScaledStack:
    """The topology, started and stopped; ``env`` is what every Steward process shares (the
    database, the secrets, the service keys)."""

    def __init__(
        self,
        directory: Path,
        env: Mapping[str, str],
        *,
        replicas: int = 2,
        gateways: int = 2,
        nats_nodes: int = 3,
    ) -> None:
        self.directory = directory
        self.nats_nodes = [NatsNode(f"n{i + 1}") for i in range(nats_nodes)]
        self.nats: list[Process] = []
        for node in self.nats_nodes:
            store = directory / node.name
            store.mkdir(parents=True)
            config = store / "nats.conf"
            config.write_text(nats_config(node, self.nats_nodes, store / "js"))
            self.nats.append(
                Process(
                    f"nats-{node.name}",
                    [nats_binary(), "-c", str(config)],
                    {},
                    # 200 once this node is current with the cluster's JetStream.
                    f"http://127.0.0.1:{node.monitor}/healthz",
                )
            )
        ports = {s: [stack_port() for _ in range(replicas)] for s in SERVICES}
        self.balancers = {s: Balancer(s, p) for s, p in ports.items()}
        proxies = [stack_port() for _ in range(gateways)]
        self.balancers["gateway"] = Balancer("gateway", proxies)
        shared = {
            **os.environ,
            **env,
            "STEWARD_NATS_URL": ",".join(n.url for n in self.nats_nodes),
            "STEWARD_NATS_REPLICAS": str(min(3, nats_nodes)),
            **{f"STEWARD_{s.upper()}_URL": self.balancers[s].url for s in SERVICES},
        }
        self.services: dict[str, list[Process]] = {}
        for service in SERVICES:
            self.services[service] = []
            for i, port in enumerate(ports[service]):
                name = f"{service}-{i + 1}"
                own = {"STEWARD_PORT": str(port), "STEWARD_DATA_DIR": str(directory / name)}
                self.services[service].append(
                    Process(
                        name,
                        [sys.executable, "-m", f"services.{service}"],
                        {**shared, **own},
                        f"http://127.0.0.1:{port}/readyz",
                    )
                )
        self.gateways: list[Process] = []
        for i, proxy in enumerate(proxies):
            admin = stack_port()
            name = f"gateway-{i + 1}"
            own = {
                "STEWARD_GATEWAY_PROXY_PORT": str(proxy),
                "STEWARD_GATEWAY_ADMIN_PORT": str(admin),
                "STEWARD_DATA_DIR": str(directory / name),
            }
            self.gateways.append(
                Process(
                    name,
                    [sys.executable, "-m", "gateway"],
                    {**shared, **own},
                    f"http://127.0.0.1:{admin}/readyz",
                )
            )

    def url(self, name: str) -> str:
        """A service's (or the gateways') balanced URL."""
        return self.balancers[name].url

    @property
    def processes(self) -> list[Process]:
        return [*self.nats, *itertools.chain(*self.services.values()), *self.gateways]

    async def start(self) -> None:
        for balancer in self.balancers.values():
            await balancer.start()
        for process in self.nats:
            await process.start()
        await asyncio.gather(*(p.ready() for p in self.nats))
        services = list(itertools.chain(*self.services.values()))
        for process in services:
            await process.start()
        await asyncio.gather(*(p.ready() for p in services))
        # The gateways load their replicas from the services: last.
        for process in self.gateways:
            await process.start()
        await asyncio.gather(*(p.ready() for p in self.gateways))

    async def restart(self, process: Process) -> None:
        await process.start()
        await process.ready()

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in [*self.gateways, *self.services_flat()]))
        await asyncio.gather(*(p.stop() for p in self.nats))
        for balancer in self.balancers.values():
            await balancer.stop()
        for process in self.processes:
            process.log.close()

    def services_flat(self) -> list[Process]:
        return list(itertools.chain(*self.services.values()))
