"""``steward up`` — the README's first command — on the embedded default: SQLite, NATS from the
wheel, every service and the gateway as processes; then ``steward status``; then Ctrl-C.

Run as a user runs it, in a process group of its own, with every port its own (never the
defaults, where a developer's stack may be running) and a data directory of the test's.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from cli.stack import SERVICES
from tests.cli.test_gitops import steward
from tests.helpers import bearer, free_port

ROOT = Path(__file__).resolve().parents[2]
KEY = re.compile(r"stw_[A-Za-z0-9]{8}_[A-Za-z0-9]{32}")


class Up:
    """A running ``steward up`` and what it printed so far."""

    def __init__(self, process: asyncio.subprocess.Process, env: dict[str, str]) -> None:
        self.process = process
        self.env = env
        self.lines: list[str] = []

    async def until(self, text: str, seconds: float = 120) -> str:
        """Read its output until a line contains ``text`` (the deadline only bounds a failure)."""
        assert self.process.stdout is not None

        async def read() -> str:
            assert self.process.stdout is not None
            while line := (await self.process.stdout.readline()).decode():
                self.lines.append(line)
                if text in line:
                    return line
            raise AssertionError(f"steward up ended before {text!r}:\n{''.join(self.lines)}")

        return await asyncio.wait_for(read(), seconds)


@pytest.fixture
async def up(tmp_path: Path) -> AsyncIterator[Up]:
    urls = {name: f"http://127.0.0.1:{free_port()}" for name in SERVICES}
    env = {
        **os.environ,
        "STEWARD_DATA_DIR": str(tmp_path / "data"),
        "STEWARD_NATS_URL": f"nats://127.0.0.1:{free_port()}",
        "STEWARD_GATEWAY_PROXY_PORT": str(free_port()),
        "STEWARD_GATEWAY_ADMIN_PORT": str(free_port()),
        **{f"STEWARD_{name.upper()}_URL": url for name, url in urls.items()},
    }
    for inherited in ("STEWARD_DATABASE_URL", "STEWARD_PORT", "STEWARD_API_KEY"):
        env.pop(inherited, None)
    running = Up(await start(env), env)
    try:
        yield running
    finally:
        await kill(running.process)


async def start(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", "from cli.main import main; main()", "up"),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        process_group=0,
    )


async def kill(process: asyncio.subprocess.Process) -> None:
    """Whatever is left of a stack that failed its test. Its children run in process groups of
    their own, so only ``steward up`` can stop them: SIGTERM first, SIGKILL as a last resort."""
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 60)
        except TimeoutError:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


async def test_steward_up_serves_every_service_then_ctrl_c_stops_all_cleanly_and_restarts(
    up: Up,
) -> None:
    await up.until("Press Ctrl-C to stop")
    printed = "".join(up.lines)
    [admin_key] = set(KEY.findall(printed))  # the banner and the export line
    assert "started NATS (JetStream)" in printed
    for name in SERVICES:
        assert up.env[f"STEWARD_{name.upper()}_URL"] in printed

    # steward status reads the same settings (the environment) and finds every process ready,
    # the gateway included.
    status_env = {k: v for k, v in up.env.items() if k.startswith("STEWARD_")}
    result = await steward(status_env, "status", "-o", "json")
    assert result.exit_code == 0, result.output
    assert {name: state["status"] for name, state in json.loads(result.output).items()} == {
        name: "ready" for name in (*SERVICES, "gateway")
    }

    # The printed key works through the gateway.
    proxy = f"http://127.0.0.1:{up.env['STEWARD_GATEWAY_PROXY_PORT']}"
    async with httpx.AsyncClient(base_url=proxy) as client:
        me = await client.get("/api/authz/v1/whoami", headers=bearer(admin_key))
    assert me.status_code == 200, me.text
    assert me.json()["platform_admin"] is True

    # Ctrl-C in a terminal signals the whole foreground process group.
    os.killpg(up.process.pid, signal.SIGINT)
    await up.until("stopping…")
    assert await asyncio.wait_for(up.process.wait(), 60) == 0
    assert "stopped unexpectedly" not in "".join(up.lines)

    # A second start on the same data directory keeps the admin: no key is printed again.
    again = Up(await start(up.env), up.env)
    try:
        await again.until("Press Ctrl-C to stop")
        assert KEY.findall("".join(again.lines)) == []
        os.killpg(again.process.pid, signal.SIGINT)
        assert await asyncio.wait_for(again.process.wait(), 60) == 0
    finally:
        await kill(again.process)
