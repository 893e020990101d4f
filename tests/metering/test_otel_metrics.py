"""The GenAI metrics in OpenTelemetry: the same measurements as Prometheus' ``/metrics``, under the
semantic conventions' own names, units, attributes and buckets, exported over OTLP/HTTP only when
an endpoint is configured."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry import metrics
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    MetricsData,
)

from libs.common.bus import Bus
from libs.common.observability import configure_metrics, meter_provider
from services.metering.metrics import DURATION_BUCKETS, TOKEN_BUCKETS, TTFT_BUCKETS
from tests.helpers import bearer, unique
from tests.metering.support import eventually, publish, usage
from tests.metering.test_ingest import metric_sum


def histogram(data: MetricsData | None, name: str) -> Metric:
    assert data is not None, "nothing recorded at all"
    found = [
        metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
    ]
    assert len(found) == 1, f"{name}: {len(found)} streams"
    return found[0]


def points(metric: Metric, attributes: Mapping[str, Any]) -> list[HistogramDataPoint]:
    """The histogram's points whose attributes include ``attributes``."""
    return [
        point
        for point in metric.data.data_points
        if isinstance(point, HistogramDataPoint)
        and point.attributes is not None
        and all(point.attributes.get(k) == v for k, v in attributes.items())
    ]


def total(metric: Metric, attributes: Mapping[str, Any]) -> tuple[float, int]:
    """(sum, count) over the points whose attributes include ``attributes``."""
    found = points(metric, attributes)
    return sum(p.sum for p in found), sum(p.count for p in found)


async def test_committed_usage_is_in_opentelemetry_as_in_prometheus_to_the_token(
    metric_reader: InMemoryMetricReader,
    metering: httpx.AsyncClient,
    gateway_bus: Bus,
    admin_key: str,
) -> None:
    project = unique("otel")
    events = [
        usage(project, prompt=11 + i % 7, completion=2 + i % 4, model=model, ttft_ms=30.0 + i)
        for i in range(40)
        for model in ("llama-3-8b", "mistral-7b")
    ]
    events += [usage(project, prompt=64, completion=0, kind="embedding") for _ in range(5)]
    events += [usage(project, prompt=9, completion=0, status="error", duration_ms=250.0)]
    await publish(gateway_bus, events)

    async def all_counted() -> bool:
        response = await metering.get(
            "/v1/usage", params={"project": project}, headers=bearer(admin_key)
        )
        rows = response.json()["rows"]
        return bool(rows) and rows[0]["requests"] == len(events)

    await eventually(all_counted, what="every event counted")
    data = metric_reader.get_metrics_data()
    prometheus = (await metering.get("/metrics")).text

    tokens = histogram(data, "gen_ai.client.token.usage")
    assert tokens.unit == "{token}"
    prompt = sum(u.prompt_tokens for u in events)
    completion = sum(u.completion_tokens for u in events)
    assert total(tokens, {"steward.project": project, "gen_ai.token.type": "input"}) == (
        prompt,
        len(events),
    )
    assert total(tokens, {"steward.project": project, "gen_ai.token.type": "output"}) == (
        completion,
        len(events),
    )
    assert prompt == metric_sum(
        prometheus, "gen_ai_client_token_usage", project=project, gen_ai_token_type="input"
    )
    assert completion == metric_sum(
        prometheus, "gen_ai_client_token_usage", project=project, gen_ai_token_type="output"
    )
    mistral_out = sum(u.completion_tokens for u in events if u.model == "mistral-7b")
    mistral = {
        "steward.project": project,
        "gen_ai.request.model": "mistral-7b",
        "gen_ai.operation.name": "chat",
        "gen_ai.token.type": "output",
    }
    assert total(tokens, mistral) == (mistral_out, 40)
    embeddings = {"steward.project": project, "gen_ai.operation.name": "embeddings"}
    assert total(tokens, embeddings) == (5 * 64, 10)  # input 64 and output 0, five times
    for point in points(tokens, {"steward.project": project}):
        assert tuple(point.explicit_bounds) == TOKEN_BUCKETS

    duration = histogram(data, "gen_ai.server.request.duration")
    assert duration.unit == "s"
    failed = points(duration, {"steward.project": project, "error.type": "upstream_error"})
    assert [p.count for p in failed] == [1]
    assert failed[0].sum == pytest.approx(0.25)
    succeeded = [
        p
        for p in points(duration, {"steward.project": project})
        if p.attributes is not None and "error.type" not in p.attributes
    ]
    assert sum(p.count for p in succeeded) == len(events) - 1
    assert sum(p.sum for p in succeeded) == pytest.approx(0.12 * (len(events) - 1))
    assert all(tuple(p.explicit_bounds) == DURATION_BUCKETS for p in succeeded)

    ttft = histogram(data, "gen_ai.server.time_to_first_token")
    ttft_sum, ttft_count = total(ttft, {"steward.project": project})
    assert ttft_count == 80
    assert ttft_sum == pytest.approx(sum(u.ttft_ms or 0 for u in events) / 1000)
    assert ttft_sum == pytest.approx(
        metric_sum(prometheus, "gen_ai_server_time_to_first_token", project=project)
    )
    assert all(tuple(p.explicit_bounds) == TTFT_BUCKETS for p in points(ttft, {}))

    tpot = histogram(data, "gen_ai.server.time_per_output_token")
    tpot_sum, tpot_count = total(tpot, {"steward.project": project})
    assert tpot_count == sum(1 for u in events if u.ttft_ms is not None and u.completion_tokens > 1)
    assert tpot_sum == pytest.approx(
        metric_sum(prometheus, "gen_ai_server_time_per_output_token", project=project)
    )
    assert tpot_sum > 0


