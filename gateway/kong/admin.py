"""Kong's DB-less admin API on the gateway's admin listener: ``POST /config`` to replace the
declarative config, ``GET /config`` and the entity listings to read it back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway.kong.config import decode, save_state
from gateway.kong.runtime import KongRuntime
from gateway.kong.schema import InvalidConfig, KongConfig, parse

if TYPE_CHECKING:
    from gateway.state import Gateway

KONG_VERSION = "3.4.0"
LISTED = {
    "services": "services",
    "routes": "routes",
    "consumers": "consumers",
    "plugins": "plugins",
    "key-auths": "keyauth_credentials",
    "acls": "acls",
    "jwts": "jwt_secrets",
}
CHILDREN = {
    "services": {"routes": "service", "plugins": "service"},
    "routes": {"plugins": "route"},
    "consumers": {
        "plugins": "consumer",
        "key-auth": "consumer",
        "acls": "consumer",
        "jwt": "consumer",
    },
}
CHILD_KIND = {
    "routes": "routes",
    "plugins": "plugins",
    "key-auth": "keyauth_credentials",
    "acls": "acls",
    "jwt": "jwt_secrets",
}


def _not_found() -> JSONResponse:
    return JSONResponse({"message": "Not found"}, status_code=404)


async def _body_config(request: Request) -> Any:
    """The config in a request: JSON or YAML body, ``{"config": "<yaml>"}``, or a form field."""
    kind = request.headers.get("content-type", "")
    if kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()
        field = form.get("config")
        if field is None:
            raise InvalidConfig({"config": "required field missing"})
        raw = await field.read() if hasattr(field, "read") else str(field)
        return decode(raw)
    data = decode(await request.body())
    if isinstance(data, dict) and set(data) == {"config"} and isinstance(data["config"], str):
        return decode(data["config"])
    return data


def kong_router(gateway: Gateway, admin: Any) -> APIRouter:
    """``admin`` is the dependency (``Depends(...)``) that every route here requires."""
    router = APIRouter(tags=["kong"], dependencies=[admin])

    def current() -> KongConfig | None:
        return gateway.kong.config if gateway.kong is not None else None

    @router.get("/")
    async def node() -> dict[str, Any]:
        """What Kong's admin root says, so tools that check the node see a DB-less Kong 3."""
        return {
            "version": KONG_VERSION,
            "tagline": "Welcome to kong",
            "node_id": "steward-gateway",
            "hostname": "steward-gateway",
            "configuration": {"database": "off", "router_flavor": "traditional_compatible"},
            "plugins": {
                "available_on_server": {
                    n: True for n in ("key-auth", "jwt", "acl", "rate-limiting", "steward-quota")
                },
                "enabled_in_cluster": sorted(
                    {p["name"] for p in (current() or _empty())["plugins"]}
                ),
            },
        }

    @router.post("/config", status_code=201)
    async def post_config(request: Request) -> Response:
        """Replace the whole declarative config (Kong DB-less); nothing changes if it is invalid."""
        try:
            config = parse(await _body_config(request))
        except InvalidConfig as exc:
            return JSONResponse(exc.body(), status_code=400)
        runtime = KongRuntime(config)
        save_state(config, gateway.settings.data_dir / "gateway")
        gateway.kong = runtime
        return JSONResponse(
            {kind: {e["id"]: e for e in items} for kind, items in config.entities.items()},
            status_code=201,
        )

    @router.get("/config")
    async def get_config() -> dict[str, str]:
        import yaml

        config = current()
        document = config.to_declarative() if config else {"_format_version": "3.0"}
        return {"config": yaml.safe_dump(document, sort_keys=False)}

    @router.get("/{collection}")
    async def listing(collection: str) -> Response:
        kind = LISTED.get(collection)
        if kind is None:
            return _not_found()
        return JSONResponse({"data": (current() or _empty())[kind], "next": None})

    @router.get("/{collection}/{key}")
    async def one(collection: str, key: str) -> Response:
        kind = LISTED.get(collection)
        config = current()
        found = config.find(kind, key) if kind and config else None
        return JSONResponse(found) if found is not None else _not_found()

    @router.get("/{collection}/{key}/{child}")
    async def children(
        collection: str,
        key: str,
        child: str,
    ) -> Response:
        config = current()
        parent_field = CHILDREN.get(collection, {}).get(child)
        kind = LISTED.get(collection)
        parent = config.find(kind, key) if kind and config and parent_field else None
        if parent is None or config is None or parent_field is None:
            return _not_found()
        items = [
            e
            for e in config[CHILD_KIND[child]]
            if (e.get(parent_field) or {}).get("id") == parent["id"]
        ]
        return JSONResponse({"data": items, "next": None})

    return router


def _empty() -> KongConfig:
    return KongConfig({k: [] for k in LISTED.values()}, "3.0")
