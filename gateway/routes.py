"""The route table: which upstream serves a model name or an MCP server.

Endpoint routes come from the inference service (its ``GET /v1/routes`` snapshot, then
``inference.endpoint.*`` events: an endpoint is routed iff its latest state is ``ready``): a
model's under its route name at ``/v1``, an MCP server's (its package, run by inference) under its
route name at ``/mcp/<route name>/``. Routes may
also be declared in a YAML or JSON file (``STEWARD_GATEWAY_ROUTES_FILE``), for upstreams Steward
does not provision::

    models:
      - name: llama-3-8b            # what clients put in "model"
        upstream: http://10.0.0.5:8000/v1
        asset: meta/llama-3-8b      # catalog asset (default: name)
        version: "1.0"              # catalog version (default: the newest approved one)
    mcp_servers:
      - name: github
        upstream: http://127.0.0.1:9100/mcp
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from libs.common.events.catalog import VersionState
from libs.common.events.inference import EndpointState
from libs.common.names import ASSET_PATTERN

NAME_PATTERN = ASSET_PATTERN
MAX_NAME_SEGMENTS = 4


class _Route(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    upstream: str
    asset: str | None = Field(default=None, pattern=NAME_PATTERN)
    version: str | None = None
    # Sent upstream as ``Authorization: Bearer`` (the client's own credential never is).
    api_key: SecretStr | None = None
    # A tenant or a publisher named the upstream (an external endpoint, an MCP server's remote):
    # the address policy checks each connection. Routes the operator declared, and endpoints
    # Steward runs, are trusted.
    guarded: bool = False

    @field_validator("upstream")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @property
    def asset_name(self) -> str:
        return self.asset or self.name

    def visible_to(self, project: str) -> bool:
        return True


class _EndpointRoute(_Route):
    # An inference endpoint: the project that owns it, and who else may call it.
    project: str | None = None
    exposure: Literal["project", "internal", "public"] = "public"

    def visible_to(self, project: str) -> bool:
        """A project-exposed endpoint serves its own project only."""
        return self.exposure != "project" or self.project in (None, project)


class ModelRoute(_EndpointRoute):
    # The model name the upstream knows, when it differs from the public one.
    upstream_model: str | None = None
    # Replicas the gateway balances (gateway/balance.py); empty: ``upstream`` alone.
    upstreams: tuple[str, ...] = ()

    @property
    def targets(self) -> tuple[str, ...]:
        return self.upstreams or (self.upstream,)

    # Fernet token of the upstream credential (opened only when a request is sent).
    sealed_api_key: str | None = None

    max_tokens: int | None = Field(default=None, gt=0)
    # Overrides STEWARD_GATEWAY_UPSTREAM_READ_TIMEOUT_SECONDS for this model.
    timeout_seconds: float | None = Field(default=None, gt=0)


class McpRoute(_EndpointRoute):
    """An MCP server: declared, a catalog version's remote, or an endpoint running its package."""


class RoutesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelRoute] = []
    mcp_servers: list[McpRoute] = []


@dataclass(frozen=True)
class Starting:
    """A model endpoint being provisioned: its route name, who may call it, what it serves."""

    name: str
    project: str
    exposure: str
    asset: str
    version: str


