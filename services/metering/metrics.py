"""Prometheus metrics named after the OpenTelemetry GenAI semantic conventions.

``gen_ai.client.token.usage`` becomes ``gen_ai_client_token_usage`` and so on; attributes become
labels (``gen_ai_token_type``, ``gen_ai_operation_name``, ``error_type``), plus ``project`` and
``model``. Buckets are the conventions' advice. They are observed once per usage event, after the
transaction that counted it commits, so ``/metrics`` agrees with the usage API: the ``_sum`` of
``gen_ai_client_token_usage`` is the number of tokens counted by this metering process since it
started (Prometheus' ``increase()`` copes with restarts; with several metering replicas, sum them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from libs.common.events.usage import UsageRecorded

TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "Tokens used per call (gen_ai.client.token.usage), by gen_ai_token_type input/output",
    ["project", "model", "gen_ai_operation_name", "gen_ai_token_type"],
    buckets=(
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
    ),
)
REQUEST_DURATION = Histogram(
    "gen_ai_server_request_duration",
    "Seconds per call as the gateway measured it (gen_ai.server.request.duration)",
    ["project", "model", "gen_ai_operation_name", "error_type"],
    buckets=(
        0.01,
        0.02,
        0.04,
        0.08,
        0.16,
        0.32,
        0.64,
        1.28,
        2.56,
        5.12,
        10.24,
        20.48,
        40.96,
        81.92,
    ),
)
TIME_TO_FIRST_TOKEN = Histogram(
    "gen_ai_server_time_to_first_token",
    "Seconds to the first token of streamed calls (gen_ai.server.time_to_first_token)",
    ["project", "model", "gen_ai_operation_name"],
    buckets=(
        0.001,
        0.005,
        0.01,
        0.02,
        0.04,
        0.06,
        0.08,
        0.1,
        0.25,
        0.5,
        0.75,
        1.0,
        2.5,
        5.0,
        7.5,
        10.0,
    ),
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "gen_ai_server_time_per_output_token",
    "Seconds per output token after the first (gen_ai.server.time_per_output_token)",
    ["project", "model", "gen_ai_operation_name"],
    buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5),
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

# OpenTelemetry's gen_ai.operation.name for each kind of call the gateway records.
OPERATIONS: dict[str, str] = {
    "chat": "chat",
    "completion": "text_completion",
    "embedding": "embeddings",
    "mcp": "execute_tool",
}


class _Children:
    """Label lookups cached per (project, model, operation): they cost more than observing."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str, str], tuple[Any, ...]] = {}

    def get(self, project: str, model: str, operation: str) -> tuple[Any, ...]:
        key = (project, model, operation)
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) > 100_000:
                self._cache.clear()
            found = (
                TOKEN_USAGE.labels(project, model, operation, "input"),
                TOKEN_USAGE.labels(project, model, operation, "output"),
                TIME_TO_FIRST_TOKEN.labels(project, model, operation),
                TIME_PER_OUTPUT_TOKEN.labels(project, model, operation),
                REQUEST_DURATION.labels(project, model, operation, ""),
            )
            self._cache[key] = found
        return found


_children = _Children()


def observe(events: Iterable[UsageRecorded]) -> None:
    """Record committed usage events."""
    for e in events:
        operation = OPERATIONS.get(e.kind, e.kind)
        tokens_in, tokens_out, ttft, tpot, ok = _children.get(e.project, e.model, operation)
        tokens_in.observe(e.prompt_tokens)
        tokens_out.observe(e.completion_tokens)
        if e.status == "ok":
            duration = ok
        else:
            duration = REQUEST_DURATION.labels(
                e.project, e.model, operation, e.error_type or e.status
            )
        duration.observe(e.duration_ms / 1000)
        if e.ttft_ms is not None:
            ttft.observe(e.ttft_ms / 1000)
            if e.completion_tokens > 1 and e.duration_ms > e.ttft_ms:
                tpot.observe((e.duration_ms - e.ttft_ms) / 1000 / (e.completion_tokens - 1))
