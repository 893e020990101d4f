"""One trace per request, from the client through the gateway to the service or model upstream
and into the usage event — with the SDK's in-memory exporter, over real sockets."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from libs.common.settings import Settings
from tests.gateway.conftest import RunningGateway, running_gateway, tenant
from tests.gateway.support import eventually, upstream_json, usage_events
from tests.helpers import SpanRecorder, bearer

KONG_YML = """
_format_version: "3.0"
services:
- name: traced-echo
  url: http://127.0.0.1:{port}/anything
  routes:
  - name: traced-route
    paths: [/traced]
"""


@pytest.fixture(scope="module")
async def traced(
    span_recorder: SpanRecorder,
    gateway_settings: Settings,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[RunningGateway]:
    """A gateway started after the SDK tracer provider was installed, so that it traces."""
    settings = gateway_settings.model_copy(
        update={"data_dir": tmp_path_factory.mktemp("traced-gateway")}
    )
    async with running_gateway(settings) as running:
        await running.gateway.wait_loaded(10)
        yield running


def finished(
    spans: InMemorySpanExporter, name: str, trace_id: int | None = None
) -> list[ReadableSpan]:
    return [
        span
        for span in spans.get_finished_spans()
        if span.name == name and (trace_id is None or _context(span).trace_id == trace_id)
    ]


async def one(spans: InMemorySpanExporter, name: str, trace_id: int | None = None) -> ReadableSpan:
    """The span called ``name`` (in ``trace_id``), once it has ended; there must be one only."""
    found: list[ReadableSpan] = await eventually(lambda: finished(spans, name, trace_id))
    assert len(found) == 1, [span.name for span in found]
    return found[0]


def _context(span: ReadableSpan) -> Any:
    assert span.context is not None
    return span.context


def ancestors(span: ReadableSpan, spans: InMemorySpanExporter) -> list[int]:
    """The span ids above ``span`` among the finished spans, nearest first."""
    by_id = {_context(s).span_id: s for s in spans.get_finished_spans()}
    found: list[int] = []
    parent = span.parent
    while parent is not None:
        found.append(parent.span_id)
        above = by_id.get(parent.span_id)
        parent = above.parent if above is not None else None
    return found


def traceparent_parts(value: str) -> tuple[int, int]:
    version, trace_id, span_id, _flags = value.split("-")
    assert version == "00"
    return int(trace_id, 16), int(span_id, 16)


async def upstream_traceparent(upstream: str, marker: str) -> str:
    """The ``traceparent`` the test upstream received with the request whose prompt was
    ``marker``."""
    log = await upstream_json(upstream, "/_log")
    [entry] = [e for e in log if marker in str(e["body"].get("messages"))]
    return str(entry["headers"]["traceparent"])


async def test_one_trace_covers_the_gateway_and_the_service_behind_api(
    traced: RunningGateway, admin_key: str, spans: InMemorySpanExporter
) -> None:
    async with httpx.AsyncClient(base_url=traced.url) as client:
        response = await client.get("/api/authz/v1/whoami", headers=bearer(admin_key))
    assert response.status_code == 200

    gateway = await one(spans, "GET /api/authz/{path}")
    assert gateway.kind == SpanKind.SERVER
    assert gateway.parent is None  # the client sent no trace: the gateway starts it
    trace_id = _context(gateway).trace_id
    authz = await one(spans, "GET /v1/whoami", trace_id)
    assert _context(gateway).span_id in ancestors(authz, spans)
    assert gateway.attributes is not None
    assert gateway.attributes["http.route"] == "/api/authz/{path}"
    assert gateway.attributes["url.path"] == "/api/authz/v1/whoami"
    assert gateway.attributes["http.response.status_code"] == 200
    assert gateway.status.status_code != StatusCode.ERROR


async def test_a_model_call_is_one_trace_from_gateway_to_upstream_and_usage_event(
    traced: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    upstream: str,
    settings: Settings,
    spans: InMemorySpanExporter,
) -> None:
    team = await tenant(authz, admin_key, traced, ["echo"])
    marker = f"marker-{secrets.token_hex(4)}"
    async with httpx.AsyncClient(base_url=traced.url) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": marker}]},
            headers=bearer(team.key),
        )
    assert response.status_code == 200

    gateway = await one(spans, "POST /v1/chat/completions")
    trace_id, gateway_id = _context(gateway).trace_id, _context(gateway).span_id
    assert gateway.attributes is not None
    assert gateway.attributes["steward.project"] == team.project
    assert gateway.attributes["gen_ai.request.model"] == "echo"
    assert gateway.attributes["gen_ai.usage.input_tokens"] == 7  # the test upstream's usage
    assert gateway.attributes["http.response.status_code"] == 200

    # The upstream call is a CLIENT child span, and the upstream received its context.
    upstream_call = await one(spans, "POST", trace_id)
    assert upstream_call.kind == SpanKind.CLIENT
    assert upstream_call.parent is not None and upstream_call.parent.span_id == gateway_id
    received = traceparent_parts(await upstream_traceparent(upstream, marker))
    assert received == (trace_id, _context(upstream_call).span_id)

    # The usage event of the call belongs to the request's trace.
    [event] = await usage_events(settings.nats_url, settings.event_namespace, team.project, 1)
    assert traceparent_parts(event["traceparent"]) == (trace_id, gateway_id)


async def test_the_clients_trace_is_continued_not_forwarded_as_is(
    traced: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    upstream: str,
    spans: InMemorySpanExporter,
) -> None:
    team = await tenant(authz, admin_key, traced, ["echo"])
    trace_id, parent_id = secrets.randbits(128) | 1, secrets.randbits(64) | 1
    incoming = f"00-{trace_id:032x}-{parent_id:016x}-01"
    marker = f"marker-{secrets.token_hex(4)}"
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": marker}]}
    async with httpx.AsyncClient(base_url=traced.url) as client:
        response = await client.post(
            "/v1/chat/completions",
            json=body,
            headers={**bearer(team.key), "traceparent": incoming},
        )
    assert response.status_code == 200
    assert "[DONE]" in response.text

    gateway = await one(spans, "POST /v1/chat/completions", trace_id)
    assert gateway.parent is not None and gateway.parent.is_remote
    assert gateway.parent.span_id == parent_id
    upstream_call = await one(spans, "POST", trace_id)
    assert upstream_call.status.status_code != StatusCode.ERROR  # the stream was read to the end
    # The upstream's parent is the gateway's call, not the client's span.
    received = traceparent_parts(await upstream_traceparent(upstream, marker))
    assert received == (trace_id, _context(upstream_call).span_id)


async def test_a_failing_upstream_marks_both_spans_as_errors(
    traced: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    spans: InMemorySpanExporter,
) -> None:
    team = await tenant(authz, admin_key, traced, ["echo-error"])
    async with httpx.AsyncClient(base_url=traced.url) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "echo-error", "messages": [{"role": "user", "content": "hi"}]},
            headers=bearer(team.key),
        )
    assert response.status_code == 500

    gateway = await one(spans, "POST /v1/chat/completions")
    assert gateway.status.status_code == StatusCode.ERROR
    assert gateway.attributes is not None
    assert gateway.attributes["error.type"] == "500"
    upstream_call = await one(spans, "POST", _context(gateway).trace_id)
    assert upstream_call.status.status_code == StatusCode.ERROR


async def test_probes_and_console_files_make_no_spans(
    traced: RunningGateway, admin_key: str, spans: InMemorySpanExporter
) -> None:
    async with httpx.AsyncClient(base_url=traced.url) as client:
        for path in ("/healthz", "/readyz", "/console/"):
            await client.get(path)
        # A traced request after them: once its span has ended, theirs would have too.
        await client.get("/v1/models", headers=bearer(admin_key))
    await one(spans, "GET /v1/models")
    # Only the gateway's own spans: the services in this process trace their work too.
    ours = [
        span.name
        for span in spans.get_finished_spans()
        if span.instrumentation_scope is not None
        and span.instrumentation_scope.name == "steward.gateway"
    ]
    assert ours == ["GET /v1/models"]


async def test_a_kong_route_names_the_span_and_its_upstream_gets_the_context(
    traced: RunningGateway, admin_key: str, upstream: str, spans: InMemorySpanExporter
) -> None:
    config = KONG_YML.format(port=upstream.rsplit(":", 1)[1])
    async with httpx.AsyncClient(base_url=traced.admin_url) as admin:
        loaded = await admin.post(
            "/config",
            content=config,
            headers={**bearer(admin_key), "content-type": "text/yaml"},
        )
    assert loaded.status_code == 201, loaded.text
    async with httpx.AsyncClient(base_url=traced.url) as client:
        response = await client.get("/traced/42")
    assert response.status_code == 200

    gateway = await one(spans, "GET /traced")  # the route's path, not the id after it
    assert gateway.attributes is not None
    assert gateway.attributes["steward.kong.route"] == "traced-route"
    received = traceparent_parts(response.json()["headers"]["traceparent"])
    assert received == (_context(gateway).trace_id, _context(gateway).span_id)