class RouteTable:
    """Declared routes plus inference endpoints and the catalog's MCP servers; ``models`` and
    ``mcp`` are what the request path reads."""

    def __init__(self) -> None:
        self.models: dict[str, ModelRoute] = {}
        self.mcp: dict[str, McpRoute] = {}
        self._declared: dict[str, ModelRoute] = {}
        self._declared_mcp: dict[str, McpRoute] = {}
        self._endpoints: dict[str, ModelRoute] = {}  # endpoint id → route
        self._endpoint_mcp: dict[str, McpRoute] = {}  # endpoint id → route
        self._catalog_mcp: dict[str, McpRoute] = {}  # asset name → route
        # Model endpoints being provisioned (first started, or started again by a new inference
        # leader): not routed, but known, so a caller hears "not ready yet", not "no such model".
        self._starting: dict[str, Starting] = {}  # endpoint id → what it will serve

    def install(self, routes: RoutesFile) -> None:
        self._declared = {r.name: r for r in routes.models}
        self._declared_mcp = {r.name: r for r in routes.mcp_servers}
        self._rebuild()

    def _rebuild(self) -> None:
        # A declared route keeps its name even if an endpoint or the catalog claims it: the
        # operator said so.
        self.models = {**{r.name: r for r in self._endpoints.values()}, **self._declared}
        self.mcp = {
            **self._catalog_mcp,
            **{r.name: r for r in self._endpoint_mcp.values()},
            **self._declared_mcp,
        }

    def catalog_servers(self, versions: Iterable[VersionState]) -> None:
        """Route every MCP server whose newest approved version has a remote, at that remote:
        a route appears when such a version is approved and goes when it is revoked."""
        newest: dict[str, VersionState] = {}
        for v in versions:
            if v.asset_kind != "mcp_server" or v.status != "approved":
                continue
            if v.asset_name not in newest or v.version_id > newest[v.asset_name].version_id:
                newest[v.asset_name] = v
        routes: dict[str, McpRoute] = {}
        for name, v in newest.items():
            if v.remote is None:
                continue
            try:
                routes[name] = McpRoute(
                    name=name, upstream=v.remote, version=v.version, guarded=True
                )
            except ValueError:  # a remote that is no http(s) URL: not routable
                continue
        self._catalog_mcp = routes
        self._rebuild()

    def mcp_route(self, path: str) -> tuple[McpRoute, str] | None:
        """The MCP route a ``/mcp/…`` path names, and the rest of the path. Catalog names may
        hold slashes (``io.github.acme/weather``): the longest name that matches wins."""
        parts = path.split("/", MAX_NAME_SEGMENTS)
        for i in range(min(len(parts), MAX_NAME_SEGMENTS), 0, -1):
            route = self.mcp.get("/".join(parts[:i]))
            if route is not None:
                return route, "/".join(parts[i:])
        return None

    def replace_endpoints(self, states: Iterable[EndpointState]) -> None:
        self._endpoints, self._endpoint_mcp = {}, {}
        for state in states:
            self._apply(state)
        self._rebuild()

    def apply_endpoint(self, state: EndpointState) -> None:
        """Route the endpoint iff this (its latest) state is ``ready`` with an upstream URL."""
        self._apply(state)
        self._rebuild()

    def starting(self, name: str, project: str) -> Starting | None:
        """The model endpoint ``name`` that ``project`` may call, being provisioned: not routed
        yet (None: there is none)."""
        for s in self._starting.values():
            if s.name == name and (s.exposure != "project" or s.project == project):
                return s
        return None

    def _apply(self, state: EndpointState) -> None:
        self._starting.pop(state.endpoint_id, None)
        if state.status != "ready" or not state.upstream_url:
            self._endpoints.pop(state.endpoint_id, None)
            self._endpoint_mcp.pop(state.endpoint_id, None)
            if state.status == "provisioning" and state.asset_kind != "mcp_server":
                self._starting[state.endpoint_id] = Starting(
                    state.route_name,
                    state.project,
                    state.network_exposure,
                    state.asset_name,
                    state.version,
                )
            return
        if state.asset_kind == "mcp_server":
            self._endpoint_mcp[state.endpoint_id] = McpRoute(
                name=state.route_name,
                upstream=state.upstream_url,
                asset=state.asset_name,
                version=state.version,
                project=state.project,
                exposure=state.network_exposure,
            )
            return
        self._endpoints[state.endpoint_id] = ModelRoute(
            name=state.route_name,
            upstream=state.upstream_url,
            upstreams=tuple(u.rstrip("/") for u in state.upstream_urls),
            asset=state.asset_name,
            version=state.version,
            upstream_model=state.served_model_name,
            project=state.project,
            exposure=state.network_exposure,
            sealed_api_key=state.upstream_credential,
            guarded=state.runtime == "external",
        )

    @classmethod
    def from_file(cls, path: Path | None) -> RouteTable:
        table = cls()
        if path is not None:
            table.install(load_routes(path))
        return table


def load_routes(path: Path) -> RoutesFile:
    data: Any = yaml.safe_load(path.read_text()) or {}
    return RoutesFile.model_validate(data)
