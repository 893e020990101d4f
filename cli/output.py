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
    table = Table(*keys, show_lines=False, header_style="bold")
    for row in rows:
        table.add_row(*(_cell(row.get(k)) for k in keys))
    console().print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | dict):
        return json.dumps(value, default=str) if value else "-"
    return str(value)
