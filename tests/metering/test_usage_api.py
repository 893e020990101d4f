"""The usage API: totals, series, top consumers, CSV, raw events, cost, and tenant filtering."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from libs.common.bus import Bus
from libs.common.db import utcnow
from libs.common.events.usage import UsageRecorded
from tests.helpers import bearer, member_key, new_project, ok, serve
from tests.metering.support import credential, eventually, publish, usage


async def wait_counted(
    metering: httpx.AsyncClient, key: str, project: str, requests: int, **params: Any
) -> None:
    async def counted() -> bool:
        response = await metering.get(
            "/v1/usage", params={"project": project, **params}, headers=bearer(key)
        )
        rows = response.json()["rows"]
        return bool(rows and rows[0]["requests"] >= requests)

    await eventually(counted, what=f"{requests} calls of {project} counted")


def hours_ago(n: float) -> datetime:
    return (utcnow() - timedelta(hours=n)).replace(minute=10, second=0, microsecond=0)


@pytest.fixture(scope="module")
async def two_projects(
    authz: httpx.AsyncClient, metering: httpx.AsyncClient, gateway_bus: Bus, admin_key: str
) -> dict[str, Any]:
    """Two projects with known usage: a (two models, two keys) and b."""
    a = await new_project(authz, admin_key, "usage-a")
    b = await new_project(authz, admin_key, "usage-b")
    ka, kb, kc = credential(), credential(), credential()
    three_hours = hours_ago(3)
    events = [
        *(usage(a, model="llama", credential_id=ka, prompt=100, completion=10) for _ in range(4)),
        *(
            usage(a, model="mistral", credential_id=kb, prompt=50, completion=50, time=three_hours)
            for _ in range(2)
        ),
        usage(a, model="mistral", credential_id=kb, prompt=1, completion=0, status="error"),
        *(usage(b, model="llama", credential_id=kc, prompt=1000, completion=500) for _ in range(3)),
    ]
    await publish(gateway_bus, events)
    await wait_counted(metering, admin_key, a, 7)
    await wait_counted(metering, admin_key, b, 3)
    return {"a": a, "b": b, "keys": (ka, kb, kc), "three_hours": three_hours}


async def test_totals_grouped_by_model_and_credential(
    metering: httpx.AsyncClient, admin_key: str, two_projects: dict[str, Any]
) -> None:
    a = two_projects["a"]
    ka, kb, _ = two_projects["keys"]
    body = await ok(
        await metering.get(
            "/v1/usage",
            params={"project": a, "group_by": "model,credential"},
            headers=bearer(admin_key),
        )
    )
    assert body["group_by"] == ["model", "credential"]
    rows = {(r["model"], r["credential"]): r for r in body["rows"]}
    assert set(rows) == {("llama", ka), ("mistral", kb)}
    assert rows[("llama", ka)]["requests"] == 4
    assert rows[("llama", ka)]["total_tokens"] == 440
    assert rows[("mistral", kb)]["requests"] == 3
    assert rows[("mistral", kb)]["errors"] == 1
    assert rows[("mistral", kb)]["prompt_tokens"] == 101
    # Every call took 120 ms: the percentiles say so, within the sketches' 1 %.
    assert rows[("mistral", kb)]["duration_ms"]["p50"] == pytest.approx(120.0, rel=0.01)

    # The same totals with repeated parameters, and a time range that leaves out the old calls.
    recent = await ok(
        await metering.get(
            "/v1/usage",
            params=[
                ("project", a),
                ("group_by", "model"),
                ("start", (utcnow() - timedelta(hours=1)).isoformat()),
            ],
            headers=bearer(admin_key),
        )
    )
    assert {r["model"]: r["requests"] for r in recent["rows"]} == {"llama": 4, "mistral": 1}


async def test_mcp_usage_by_tool(
    authz: httpx.AsyncClient, metering: httpx.AsyncClient, gateway_bus: Bus, admin_key: str
) -> None:
    """A tool call's endpoint is ``<server>/<tool>``; server names may hold slashes. Grouped by
    tool (and server), model calls beside them have none."""
    p = await new_project(authz, admin_key, "usage-tools")
    server = "io.github.acme/weather"
    calls = ["forecast", "forecast", "forecast", "set_alert"]
    events = [
        *(
            usage(
                p,
                model=server,
                endpoint=f"{server}/{tool}",
                kind="mcp",
                request_bytes=100 + i,
                response_bytes=1000 * (i + 1),
            )
            for i, tool in enumerate(calls)
        ),
        usage(p, model="llama", endpoint="llama", prompt=10, completion=5),
    ]
    await publish(gateway_bus, events)
    await wait_counted(metering, admin_key, p, 5)
    body = await ok(
        await metering.get(
            "/v1/usage", params={"project": p, "group_by": "model,tool"}, headers=bearer(admin_key)
        )
    )
    rows = {(r["model"], r["tool"]): r["requests"] for r in body["rows"]}
    assert rows == {(server, "forecast"): 3, (server, "set_alert"): 1, ("llama", None): 1}
    sent = {
        (r["model"], r["tool"]): (r["request_bytes"], r["response_bytes"]) for r in body["rows"]
    }
    assert sent == {
        (server, "forecast"): (100 + 101 + 102, 1000 + 2000 + 3000),
        (server, "set_alert"): (103, 4000),
        ("llama", None): (0, 0),  # a model call's bytes are not measured
    }
    raw = await ok(
        await metering.get("/v1/usage/events", params={"project": p}, headers=bearer(admin_key))
    )
    assert sorted(e["response_bytes"] or 0 for e in raw) == [0, 1000, 2000, 3000, 4000]


async def test_time_series_by_hour_and_csv_export(
    metering: httpx.AsyncClient, admin_key: str, two_projects: dict[str, Any]
) -> None:
    a = two_projects["a"]
    params = {
        "project": a,
        "interval": "hour",
        "group_by": "model",
        "start": hours_ago(5).isoformat(),
    }
    body = await ok(
        await metering.get("/v1/usage/series", params=params, headers=bearer(admin_key))
    )
    points = [(r["start"], r["model"], r["requests"]) for r in body["rows"]]
    old_hour = two_projects["three_hours"].replace(minute=0).isoformat().replace("+00:00", "Z")
    assert (old_hour, "mistral", 2) in points
    assert sum(p[2] for p in points) == 7

    response = await metering.get("/v1/usage/export.csv", params=params, headers=bearer(admin_key))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    lines = list(csv.DictReader(io.StringIO(response.text)))
    assert sum(int(line["requests"]) for line in lines) == 7
    assert {line["model"] for line in lines} == {"llama", "mistral"}
    assert lines[0]["start"].endswith("Z")
    assert "cost_usd" in lines[0]


async def test_top_consumers_by_tokens(
    metering: httpx.AsyncClient, admin_key: str, two_projects: dict[str, Any]
) -> None:
    a, b = two_projects["a"], two_projects["b"]
    body = await ok(
        await metering.get(
            "/v1/usage/top",
            params={"by": "credential", "metric": "total_tokens", "limit": 1000},
            headers=bearer(admin_key),
        )
    )
    ours = [e for e in body["entries"] if e["project"] in (a, b)]
    assert [(e["project"], e["value"]) for e in ours] == [(b, 4500.0), (a, 440.0), (a, 201.0)]
    values = [e["value"] for e in body["entries"]]
    assert values == sorted(values, reverse=True)


async def test_a_project_sees_only_itself_and_a_platform_admin_sees_all(
    authz: httpx.AsyncClient,
    metering: httpx.AsyncClient,
    admin_key: str,
    two_projects: dict[str, Any],
) -> None:
    a, b = two_projects["a"], two_projects["b"]
    viewer = await member_key(authz, admin_key, a, "viewer", ["usage:read"])

    mine = await ok(
        await metering.get("/v1/usage", params={"group_by": "project"}, headers=bearer(viewer))
    )
    assert [r["project"] for r in mine["rows"]] == [a]
    top = await ok(await metering.get("/v1/usage/top", headers=bearer(viewer)))
    assert [e["key"] for e in top["entries"]] == [a]
    events = await ok(await metering.get("/v1/usage/events", headers=bearer(viewer)))
    assert {e["project"] for e in events} == {a}
    assert len(events) == 7  # the last day, the two calls of three hours ago included
    series = await ok(
        await metering.get(
            "/v1/usage/series", params={"group_by": "project"}, headers=bearer(viewer)
        )
    )
    assert {r["project"] for r in series["rows"]} == {a}

    for path in ("/v1/usage", "/v1/usage/series", "/v1/usage/top", "/v1/usage/export.csv"):
        refused = await metering.get(path, params={"project": b}, headers=bearer(viewer))
        assert refused.status_code == 403, path
        assert refused.headers["content-type"] == "application/problem+json"

    everyone = await ok(
        await metering.get("/v1/usage", params={"group_by": "project"}, headers=bearer(admin_key))
    )
    assert {a, b} <= {r["project"] for r in everyone["rows"]}


async def test_reading_usage_needs_the_usage_scope(
    authz: httpx.AsyncClient,
    metering: httpx.AsyncClient,
    admin_key: str,
    two_projects: dict[str, Any],
) -> None:
    a = two_projects["a"]
    no_scope = await member_key(authz, admin_key, a, "developer", ["inference:invoke"])
    response = await metering.get("/v1/usage", headers=bearer(no_scope))
    assert response.status_code == 403
    assert "usage:read" in response.json()["detail"]
    assert (await metering.get("/v1/usage")).status_code == 401


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"group_by": "project,colour"}, "unknown group_by"),
        ({"group_by": "model,model"}, "repeats"),
        ({"start": "2027-01-02T00:00:00Z", "end": "2027-01-01T00:00:00Z"}, "before end"),
        ({"start": "2027-01-01T00:00:00"}, "time zone"),
        ({"start": "2020-01-01T00:00:00Z"}, "at most 400 days"),
        ({"project": "Not_A_Project"}, "project"),
        ({"colour": "blue"}, "colour"),
    ],
)
async def test_bad_usage_queries_are_refused_with_422(
    metering: httpx.AsyncClient, admin_key: str, params: dict[str, str], message: str
) -> None:
    response = await metering.get("/v1/usage", params=params, headers=bearer(admin_key))
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


async def test_a_series_with_too_many_points_is_refused(
    metering: httpx.AsyncClient, admin_key: str
) -> None:
    start = (utcnow() - timedelta(days=30)).isoformat()
    response = await metering.get(
        "/v1/usage/series",
        params={"interval": "minute", "start": start},
        headers=bearer(admin_key),
    )
    assert response.status_code == 422
    assert "widen the interval" in response.json()["detail"]


async def test_cost_uses_the_price_in_force_when_the_usage_was_counted(
    authz: httpx.AsyncClient, metering: httpx.AsyncClient, gateway_bus: Bus, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "cost")
    model = f"priced/{project}"
    price = {"input_per_1k": "0.5", "output_per_1k": "1.5", "gpu_hour": "2.75"}
    set_ = await ok(
        await metering.put(f"/v1/prices/{model}", json=price, headers=bearer(admin_key))
    )
    assert set_["input_per_1k"] == "0.5" and set_["currency"] == "USD"
    await publish(gateway_bus, [usage(project, model=model, prompt=2000, completion=1000)])
    await wait_counted(metering, admin_key, project, 1)

    cheaper = {"input_per_1k": "0.1", "output_per_1k": "0.1"}
    await ok(await metering.put(f"/v1/prices/{model}", json=cheaper, headers=bearer(admin_key)))
    await publish(gateway_bus, [usage(project, model=model, prompt=1000, completion=0)])
    await wait_counted(metering, admin_key, project, 2)

    body = await ok(
        await metering.get("/v1/usage", params={"project": project}, headers=bearer(admin_key))
    )
    # 2000 x 0.5/1K + 1000 x 1.5/1K = 2.5 at the first price; then 1000 x 0.1/1K = 0.1.
    assert body["rows"][0]["cost"] == pytest.approx(2.6)
    assert body["currency"] == "USD"
    prices = await ok(await metering.get("/v1/prices", headers=bearer(admin_key)))
    assert {"model": model, "input_per_1k": "0.1"}.items() <= next(
        p for p in prices if p["model"] == model
    ).items()

    # Prices are platform business: a project admin may read them, not set them.
    pa = await member_key(
        authz, admin_key, project, "project-admin", ["usage:read", "quotas:manage"]
    )
    assert (await metering.get("/v1/prices", headers=bearer(pa))).status_code == 200
    refused = await metering.put(f"/v1/prices/{model}", json=price, headers=bearer(pa))
    assert refused.status_code == 403
    bad = await metering.put(
        f"/v1/prices/{model}",
        json={"input_per_1k": "-1", "output_per_1k": "1"},
        headers=bearer(admin_key),
    )
    assert bad.status_code == 422
    too_precise = await metering.put(
        f"/v1/prices/{model}",
        json={"input_per_1k": "0.0000000001", "output_per_1k": "1"},
        headers=bearer(admin_key),
    )
    assert too_precise.status_code == 422
    after = await ok(await metering.get("/v1/prices", headers=bearer(admin_key)))
    assert next(p for p in after if p["model"] == model)["input_per_1k"] == "0.1"

    assert (
        await metering.delete(f"/v1/prices/{model}", headers=bearer(admin_key))
    ).status_code == 204
    assert (
        await metering.delete(f"/v1/prices/{model}", headers=bearer(admin_key))
    ).status_code == 404


async def test_raw_events_keep_what_the_gateway_reported(
    authz: httpx.AsyncClient, metering: httpx.AsyncClient, gateway_bus: Bus, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "raw")
    sent = usage(project, prompt=12, completion=34, ttft_ms=56.5, duration_ms=789.0)
    await publish(gateway_bus, [sent])
    await wait_counted(metering, admin_key, project, 1)
    [event] = await ok(
        await metering.get(
            "/v1/usage/events", params={"project": project}, headers=bearer(admin_key)
        )
    )
    assert event["event_id"] == sent.event_id
    assert (event["prompt_tokens"], event["completion_tokens"]) == (12, 34)
    assert (event["ttft_ms"], event["duration_ms"], event["stream"]) == (56.5, 789.0, True)
    assert datetime.fromisoformat(event["time"]) == sent.time.astimezone(UTC)


async def test_csv_cells_that_a_spreadsheet_would_run_are_quoted(
    authz: httpx.AsyncClient, metering: httpx.AsyncClient, gateway_bus: Bus, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "csv")
    await publish(gateway_bus, [usage(project, model='=HYPERLINK("http://evil")')])
    await wait_counted(metering, admin_key, project, 1)
    response = await metering.get(
        "/v1/usage/export.csv",
        params={"project": project, "group_by": "model"},
        headers=bearer(admin_key),
    )
    [line] = list(csv.DictReader(io.StringIO(response.text)))
    assert line["model"] == """'=HYPERLINK("http://evil")"""


