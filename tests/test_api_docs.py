"""docs/api/ is what the services' code says today (``make docs`` rewrites it)."""

from __future__ import annotations

from scripts.api_docs import render


def test_the_api_reference_matches_the_services_openapi_documents() -> None:
    stale = [path.name for path, text in render().items() if path.read_text() != text]
    assert stale == [], f"run `make docs`: {stale} differ from the code"
