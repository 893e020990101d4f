"""One call's record, filled in as the call proceeds and turned into a usage event at the end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from opentelemetry import metrics, trace
from prometheus_client import Counter, Histogram
from starlette.types import Receive

from gateway.http import wait_disconnect
from gateway.usage import UsageRecorder
from libs.common.db import new_id
from libs.common.events.usage import CallStatus, UsageRecorded, UsageSource
from libs.common.observability import GEN_AI_OPERATIONS, LATENCY_BUCKETS_SECONDS
from libs.common.outbox import current_traceparent

# Bucket boundaries shared by the Prometheus histograms and their OpenTelemetry twins.
TTFT_BUCKETS = DURATION_BUCKETS = LATENCY_BUCKETS_SECONDS

CALLS = Counter(
    "steward_gateway_calls_total", "Calls proxied upstream", ["kind", "model", "status"]
)
TTFT = Histogram(
    "steward_gateway_time_to_first_token_seconds",
    "From sending upstream to the first content delta (streams only)",
    ["model"],
    buckets=TTFT_BUCKETS,
)
UPSTREAM_DURATION = Histogram(
    "steward_gateway_call_duration_seconds",
    "Duration of proxied calls, gateway in to last byte out",
    ["kind"],
    buckets=DURATION_BUCKETS,
)
# What the gateway itself adds: arrival to sending upstream (admission, body, quota, credential).
# The SLO alert on its p99 (deploy/helm/files/prometheus-rules.yaml) reads it.
ADDED = Histogram(
    "steward_gateway_added_seconds",
    "Time the gateway spends on a call before the upstream sees it",
    ["kind"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)

# The same in OpenTelemetry (no-op proxies until configure_metrics installs a provider). One
# duration histogram stands for both the counter and the duration: its count is the calls.
# Steward's own names: the gen_ai.server.* ones come from metering, from the same usage events.
_meter = metrics.get_meter("steward.gateway")
OTEL_CALL_DURATION = _meter.create_histogram(
    "steward.gateway.call.duration",
    unit="s",
    description="Duration of proxied calls, gateway in to last byte out.",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
)
OTEL_TTFT = _meter.create_histogram(
    "steward.gateway.time_to_first_token",
    unit="s",
    description="From sending upstream to the first content delta (streams only).",
    explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
)
_attributes: dict[tuple[str, str, str, str | None], dict[str, str]] = {}


def _call_attributes(kind: str, model: str, status: str, error: str | None) -> dict[str, str]:
    """One dict per (kind, model, status, error), built once: the hot path only looks it up."""
    key = (kind, model, status, error)
    found = _attributes.get(key)
    if found is None:
        if len(_attributes) > 10_000:
            _attributes.clear()
        found = {
            "gen_ai.operation.name": GEN_AI_OPERATIONS.get(kind, kind),
            "gen_ai.request.model": model,
            "steward.call.status": status,
        }
        if error is not None:
            found["error.type"] = error
        _attributes[key] = found
    return found


Kind = Literal["chat", "completion", "embedding", "mcp"]


@dataclass(slots=True)
class Call:
    project: str
    credential_id: str
    subject: str
    model: str
    endpoint: str
    kind: Kind
    # The catalog asset and version serving the call (what metering prices it by).
    asset: str | None = None
    asset_version: str | None = None
    stream: bool = False
    started: float = 0.0  # perf_counter at arrival
    sent_upstream: float | None = None
    first_token: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_source: UsageSource = "upstream"
    http_status: int = 0
    status: CallStatus = "ok"
    error_type: str | None = None
    # The gateway process that served it (its quota ledger's id).
    gateway_id: str | None = None
    # It held quota (``UsageRecorded.admitted``): set where the quota is reserved.
    admitted: bool = False
    request_bytes: int | None = None
    response_bytes: int | None = None
    # The model asked for, when a model of the project's fallback chain served the call.
    fallback_from: str | None = None
    # The ``X-Request-Id`` of the HTTP request that carried the call.
    request_id: str | None = None
    # The usage event's id, fixed at the start: the in-flight journal's entry has the same one.
    event_id: str = field(default_factory=new_id)

    def fail(self, http_status: int, error_type: str) -> None:
        self.http_status = http_status
        self.status = "error"
        self.error_type = error_type

    def to_event(self) -> UsageRecorded:
        now = time.perf_counter()
        ttft = None
        if self.first_token is not None and self.sent_upstream is not None:
            ttft = round((self.first_token - self.sent_upstream) * 1000, 3)
        return UsageRecorded(
            event_id=self.event_id,
            time=datetime.now(UTC),
            project=self.project,
            credential_id=self.credential_id,
            subject_id=self.subject,
            model=self.model,
            endpoint=self.endpoint,
            asset=self.asset,
            asset_version=self.asset_version,
            kind=self.kind,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            ttft_ms=ttft,
            duration_ms=round((now - self.started) * 1000, 3),
            http_status=self.http_status,
            status=self.status,
            error_type=self.error_type,
            usage_source=self.usage_source,
            stream=self.stream,
            gateway_id=self.gateway_id,
            admitted=self.admitted,
            request_bytes=self.request_bytes,
            response_bytes=self.response_bytes,
            fallback_from=self.fallback_from,
            request_id=self.request_id,
        )

    def interrupted(self, prompt_tokens: int) -> UsageRecorded:
        """Its event as it reads if the gateway stops now, with the prompt estimate: what the
        in-flight journal keeps."""
        return self.to_event().model_copy(
            update={
                "status": "interrupted",
                "error_type": "gateway_stopped",
                "http_status": 0,
                "usage_source": "estimated",
                "prompt_tokens": prompt_tokens,
                "completion_tokens": 0,
                "total_tokens": prompt_tokens,
                "ttft_ms": None,
            }
        )

    def observe(self) -> None:
        """The call's Prometheus metrics and their OpenTelemetry twins."""
        duration = time.perf_counter() - self.started
        attributes = _call_attributes(self.kind, self.model, self.status, self.error_type)
        CALLS.labels(self.kind, self.model, self.status).inc()
        UPSTREAM_DURATION.labels(self.kind).observe(duration)
        OTEL_CALL_DURATION.record(duration, attributes)
        if self.sent_upstream is not None:
            ADDED.labels(self.kind).observe(self.sent_upstream - self.started)
        if self.first_token is not None and self.sent_upstream is not None:
            ttft = self.first_token - self.sent_upstream
            TTFT.labels(self.model).observe(ttft)
            OTEL_TTFT.record(ttft, attributes)


