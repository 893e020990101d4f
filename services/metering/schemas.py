"""Bodies and query parameters of the metering API. Inputs forbid unknown fields."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Literal, Self

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from libs.common.db import utcnow
from libs.common.events.inference import EndpointStatus
from libs.common.events.metering import QuotaLimits, QuotaState, QuotaStatus, Window
from libs.common.names import AssetName, KeyId, ProjectName

# A model is named like its catalog asset (and its gateway route).
ModelName = AssetName
Credential = Annotated[str, Field(min_length=1, max_length=255)]
Endpoint = Annotated[str, Field(min_length=1, max_length=255)]
TokenLimit = Annotated[int, Field(gt=0, le=10**13)]
Threshold = Annotated[float, Field(gt=0, lt=1, description="Fraction of a limit, e.g. 0.8")]
# Prices per 1K tokens (or per GPU-hour), up to nine decimals: stored as integer nano-units.
Price = Annotated[Decimal, Field(ge=0, le=1_000_000, max_digits=16, decimal_places=9)]


def _https_or_http(url: AnyHttpUrl) -> AnyHttpUrl:
    if len(str(url)) > 2000:
        raise ValueError("is longer than 2000 characters")
    return url


WebhookUrl = Annotated[AnyHttpUrl, AfterValidator(_https_or_http)]

GroupBy = Literal["project", "model", "credential", "endpoint"]
Interval = Literal["minute", "hour", "day", "month"]
Metric = Literal["total_tokens", "prompt_tokens", "completion_tokens", "requests", "errors", "cost"]

INTERVAL_SECONDS: dict[str, int] = {"minute": 60, "hour": 3600, "day": 86400, "month": 2678400}
MAX_POINTS = 20_000
MAX_RANGE = timedelta(days=400)


class Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- usage queries -----------------------------------------------------------------------------


def _zoned(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError("needs a time zone, e.g. 2027-01-01T00:00:00Z")
    return value


class UsageFilter(Input):
    """Which usage: a time range (default the last 24 hours) and optional equality filters."""

    start: Annotated[datetime | None, AfterValidator(_zoned)] = Field(
        default=None, description="Inclusive, rounded down to the minute"
    )
    end: Annotated[datetime | None, AfterValidator(_zoned)] = Field(
        default=None, description="Exclusive, rounded up to the minute; default now"
    )
    project: ProjectName | None = None
    model: ModelName | None = None
    credential: Credential | None = None
    endpoint: Endpoint | None = None

    @model_validator(mode="after")
    def _range(self) -> Self:
        end = self.end or utcnow()
        start = self.start or end - timedelta(days=1)
        if start >= end:
            raise ValueError("start must be before end")
        if end - start > MAX_RANGE:
            raise ValueError(f"the range may span at most {MAX_RANGE.days} days")
        return self

    def bounds(self, now: datetime) -> tuple[datetime, datetime]:
        """``[start, end)`` aligned to whole minutes (aggregates are per minute)."""
        end = self.end or now
        start = self.start or end - timedelta(days=1)
        start = start.replace(second=0, microsecond=0)
        if end.second or end.microsecond:
            end = end.replace(second=0, microsecond=0) + timedelta(minutes=1)
        return start, end


def _group_by(value: list[str] | str | None) -> list[str]:
    """``group_by=project,model`` or ``group_by=project&group_by=model``; no repeats."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    parts = [p.strip() for item in items for p in item.split(",") if p.strip()]
    allowed = ("project", "model", "credential", "endpoint", "tool")
    unknown = [p for p in parts if p not in allowed]
    if unknown:
        raise ValueError(f"unknown group_by {unknown}; use any of {list(allowed)}")
    if len(set(parts)) != len(parts):
        raise ValueError("group_by repeats a dimension")
    return parts


class TotalsQuery(UsageFilter):
    group_by: list[str] = Field(
        default=[],
        description="Any of project, model, credential, endpoint, tool (comma-separated); "
        "tool is an MCP call's tool (none for model calls)",
    )

    @field_validator("group_by", mode="before")
    @classmethod
    def _parse_group_by(cls, value: list[str] | str | None) -> list[str]:
        return _group_by(value)


