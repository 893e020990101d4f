"""The service factory: every service is built the same way, from a ``ServiceSpec``.

The lifespan is the composition root: it creates the engine, the bus, the outbox relay and
the consumers, hands them to the service's own setup, and tears them down in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from libs.common.auth import PrincipalDep
from libs.common.bus import Bus
from libs.common.clients import AuthzClient, CatalogClient, RemoteResolver
from libs.common.consumer import Consumer, Handler
from libs.common.db import make_engine, make_sessionmaker, transaction
from libs.common.errors import Conflict, install_error_handlers, problem_response
from libs.common.observability import (
    RequestContextMiddleware,
    configure_logging,
    configure_metrics,
    configure_tracing,
)
from libs.common.outbox import BusTables, Outbox
from libs.common.settings import Settings
from libs.common.uow import UnitOfWork


@dataclass
class ServiceContext:
    """What the lifespan built; reachable from routes as ``request.app.state.ctx``."""

    name: str
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    bus: Bus
    outbox: Outbox
    authz: AuthzClient
    catalog: CatalogClient
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def spawn(self, coro: Any, name: str) -> None:
        self.tasks.append(asyncio.create_task(coro, name=f"{self.name}-{name}"))


Setup = Callable[[ServiceContext, FastAPI], AbstractAsyncContextManager[None]]


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    title: str
    tables: BusTables
    routers: Sequence[APIRouter]
    handlers: Mapping[str, Handler] = field(default_factory=dict)
    setup: Setup | None = None
    # What every session carries in ``session.info`` (e.g. a key the event handlers need),
    # from the settings, before the first handler runs.
    session_info: Callable[[Settings], dict[str, Any]] | None = None


def create_service_app(
    spec: ServiceSpec,
    settings: Settings | None = None,
    *,
    transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
) -> FastAPI:
    """Build a service. ``transports`` lets tests route service-to-service calls in-process."""
    settings = settings or Settings()
    transports = transports or {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_tracing(spec.name, settings.otel_exporter_otlp_endpoint)
        configure_metrics(
            spec.name,
            settings.otel_exporter_otlp_endpoint,
            settings.otel_metric_export_interval_seconds,
        )
        engine = make_engine(settings.database_url_for(spec.name), schema=spec.name)
        bus = Bus.from_settings(settings, name=f"steward-{spec.name}")
        await bus.connect()
        ctx = ServiceContext(
            name=spec.name,
            settings=settings,
            engine=engine,
            sessionmaker=make_sessionmaker(
                engine, info=spec.session_info(settings) if spec.session_info else None
            ),
            bus=bus,
            outbox=Outbox(spec.tables.outbox, spec.name),
            authz=AuthzClient(settings.authz_url, transport=transports.get("authz")),
            catalog=CatalogClient(settings.catalog_url, transport=transports.get("catalog")),
        )
        app.state.ctx = ctx
        # Callers are resolved through authz unless the service's setup knows better.
        app.state.principal_resolver = RemoteResolver(ctx.authz)
        ctx.spawn(
            ctx.outbox.run_relay(ctx.sessionmaker, bus, settings.outbox_poll_seconds), "relay"
        )
        if spec.handlers:
            consumer = Consumer(
                bus=bus,
                sessionmaker=ctx.sessionmaker,
                inbox=spec.tables.inbox,
                durable=spec.name,
                handlers=spec.handlers,
            )
            ctx.spawn(consumer.run(), "consumer")
        try:
            if spec.setup is not None:
                async with spec.setup(ctx, app):
                    if getattr(app.state, "settle_heap", False):
                        settle_heap()
                    yield
            else:
                if getattr(app.state, "settle_heap", False):
                    settle_heap()
                yield
        finally:
            for task in ctx.tasks:
                task.cancel()
            await asyncio.gather(*ctx.tasks, return_exceptions=True)
            # One last relay so events committed during shutdown are not left waiting.
            if bus.connected:
                with contextlib.suppress(Exception):
                    await ctx.outbox.relay_once(ctx.sessionmaker, bus)
            await bus.close()
            await ctx.authz.aclose()
            await ctx.catalog.aclose()
            await engine.dispose()

    app = FastAPI(title=spec.title, version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)

    async def on_integrity_error(request: Request, exc: Exception) -> JSONResponse:
        return problem_response(Conflict("conflicts with existing data; nothing changed"), request)

    app.add_exception_handler(IntegrityError, on_integrity_error)
    app.add_middleware(RequestContextMiddleware, service=spec.name)
    app.include_router(health_router())
    for router in spec.routers:
        app.include_router(router)
    return app


def health_router() -> APIRouter:
    """Public probes and metrics: the only routes that need no credential."""
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        ctx: ServiceContext = request.app.state.ctx
        checks = {"database": "ok", "nats": "ok" if ctx.bus.connected else "unreachable"}
        try:
            async with ctx.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    @router.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router


def context(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async for session in transaction(context(request).sessionmaker):
        yield session


# scope="function": the transaction commits before the response is sent, so a failed commit
# becomes an error response instead of a 2xx for a change that never happened.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
ContextDep = Annotated[ServiceContext, Depends(context)]


async def get_uow(request: Request, session: SessionDep, principal: PrincipalDep) -> UnitOfWork:
    return UnitOfWork(session=session, outbox=context(request).outbox, actor=principal.subject)


UnitOfWorkDep = Annotated[UnitOfWork, Depends(get_uow)]


def settle_heap() -> None:
    """What start-up allocated lives for the process: move it out of the collector's sight, and
    collect the young generation less often, so serving (a metering batch of 1,000 events, a
    gateway request) does not pay for full scans of long-lived objects. Once per process, after
    start-up; not in tests, where many apps share one process."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def run_service(spec: ServiceSpec) -> None:
    """``python -m services.<name>``: serve with uvicorn (uvloop and httptools when installed)."""
    import uvicorn

    settings = Settings()
    configure_logging(settings.log_level)
    app = create_service_app(spec, settings)
    app.state.settle_heap = True  # a process of its own: settle its heap once started
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port_for(spec.name),
        log_config=None,
        access_log=False,
        proxy_headers=False,
    )
