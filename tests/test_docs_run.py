"""The docs cannot drift: every shell and Python block in README.md and docs/*.md says whether
it runs, and those that do are run as written against live services on real sockets; only what a
reader fills in is given (their key, the services' URLs where a doc uses the default ports, a
project name of the test's own). The machinery is in tests/docs/runner.py, the pages' tests in
tests/docs/; the README's tour, which needs authz alone, runs here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi import FastAPI

from tests.docs.runner import DOCS, PYTHON, ROOT, SHELL, block, blocks, need, reader_env, run_bash
from tests.helpers import serve, unique


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_says_whether_it_runs_and_a_runnable_one_names_its_test(doc: Path) -> None:
    """A new shell or Python block without a marker fails here, as does one in a block that
    names no language (where a shell snippet could hide)."""
    problems = []
    for found in blocks(doc):
        if not found.language:
            problems.append(f"{found.where}: name the block's language (bash, python, text…)")
        elif found.language in SHELL | PYTHON and found.marker is None:
            problems.append(
                f"{found.where}: put <!-- runnable: … --> (and a test that runs it) or "
                "<!-- not runnable: why --> on the line above"
            )
        elif found.marker == "runnable":
            named = re.findall(r"tests/[\w/]+\.py", found.note)
            texts = [(ROOT / n).read_text() for n in named if (ROOT / n).exists()]
            # The test names the page, and the block by its heading (or the heading's start).
            headings = [h for text in texts for h in re.findall(r"[\"'](#+ [^\"']+)[\"']", text)]
            if not any(doc.name in text for text in texts) or not any(
                found.heading.startswith(h) for h in headings
            ):
                problems.append(f"{found.where}: the marker names no test that runs this block")
    assert problems == []


def test_the_markers_are_read_as_written() -> None:
    """The parser the tests rely on: languages, markers and headings as a reader sees them."""
    readme = blocks(ROOT / "README.md")
    tour = [b for b in readme if b.heading == "## A five-minute tour (authz)"]
    assert [(b.language, b.marker) for b in tour] == [("bash", "runnable")]
    assert tour[0].code.startswith("export STEWARD_API_KEY=stw_...")
    assert any(b.marker == "not runnable" and "foreground" in b.note for b in readme)


async def test_the_readmes_five_minute_tour_runs_as_written(
    authz_app: FastAPI, admin_key: str, tmp_path: Path
) -> None:
    need("curl", "python3")
    script = block("README.md", "## A five-minute tour")
    # The reader's placeholder: their bootstrap key (the snippet exports it).
    script = script.replace("export STEWARD_API_KEY=stw_...", f"export STEWARD_API_KEY={admin_key}")
    # This world's project name, so the tour runs again in any order.
    project = unique("fraud-detection")
    script = script.replace("fraud-detection", project)
    async with serve(authz_app) as url:
        ran = await run_bash(script, reader_env(tmp_path, STEWARD_AUTHZ_URL=url))
    out = ran.ok()
    assert f'"name":"{project}"' in out
    assert '"status":403' in out  # alice may not add members
    assert out.rstrip().endswith("}") and '"allowed":true' in out
