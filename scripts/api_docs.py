"""Write the API reference: each service's OpenAPI document and a Markdown index of its routes.

Run ``make docs`` after changing an API; a test fails while docs/api/ is out of date.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api"
SERVICES = ("authz", "catalog", "approval", "inference", "metering")
METHODS = ("get", "post", "put", "patch", "delete")


def openapi(service: str) -> dict[str, Any]:
    module = importlib.import_module(f"services.{service}.app")
    document: dict[str, Any] = module.create_app().openapi()
    return document


def index(documents: dict[str, dict[str, Any]]) -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the services' OpenAPI documents by `make docs` (do not edit by hand).",
        "Every service also serves its document at `/openapi.json` and an explorer at `/docs`;",
        "through the gateway, prefix the paths with `/api/<service>`.",
        "",
    ]
    for service, document in documents.items():
        lines += [f"## {service}", "", f"[`{service}.json`]({service}.json)", ""]
        lines += ["| method | path | summary |", "|---|---|---|"]
        for path, operations in document["paths"].items():
            for method in METHODS:
                if method in operations:
                    summary = operations[method].get("summary", "")
                    lines.append(f"| {method.upper()} | `{path}` | {summary} |")
        lines.append("")
    return "\n".join(lines)


def render() -> dict[Path, str]:
    documents = {s: openapi(s) for s in SERVICES}
    files = {
        OUT / f"{s}.json": json.dumps(d, indent=2, sort_keys=True) + "\n"
        for s, d in documents.items()
    }
    files[OUT / "README.md"] = index(documents)
    return files


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for path, text in render().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
