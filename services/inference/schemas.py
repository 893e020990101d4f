"""Bodies of the inference API. Inputs forbid unknown fields; no Read model carries a secret
(an external endpoint's credential is write-only: reads say only whether one is set)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, model_validator

from libs.common.events.approval import VersionName
from libs.common.events.inference import EndpointState
from libs.common.mcp_packages import ENV_NAME
from libs.common.names import AssetName

RouteName = AssetName  # route names share the catalog names' shape
Runtime = Literal["kubernetes", "local", "external"]
Status = Literal["provisioning", "ready", "failed", "stopped", "deleting", "deleted"]


def _base_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    if parts.username or parts.password:
        raise ValueError("must not carry a credential; send it as upstream_api_key")
    if parts.query or parts.fragment:
        raise ValueError("must be a base URL without query or fragment")
    return value.rstrip("/")


BaseUrl = Annotated[str, Field(max_length=1000), AfterValidator(_base_url)]


class Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EndpointCreate(Input):
    """Create an endpoint directly (``endpoint.manage``), for an approved catalog version."""

    model_name: AssetName
    version: VersionName
    runtime: Runtime
    replicas: int = Field(default=1, ge=1, le=64)
    gpus: int = Field(default=0, ge=0, le=64, description="GPUs per replica")
    gpu_type: str = Field(default="any", max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    profile: str | None = Field(
        default=None, max_length=64, description="local: the runtime profile (simulator, vllm…)"
    )
    served_model_name: RouteName | None = Field(
        default=None, description="The name the server knows the model by; default: model_name"
    )
    route_name: RouteName | None = Field(
        default=None, description="What clients send as model at the gateway; default project/model"
    )
    network_exposure: Literal["project", "internal", "public"] = "project"
    upstream_url: BaseUrl | None = Field(
        default=None, description="external: the OpenAI-compatible base URL (…/v1)"
    )
    upstream_api_key: SecretStr | None = Field(
        default=None, max_length=4096, description="external: stored encrypted, never shown again"
    )
    asset_kind: Literal["model", "mcp_server"] = Field(
        default="model",
        description="mcp_server: run the version's stdio package (local; kubernetes: OCI only)",
    )
    environment: dict[Annotated[str, Field(pattern=ENV_NAME)], SecretStr] | None = Field(
        default=None,
        max_length=64,
        description="mcp_server: the package's environment variables; stored encrypted",
    )

    @model_validator(mode="after")
    def _fits_runtime(self) -> EndpointCreate:
        if self.asset_kind == "mcp_server" and self.runtime == "external":
            raise ValueError("MCP servers run on the local or kubernetes runtime")
        if self.environment and self.asset_kind != "mcp_server":
            raise ValueError("environment is for MCP server endpoints")
        if self.runtime == "external":
            if self.upstream_url is None:
                raise ValueError("an external endpoint needs upstream_url")
        elif self.upstream_url is not None or self.upstream_api_key is not None:
            raise ValueError("upstream_url and upstream_api_key are for external endpoints only")
        if self.profile is not None and self.runtime != "local":
            raise ValueError("profile is for local endpoints only")
        return self


class Scale(Input):
    replicas: int = Field(ge=0, le=64, description="0 stops the endpoint")


class EndpointRead(BaseModel):
    id: str
    project: str
    asset_kind: Literal["model", "mcp_server"]
    model_name: str
    version: str
    source_uri: str | None
    runtime: Runtime
    profile: str | None
    replicas: int
    gpus: int
    gpu_type: str | None
    served_model_name: str
    route_name: str
    network_exposure: str
    status: Status
    reason: str
    upstream_url: str | None
    upstream_urls: list[str] = Field(
        default=[], description="Each serving replica's URL, when the gateway balances them"
    )
    has_upstream_credential: bool
    owner: str
    request_id: str | None
    requested_at: datetime
    approved_at: datetime
    ready_at: datetime | None
    created_at: datetime
    status_changed_at: datetime
    deleted_at: datetime | None
    lead_time_seconds: float | None = Field(description="Request filed → first ready")


class RoutesSnapshot(BaseModel):
    """Every ready endpoint, as of ``generated_at``; then follow ``inference.endpoint.*``."""

    generated_at: datetime
    routes: list[EndpointState]


class PoolType(BaseModel):
    total: int
    used: int
    free: int


class PoolRead(BaseModel):
    types: dict[str, PoolType]
    projects: dict[str, dict[str, int]] = Field(description="GPUs held, by project and type")
    project_limit: int | None = Field(description="Default GPUs one project may hold")


class LeadTime(BaseModel):
    endpoints: int = Field(description="Endpoints that reached ready")
    request_to_ready_median_seconds: float | None
    request_to_ready_p90_seconds: float | None
    approval_to_ready_median_seconds: float | None
    approval_to_ready_p90_seconds: float | None
