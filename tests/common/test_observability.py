"""Request ids, JSON logs, Prometheus metrics, and trace context carried into events."""

from __future__ import annotations

import json
import logging

import httpx
from fastapi import FastAPI
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select

from libs.common.events import CloudEvent
from libs.common.observability import JSONFormatter, request_id_var
from services.authz.models import bus_tables
from tests.helpers import bearer, member_key, new_project, unique


async def test_a_safe_request_id_is_echoed_and_an_unsafe_one_replaced(
    authz: httpx.AsyncClient,
) -> None:
    echoed = await authz.get("/healthz", headers={"X-Request-Id": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    replaced = await authz.get("/healthz", headers={"X-Request-Id": "bad id\twith spaces"})
    assert replaced.headers["x-request-id"] not in ("", "bad id\twith spaces")
    generated = await authz.get("/healthz")
    assert len(generated.headers["x-request-id"]) == 36


async def test_metrics_count_requests_by_route_template(
    authz: httpx.AsyncClient, admin_key: str
) -> None:
    await authz.get("/v1/projects/does-not-exist", headers=bearer(admin_key))
    text = (await authz.get("/metrics")).text
    assert (
        'steward_http_requests_total{method="GET",route="/v1/projects/{project}",'
        'service="authz",status="404"}'
    ) in text
    assert "does-not-exist" not in text  # ids never become label values


async def test_readiness_reports_database_and_nats(authz: httpx.AsyncClient) -> None:
    ready = await authz.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "nats": "ok"}}


def test_json_logs_carry_the_request_id_and_extra_fields() -> None:
    record = logging.LogRecord("steward.test", logging.INFO, __file__, 1, "hello %s", ("x",), None)
    record.project = "p1"
    token = request_id_var.set("rid-1")
    try:
        line = json.loads(JSONFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["message"] == "hello x"
    assert line["request_id"] == "rid-1"
    assert line["project"] == "p1"
    assert line["level"] == "info"


async def test_a_request_is_traced_and_its_trace_travels_into_the_events_it_causes(
    authz: httpx.AsyncClient, authz_app: FastAPI, admin_key: str, spans: InMemorySpanExporter
) -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await authz.get("/v1/whoami", headers={**bearer(admin_key), "traceparent": parent})
    server = [s for s in spans.get_finished_spans() if s.name == "GET /v1/whoami"]
    assert len(server) == 1
    assert format(server[0].context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert server[0].attributes is not None
    assert server[0].attributes["http.response.status_code"] == 200

    # A state change made under that trace emits its events with the same trace id.
    name = unique("traced")
    await authz.post(
        "/v1/projects", json={"name": name}, headers={**bearer(admin_key), "traceparent": parent}
    )
    outbox = bus_tables.outbox
    async with authz_app.state.ctx.sessionmaker() as session:
        rows = (await session.scalars(select(outbox.c.event))).all()
    events = [CloudEvent.model_validate_json(r) for r in rows]
    created = [e for e in events if e.data.get("project") == name]
    assert created and all(
        e.traceparent and "0af7651916cd43dd8448eb211c80319c" in e.traceparent for e in created
    )


async def test_a_service_calling_another_carries_the_trace_into_it(
    authz: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
    spans: InMemorySpanExporter,
) -> None:
    # A key approval has never seen: it asks authz who holds it, within the request's trace.
    project = await new_project(authz, admin_key, "trace")
    key = await member_key(authz, admin_key, project, "viewer", ["requests:write"])
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    answer = await approval.get(
        f"/v1/projects/{project}/requests", headers={**bearer(key), "traceparent": parent}
    )
    assert answer.status_code == 200
    finished = spans.get_finished_spans()
    approval_span = next(s for s in finished if s.name == "GET /v1/projects/{project}/requests")
    trace_id = approval_span.context.trace_id
    assert format(trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    in_trace = [s for s in finished if s.context.trace_id == trace_id]
    # authz's server span, below approval's (through the client span of the call it made).
    authz_spans = [s for s in in_trace if s.kind.name == "SERVER" and s is not approval_span]
    assert authz_spans, "authz's span is not in approval's trace"
    ids = {s.context.span_id for s in in_trace}
    assert all(s.parent is not None and s.parent.span_id in ids for s in authz_spans)
    started = approval_span.start_time or 0
    assert all((s.start_time or 0) >= started for s in authz_spans)
