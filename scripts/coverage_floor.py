"""Hold the test run to its coverage floors, reading the data pytest-cov left in ``.coverage``.

- the whole code base: at least 90 % of lines;
- ``cli/``: at least 80 %;
- the Kong plugin's ``Plugin`` class (what real Kong runs, through its plugin server): every method
  executed at least once.

Prints a line per floor and exits non-zero when one is missed.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import coverage

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"": 90.0, "cli/": 80.0}
PLUGIN = ROOT / "gateway" / "kong" / "steward_quota.py"


def percent(data: coverage.CoverageData, cov: coverage.Coverage, prefix: str) -> float:
    run = missed = 0
    for name in data.measured_files():
        relative = Path(name).resolve().relative_to(ROOT).as_posix()
        if not relative.startswith(prefix):
            continue
        _, statements, _, missing, _ = cov.analysis2(name)
        run += len(statements)
        missed += len(missing)
    return 100.0 * (run - missed) / run if run else 0.0


def plugin_methods_missed(data: coverage.CoverageData) -> list[str]:
    executed = set(data.lines(str(PLUGIN)) or [])
    tree = ast.parse(PLUGIN.read_text())
    [plugin] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Plugin"]
    missed = []
    for method in plugin.body:
        if isinstance(method, ast.FunctionDef):
            body = range(method.body[0].lineno, (method.end_lineno or method.lineno) + 1)
            if not executed.intersection(body):
                missed.append(method.name)
    return missed


def main() -> int:
    cov = coverage.Coverage(data_file=str(ROOT / ".coverage"))
    cov.load()
    data = cov.get_data()
    failed = False
    for prefix, floor in FLOORS.items():
        got = percent(data, cov, prefix)
        ok = got >= floor
        failed |= not ok
        print(
            f"coverage {prefix or 'total'}: {got:.1f}% (floor {floor:.0f}%) {'ok' if ok else 'LOW'}"
        )
    missed = plugin_methods_missed(data)
    failed |= bool(missed)
    verdict = f"never run: {', '.join(missed)}" if missed else "every method run"
    print(f"Kong plugin's Plugin class: {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
