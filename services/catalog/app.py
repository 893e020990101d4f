"""The catalog service: models and MCP servers, their versions and lifecycle, imports."""

from __future__ import annotations

from collections.abc import Mapping

import httpx
from fastapi import FastAPI

from libs.common.service import ServiceSpec, create_service_app
from libs.common.settings import Settings
from services.catalog.api import router
from services.catalog.events import HANDLERS
from services.catalog.models import bus_tables

SPEC = ServiceSpec(
    name="catalog",
    title="Steward catalog",
    tables=bus_tables,
    routers=[router],
    handlers=HANDLERS,
)


def create_app(
    settings: Settings | None = None,
    *,
    transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
) -> FastAPI:
    return create_service_app(SPEC, settings, transports=transports)
