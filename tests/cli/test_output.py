"""Tables for people: ids are printed whole, however narrow the terminal (they are pasted into
the next command), and figures are rounded alike."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cli.output import Format, emit

ID = "01a23ad8-584d-7108-a1b2-c3d4e5f60718"


@pytest.mark.parametrize("columns", ["60", "100"])
def test_ids_stay_whole_in_a_narrow_table(
    columns: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", columns)
    row = {
        "id": ID,
        "request_id": ID.replace("1", "2"),
        "description": "a long description that has to give way " * 3,
        "cost": 0.449908194,
        "rate": 0.18,
        "tiny": 0.000123,
    }
    emit([row], Format.table)
    out = capsys.readouterr().out
    assert ID in out and ID.replace("1", "2") in out
    assert "0.45" in out and "0.18" in out and "0.00012" in out
    assert "0.449908194" not in out


def test_the_cli_starts_without_the_database_stack() -> None:
    """Only ``up`` and ``migrate`` need alembic and SQLAlchemy, and only commands that call a
    service need httpx and the settings (most of the start-up): ``steward --help`` and a typo
    must not pay for them (the CLI starts in about 0.2 s instead of 0.45 s)."""
    heavy = "('alembic', 'sqlalchemy', 'httpx', 'pydantic_settings')"
    probe = f"import sys, cli.main; print(sorted(m for m in {heavy} if m in sys.modules))"
    found = subprocess.run(  # noqa: S603 - this interpreter, a fixed program
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[]"
