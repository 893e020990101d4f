"""Kong's DB-less admin API on the gateway's admin listener."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gateway.app import Gateway


def kong_router(gateway: Gateway, admin: Any) -> APIRouter:
    return APIRouter(tags=["kong"])
