"""The route table: which upstream serves a model name or an MCP server.

Until the inference service publishes endpoint events, routes are declared in a YAML or JSON file
(``STEWARD_GATEWAY_ROUTES_FILE``)::

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

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$"


class _Route(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    upstream: str
    asset: str | None = Field(default=None, pattern=NAME_PATTERN)
    version: str | None = None
    # Sent upstream as ``Authorization: Bearer`` (the client's own credential never is).
    api_key: SecretStr | None = None

    @field_validator("upstream")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @property
    def asset_name(self) -> str:
        return self.asset or self.name


class ModelRoute(_Route):
    # The model name the upstream knows, when it differs from the public one.
    upstream_model: str | None = None
    max_tokens: int | None = Field(default=None, gt=0)
    # Overrides STEWARD_GATEWAY_UPSTREAM_READ_TIMEOUT_SECONDS for this model.
    timeout_seconds: float | None = Field(default=None, gt=0)


class McpRoute(_Route):
    pass


class RoutesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelRoute] = []
    mcp_servers: list[McpRoute] = []


class RouteTable:
    def __init__(self) -> None:
        self.models: dict[str, ModelRoute] = {}
        self.mcp: dict[str, McpRoute] = {}

    def install(self, routes: RoutesFile) -> None:
        self.models = {r.name: r for r in routes.models}
        self.mcp = {r.name: r for r in routes.mcp_servers}

    @classmethod
    def from_file(cls, path: Path | None) -> RouteTable:
        table = cls()
        if path is not None:
            table.install(load_routes(path))
        return table


def load_routes(path: Path) -> RoutesFile:
    data: Any = yaml.safe_load(path.read_text()) or {}
    return RoutesFile.model_validate(data)
