"""The services' logs say what happened to them, not every HTTP request they made: a local
endpoint's health checks every few seconds once filled most of the inference log."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest

from libs.common.observability import configure_logging
from tests.helpers import serve


@pytest.fixture
def restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    loggers = {n: logging.getLogger(n).level for n in ("httpx", "httpcore", "steward.test")}
    yield
    root.handlers[:], root.level = handlers, level
    for name, old in loggers.items():
        logging.getLogger(name).setLevel(old)


async def test_outgoing_requests_are_not_logged_but_the_services_own_lines_are(
    restored: None, capfd: pytest.CaptureFixture[str]
) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def health(_: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    configure_logging("INFO")
    app = Starlette(routes=[Route("/health", health)])
    async with serve(app) as url, httpx.AsyncClient() as http:
        assert (await http.get(url + "/health")).status_code == 200
    logging.getLogger("steward.test").info("endpoint ready")
    err = capfd.readouterr().err
    assert "endpoint ready" in err
    assert "/health" not in err
