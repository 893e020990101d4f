"""Events published by the approval service, and the typed payload of each request kind.

A request's ``payload`` travels as a plain dict so that every consumer can read the kinds it
cares about with the models below (``AccessPayload.model_validate(event.payload)``) and ignore
the others. The models are tolerant of unknown fields (a newer producer may add some); the
approval API forbids them on input.

Who acts on an approval:

- ``asset``: catalog moves the version to ``approved`` (and back to ``draft`` when a request is
  rejected, withdrawn or expires);
- ``access``: authz grants the project's entitlement to the asset;
- ``endpoint``: inference provisions the endpoint described by the plan;
- ``quota``: metering raises the project's (or one key's) token budget.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from libs.common.events.authz import ToolAccessLimit, ToolLimit, check_tool_limits
from libs.common.events.envelope import EventPayload
from libs.common.names import AssetName, KeyId

RequestKind = Literal["asset", "access", "endpoint", "quota"]
RequestStatus = Literal["pending", "approved", "rejected", "withdrawn", "expired"]
AssetKind = Literal["model", "mcp_server"]
VersionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+:-]{0,99}$")]


class RequestPayload(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class AssetPayload(RequestPayload):
    """Admit one version of a catalog asset (it is ``draft`` in the catalog until then)."""

    asset_kind: AssetKind
    asset_name: AssetName
    version: VersionName
    # The catalog's validation checklist for the version, copied when the request is filed so
    # the reviewer sees what was checked (never trusted from the requester: set by approval).
    checklist: list[dict[str, Any]] = []


class AccessPayload(RequestPayload):
    """The request's project may use an approved asset (any of its approved versions)."""

    asset_kind: AssetKind
    asset_name: AssetName
    justification: str = Field(default="", max_length=2000)
    # The asset's tags when the request was filed (auto-approve policies match on them).
    tags: list[str] = []
    # An MCP server may be asked for in part: only its read-only tools, say, or named ones.
    tool_access: ToolAccessLimit = None
    tools: ToolLimit = None

    @model_validator(mode="after")
    def _tools_of_servers(self) -> AccessPayload:
        check_tool_limits(self.asset_kind, self.tool_access, self.tools)
        return self


class CostSecurityPlan(RequestPayload):
    """What an inference endpoint will cost and what data it will see, for the reviewer."""

    gpus: int = Field(ge=0, le=64, description="GPUs per replica")
    gpu_type: str = Field(default="any", max_length=64, examples=["nvidia-a100-80gb"])
    replicas: int = Field(ge=1, le=64)
    hours: float = Field(gt=0, le=24 * 366, description="How long the endpoint is needed")
    gpu_hour_rate: float = Field(ge=0, le=10_000, description="Price of one GPU-hour")
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    data_classification: Literal["public", "internal", "confidential", "restricted"]
    network_exposure: Literal["project", "internal", "public"]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def gpu_hours(self) -> float:
        return round(self.gpus * self.replicas * self.hours, 4)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def estimated_cost(self) -> float:
        """GPU-hours times the rate: the figure the reviewer approves."""
        return round(self.gpu_hours * self.gpu_hour_rate, 2)


class EndpointPayload(RequestPayload):
    """An inference endpoint in the request's project serving an approved model version, or
    running an approved MCP server version from its stdio package (``asset_kind``)."""

    model_name: AssetName = Field(description="The model's (or MCP server's) catalog name")
    version: VersionName
    runtime: Literal["kubernetes", "local", "external"] = "kubernetes"
    context_length: int | None = Field(default=None, ge=1, le=10_000_000)
    plan: CostSecurityPlan
    asset_kind: AssetKind = "model"
    # An MCP server's environment (its server.json environmentVariables): the names, for the
    # reviewer; the values sealed by approval when the request was filed, for the runtime alone.
    environment_names: list[str] = []
    sealed_environment: str | None = None


class QuotaPayload(RequestPayload):
    """Raise the project's token budget (or one API key's) for a window."""

    window: Literal["minute", "hour", "day", "month"]
    token_limit: int = Field(gt=0, le=10**13)
    key_id: KeyId | None = None
    justification: str = Field(default="", max_length=2000)


PAYLOADS: dict[str, type[RequestPayload]] = {
    "asset": AssetPayload,
    "access": AccessPayload,
    "endpoint": EndpointPayload,
    "quota": QuotaPayload,
}


class RequestState(EventPayload):
    """A request as it stands; ``payload`` is the dump of the kind's model above."""

    request_id: str
    kind: RequestKind
    project: str
    requester: str
    status: RequestStatus
    payload: dict[str, Any]
    created_at: datetime
    due_at: datetime


class RequestCreated(RequestState):
    subject: ClassVar[str] = "approval.request.created"


class RequestDecided(RequestState):
    """A closing decision: who (a subject, or ``policy:<name>``), when, and why."""

    decided_by: str
    decided_at: datetime
    comment: str = ""
    lead_time_seconds: float


class RequestApproved(RequestDecided):
    """The owning service acts on it, idempotently (the same event may arrive twice)."""

    subject: ClassVar[str] = "approval.request.approved"

    policy: str | None = None  # the auto-approve policy that decided, if any


class RequestRejected(RequestDecided):
    subject: ClassVar[str] = "approval.request.rejected"


class RequestWithdrawn(RequestDecided):
    subject: ClassVar[str] = "approval.request.withdrawn"


class RequestExpired(RequestDecided):
    subject: ClassVar[str] = "approval.request.expired"
