"""The authz service: identities, projects, roles, API keys, entitlements."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from libs.common.db import Clock, utcnow
from libs.common.oidc import Monotonic, verifier_from_settings
from libs.common.service import ServiceContext, ServiceSpec, create_service_app
from libs.common.settings import Settings
from services.authz.api import router
from services.authz.events import HANDLERS
from services.authz.models import bus_tables
from services.authz.principals import AuthzResolver, LastUsed


@asynccontextmanager
async def setup(ctx: ServiceContext, app: FastAPI) -> AsyncIterator[None]:
    clock: Clock = getattr(app.state, "clock", utcnow)
    app.state.clock = clock  # the API reads it too (``python -m`` builds the app from SPEC)
    monotonic: Monotonic = getattr(app.state, "monotonic", time.monotonic)
    async with httpx.AsyncClient(timeout=5.0) as http:
        last_used = LastUsed(clock)
        app.state.principal_resolver = AuthzResolver(
            ctx.sessionmaker,
            ctx.settings.pepper,
            verifier_from_settings(ctx.settings, http, monotonic=monotonic),
            last_used,
            clock,
        )
        ctx.spawn(
            last_used.run(ctx.sessionmaker, ctx.settings.key_last_used_flush_seconds), "last-used"
        )
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await last_used.flush(ctx.sessionmaker)


SPEC = ServiceSpec(
    name="authz",
    title="Steward authz",
    tables=bus_tables,
    routers=[router],
    handlers=HANDLERS,
    setup=setup,
)


def create_app(
    settings: Settings | None = None,
    *,
    clock: Clock | None = None,
    monotonic: Monotonic | None = None,
) -> FastAPI:
    """``clock`` replaces the wall clock (key expiry, rotation grace, revocation and last-use
    times); ``monotonic`` replaces ``time.monotonic`` for the OIDC JWKS cache. Tests move them
    instead of waiting."""
    app = create_service_app(SPEC, settings)
    app.state.clock = clock or utcnow
    app.state.monotonic = monotonic or time.monotonic
    return app


async def bootstrap(settings: Settings) -> str | None:
    """First start: the platform admin and its key; every start: the configured service keys.

    Returns a newly minted admin key (to show once), or None. Runs before the services start
    (``steward up``/``steward bootstrap``); its events wait in the outbox until authz relays them.
    """
    from libs.common.db import make_engine, make_sessionmaker, transaction
    from libs.common.outbox import Outbox
    from libs.common.uow import UnitOfWork
    from services.authz.domain import bootstrap as bootstrap_admin
    from services.authz.domain import install_service_key

    engine = make_engine(settings.database_url_for("authz"), schema="authz")
    configured = settings.bootstrap_api_key
    service_keys = {
        "gateway": settings.gateway_api_key,
        "inference": settings.inference_api_key,
    }
    try:
        async for session in transaction(make_sessionmaker(engine)):
            uow = UnitOfWork(session, Outbox(bus_tables.outbox, "authz"), actor="steward-bootstrap")
            now = utcnow()
            issued = await bootstrap_admin(
                uow,
                settings.pepper,
                configured.get_secret_value() if configured else None,
                now=now,
            )
            for service, key in service_keys.items():
                if key is not None:
                    await install_service_key(
                        uow, settings.pepper, service, key.get_secret_value(), now=now
                    )
    finally:
        await engine.dispose()
    return issued.secret if issued is not None and configured is None else None


async def recover(settings: Settings, owner: str, actor: str) -> str:
    """``steward admin recover``: mint a platform-admin key straight into the database."""
    from libs.common.db import make_engine, make_sessionmaker, transaction
    from libs.common.outbox import Outbox
    from libs.common.uow import UnitOfWork
    from services.authz.domain import recover as recover_key

    engine = make_engine(settings.database_url_for("authz"), schema="authz")
    try:
        async for session in transaction(make_sessionmaker(engine)):
            uow = UnitOfWork(session, Outbox(bus_tables.outbox, "authz"), actor=actor)
            issued = await recover_key(uow, settings.pepper, owner, now=utcnow())
    finally:
        await engine.dispose()
    return issued.secret
