"""The approval service: requests, reviews, auto-approve policies, and the audit log."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from libs.common.db import Clock, utcnow
from libs.common.service import ServiceContext, ServiceSpec, create_service_app
from libs.common.settings import Settings
from services.approval import audit, domain
from services.approval.api import router
from services.approval.config import ApprovalConfig
from services.approval.events import HANDLERS
from services.approval.models import bus_tables

log = logging.getLogger("steward.approval")


async def _expire_forever(ctx: ServiceContext, clock: Clock, every: float) -> None:
    while True:
        try:
            expired = await domain.expire_due(ctx.sessionmaker, ctx.outbox, clock())
            if expired:
                log.info("pending requests expired", extra={"count": expired})
            await domain.measure_overdue(ctx.sessionmaker, clock())
        except Exception:
            log.exception("expiring requests failed; will retry")
        await asyncio.sleep(every)


async def _checkpoint_forever(ctx: ServiceContext, anchor: audit.Anchor, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        try:
            async with ctx.sessionmaker() as session:
                await anchor.checkpoint(session)
        except Exception:
            log.exception("checkpointing the audit chain failed; will retry")


def _session_info(settings: Settings) -> dict[str, Any]:
    return {audit.KEYS: audit.AuditKeys(settings.audit_secret)}


def make_spec(config: ApprovalConfig) -> ServiceSpec:
    @asynccontextmanager
    async def setup(ctx: ServiceContext, app: FastAPI) -> AsyncIterator[None]:
        app.state.approval_config = config
        clock: Clock = getattr(app.state, "clock", utcnow)
        app.state.clock = clock  # the API reads it too (``python -m`` builds the app from SPEC)
        keys = ctx.sessionmaker.kw["info"][audit.KEYS]
        anchor = audit.Anchor(keys, ctx.bus, ctx.settings.audit_checkpoint_path)
        app.state.audit_anchor = anchor
        ctx.spawn(_expire_forever(ctx, clock, config.expiry_poll_seconds), "expiry")
        ctx.spawn(_checkpoint_forever(ctx, anchor, config.checkpoint_seconds), "checkpoints")
        yield

    return ServiceSpec(
        name="approval",
        title="Steward approval",
        tables=bus_tables,
        routers=[router],
        handlers=HANDLERS,
        setup=setup,
        session_info=_session_info,
    )


SPEC = make_spec(ApprovalConfig())


def create_app(
    settings: Settings | None = None,
    *,
    config: ApprovalConfig | None = None,
    transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    clock: Clock | None = None,
) -> FastAPI:
    """``clock`` replaces the wall clock (tests move it past a request's due date and expiry)."""
    spec = make_spec(config) if config is not None else SPEC
    app = create_service_app(spec, settings, transports=transports)
    app.state.clock = clock or utcnow
    return app
