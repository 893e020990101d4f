"""Kong's side of the external plugin protocol, to run a Python PDK plugin under the real
kong-pdk plugin server in tests, with no Kong.

It does what Kong 3.x does (kong/runloop/plugin_servers/rpc/mp_rpc.lua and plugin.lua):

- every call is a msgpack-rpc request ``[0, msgid, method, [args]]`` on the server's unix
  socket, answered by ``[1, msgid, error, result]``;
- ``plugin.StartInstance {Name, Config}`` carries the plugin's config as JSON, every schema field
  present (its default, else null), plus the keys Kong adds (``route_id``, ``__seq__``...);
- ``plugin.HandleEvent {InstanceId, EventName}`` starts a phase; until the answer's ``Data`` is
  ``"ret"`` it is a PDK call ``{Method, Args}``, which Kong runs and answers with
  ``{EventId, Data}`` (no ``Data`` for nil) through ``plugin.Step`` or the typed step mp_rpc.lua
  names for that method (``plugin.StepConsumer``...);
- after ``kong.response.exit`` Kong sends nothing more for that event (the request has ended).

mp_rpc.lua keeps only a PDK function's first return value, so it never sends
``plugin.StepError``; a test can still make the fake Kong answer with one (``Call.failing``).

A ``Call`` is one request as the plugin sees it: the PDK answers come from it, and what the
plugin did (exit, logs, the PDK calls in order) is recorded on it. The fake answers only the PDK
functions listed in ``PDK``, in the phases Kong's PDK allows them (kong/pdk/*.lua
``check_phase``), so a misnamed or misplaced call fails the test instead of returning nil.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

# mp_rpc.lua: objects come back through typed Step methods.
STEP_METHODS = {
    "kong.client.get_credential": "plugin.StepCredential",
    "kong.client.load_consumer": "plugin.StepConsumer",
    "kong.client.get_consumer": "plugin.StepConsumer",
    "kong.client.authenticate": "plugin.StepCredential",
    "kong.node.get_memory_stats": "plugin.StepMemoryStats",
    "kong.router.get_route": "plugin.StepRoute",
    "kong.router.get_service": "plugin.StepService",
    "kong.request.get_query": "plugin.StepMultiMap",
    "kong.request.get_headers": "plugin.StepMultiMap",
    "kong.response.get_headers": "plugin.StepMultiMap",
    "kong.service.response.get_headers": "plugin.StepMultiMap",
}
TERMINAL = {"kong.response.exit", "kong.response.error"}
LOG_LEVELS = {"alert", "crit", "err", "warn", "notice", "info", "debug"}  # kong.log.<level>

# Phase sets of Kong's PDK (kong/pdk/client.lua, router.lua, response.lua, service/*.lua).
AUTH_AND_LATER = {"access", "header_filter", "response", "body_filter", "log"}
HEADER_BODY_LOG = {"response", "header_filter", "body_filter", "log"}
REWRITE_ACCESS_HEADER = {"rewrite", "access", "response", "balancer", "header_filter"}
ACCESS_REWRITE_BALANCER = {"rewrite", "access", "balancer"}
ANY_PHASE = {"rewrite", "access", "response", "header_filter", "body_filter", "log"}


class RpcError(Exception):
    """The plugin server answered a call with an error."""


@dataclass
class Exit:
    """What the plugin asked ``kong.response.exit`` to answer the client."""

    status: int
    body: Any
    headers: dict[str, str]


@dataclass
class Call:
    """One request through Kong: what the PDK answers, and what the plugin did with it."""

    consumer: dict[str, Any] | None = None
    credential: dict[str, Any] | None = None
    service: dict[str, Any] | None = None
    upstream_status: int = 200
    upstream_body: bytes = b""
    # PDK method -> the error Kong answers it with (plugin.StepError).
    failing: dict[str, str] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)  # kong.ctx.shared
    buffered: bool = False
    exit: Exit | None = None
    logs: list[tuple[str, list[Any]]] = field(default_factory=list)
    pdk_calls: list[tuple[str, str]] = field(default_factory=list)  # (phase, method)
    events: dict[str, int] = field(default_factory=dict)  # phase -> the server's EventId


def _enable_buffering(call: Call) -> None:
    call.buffered = True


def _raw_body(call: Call) -> bytes:
    # Kong raises (a 500) rather than answer nil: service/response.lua get_raw_body.
    assert call.buffered, "service body is only available with buffered proxying"
    return call.upstream_body


def _exit(call: Call, status: int, body: Any = None, headers: Any = None) -> None:
    # kong/pdk/response.lua exit's own checks on its arguments.
    assert isinstance(status, int) and 100 <= status <= 599, status
    assert body is None or isinstance(body, str | dict), body
    assert headers is None or isinstance(headers, dict), headers
    for name, value in (headers or {}).items():  # checks.lua validate_header
        values = value if isinstance(value, list) else [value]
        assert isinstance(name, str), name
        assert all(isinstance(v, str | int | float | bool) for v in values), (name, value)
    call.exit = Exit(status, body, dict(headers or {}))


def _shared_set(call: Call, key: str, value: Any) -> None:
    call.shared[key] = value


PDK: dict[str, tuple[set[str], Callable[..., Any]]] = {
    "kong.ctx.shared.get": (ANY_PHASE, lambda call, key: call.shared.get(key)),
    "kong.ctx.shared.set": (ANY_PHASE, _shared_set),
    "kong.client.get_consumer": (AUTH_AND_LATER, lambda call: call.consumer),
    "kong.client.get_credential": (AUTH_AND_LATER, lambda call: call.credential),
    "kong.router.get_service": (AUTH_AND_LATER, lambda call: call.service),
    "kong.service.request.enable_buffering": (ACCESS_REWRITE_BALANCER, _enable_buffering),
    "kong.service.response.get_status": (HEADER_BODY_LOG, lambda call: call.upstream_status),
    "kong.service.response.get_raw_body": (HEADER_BODY_LOG, _raw_body),
    "kong.response.exit": (REWRITE_ACCESS_HEADER, _exit),
}


@dataclass
class PluginServer:
    """A running plugin server process and where to reach it."""

    socket: Path
    log: Path  # its stdout and stderr, as Kong logs them
    process: subprocess.Popen[bytes]


class Rpc:
    """One connection to the plugin server, as Kong's ``Rpc:call`` uses it."""

    def __init__(self, server: PluginServer, timeout: float = 10) -> None:
        self.server = server
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)  # a failure bound: a server that never answers fails
        self.sock.connect(str(server.socket))
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.msgid = 0
        self.sent: list[list[Any]] = []  # every request, as sent
        self.stuck = False

    def call(self, method: str, *args: Any) -> Any:
        self.msgid += 1
        message = [0, self.msgid, method, list(args)]
        self.sent.append(message)
        self.sock.sendall(msgpack.packb(message))
        while True:
            try:
                kind, *rest = self._receive()
            except TimeoutError:
                self.stuck = True
                raise TimeoutError(
                    f"no answer to {method} in {self.timeout} s (a plugin phase that raised "
                    f"never answers); the plugin server said:\n{self.server.log.read_text()}"
                ) from None
            if kind == 2:  # a notification [2, label, args]: Kong only tracks serverPid
                continue
            msgid, error, result = rest
            assert kind == 1 and msgid == self.msgid, (kind, msgid)
            if error is not None:
                raise RpcError(error)
            return result

    def _receive(self) -> list[Any]:
        while True:
            try:
                return list(next(self.unpacker))
            except StopIteration:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the plugin server closed the connection") from None
                self.unpacker.feed(chunk)

    def close(self) -> None:
        self.sock.close()