class SeriesQuery(TotalsQuery):
    interval: Interval = "hour"

    @model_validator(mode="after")
    def _points(self) -> Self:
        start, end = self.bounds(utcnow())
        points = (end - start).total_seconds() / INTERVAL_SECONDS[self.interval]
        if points > MAX_POINTS:
            raise ValueError(
                f"{int(points)} {self.interval} points asked; at most {MAX_POINTS}: "
                "narrow the range or widen the interval"
            )
        return self


class TopQuery(UsageFilter):
    by: GroupBy = Field(default="project", description="Whom to rank")
    metric: Metric = "total_tokens"
    limit: int = Field(default=10, ge=1, le=1000)


class UsageEventsQuery(UsageFilter):
    limit: int = Field(default=100, ge=1, le=1000)
    request_id: str | None = Field(
        default=None, max_length=64, description="Only the calls of this X-Request-Id"
    )


# -- usage answers -----------------------------------------------------------------------------


class Latency(BaseModel):
    """Milliseconds. Percentiles are within 1 % of the true values (latency sketches); for
    minutes aggregated before the sketches existed, the upper bound of a coarse histogram
    bucket."""

    count: int
    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None = None


class UsageRow(BaseModel):
    """Usage of one group (the keys named in ``group_by``) over the range or one interval."""

    start: datetime | None = Field(default=None, description="The interval (series only)")
    project: str | None = None
    model: str | None = None
    credential: str | None = None
    endpoint: str | None = None
    tool: str | None = Field(default=None, description="An MCP call's tool (group_by=tool)")
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: float
    rate_limited: int = Field(default=0, description="Errors that were 429: quota, rate limit")
    client_errors: int = Field(default=0, description="Errors that were another 4xx")
    server_errors: int = Field(default=0, description="Errors that were 5xx or broke off")
    request_bytes: int = Field(default=0, description="Bytes of MCP tool calls sent")
    response_bytes: int = Field(default=0, description="Bytes of their answers")
    ttft_ms: Latency
    duration_ms: Latency
    tpot_ms: Latency = Field(
        description="Time per output token after the first, of streamed calls with two or more"
    )


class UsageReport(BaseModel):
    start: datetime
    end: datetime
    group_by: list[str]
    interval: Interval | None = None
    currency: str
    rows: list[UsageRow]


class UsageEventRead(BaseModel):
    event_id: str
    time: datetime
    received_at: datetime
    project: str
    credential_id: str
    subject_id: str
    model: str
    endpoint: str
    kind: str
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    duration_ms: float
    http_status: int
    status: str
    error_type: str | None
    usage_source: str
    stream: bool
    cost_nanos: int
    request_bytes: int | None = None
    response_bytes: int | None = None
    request_id: str | None = Field(default=None, description="The call's X-Request-Id")


class TopEntry(BaseModel):
    key: str
    project: str | None = Field(default=None, description="The project of a credential")
    value: float
    requests: int
    total_tokens: int
    cost: float


class TopReport(BaseModel):
    start: datetime
    end: datetime
    by: GroupBy
    metric: Metric
    currency: str
    entries: list[TopEntry]


# -- dedicated endpoints: GPU-hours and cost against the approved plan -------------------------


class EndpointCostQuery(Input):
    project: ProjectName | None = None
    status: EndpointStatus | None = None
    limit: int = Field(default=200, ge=1, le=1000)


class EndpointPlanRead(BaseModel):
    """The cost & security plan the reviewer approved (``approval`` request ``request_id``)."""

    request_id: str
    gpus: int = Field(description="GPUs per replica")
    replicas: int
    hours: float
    gpu_hours: float
    gpu_hour_rate: float
    estimated_cost: float
    currency: str
    approved_at: datetime
    approved_by: str


class EndpointCostRead(BaseModel):
    """One dedicated endpoint: GPU-hours and cost so far, beside its plan."""

    endpoint_id: str
    project: str
    model: str = Field(description="The route name clients call it by")
    asset_name: str
    version: str
    runtime: str
    gpu_type: str | None
    status: str
    gpus_held: int = Field(description="GPUs held now, all replicas")
    first_held_at: datetime | None
    gpu_hours: float
    cost: float
    currency: str
    plan: EndpointPlanRead | None = Field(description="None for an endpoint made without one")
    planned_until: datetime | None = Field(
        description="The first GPU-hour plus the planned duration"
    )
    plan_used: float | None = Field(
        description="Cost as a fraction of the estimate (GPU-hours of the planned ones when "
        "the estimate is zero or in another currency)"
    )
    over_plan: Literal["cost", "gpu_hours"] | None
    over_plan_at: datetime | None = Field(description="When it was announced as over its plan")


