"""A server the inference process started dies with it, even when it is killed with SIGKILL, so
the next leader starts it again rather than finding an orphan on its port and GPUs."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.approval.support import eventually
from tests.helpers import alive

ROOT = Path(__file__).resolve().parents[2]

SUPERVISOR = """
import subprocess, sys, time
from services.inference.runtimes.base import dies_with_parent
sleep = [sys.executable, "-c", "import time; time.sleep(300)"]
quiet = dict(stdout=subprocess.DEVNULL, start_new_session=True)
tied = subprocess.Popen(sleep, preexec_fn=dies_with_parent(), **quiet)
loose = subprocess.Popen(sleep, **quiet)
print(tied.pid, loose.pid, flush=True)
time.sleep(300)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
async def test_a_supervised_server_dies_when_its_supervisor_is_killed() -> None:
    supervisor = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SUPERVISOR, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    assert supervisor.stdout is not None
    tied, loose = map(int, (await supervisor.stdout.readline()).split())
    try:
        assert alive(tied) and alive(loose)
        supervisor.kill()
        await supervisor.wait()

        async def gone() -> bool:
            return not alive(tied)

        await eventually(gone, within=10, what="the tied server gone")
        # Without it, a child outlives its killed supervisor: what the local runtime had before.
        assert alive(loose)
    finally:
        for pid in (tied, loose):
            if alive(pid):
                os.kill(pid, 9)
