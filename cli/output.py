"""Tables for people, JSON for scripts: every command takes ``--output table|json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table


def console() -> Console:
    """Standard output, made per use: its width comes from the terminal (or ``COLUMNS``) of this
    invocation, not of whatever first imported the module."""
    return Console()


def errors() -> Console:
    return Console(stderr=True)


# Values up to this long are never folded across lines.
SHORT = 12


class Format(StrEnum):
    table = "table"
    json = "json"


OutputOpt = Annotated[
    Format, typer.Option("--output", "-o", help="table for people, json for scripts")
]


def emit(data: Any, output: Format, columns: Sequence[str] | None = None) -> None:
    """Print ``data`` (a dict, or a list of dicts) in the chosen format."""
    if output is Format.json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    rows = data if isinstance(data, list) else [data]
    if not rows:
        console().print("(none)")
        return
    keys = list(columns or rows[0].keys())
    cells = [[_cell(row.get(k)) for k in keys] for row in rows]
    table = Table(show_lines=False, header_style="bold")
    needed = 1
    for i, key in enumerate(keys):
        longest = max(len(key), *(len(c[i]) for c in cells))
        if _is_id(key):
            # Whole, so it can be pasted into the next command: other columns wrap instead.
            table.add_column(key, no_wrap=True, min_width=longest)
            needed += longest + 3
        else:
            # Short values (figures, names) whole too; long text folds.
            width = min(longest, SHORT)
            table.add_column(key, overflow="fold", min_width=width)
            needed += width + 3
    for row_cells in cells:
        table.add_row(*row_cells)
    out = console()
    # A terminal too narrow for the ids gets a wider table (its lines wrap), never a cut id.
    (Console(width=needed) if needed > out.width else out).print(table)


def _is_id(key: str) -> bool:
    return key == "id" or key.endswith("_id")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2g}"
    if isinstance(value, list | dict):
        return json.dumps(value, default=str) if value else "-"
    return str(value)