class Kong:
    """Kong driving one external plugin: instances, and calls through their phases."""

    def __init__(self, server: PluginServer, plugin: str) -> None:
        self.rpc = Rpc(server)
        self.plugin = plugin
        self.info: dict[str, Any] = self.rpc.call("plugin.GetPluginInfo", plugin)
        self.instances: list[int] = []

    def start_instance(self, config: dict[str, Any]) -> int:
        """Start an instance for a plugin entity whose config is ``config``, as Kong sends it."""
        fields = self.info["Schema"]["fields"][0]["config"]["fields"]
        full: dict[str, Any] = {}
        for entry in fields:
            [(name, spec)] = entry.items()
            full[name] = config.get(name, spec.get("default"))
        unknown = set(config) - set(full)
        assert not unknown, f"Kong's schema for {self.plugin} refuses {unknown}"
        # plugins_iterator.lua get_plugin_config: what Kong adds (nil ones are absent).
        plugin_id, route_id, service_id, ws_id = (str(uuid.uuid4()) for _ in range(4))
        full |= {
            "route_id": route_id,
            "service_id": service_id,
            "__plugin_id": plugin_id,
            "__ws_id": ws_id,
            "__key__": f"plugins:{self.plugin}:{route_id}:{service_id}::{ws_id}",
            "__seq__": len(self.instances) + 1,
        }
        status = self.rpc.call(
            "plugin.StartInstance", {"Name": self.plugin, "Config": json.dumps(full)}
        )
        self.instances.append(status["Id"])
        return int(status["Id"])

    def proxy(self, instance: int, call: Call) -> Call:
        """One request: access, then (if not ended by an exit) response, then log."""
        phases = self.info["Phases"]
        # plugins_iterator.lua: a plugin with a response phase turns buffered proxying on.
        call.buffered = call.buffered or "response" in phases
        if "access" in phases:
            self.run_phase(instance, "access", call)
        if call.exit is None and "response" in phases:
            self.run_phase(instance, "response", call)
        if "log" in phases:
            self.run_phase(instance, "log", call)
        return call

    def run_phase(self, instance: int, phase: str, call: Call) -> None:
        """mp_rpc.lua's bridge_loop: answer the plugin's PDK calls until the event returns."""
        answer = self.rpc.call("plugin.HandleEvent", {"InstanceId": instance, "EventName": phase})
        event = call.events[phase] = answer["EventId"]
        while answer["Data"] != "ret":
            method, args = answer["Data"]["Method"], answer["Data"]["Args"]
            call.pdk_calls.append((phase, method))
            if method in call.failing:
                step, data = "plugin.StepError", call.failing[method]
            elif method.removeprefix("kong.log.") in LOG_LEVELS:
                call.logs.append((method.removeprefix("kong.log."), list(args)))
                step, data = "plugin.Step", None
            else:
                assert method in PDK, f"the fake Kong does not answer {method}"
                phases, function = PDK[method]
                assert phase in phases, f"Kong refuses {method} in the {phase} phase"
                data = function(call, *args)
                if method in TERMINAL:
                    return  # the request has ended: Kong sends nothing more for this event
                step = STEP_METHODS.get(method, "plugin.Step")
            message = {"EventId": event} if data is None else {"EventId": event, "Data": data}
            answer = self.rpc.call(step, message)

    def close(self) -> None:
        for instance in [] if self.rpc.stuck else self.instances:
            self.rpc.call("plugin.CloseInstance", instance)
        self.rpc.close()


@contextmanager
def plugin_server(
    argv: list[str], socket_path: Path, cwd: Path, env: dict[str, str], log: Path
) -> Iterator[PluginServer]:
    """The plugin server as Kong starts it (start_cmd), until its socket takes connections."""
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 - the test's own command line
            argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 20  # a failure bound only
        while not _accepts(socket_path):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv} did not listen on {socket_path}: {log.read_text()}")
            time.sleep(0.01)
        yield PluginServer(socket_path, log, process)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _accepts(path: Path) -> bool:
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
