"""Metering fixtures: the service on the session's PostgreSQL and NATS, a clock tests can move,
and a bus to publish usage events as the gateway does."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI

from libs.common.bus import Bus
from libs.common.db import utcnow
from libs.common.settings import Settings
from tests.conftest import running


class Clock:
    """Wall time plus an offset a test may move forward (and the fixture puts back)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return utcnow() + self.offset

    def travel(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@pytest.fixture(scope="module")
def metering_clock() -> Clock:
    return Clock()


@pytest.fixture
def clock(metering_clock: Clock) -> Iterator[Clock]:
    """The metering app's clock, back to wall time after the test."""
    yield metering_clock
    metering_clock.offset = timedelta()


@pytest.fixture(scope="module")
def metering_settings(settings: Settings) -> Settings:
    """Faster cadences than production, so tests wait milliseconds rather than seconds."""
    return settings.model_copy(
        update={
            "metering_quota_publish_seconds": 0.1,
            "metering_webhook_retry_seconds": 0.1,
            "metering_webhook_timeout_seconds": 2.0,
            "metering_plan_check_seconds": 0.2,
        }
    )


@pytest.fixture(scope="module")
async def metering_app(
    metering_settings: Settings, authz_app: FastAPI, metering_clock: Clock
) -> AsyncIterator[FastAPI]:
    from services.metering.app import create_app

    app = create_app(
        metering_settings,
        transports={"authz": httpx.ASGITransport(app=authz_app)},
        clock=metering_clock,
    )
    async for started in running(app):
        yield started


@pytest.fixture(scope="module")
async def metering(metering_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=metering_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://metering") as client:
        yield client


@pytest.fixture(scope="module")
async def gateway_bus(settings: Settings) -> AsyncIterator[Bus]:
    """Publishes as the gateway does (a connection of its own)."""
    bus = Bus(settings.nats_url, settings.event_namespace, name="test-gateway")
    await bus.connect(wait=True)
    yield bus
    await bus.close()
