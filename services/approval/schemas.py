"""Bodies of the approval API. Inputs forbid unknown fields; fields the service fills in (the
catalog's checklist, an asset's tags, the computed cost) cannot be sent by a requester."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from libs.common.events.approval import (
    AssetKind,
    CostSecurityPlan,
    EndpointPayload,
    QuotaPayload,
    RequestKind,
    RequestStatus,
    VersionName,
)
from libs.common.events.authz import ToolAccessLimit, ToolLimit, check_tool_limits
from libs.common.mcp_packages import ENV_NAME
from libs.common.names import AssetName
from services.approval.policies import Rule


class Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AssetRequestIn(Input):
    asset_kind: AssetKind
    asset_name: AssetName
    version: VersionName


class AccessRequestIn(Input):
    asset_kind: AssetKind
    asset_name: AssetName
    justification: str = Field(default="", max_length=2000)
    # An MCP server in part: only tools of these access types, and/or only these tools.
    tool_access: ToolAccessLimit = None
    tools: ToolLimit = None

    @model_validator(mode="after")
    def _tools_of_servers(self) -> AccessRequestIn:
        check_tool_limits(self.asset_kind, self.tool_access, self.tools)
        return self


class PlanIn(CostSecurityPlan):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EndpointRequestIn(EndpointPayload):
    model_config = ConfigDict(extra="forbid", frozen=True)

    plan: PlanIn
    # An MCP server's environment variables: sealed when filed, never stored or shown in clear.
    environment: dict[Annotated[str, Field(pattern=ENV_NAME)], SecretStr] | None = Field(
        default=None, max_length=64
    )

    @model_validator(mode="after")
    def _sealed_by_approval(self) -> EndpointRequestIn:
        if {"environment_names", "sealed_environment"} & self.model_fields_set:
            raise ValueError("give environment; approval seals it")
        if self.environment and self.asset_kind != "mcp_server":
            raise ValueError("environment is for MCP server endpoints")
        return self


class QuotaRequestIn(QuotaPayload):
    model_config = ConfigDict(extra="forbid", frozen=True)


PAYLOAD_INPUTS: dict[str, type[BaseModel]] = {
    "asset": AssetRequestIn,
    "access": AccessRequestIn,
    "endpoint": EndpointRequestIn,
    "quota": QuotaRequestIn,
}


class RequestCreate(Input):
    kind: RequestKind
    payload: dict[str, Any] = Field(
        description="asset: {asset_kind, asset_name, version}; access: {asset_kind, asset_name, "
        "justification}; endpoint: {model_name, version, runtime, plan: {gpus, replicas, hours, "
        "gpu_hour_rate, currency, data_classification, network_exposure}}; quota: {window, "
        "token_limit, key_id?, justification}",
        examples=[{"asset_kind": "model", "asset_name": "certified/production-llm-8b"}],
    )


class Decision(Input):
    comment: str = Field(default="", max_length=5000)


class Rejection(Input):
    comment: str = Field(min_length=1, max_length=5000, description="Why: the requester reads it")


class CommentCreate(Input):
    body: str = Field(min_length=1, max_length=5000)


class CommentRead(BaseModel):
    id: str
    author: str
    body: str
    created_at: datetime


class Cost(BaseModel):
    gpu_hours: float
    estimated_cost: float
    currency: str


class RequestRead(BaseModel):
    id: str
    kind: RequestKind
    project: str
    requester: str
    status: RequestStatus
    payload: dict[str, Any]
    cost: Cost | None = Field(description="endpoint requests: the plan's computed cost")
    created_at: datetime
    due_at: datetime
    expires_at: datetime
    overdue: bool
    age_seconds: float
    decided_at: datetime | None
    decided_by: str | None
    decision_comment: str
    policy: str | None
    lead_time_seconds: float | None


class RequestDetail(RequestRead):
    comments: list[CommentRead]


class RequestPage(BaseModel):
    items: list[RequestRead]
    next_cursor: str | None


class KindStats(BaseModel):
    decided: int
    approved: int
    rejected: int
    pending: int
    overdue: int
    lead_time_median_seconds: float | None
    lead_time_p90_seconds: float | None


class ProjectQueue(BaseModel):
    pending: int
    overdue: int
    oldest_pending_at: datetime | None


class Stats(BaseModel):
    since: datetime
    by_kind: dict[str, KindStats]
    by_project: dict[str, ProjectQueue]


class PolicyRead(Rule):
    model_config = ConfigDict(extra="ignore")

    name: str
    updated_at: datetime
    updated_by: str


class AuditRead(BaseModel):
    seq: int
    event_id: str
    service: str
    actor: str
    action: str
    target: str
    project: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    request_id: str | None
    at: datetime
    recorded_at: datetime
    prev_hash: str
    hash: str


class AuditPage(BaseModel):
    items: list[AuditRead]
    next_cursor: str | None


class AuditProblem(BaseModel):
    seq: int | None
    # missing, broken-link, edited: the chain itself; unkeyed: a record in the pre-key form after
    # keyed ones; truncated, rewritten: the chain against the latest signed checkpoint;
    # forged-checkpoint: a checkpoint whose signature does not verify.
    problem: Literal[
        "missing",
        "broken-link",
        "edited",
        "unkeyed",
        "truncated",
        "rewritten",
        "forged-checkpoint",
    ]
    detail: str


class AuditCheckpoint(BaseModel):
    """The chain's head at one moment, signed with the audit Ed25519 key."""

    seq: int
    hash: str
    at: str
    signature: str


class AuditAnchor(BaseModel):
    public_key: str  # raw Ed25519, base64
    checkpoint: AuditCheckpoint | None


class AuditVerification(BaseModel):
    ok: bool
    records: int
    head_seq: int
    head_hash: str
    checkpoint: AuditCheckpoint | None  # the latest signed one the chain was held against
    problems: list[AuditProblem]


# -- the audit report ---------------------------------------------------------------------------


class ReportApproval(BaseModel):
    """One request in the report: who asked for what, who decided, when, against its SLA."""

    request_id: str
    kind: RequestKind
    project: str
    subject: str = Field(description="What was asked for, e.g. 'model acme/chat-8b@1.0'")
    requester: str
    status: RequestStatus
    filed_at: datetime
    due_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    policy: str | None = Field(description="The policy that decided it, if one did")
    comment: str
    lead_time_seconds: float | None
    within_sla: bool = Field(description="Decided by its due date (open: not overdue yet)")


class ReportChange(BaseModel):
    """One audit record: a key, access or catalog change."""

    seq: int
    at: datetime
    actor: str
    action: str
    target: str
    project: str | None


class ReportSummary(BaseModel):
    decided: int
    within_sla: int
    open: int
    open_overdue: int
    by_kind: dict[str, dict[str, Any]]


class AuditReport(BaseModel):
    """The period ``[start, end)``: approvals, keys, access and catalog changes, and the audit
    chain's verification when the report was made."""

    start: datetime
    end: datetime
    generated_at: datetime
    generated_by: str
    summary: ReportSummary
    approvals: list[ReportApproval]
    open_requests: list[ReportApproval]
    keys: list[ReportChange]
    access: list[ReportChange]
    catalog: list[ReportChange]
    verification: AuditVerification
    public_key: str = Field(description="The Ed25519 key (base64) the checkpoint verifies with")
    truncated: bool = Field(description="More audit records than the report lists")