def test_gateway_calls_are_recorded_in_opentelemetry(
    metric_reader: InMemoryMetricReader,
) -> None:
    from gateway.calls import Call

    model = unique("model")
    ok = Call("p", "cred", "alice", model, "ep", "chat", stream=True, started=time.perf_counter())
    ok.sent_upstream, ok.first_token = 10.0, 10.25
    ok.observe()
    broken = Call("p", "cred", "alice", model, "ep", "embedding", started=time.perf_counter())
    broken.fail(502, "upstream_error")
    broken.observe()

    data = metric_reader.get_metrics_data()
    calls = histogram(data, "steward.gateway.call.duration")
    assert calls.unit == "s"
    chat = {"gen_ai.request.model": model, "gen_ai.operation.name": "chat"}
    assert [p.attributes for p in points(calls, chat)] == [{**chat, "steward.call.status": "ok"}]
    failed = {
        "gen_ai.request.model": model,
        "gen_ai.operation.name": "embeddings",
        "steward.call.status": "error",
        "error.type": "upstream_error",
    }
    assert total(calls, failed)[1] == 1
    ttft = histogram(data, "steward.gateway.time_to_first_token")
    ttft_sum, ttft_count = total(ttft, {"gen_ai.request.model": model})
    assert ttft_count == 1
    assert ttft_sum == pytest.approx(0.25)


def test_without_an_endpoint_no_meter_provider_is_installed() -> None:
    before = metrics.get_meter_provider()
    configure_metrics("metering", None)
    configure_metrics("metering", "")
    assert metrics.get_meter_provider() is before


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver that keeps what it is sent."""

    received: list[tuple[str, ExportMetricsServiceRequest]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.received.append((self.path, ExportMetricsServiceRequest.FromString(body)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, ExportMetricsServiceRequest]]]]:
    received: list[tuple[str, ExportMetricsServiceRequest]] = []
    handler = type("Handler", (_Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", received
    finally:
        server.shutdown()
        server.server_close()


def test_the_provider_pushes_otlp_http_to_the_endpoint_as_a_steward_service(
    collector: tuple[str, list[tuple[str, ExportMetricsServiceRequest]]],
) -> None:
    """The provider ``configure_metrics`` installs, built on its own (the global one is taken)."""
    endpoint, received = collector
    provider = meter_provider("metering", endpoint, export_interval_seconds=3600)
    try:
        tokens = provider.get_meter("steward.metering").create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        tokens.record(42, {"gen_ai.token.type": "input"})
        assert provider.force_flush(timeout_millis=10_000)
    finally:
        provider.shutdown()

    assert received, "nothing exported"
    path, request = received[0]
    assert path == "/v1/metrics"
    resource = request.resource_metrics[0].resource
    service = {a.key: a.value.string_value for a in resource.attributes}["service.name"]
    assert service == "steward-metering"
    exported = request.resource_metrics[0].scope_metrics[0].metrics[0]
    assert exported.name == "gen_ai.client.token.usage"
    assert exported.unit == "{token}"
    point = exported.histogram.data_points[0]
    assert (point.sum, point.count) == (42, 1)
    assert tuple(point.explicit_bounds) == TOKEN_BUCKETS
