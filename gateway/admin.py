"""The admin listener: probes and metrics (public), the replica status, and Kong's DB-less
admin API (``POST /config``, ``GET /services|/routes|/consumers|/plugins``).

Unlike Kong's, every admin route but the probes needs a platform-admin credential: the admin
API changes who may reach what, so it is never open just because it listens on localhost.
"""

from typing import Annotated, Any

import yaml
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.authn import AuthFailure
from gateway.kong.export import export_kong
from gateway.state import Gateway
from libs.common.auth import Principal
from libs.common.errors import Forbidden, Unauthorized, Unprocessable, install_error_handlers
from libs.common.events.usage import UsageRecorded
from libs.common.observability import RequestContextMiddleware


def create_admin_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="Steward gateway admin", version="0.1.0")
    app.state.gateway = gateway
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, service="gateway-admin")

    async def platform_admin(request: Request) -> Principal:
        try:
            principal = await gateway.authn.principal(request.scope)
        except AuthFailure as exc:
            if exc.status == 401:
                raise Unauthorized(exc.message) from exc
            raise Forbidden(exc.message) from exc
        if not principal.platform_admin:
            raise Forbidden("the gateway admin API needs a platform-admin credential")
        return principal

    Admin = Annotated[Principal, Depends(platform_admin)]

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        ready, body = gateway.readiness()
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"])
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/status", tags=["gateway"])
    async def status(principal: Admin) -> dict[str, Any]:
        """Replica freshness, usage queue and spool, routes: what an operator checks first."""
        _, body = gateway.readiness()
        body["routes"] = {
            "models": sorted(gateway.routes.models),
            "mcp_servers": sorted(gateway.routes.mcp),
        }
        return body

    @app.get("/steward/export", tags=["gateway"])
    async def export(principal: Admin, format: str = "kong") -> PlainTextResponse:
        """The live policy as a kong.yml (``steward gateway export --format kong``)."""
        if format != "kong":
            raise Unprocessable("the only export format is 'kong'")
        document = export_kong(
            gateway.routes,
            gateway.auth,
            gateway.catalog,
            gateway.kong.config if gateway.kong is not None else None,
        )
        return PlainTextResponse(
            yaml.safe_dump(document, sort_keys=False), media_type="application/yaml"
        )

    @app.post("/steward/usage", status_code=202, tags=["gateway"])
    async def usage_intake(body: list[UsageRecorded], principal: Admin) -> dict[str, int]:
        """Usage from Steward's plugin on a real Kong: queued like the gateway's own."""
        for payload in body:
            gateway.usage.record(payload)
        return {"accepted": len(body)}

    from gateway.kong.admin import kong_router

    app.include_router(kong_router(gateway, Depends(platform_admin)))
    return app
