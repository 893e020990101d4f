"""The GenAI metrics, in Prometheus and (when an exporter is set) in OpenTelemetry.

Prometheus names follow the OpenTelemetry GenAI semantic conventions: ``gen_ai.client.token.usage``
becomes ``gen_ai_client_token_usage`` and so on; attributes become labels (``gen_ai_token_type``,
``gen_ai_operation_name``, ``error_type``), plus ``project`` and ``model``. The same measurements
go to OpenTelemetry instruments with the conventions' own names, units and attributes
(``gen_ai.request.model``, ``gen_ai.token.type``…, plus ``steward.project``); they are the API's
no-ops unless ``configure_metrics`` installed an exporting provider. Both use the conventions'
advised buckets for tokens and time per output token, and 10 ms steps below 1 s for durations
and time to first token (the advised ones jump from 640 ms to 1.28 s), defined once below.
``gen_ai.provider.name`` is left out: metering knows the model asked for, not who serves it.

They are observed once per usage event, after the transaction that counted it commits, so
``/metrics`` agrees with the usage API: the ``_sum`` of ``gen_ai_client_token_usage`` is the number
of tokens counted by this metering process since it started (Prometheus' ``increase()`` copes with
restarts; with several metering replicas, sum them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from opentelemetry import metrics as otel
from prometheus_client import Counter, Gauge, Histogram

from libs.common import quota as q
from libs.common.events.metering import QuotaState
from libs.common.events.usage import UsageRecorded
from libs.common.observability import GEN_AI_OPERATIONS, LATENCY_BUCKETS_SECONDS

# The semantic conventions' advised ExplicitBucketBoundaries, for both exporters.
TOKEN_BUCKETS: tuple[float, ...] = (
    1,
    4,
    16,
    64,
    256,
    1024,
    4096,
    16384,
    65536,
    262144,
    1048576,
    4194304,
    16777216,
    67108864,
)
# Finer than advised: a dashboard's percentiles resolve 10 ms below 1 s.
DURATION_BUCKETS = TTFT_BUCKETS = LATENCY_BUCKETS_SECONDS
TPOT_BUCKETS: tuple[float, ...] = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)

TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "Tokens used per call (gen_ai.client.token.usage), by gen_ai_token_type input/output",
    ["project", "model", "gen_ai_operation_name", "gen_ai_token_type"],
    buckets=TOKEN_BUCKETS,
)
REQUEST_DURATION = Histogram(
    "gen_ai_server_request_duration",
    "Seconds per call as the gateway measured it (gen_ai.server.request.duration)",
    ["project", "model", "gen_ai_operation_name", "error_type"],
    buckets=DURATION_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "gen_ai_server_time_to_first_token",
    "Seconds to the first token of streamed calls (gen_ai.server.time_to_first_token)",
    ["project", "model", "gen_ai_operation_name"],
    buckets=TTFT_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "gen_ai_server_time_per_output_token",
    "Seconds per output token after the first (gen_ai.server.time_per_output_token)",
    ["project", "model", "gen_ai_operation_name"],
    buckets=TPOT_BUCKETS,
)

# Module-level instruments are the API's proxies until a provider is installed, then record
# into it (configure_metrics runs in the lifespan, after this import).
_meter = otel.get_meter("steward.metering")
OTEL_TOKEN_USAGE = _meter.create_histogram(
    "gen_ai.client.token.usage",
    unit="{token}",
    description="Number of input and output tokens used.",
    explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
)
OTEL_REQUEST_DURATION = _meter.create_histogram(
    "gen_ai.server.request.duration",
    unit="s",
    description="Generative AI server request duration, as the gateway measured it.",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
)
OTEL_TIME_TO_FIRST_TOKEN = _meter.create_histogram(
    "gen_ai.server.time_to_first_token",
    unit="s",
    description="Time to the first token of streamed responses.",
    explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
)
OTEL_TIME_PER_OUTPUT_TOKEN = _meter.create_histogram(
    "gen_ai.server.time_per_output_token",
    unit="s",
    description="Time per output token generated after the first token.",
    explicit_bucket_boundaries_advisory=TPOT_BUCKETS,
)

EVENTS = Counter(
    "steward_metering_usage_events_total",
    "Usage events received, by outcome (counted, duplicate, rejected)",
    ["outcome"],
)
BATCH_SECONDS = Histogram(
    "steward_metering_batch_seconds",
    "Time to apply one batch of usage events (one transaction)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
LAG_SECONDS = Gauge(
    "steward_metering_lag_seconds",
    "Age of the newest usage event counted, when it was counted",
)
WEBHOOKS = Counter(
    "steward_metering_webhook_deliveries_total",
    "Quota webhook attempts, by outcome (delivered, retry, failed)",
    ["outcome"],
)
COST = Counter(
    "steward_metering_cost_total",
    "Cost of the usage counted, in the configured currency (the usage API's figure)",
    ["project", "model", "currency"],
)
QUOTA_USED = Gauge(
    "steward_metering_quota_used_ratio",
    "Share of a quota's limit used in its current window, by limit (1 or more: exceeded)",
    ["project", "quota_id", "window", "dimension"],
)


@dataclass(frozen=True, slots=True)
class _Series:
    """One (project, model, operation)'s Prometheus children and OpenTelemetry attributes."""

    tokens_in: Histogram
    tokens_out: Histogram
    ttft: Histogram
    tpot: Histogram
    duration_ok: Histogram
    attributes: Mapping[str, str]
    input_attributes: Mapping[str, str]
    output_attributes: Mapping[str, str]