class EndpointCostReport(BaseModel):
    generated_at: datetime
    currency: str
    gpu_hours: float
    cost: float
    estimated_cost: float = Field(
        description="The sum of the plans in ``currency``, each approved request once"
    )
    endpoints: list[EndpointCostRead]


# -- quotas ------------------------------------------------------------------------------------


class QuotaLimitsIn(Input):
    input_tokens: TokenLimit | None = None
    output_tokens: TokenLimit | None = None
    total_tokens: TokenLimit | None = None
    requests: TokenLimit | None = Field(
        default=None,
        description="Calls per window: model calls, or tool calls when the quota names an MCP "
        "server as its model",
    )


class QuotaCreate(Input):
    window: Window
    limits: QuotaLimitsIn
    key_id: KeyId | None = Field(default=None, description="Only this key's calls count")
    model: ModelName | None = Field(default=None, description="Only calls to this model count")
    soft_threshold: Threshold | None = Field(
        default=None, description="Warn at this fraction (default metering_soft_threshold)"
    )
    webhook_url: WebhookUrl | None = Field(
        default=None, description="POSTed the warning and exceeded events (CloudEvents JSON)"
    )

    @model_validator(mode="after")
    def _some_limit(self) -> Self:
        if not any(self.limits.model_dump().values()):
            raise ValueError(
                "limits: set at least one of input_tokens, output_tokens, total_tokens, requests"
            )
        return self


class QuotaUpdate(Input):
    """Fields left out keep their value; ``null`` removes a limit or the webhook."""

    limits: QuotaLimitsIn | None = None
    soft_threshold: Threshold | None = None
    webhook_url: WebhookUrl | None = None

    @model_validator(mode="after")
    def _something(self) -> Self:
        if not self.model_fields_set:
            raise ValueError("nothing to change: give limits, soft_threshold or webhook_url")
        if "soft_threshold" in self.model_fields_set and self.soft_threshold is None:
            raise ValueError("soft_threshold cannot be null")
        if "limits" in self.model_fields_set and self.limits is None:
            raise ValueError("limits cannot be null; remove the quota instead")
        return self


class QuotaRead(BaseModel):
    id: str
    project: str
    key_id: str | None
    model: str | None
    window: Window
    limits: QuotaLimits
    soft_threshold: float
    webhook_url: str | None
    revision: int
    source: str
    created_at: datetime
    created_by: str
    updated_at: datetime
    updated_by: str
    window_start: datetime
    window_end: datetime
    input_used: int
    output_used: int
    # Calls the gateway admitted in the window (what a ``requests`` limit counts).
    requests_used: int
    status: QuotaStatus


class QuotaSnapshot(BaseModel):
    """Every visible quota and its current window, for the gateway's ledger."""

    generated_at: datetime
    counted_through: datetime | None
    quotas: list[QuotaState]


# -- prices ------------------------------------------------------------------------------------


# A catalog version, as the catalog names it (e.g. "1.0.0").
CatalogVersion = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._+-]+$")]


class PriceSet(Input):
    input_per_1k: Price = Field(description="Per 1,000 prompt tokens")
    output_per_1k: Price = Field(description="Per 1,000 completion tokens")
    gpu_hour: Price | None = Field(default=None, description="Per GPU-hour (dedicated endpoints)")
    effective_from: Annotated[datetime | None, AfterValidator(_zoned)] = Field(
        default=None,
        description="When the price starts to apply (default now; never in the past: usage "
        "already counted keeps the price it was counted at)",
    )


class PriceQuery(Input):
    model: ModelName | None = Field(default=None, description="Only this catalog asset's prices")
    history: bool = Field(
        default=False,
        description="Also the prices no longer in force, and withdrawals (default: the price "
        "in force now and those scheduled)",
    )


class PriceRead(BaseModel):
    """One version in time of a catalog asset's price (or of one version of it)."""

    model: str = Field(description="The catalog asset")
    version: str | None = Field(description="The asset version it prices; None: every version")
    currency: str
    input_per_1k: Decimal
    output_per_1k: Decimal
    gpu_hour: Decimal | None
    effective_from: datetime
    effective_until: datetime | None = Field(description="When the next price takes over")
    withdrawn: bool = Field(description="Marks the end of a price: none from effective_from")
    created_at: datetime
    created_by: str