async def test_the_cli_shows_the_same_totals_and_csv(
    two_projects: dict[str, Any], metering_app: FastAPI, admin_key: str
) -> None:
    """``steward usage`` over a real socket: the table's numbers are the API's."""
    from typer.testing import CliRunner

    from cli.main import app

    async with serve(metering_app) as url:
        env = {"STEWARD_METERING_URL": url, "STEWARD_API_KEY": admin_key, "STEWARD_URL": ""}

        def steward(*args: str) -> str:
            result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
            assert result.exit_code == 0, result.output
            return result.output

        project = two_projects["a"]
        shown = await asyncio.to_thread(
            steward, "usage", "--project", project, "--group-by", "model", "-o", "json"
        )
        rows = {r["model"]: r for r in json.loads(shown)["rows"]}
        assert rows["llama"]["total_tokens"] == 440 and rows["llama"]["requests"] == 4
        assert rows["mistral"]["requests"] == 3
        exported = await asyncio.to_thread(steward, "usage", "--project", project, "--csv")
        lines = list(csv.DictReader(io.StringIO(exported)))
        assert sum(int(line["total_tokens"]) for line in lines) == sum(
            r["total_tokens"] for r in rows.values()
        )


async def test_errors_are_counted_by_cause(
    authz: httpx.AsyncClient, metering: httpx.AsyncClient, gateway_bus: Bus, admin_key: str
) -> None:
    """A 429 (a quota, a rate limit) is not a failing model: usage tells them apart."""
    p = await new_project(authz, admin_key, "usage-causes")

    def failed(status: int) -> UsageRecorded:
        return usage(p, status="error").model_copy(update={"http_status": status})

    events = [usage(p), failed(429), failed(429), failed(400), failed(502), failed(0)]
    await publish(gateway_bus, events)
    await wait_counted(metering, admin_key, p, len(events))
    [row] = (
        await ok(await metering.get("/v1/usage", params={"project": p}, headers=bearer(admin_key)))
    )["rows"]
    assert (row["errors"], row["rate_limited"], row["client_errors"], row["server_errors"]) == (
        5,
        2,
        1,
        2,
    )