class _Children:
    """Label lookups and attribute dicts cached per (project, model, operation): building them
    costs more than observing, and with no exporter set nothing else is spent per event."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str, str], _Series] = {}

    def get(self, project: str, model: str, operation: str) -> _Series:
        key = (project, model, operation)
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) > 100_000:
                self._cache.clear()
            attributes = {
                "gen_ai.operation.name": operation,
                "gen_ai.request.model": model,
                "steward.project": project,
            }
            found = _Series(
                tokens_in=TOKEN_USAGE.labels(project, model, operation, "input"),
                tokens_out=TOKEN_USAGE.labels(project, model, operation, "output"),
                ttft=TIME_TO_FIRST_TOKEN.labels(project, model, operation),
                tpot=TIME_PER_OUTPUT_TOKEN.labels(project, model, operation),
                duration_ok=REQUEST_DURATION.labels(project, model, operation, ""),
                attributes=attributes,
                input_attributes={**attributes, "gen_ai.token.type": "input"},
                output_attributes={**attributes, "gen_ai.token.type": "output"},
            )
            self._cache[key] = found
        return found


_children = _Children()


def observe_quota(state: QuotaState) -> None:
    """A quota's use of each of its limits in the current window, as last published."""
    used = q.used_in(state)
    for dimension in q.DIMENSIONS:
        limit = q.limit_of(state.limits, dimension)
        if limit:
            ratio = q.used_of(dimension, used) / limit
            QUOTA_USED.labels(state.project, state.quota_id, state.window, dimension).set(ratio)


def observe(
    events: Sequence[UsageRecorded], costs: Sequence[int] = (), currency: str = "USD"
) -> None:
    """Record committed usage events (and their costs, in nano-units), in Prometheus and
    OpenTelemetry alike."""
    for e, cost in zip(events, costs, strict=False):
        if cost:
            COST.labels(e.project, e.model, currency).inc(cost / 1_000_000_000)
    for e in events:
        operation = GEN_AI_OPERATIONS.get(e.kind, e.kind)
        series = _children.get(e.project, e.model, operation)
        series.tokens_in.observe(e.prompt_tokens)
        series.tokens_out.observe(e.completion_tokens)
        OTEL_TOKEN_USAGE.record(e.prompt_tokens, series.input_attributes)
        OTEL_TOKEN_USAGE.record(e.completion_tokens, series.output_attributes)
        duration = e.duration_ms / 1000
        if e.status == "ok":
            series.duration_ok.observe(duration)
            OTEL_REQUEST_DURATION.record(duration, series.attributes)
        else:
            error = e.error_type or e.status
            REQUEST_DURATION.labels(e.project, e.model, operation, error).observe(duration)
            OTEL_REQUEST_DURATION.record(duration, {**series.attributes, "error.type": error})
        if e.ttft_ms is not None:
            ttft = e.ttft_ms / 1000
            series.ttft.observe(ttft)
            OTEL_TIME_TO_FIRST_TOKEN.record(ttft, series.attributes)
            if e.completion_tokens > 1 and e.duration_ms > e.ttft_ms:
                tpot = (e.duration_ms - e.ttft_ms) / 1000 / (e.completion_tokens - 1)
                series.tpot.observe(tpot)
                OTEL_TIME_PER_OUTPUT_TOKEN.record(tpot, series.attributes)