def finish(call: Call, usage: UsageRecorder, *, traced: bool) -> None:
    """The call's metrics, what it learnt on its request's span, and its usage event (in the
    request's trace when tracing is on)."""
    call.observe()
    if not traced:
        usage.record(call.to_event())
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(
            {
                "steward.project": call.project,
                "steward.endpoint": call.endpoint,
                "gen_ai.operation.name": GEN_AI_OPERATIONS[call.kind],
                "gen_ai.request.model": call.model,
                "gen_ai.usage.input_tokens": call.prompt_tokens,
                "gen_ai.usage.output_tokens": call.completion_tokens,
                "steward.call.status": call.status,
            }
        )
    usage.record(call.to_event(), traceparent=current_traceparent())


async def until_disconnect(work: Awaitable[None], receive: Receive) -> bool:
    """Run ``work`` in this task; if the client goes away first, cancel it. True on disconnect.

    Cancelling the work closes the upstream response, which closes its connection, so the
    upstream stops generating tokens nobody will read. One watcher task per call; the work
    itself runs in the caller's task (no second task on the hot path).
    """
    current = asyncio.current_task()
    assert current is not None
    state = {"finished": False, "gone": False}

    def on_disconnect(watcher: asyncio.Task[object]) -> None:
        if watcher.cancelled() or watcher.exception() is not None or state["finished"]:
            return
        state["gone"] = True
        current.cancel()

    watcher = asyncio.create_task(wait_disconnect(receive))
    watcher.add_done_callback(on_disconnect)
    try:
        await work
    except asyncio.CancelledError:
        if not state["gone"]:
            raise
        current.uncancel()
        return True
    finally:
        state["finished"] = True
        watcher.cancel()
    return False
