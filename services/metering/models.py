"""Metering tables: raw usage events, per-minute aggregates, quotas and their counters, alerts,
webhook deliveries and the price history.

The two usage tables are SQLAlchemy Core tables: they are written in bulk by the ingest (one
statement per batch), never row by row through the ORM. Money is stored in integer nano-units
of the configured currency, so sums are exact.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from libs.common.db import UTCDateTime, new_id, new_metadata, utcnow
from libs.common.outbox import define_bus_tables

metadata = new_metadata()
bus_tables = define_bus_tables(metadata)
# The usage consumer's inbox holds millions of ids; retention deletes the old ones by time.
Index(
    "ix_inbox_consumer_processed_at", bus_tables.inbox.c.consumer, bus_tables.inbox.c.processed_at
)

# Histogram buckets (upper bounds, milliseconds) of the per-minute aggregates; the last is +inf.
TTFT_BOUNDS_MS: tuple[float, ...] = (50, 100, 250, 500, 1000, 2500, 5000, 10000, math.inf)
DURATION_BOUNDS_MS: tuple[float, ...] = (
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    120000,
    math.inf,
)


def bucket_columns(prefix: str, bounds: tuple[float, ...]) -> list[str]:
    """``ttft_le_50``…``ttft_le_inf``: one count column per bucket (not cumulative)."""
    return [f"{prefix}_le_{'inf' if math.isinf(b) else int(b)}" for b in bounds]


TTFT_BUCKETS = bucket_columns("ttft", TTFT_BOUNDS_MS)
DURATION_BUCKETS = bucket_columns("duration", DURATION_BOUNDS_MS)

# The dimensions usage is aggregated and grouped by (API name -> column).
DIMENSIONS: dict[str, str] = {
    "project": "project",
    "model": "model",
    "credential": "credential_id",
    "endpoint": "endpoint",
}

usage_events = Table(
    "usage_events",
    metadata,
    Column("event_id", String(64), primary_key=True),
    Column("time", UTCDateTime, nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
    Column("project", String(63), nullable=False),
    Column("credential_id", String(255), nullable=False),
    Column("subject_id", String(255), nullable=False),
    Column("model", String(255), nullable=False),
    Column("endpoint", String(255), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("ttft_ms", Float, nullable=True),
    Column("duration_ms", Float, nullable=False),
    Column("http_status", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("error_type", String(64), nullable=True),
    Column("usage_source", String(16), nullable=False),
    Column("stream", Boolean, nullable=False),
    Column("cost_nanos", BigInteger, nullable=False),
    Column("request_bytes", BigInteger, nullable=True),
    Column("response_bytes", BigInteger, nullable=True),
    Column("request_id", String(64), nullable=True),
    Index("ix_usage_events_project_time", "project", "time"),
    Index("ix_usage_events_request_id", "request_id"),
    Index("ix_usage_events_received_at", "received_at"),
)


def _counter(name: str) -> Column[Any]:
    return Column(name, BigInteger, nullable=False, default=0, server_default="0")


usage_minutes = Table(
    "usage_minutes",
    metadata,
    Column("minute", UTCDateTime, primary_key=True),
    Column("project", String(63), primary_key=True),
    Column("model", String(255), primary_key=True),
    Column("credential_id", String(255), primary_key=True),
    Column("endpoint", String(255), primary_key=True),
    _counter("requests"),
    _counter("errors"),
    _counter("prompt_tokens"),
    _counter("completion_tokens"),
    _counter("cost_nanos"),
    _counter("request_bytes"),
    _counter("response_bytes"),
    # The errors by cause: refused for a quota or a rate limit (429), the caller's request (other
    # 4xx), the model or the gateway (5xx, and calls that broke off).
    _counter("rate_limited"),
    _counter("client_errors"),
    _counter("server_errors"),
    _counter("ttft_count"),
    Column("ttft_sum_ms", Float, nullable=False, default=0.0, server_default="0"),
    Column("duration_sum_ms", Float, nullable=False, default=0.0, server_default="0"),
    *(_counter(c) for c in TTFT_BUCKETS),
    *(_counter(c) for c in DURATION_BUCKETS),
    Index("ix_usage_minutes_project_minute", "project", "minute"),
    Index("ix_usage_minutes_minute_only", "minute"),
)

# Latency sketches (services/metering/sketch.py): per minute and group, how many calls fell in
# each log-spaced bin of each metric. Summed over any range and grouping, they give percentiles
# within 1 % of the true values.
usage_latency_bins = Table(
    "usage_latency_bins",
    metadata,
    Column("minute", UTCDateTime, primary_key=True),
    Column("project", String(63), primary_key=True),
    Column("model", String(255), primary_key=True),
    Column("credential_id", String(255), primary_key=True),
    Column("endpoint", String(255), primary_key=True),
    Column("metric", String(16), primary_key=True),
    Column("bin", Integer, primary_key=True, autoincrement=False),
    _counter("count"),
    Index("ix_usage_latency_bins_project_minute", "project", "minute"),
    Index("ix_usage_latency_bins_minute_only", "minute"),
)

# The additive columns of an aggregate row: what an upsert adds to.
MINUTE_SUMS: tuple[str, ...] = tuple(c.name for c in usage_minutes.columns if not c.primary_key)


class Base(DeclarativeBase):
    metadata = metadata
    type_annotation_map = {datetime: UTCDateTime}


class Quota(Base):
    """A budget of a project (optionally of one key, and/or one model or MCP server) per
    window: tokens, and calls (``request_limit``)."""

    __tablename__ = "quotas"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    # project/key/model/window, with "*" for "any": at most one quota per scope.
    scope: Mapped[str] = mapped_column(String(600), unique=True)
    project: Mapped[str] = mapped_column(String(63), index=True)
    key_id: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(255))
    window: Mapped[str] = mapped_column(String(16))
    input_limit: Mapped[int | None] = mapped_column(BigInteger)
    output_limit: Mapped[int | None] = mapped_column(BigInteger)
    total_limit: Mapped[int | None] = mapped_column(BigInteger)
    request_limit: Mapped[int | None] = mapped_column(BigInteger)
    soft_threshold: Mapped[float] = mapped_column(Float)
    webhook_url: Mapped[str | None] = mapped_column(String(2000))
    revision: Mapped[int] = mapped_column(Integer, default=1)
    # "api", or "approval:<request id>" when an approved quota request set it.
    source: Mapped[str] = mapped_column(String(100), default="api")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(255))


class QuotaCounter(Base):
    """Tokens and calls counted against a quota in one window (written by the ingest, exactly
    once; ``requests`` counts admitted calls, ``UsageRecorded.admitted``)."""

    __tablename__ = "quota_counters"

    quota_id: Mapped[str] = mapped_column(
        ForeignKey("quotas.id", ondelete="CASCADE"), primary_key=True
    )
    window_start: Mapped[datetime] = mapped_column(primary_key=True)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class QuotaGatewayCounter(Base):
    """The part of a quota window's counter that one gateway process's calls make up."""

    __tablename__ = "quota_gateway_counters"

    quota_id: Mapped[str] = mapped_column(
        ForeignKey("quotas.id", ondelete="CASCADE"), primary_key=True
    )
    window_start: Mapped[datetime] = mapped_column(primary_key=True)
    gateway_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    requests: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class QuotaAlert(Base):
    """A threshold reached in a window: the primary key makes each alert happen once."""

    __tablename__ = "quota_alerts"

    quota_id: Mapped[str] = mapped_column(
        ForeignKey("quotas.id", ondelete="CASCADE"), primary_key=True
    )
    window_start: Mapped[datetime] = mapped_column(primary_key=True)
    threshold_pct: Mapped[int] = mapped_column(Integer, primary_key=True)
    level: Mapped[str] = mapped_column(String(16))
    dimensions: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One POST to make, written with the alert it announces; retried until it succeeds."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "delivered_at", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    url: Mapped[str] = mapped_column(String(2000))
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(100))
    body: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Price(Base):
    """One version in time of a catalog asset's price (or of one version of it).

    Prices are versioned in time: a change adds a row from its ``effective_from`` on, and usage
    is priced with the row in force at the usage's own time (``services.metering.pricing``),
    so a report never prices the past at today's price. ``version`` is "" for the asset's price
    (every version); a version's own price beats it. A ``withdrawn`` row ends a price: from
    then on the asset (or version) has none. Money in nano-units of the configured currency.
    """

    __tablename__ = "prices"
    __table_args__ = (UniqueConstraint("asset", "version", "effective_from"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    asset: Mapped[str] = mapped_column(String(255))
    version: Mapped[str] = mapped_column(String(100), default="")
    effective_from: Mapped[datetime]
    input_per_1k_nanos: Mapped[int] = mapped_column(BigInteger)
    output_per_1k_nanos: Mapped[int] = mapped_column(BigInteger)
    gpu_hour_nanos: Mapped[int | None] = mapped_column(BigInteger)
    withdrawn: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(255))


class EndpointPlan(Base):
    """An approved endpoint request's cost & security plan: what actual GPU cost is held to.

    Written from ``approval.request.approved`` (kind ``endpoint``), keyed by the request, so it
    meets the endpoint's own events by ``request_id`` whichever arrives first.
    """

    __tablename__ = "endpoint_plans"

    request_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project: Mapped[str] = mapped_column(String(63))
    model_name: Mapped[str] = mapped_column(String(255))
    version: Mapped[str] = mapped_column(String(100))
    gpus: Mapped[int] = mapped_column(Integer)
    replicas: Mapped[int] = mapped_column(Integer)
    hours: Mapped[float] = mapped_column(Float)
    gpu_hours: Mapped[float] = mapped_column(Float)
    gpu_hour_rate_nanos: Mapped[int] = mapped_column(BigInteger)
    estimated_cost_nanos: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    approved_at: Mapped[datetime]
    approved_by: Mapped[str] = mapped_column(String(255))


class EndpointRun(Base):
    """One dedicated endpoint as metering follows it through ``inference.endpoint.*`` events."""

    __tablename__ = "endpoint_runs"

    endpoint_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project: Mapped[str] = mapped_column(String(63), index=True)
    route_name: Mapped[str] = mapped_column(String(255))
    asset_name: Mapped[str] = mapped_column(String(255))
    version: Mapped[str] = mapped_column(String(100))
    runtime: Mapped[str] = mapped_column(String(16))
    gpu_type: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(36), index=True)
    status: Mapped[str] = mapped_column(String(16))
    # The time of the latest event applied: an older one arriving late is stale.
    event_time: Mapped[datetime]
    # When the endpoint first went beyond its approved plan (``metering.endpoint.over_plan``).
    over_plan_at: Mapped[datetime | None]


class GpuPeriod(Base):
    """An interval in which an endpoint held a fixed number of GPUs: the unit of GPU cost.

    A period opens when the endpoint starts holding GPUs (or their count changes) and closes
    when it stops; ``ended_at`` is None while it is open.
    """

    __tablename__ = "gpu_periods"
    __table_args__ = (Index("ix_gpu_periods_endpoint_started", "endpoint_id", "started_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    endpoint_id: Mapped[str] = mapped_column(
        ForeignKey("endpoint_runs.endpoint_id", ondelete="CASCADE")
    )
    gpus: Mapped[int] = mapped_column(Integer)  # per replica, times replicas
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    # The GPU-hour price in force when the period began (``pricing.PriceBook``, by the
    # endpoint's asset and version); None: the approved plan's rate.
    rate_nanos: Mapped[int | None] = mapped_column(BigInteger)
