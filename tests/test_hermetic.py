"""The suite reads nothing outside the repository: a clone with nothing beside it must pass."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARENTS = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?\.parents\[(\d+)\]")


def test_no_test_climbs_out_of_the_repository() -> None:
    climbing = []
    for source in (ROOT / "tests").rglob("*.py"):
        for match in PARENTS.finditer(source.read_text()):
            target = source.resolve().parents[int(match.group(1))]
            if not target.is_relative_to(ROOT):
                climbing.append(f"{source.relative_to(ROOT)}: parents[{match.group(1)}]")
    assert climbing == []


def test_no_test_names_a_folder_beside_the_checkout() -> None:
    beside = [
        str(source.relative_to(ROOT))
        for source in (ROOT / "tests").rglob("*.py")
        if source.name != Path(__file__).name
        and re.search(r"""["']\.\./|/shared/fixtures""", source.read_text())
    ]
    assert beside == []
