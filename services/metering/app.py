"""The metering service: usage ingest, usage reports, quotas, prices, Prometheus GenAI metrics,
and the GPU-hours of dedicated endpoints against their approved plans."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from fastapi import FastAPI

from libs.common.consumer import BatchConsumer, Consumer
from libs.common.db import Clock, utcnow
from libs.common.service import ServiceContext, ServiceSpec, create_service_app
from libs.common.settings import Settings
from services.metering.api import router
from services.metering.background import USAGE_DURABLE, PlanWatch, QuotaPublisher, Retention
from services.metering.events import control_handlers, usage_handlers
from services.metering.ingest import Ingest
from services.metering.models import bus_tables
from services.metering.webhooks import WebhookSender


@dataclass
class Metering:
    """What the lifespan built besides the service context (``app.state.metering``)."""

    clock: Clock
    ingest: Ingest
    usage: BatchConsumer
    publisher: QuotaPublisher
    webhooks: WebhookSender
    retention: Retention
    plans: PlanWatch


@asynccontextmanager
async def setup(ctx: ServiceContext, app: FastAPI) -> AsyncIterator[None]:
    settings = ctx.settings
    clock: Clock = getattr(app.state, "clock", utcnow)
    app.state.clock = clock  # the API reads it too (``python -m`` builds the app from SPEC)
    ingest = Ingest(ctx.outbox, settings, clock)
    usage = BatchConsumer(
        bus=ctx.bus,
        sessionmaker=ctx.sessionmaker,
        inbox=bus_tables.inbox,
        durable=USAGE_DURABLE,
        handlers=usage_handlers(ingest),
        batch=settings.metering_batch_size,
        ack_wait=settings.metering_ack_wait_seconds,
        clock=clock,
    )
    control = Consumer(
        bus=ctx.bus,
        sessionmaker=ctx.sessionmaker,
        inbox=bus_tables.inbox,
        durable="metering",
        handlers=control_handlers(settings, clock),
    )
    publisher = QuotaPublisher(
        ingest,
        ctx.sessionmaker,
        ctx.bus,
        clock,
        lambda: usage.watermark,
        settings.metering_quota_publish_seconds,
    )
    retention = Retention(ctx.sessionmaker, settings, clock)
    plans = PlanWatch(ctx.sessionmaker, settings, clock)
    async with httpx.AsyncClient(follow_redirects=False) as http:
        webhooks = WebhookSender(ctx.sessionmaker, http, settings, clock)
        app.state.metering = Metering(clock, ingest, usage, publisher, webhooks, retention, plans)
        tasks = [
            asyncio.create_task(usage.run(), name="metering-usage"),
            asyncio.create_task(control.run(), name="metering-control"),
            asyncio.create_task(publisher.run(), name="metering-quota-publisher"),
            asyncio.create_task(webhooks.run(), name="metering-webhooks"),
            asyncio.create_task(retention.run(), name="metering-retention"),
            asyncio.create_task(plans.run(), name="metering-plan-watch"),
        ]
        try:
            yield
        finally:
            # Stopped here, before the HTTP client and the bus they use are closed.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


SPEC = ServiceSpec(
    name="metering",
    title="Steward metering",
    tables=bus_tables,
    routers=[router],
    setup=setup,
)


def create_app(
    settings: Settings | None = None,
    *,
    transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    clock: Clock | None = None,
) -> FastAPI:
    """``clock`` replaces the wall clock (tests move it past a window's end)."""
    app = create_service_app(SPEC, settings, transports=transports)
    app.state.clock = clock or utcnow
    return app
