"""A stdio ↔ streamable-HTTP bridge: an MCP server that speaks stdio (an npm, PyPI or OCI package
from the catalog) served at ``/mcp`` so the gateway can route, govern and meter it like any other.

``python -m services.inference.mcp_bridge --host H --port P -- <command…>``

Each MCP session (an ``initialize``) gets its own child process: a stdio server serves one
client, and sessions of different projects must not share one server's state. The answer to a
POST is JSON (the streamable-HTTP spec allows it): the bridge writes the messages to the child's
stdin, one per line, and waits for the responses with their ids. Requests the server sends the
client (sampling, elicitation) are answered "not supported"; its notifications are dropped.
Sessions end on ``DELETE``, after ``--idle-seconds`` without a call, or when their child exits.

Before it answers ``/health``, the bridge starts the command once and initializes it: a package
that cannot be fetched or does not speak MCP fails the endpoint with the child's output in the
log, instead of failing the first caller.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.inference.runtimes.base import dies_with_parent

log = logging.getLogger("steward.mcp_bridge")

SESSION = "mcp-session-id"
PROTOCOL = "2025-06-18"
NOT_SUPPORTED = -32601
LINE_LIMIT = 16 * 1024 * 1024


def _error(id_: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "error": {"code": code, "message": message}}


class ChildGone(Exception):
    """The server process exited (or its output broke the protocol)."""


@dataclass
class Child:
    """One stdio server process and the responses it owes."""

    process: asyncio.subprocess.Process
    pending: dict[Any, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)
    reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, command: Sequence[str]) -> Child:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,  # the bridge's own log: what the endpoint's log file shows
            limit=LINE_LIMIT,
            start_new_session=True,
            preexec_fn=dies_with_parent(),
        )
        child = cls(process)
        child.reader = asyncio.create_task(child._read())
        return child

    async def _read(self) -> None:
        assert self.process.stdout is not None
        try:
            while line := await self.process.stdout.readline():
                try:
                    message = json.loads(line)
                except ValueError:
                    log.warning("not JSON-RPC on the server's stdout: %.200s", line)
                    continue
                if not isinstance(message, dict):
                    continue
                if "method" in message:
                    if "id" in message:  # a request to the client: not relayed
                        await self._write(
                            [_error(message["id"], NOT_SUPPORTED, "not supported by the gateway")]
                        )
                    continue
                waiter = self.pending.pop(message.get("id"), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
        except (ValueError, OSError, ChildGone) as exc:  # a line past the limit, a closed pipe
            log.warning("the server's output broke off: %s", exc)
        finally:
            for waiter in self.pending.values():
                if not waiter.done():
                    waiter.set_exception(ChildGone("the MCP server exited"))
            self.pending.clear()

    async def _write(self, messages: list[dict[str, Any]]) -> None:
        stdin = self.process.stdin
        if stdin is None or stdin.is_closing() or self.process.returncode is not None:
            raise ChildGone("the MCP server exited")
        try:
            stdin.write(b"".join(json.dumps(m).encode() + b"\n" for m in messages))
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ChildGone("the MCP server exited") from exc

    async def exchange(self, messages: list[dict[str, Any]]) -> list[Any]:
        """Send ``messages``; the responses to its requests, in their order (the caller bounds
        the wait)."""
        self.last_used = time.monotonic()
        loop = asyncio.get_running_loop()
        waits = []
        for message in messages:
            if "method" in message and "id" in message:
                future: asyncio.Future[dict[str, Any]] = loop.create_future()
                self.pending[message["id"]] = future
                waits.append(future)
        await self._write(messages)
        if not waits:
            return []
        done = await asyncio.gather(*waits)
        self.last_used = time.monotonic()
        return list(done)

    async def stop(self) -> None:
        process = self.process
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader


class Bridge:
    def __init__(
        self,
        command: Sequence[str],
        *,
        max_sessions: int = 32,
        idle_seconds: float = 600.0,
        timeout: float = 300.0,
    ) -> None:
        self.command = list(command)
        self.max_sessions = max_sessions
        self.idle_seconds = idle_seconds
        self.timeout = timeout
        self.sessions: dict[str, Child] = {}
        self.healthy = False

    async def probe(self) -> None:
        """Start the server once and initialize it: healthy only if it answers."""
        child = await Child.start(self.command)
        try:
            hello = {
                "jsonrpc": "2.0",
                "id": "steward-probe",
                "method": "initialize",
                "params": {
                    "protocolVersion": PROTOCOL,
                    "capabilities": {},
                    "clientInfo": {"name": "steward-bridge-probe", "version": "1"},
                },
            }
            async with asyncio.timeout(self.timeout):
                [answer] = await child.exchange([hello])
            if "result" not in answer:
                raise ChildGone(f"the MCP server refused initialize: {answer.get('error')}")
        finally:
            await child.stop()
        self.healthy = True

    async def reap(self) -> None:
        """End sessions idle for too long (their clients left without a DELETE)."""
        while True:
            await asyncio.sleep(min(30.0, self.idle_seconds / 2))
            now = time.monotonic()
            for sid, child in list(self.sessions.items()):
                if (
                    now - child.last_used > self.idle_seconds
                    or child.process.returncode is not None
                ):
                    self.sessions.pop(sid, None)
                    await child.stop()

    async def close(self) -> None:
        children, self.sessions = list(self.sessions.values()), {}
        await asyncio.gather(*(c.stop() for c in children), return_exceptions=True)

    async def health(self, request: Request) -> Response:
        return JSONResponse(
            {"status": "ok" if self.healthy else "starting"}, 200 if self.healthy else 503
        )

    async def mcp(self, request: Request) -> Response:
        sid = request.headers.get(SESSION)
        if request.method == "GET":
            return Response(status_code=405, headers={"allow": "POST, DELETE"})
        if request.method == "DELETE":
            child = self.sessions.pop(sid or "", None)
            if child is None:
                return Response(status_code=404)
            await child.stop()
            return Response(status_code=204)
        try:
            parsed = json.loads(await request.body())
        except ValueError:
            return JSONResponse(_error(None, -32700, "parse error"), 400)
        messages = parsed if isinstance(parsed, list) else [parsed]
        if not messages or not all(isinstance(m, dict) for m in messages):
            return JSONResponse(_error(None, -32600, "invalid request"), 400)
        headers: dict[str, str] = {}
        if any(m.get("method") == "initialize" for m in messages):
            if len(self.sessions) >= self.max_sessions:
                return JSONResponse(_error(None, -32000, "too many MCP sessions"), 503)
            sid = secrets.token_urlsafe(24)
            self.sessions[sid] = await Child.start(self.command)
            headers[SESSION] = sid
        elif sid is None:
            return JSONResponse(_error(None, -32600, "Mcp-Session-Id is required"), 400)
        child = self.sessions.get(sid)
        if child is None:
            return JSONResponse(_error(None, -32001, "session not found"), 404)
        try:
            async with asyncio.timeout(self.timeout):
                answers = await child.exchange(messages)
        except ChildGone as exc:
            self.sessions.pop(sid, None)
            await child.stop()
            return JSONResponse(_error(None, -32603, str(exc)), 502)
        except TimeoutError:
            return JSONResponse(_error(None, -32603, "the MCP server did not answer in time"), 504)
        if not answers:
            return Response(status_code=202, headers=headers)
        body = answers if isinstance(parsed, list) else answers[0]
        return JSONResponse(body, headers=headers)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/mcp", self.mcp, methods=["GET", "POST", "DELETE"]),
            ]
        )


async def serve(args: argparse.Namespace) -> int:
    bridge = Bridge(
        args.command,
        max_sessions=args.max_sessions,
        idle_seconds=args.idle_seconds,
        timeout=args.timeout,
    )
    try:
        await bridge.probe()
    except (OSError, ChildGone, TimeoutError, ValueError) as exc:
        print(
            f"steward mcp bridge: {' '.join(args.command)!r} does not serve MCP: {exc}",
            file=sys.stderr,
        )
        return 1
    server = uvicorn.Server(
        uvicorn.Config(bridge.app(), host=args.host, port=args.port, log_level="warning")
    )
    reaper = asyncio.create_task(bridge.reap())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    try:
        await server.serve()
    finally:
        reaper.cancel()
        await bridge.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-sessions", type=int, default=32)
    parser.add_argument("--idle-seconds", type=float, default=600.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("give the server's command after --")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
