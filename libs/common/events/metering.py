"""Events published by the metering service about token quotas (DESIGN §7).

Every quota event carries the quota's whole usable state: its scope, its limits and the usage
counted in the current window. The gateway keeps a local ledger (``libs.common.quota``) fed by
``GET /v1/quotas/snapshot`` at start and by these events after, so a quota check costs no network
round trip. Usage only grows within a window, so a consumer merges states monotonically (the
larger count wins for the same window) and needs no ordering guarantee between replicas.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from libs.common.events.envelope import EventPayload

Window = Literal["minute", "hour", "day", "month"]
Dimension = Literal["input", "output", "total", "requests"]
QuotaStatus = Literal["ok", "warning", "exceeded"]


class QuotaLimits(BaseModel):
    """Budgets for one window: tokens, and calls (``requests``: model calls, MCP tool calls);
    None means no limit on that dimension."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    requests: int | None = None


class QuotaState(EventPayload):
    """A quota and its usage in the window containing ``as_of``.

    ``counted_through``: usage events JetStream accepted before this instant are included in the
    counts (the metering consumer had caught up to there). A gateway drops its own locally settled
    usage older than that, since metering now counts it; see ``QuotaLedger.apply``.
    """

    quota_id: str
    project: str
    # None: every key (and every model) of the project counts against this quota.
    key_id: str | None = None
    model: str | None = None
    window: Window
    limits: QuotaLimits
    soft_threshold: float
    revision: int
    window_start: datetime
    window_end: datetime
    input_used: int = 0
    output_used: int = 0
    requests_used: int = 0
    status: QuotaStatus = "ok"
    as_of: datetime
    counted_through: datetime | None = None
    # The part of ``input_used``/``output_used`` (and of ``requests_used``) each gateway
    # process's calls make up, read with them (``UsageRecorded.gateway_id``): a gateway takes
    # metering's count of the others' calls and its own exact count of its own.
    by_gateway: dict[str, tuple[int, int]] = Field(default_factory=dict)
    requests_by_gateway: dict[str, int] = Field(default_factory=dict)


class QuotaUpdated(QuotaState):
    """A quota was created or its limits changed (``revision`` grows with every change)."""

    subject: ClassVar[str] = "metering.quota.updated"


class QuotaConsumed(QuotaState):
    """Usage in the current window grew. A state broadcast: the next one supersedes it, so
    metering publishes it at most every ``metering_quota_publish_seconds`` per quota."""

    subject: ClassVar[str] = "metering.quota.consumed"


class QuotaThresholdReached(QuotaState):
    threshold: float = Field(description="The fraction of a limit reached, e.g. 0.8 or 1.0")
    dimensions: list[Dimension] = Field(description="Which limits reached it")


class QuotaWarning(QuotaThresholdReached):
    """The soft threshold was reached: once per (quota, window, threshold)."""

    subject: ClassVar[str] = "metering.quota.warning"


class QuotaExceeded(QuotaThresholdReached):
    """A hard limit was reached: the gateway answers 429 until the window ends."""

    subject: ClassVar[str] = "metering.quota.exceeded"


class QuotaDeleted(EventPayload):
    subject: ClassVar[str] = "metering.quota.deleted"

    quota_id: str
    project: str


class EndpointOverPlan(EventPayload):
    """A dedicated endpoint went beyond its approved cost & security plan, once per endpoint.

        ``reason`` says which figure it passed first: ``cost`` (actual GPU cost above the estimate
        the reviewer approved) or ``gpu_hours`` (more GPU-hours than planned: a longer or bigger run
    than approved, at a rate that kept the cost within the estimate). Money
        is in ``currency``, as decimal strings so no float rounding creeps into a budget.
    """

    subject: ClassVar[str] = "metering.endpoint.over_plan"

    endpoint_id: str
    project: str
    request_id: str
    reason: Literal["cost", "gpu_hours"]
    gpu_hours: float
    planned_gpu_hours: float
    cost: str
    estimated_cost: str
    currency: str
    at: datetime
