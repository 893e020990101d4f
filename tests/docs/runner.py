"""The docs' code blocks, found by their markers, and run as a reader would: shell blocks in
bash (``-euo pipefail``), Python blocks with this interpreter.

A block is a fenced block in README.md or docs/*.md. The line right above a shell or Python block
says whether it runs: ``<!-- runnable: … -->`` (a test runs it; the marker names the test) or
``<!-- not runnable: <why> -->``. tests/test_docs_run.py checks that every one says which.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Languages whose blocks are snippets to run; every other block must name its language too, so
# a shell snippet cannot hide in an untagged block.
SHELL = {"bash", "sh", "shell", "console", "zsh"}
PYTHON = {"python", "py", "python3", "pycon"}
MARKER = re.compile(r"^<!-- (runnable|not runnable): (.+?) -->$")
FENCE = re.compile(r"^\s*```(\S*)\s*$")  # a block in a list item is indented


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    language: str
    heading: str  # the nearest heading above, as written ("## A five-minute tour")
    marker: str | None  # "runnable" or "not runnable"
    note: str  # the marker's text after the colon
    code: str

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line} ({self.heading})"


def blocks(doc: Path) -> list[Block]:
    """Every fenced block of ``doc``, in order."""
    lines = doc.read_text().splitlines()
    found: list[Block] = []
    heading = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence is None:
            if line.startswith("#"):
                heading = line
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].lstrip().startswith("```"))
        marker = MARKER.match(lines[i - 1].strip()) if i > 0 else None
        found.append(
            Block(
                doc=doc,
                line=i + 1,
                language=fence.group(1),
                heading=heading,
                marker=marker.group(1) if marker else None,
                note=marker.group(2) if marker else "",
                code=textwrap.dedent("\n".join(lines[i + 1 : end]) + "\n"),
            )
        )
        i = end + 1
    return found


def block(doc: str, heading: str, nth: int = 0) -> str:
    """The code of the ``nth`` runnable block under ``heading`` (a heading's start will do) in
    ``doc`` (a path from the repository's root)."""
    under = [
        b for b in blocks(ROOT / doc) if b.heading.startswith(heading) and b.marker == "runnable"
    ]
    assert len(under) > nth, f"no runnable block {nth} under {heading!r} in {doc}"
    return under[nth].code


def substitute(code: str, values: dict[str, str]) -> str:
    """Fill in what a reader fills in; each placeholder must be there, so a doc that drops one
    fails here rather than running against a default."""
    for old, new in values.items():
        assert old in code, f"{old!r} is not in the block any more"
        code = code.replace(old, new)
    return code


def documents(text: str) -> list[Any]:
    """The JSON values a block printed one after another (curl prints no newline after one)."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    at = 0
    while (at := len(text) - len(text[at:].lstrip())) < len(text):
        value, at = decoder.raw_decode(text, at)
        values.append(value)
    return values


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def ok(self) -> str:
        assert self.code == 0, f"exit {self.code}\n--- stderr\n{self.err}\n--- stdout\n{self.out}"
        return self.out


async def _run(
    argv: list[str], env: dict[str, str], cwd: Path, stdin: str | None, within: float
) -> Ran:
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # no terminal: a prompt reads the stdin given, never a tty
    )
    data = stdin.encode() if stdin is not None else None
    try:
        out, err = await asyncio.wait_for(process.communicate(data), within)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return Ran(process.returncode or 0, out.decode(), err.decode())


def reader_env(home: Path, **values: str) -> dict[str, str]:
    """A reader's shell: this checkout's venv first on PATH (where `steward` is), a home of
    their own (never the developer's stored credential, ~/.curlrc or `.steward/`), and no
    STEWARD_* setting of the machine the tests run on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEWARD_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(home)
    env["COLUMNS"] = "120"  # the CLI's tables, as wide on every machine
    env["XDG_CONFIG_HOME"] = str(home / "config")
    env["STEWARD_DATA_DIR"] = str(home / "data")
    env.update(values)
    return env


def need(*commands: str) -> None:
    """The tools the docs' blocks call besides Steward's own (curl, jq): missing ones fail the
    test saying so, rather than as a block's "command not found"."""
    missing = [c for c in commands if shutil.which(c) is None]
    assert not missing, f"the docs' blocks need {missing} on PATH (Debian: apt-get install …)"


def checkout(home: Path) -> Path:
    """A working folder that looks like the reader's checkout for the docs' relative paths
    (``examples/…``), so the files the blocks write (reports, CSV) land in the test's folder and
    never in the repository."""
    folder = home / "checkout"
    folder.mkdir(exist_ok=True)
    link = folder / "examples"
    if not link.exists():
        link.symlink_to(ROOT / "examples")
    return folder


async def run_bash(
    script: str, env: dict[str, str], *, cwd: Path = ROOT, stdin: str | None = None
) -> Ran:
    """The script in bash with ``-euo pipefail``."""
    return await _run(["bash", "-euo", "pipefail", "-c", script], env, cwd, stdin, 60)


async def run_python(code: str, env: dict[str, str], *, cwd: Path = ROOT) -> Ran:
    return await _run([sys.executable, "-c", code], env, cwd, None, 60)


class Session:
    """A reader's terminal: one bash process (``-euo pipefail``) whose variables last from one
    block to the next, as when a reader runs a page's blocks in order. Between blocks the test
    may look at what changed; a failing command ends the session, and the block that ran it
    fails with what it wrote."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.cwd = cwd
        self.process: asyncio.subprocess.Process | None = None
        self.lines: dict[str, list[str]] = {"out": [], "err": []}
        self.changed = asyncio.Event()
        self.readers: list[asyncio.Task[None]] = []
        self.count = 0

    async def __aenter__(self) -> Session:
        self.process = await asyncio.create_subprocess_exec(
            *("bash", "--noprofile", "--norc", "-euo", "pipefail"),
            cwd=self.cwd,
            env=self.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # no terminal: a prompt reads the stdin given, never a tty
        )
        assert self.process.stdout and self.process.stderr
        self.readers = [
            asyncio.create_task(self._drain(self.process.stdout, "out")),
            asyncio.create_task(self._drain(self.process.stderr, "err")),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            assert self.process.stdin
            self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        await asyncio.gather(*self.readers)

    async def _drain(self, stream: asyncio.StreamReader, name: str) -> None:
        while line := await stream.readline():
            self.lines[name].append(line.decode(errors="replace"))
            self.changed.set()
        self.changed.set()

    async def run(self, code: str, *, stdin: str | None = None, within: float = 60) -> str:
        """Run one block (its stdin: ``stdin``, else nothing) and return what it printed."""
        assert self.process is not None and self.process.stdin is not None
        self.count += 1
        script = self.cwd.parent / f"block-{self.count}.sh"
        script.write_text(code)
        given = self.cwd.parent / f"block-{self.count}.stdin"
        given.write_text(stdin or "")
        done = f"::block {self.count} done::"
        start = {name: len(lines) for name, lines in self.lines.items()}
        mark = f"printf '\\n%s\\n' '{done}'"
        self.process.stdin.write(f"source {script} < {given}\n{mark}; {mark} >&2\n".encode())
        await self.process.stdin.drain()

        def since(name: str) -> list[str]:
            return self.lines[name][start[name] :]

        deadline = asyncio.get_running_loop().time() + within
        while True:
            self.changed.clear()
            ended = self.process.returncode is not None or all(r.done() for r in self.readers)
            if ended:
                await asyncio.gather(*self.readers)  # all it wrote before it ended
                break
            if all(f"{done}\n" in since(name) for name in ("out", "err")):
                break
            remaining = deadline - asyncio.get_running_loop().time()
            await asyncio.wait_for(self.changed.wait(), max(remaining, 0.01))
        out = "".join(since("out")).removesuffix(f"\n{done}\n")
        err = "".join(since("err")).removesuffix(f"\n{done}\n")
        assert f"{done}\n" in since("out"), (
            f"the block failed\n--- stderr\n{err}\n--- stdout\n{out}\n--- block\n{code}"
        )
        return out

    async def value(self, name: str) -> str:
        """A shell variable's value, as the reader would ``echo`` it."""
        return (await self.run(f'printf %s "${name}"')).strip()
