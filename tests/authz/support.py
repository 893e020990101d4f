"""Helpers for authz tests: a clock the test moves, and authz (or any service) running on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import httpx
from fastapi import FastAPI

from libs.common.db import utcnow
from libs.common.settings import Settings
from tests.conftest import running


class ManualClock:
    """A clock that stands still until the test moves it.

    ``clock()`` is the wall time a service reads (``create_app(clock=clock)``),
    ``clock.monotonic()`` its monotonic seconds (``create_app(monotonic=clock.monotonic)``, for
    caches); ``advance`` moves both by the same amount. The wall time starts at the moment the
    clock is made, the monotonic one at 0.0, so whole seconds add up exactly.
    """

    def __init__(self) -> None:
        self.now = utcnow()
        self.seconds = 0.0

    def __call__(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return self.seconds

    def advance(self, by: timedelta) -> datetime:
        assert by >= timedelta(0), "a clock never goes back"
        self.now += by
        self.seconds += by.total_seconds()
        return self.now


async def clocked_authz(
    settings: Settings, clock: ManualClock, **overrides: object
) -> AsyncIterator[FastAPI]:
    """The authz service on ``clock`` (wall and monotonic), with ``overrides`` to its settings."""
    from services.authz.app import create_app

    configured = settings.model_copy(update=overrides)
    app = create_app(configured, clock=clock, monotonic=clock.monotonic)
    async for started in running(app):
        yield started


async def client_of(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://authz") as client:
        yield client
