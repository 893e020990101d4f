"""The docs' shell snippets marked ``<!-- runnable: … -->`` run as written, in bash, against a
live service on a real socket; only the placeholders a reader fills in are given (the key, and
the service's URL where it is not the default port)."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

from fastapi import FastAPI

from tests.helpers import serve, unique

ROOT = Path(__file__).resolve().parents[1]


def runnable(doc: Path, heading: str) -> str:
    """The runnable bash block under ``heading``."""
    text = doc.read_text()
    start = text.index(heading)
    marker = text.index("<!-- runnable:", start)
    found = re.search(r"```bash\n(.*?)```", text[marker:], re.S)
    assert found is not None, heading
    return found.group(1)


async def run_bash(script: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        script,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode(), err.decode()


async def test_the_readmes_five_minute_tour_runs_as_written(
    authz_app: FastAPI, admin_key: str
) -> None:
    script = runnable(ROOT / "README.md", "## A five-minute tour")
    # The reader's placeholder: their bootstrap key (the snippet exports it).
    script = script.replace("export STEWARD_API_KEY=stw_...", f"export STEWARD_API_KEY={admin_key}")
    # This world's project name, so the tour runs again in any order.
    project = unique("fraud-detection")
    script = script.replace("fraud-detection", project)
    async with serve(authz_app) as url:
        code, out, err = await run_bash(script, {"STEWARD_AUTHZ_URL": url})
    assert code == 0, err + out
    assert f'"name":"{project}"' in out
    assert '"status":403' in out  # alice may not add members
    assert out.rstrip().endswith("}") and '"allowed":true' in out
