"""JSON logs with request ids, Prometheus request metrics, and OpenTelemetry traces and metrics.

Tracing and OpenTelemetry metrics are off (the API's no-op tracer and meter) unless an OTLP
endpoint is configured, so they cost nothing by default; Prometheus' ``/metrics`` is always on.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from libs.common.db import new_id

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")

HTTP_REQUESTS = Counter(
    "steward_http_requests_total",
    "HTTP requests served",
    ["service", "method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "steward_http_request_duration_seconds",
    "HTTP request duration",
    ["service", "method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "color_message",
}


class JSONFormatter(logging.Formatter):
    """One JSON object per line; ``extra=`` fields are kept, the request id is added."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if rid := request_id_var.get():
            entry["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    formatter = handler.formatter
    assert formatter is not None
    formatter.converter = time.gmtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx and httpcore log every request at INFO: a local endpoint's health checks alone made
    # most of the inference log. Failures still show (WARNING), and traces show every call.
    for noisy in ("uvicorn.access", "nats", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def configure_tracing(service: str, otlp_endpoint: str | None) -> None:
    """Install an SDK tracer provider exporting over OTLP/HTTP, only when an endpoint is set."""
    if not otlp_endpoint:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"steward-{service}"}))
    endpoint = otlp_endpoint.rstrip("/") + "/v1/traces"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)


# Latency histogram boundaries (seconds): 10 ms steps up to 1 s, where model latencies live and
# a dashboard's percentiles must not jump from one coarse edge to the next; coarser beyond.
LATENCY_BUCKETS_SECONDS: tuple[float, ...] = (
    *(round(i / 100, 2) for i in range(1, 101)),
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)

# OpenTelemetry's gen_ai.operation.name for each kind of call the gateway proxies (the ``kind``
# of a usage event): the gateway and metering label their metrics with it.
GEN_AI_OPERATIONS: dict[str, str] = {
    "chat": "chat",
    "completion": "text_completion",
    "embedding": "embeddings",
    "mcp": "execute_tool",
}


def meter_provider(
    service: str, otlp_endpoint: str, export_interval_seconds: float = 60.0
) -> MeterProvider:
    """An SDK meter provider pushing every instrument to ``<endpoint>/v1/metrics`` (OTLP/HTTP).

    Separate from ``configure_metrics`` so that it can be exercised without taking the
    process-wide provider, which can be set only once.
    """
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    endpoint = otlp_endpoint.rstrip("/") + "/v1/metrics"
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=endpoint),
        export_interval_millis=export_interval_seconds * 1000,
    )
    return MeterProvider(
        metric_readers=[reader],
        resource=Resource.create({"service.name": f"steward-{service}"}),
    )


def configure_metrics(
    service: str, otlp_endpoint: str | None, export_interval_seconds: float = 60.0
) -> None:
    """Install an SDK meter provider exporting over OTLP/HTTP, only when an endpoint is set.

    Instruments made earlier from ``metrics.get_meter`` (module-level ones) are the API's proxies
    and start recording into it from here on. Without an endpoint the proxies stay no-ops. A
    second call (several services' lifespans in one process) keeps the first provider rather than
    starting another export thread that nothing would record into.
    """
    if not otlp_endpoint:
        return
    from opentelemetry.sdk.metrics import MeterProvider

    if isinstance(metrics.get_meter_provider(), MeterProvider):
        return
    metrics.set_meter_provider(meter_provider(service, otlp_endpoint, export_interval_seconds))


class RequestContextMiddleware:
    """Request id in and out, and Prometheus metrics per route template.

    Server spans (with the caller's ``traceparent``) come from FastAPI's native OpenTelemetry
    support, which follows the global tracer provider set by ``configure_tracing``.
    """

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), ""
        )
        request_id = incoming if _SAFE_REQUEST_ID.match(incoming) else new_id()
        token = request_id_var.set(request_id)
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"].append((b"x-request-id", request_id.encode()))
            await send(message)

        method = scope["method"]
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = getattr(scope.get("route"), "path", None) or "unmatched"
            HTTP_REQUESTS.labels(self.service, method, template, str(status)).inc()
            HTTP_DURATION.labels(self.service, method, template).observe(
                time.perf_counter() - started
            )
            request_id_var.reset(token)
