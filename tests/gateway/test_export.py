"""The live policy exported as a kong.yml, and Steward's quota/metering plugin for real Kong."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import yaml

from gateway.kong import steward_quota
from gateway.kong.schema import parse
from libs.common.settings import Settings
from tests.gateway.conftest import RunningGateway, tenant
from tests.gateway.support import eventually, usage_events
from tests.helpers import bearer


async def test_export_writes_the_live_policy_as_a_kong_file_that_loads(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, tmp_path: Path
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo", "unapproved"])
    mcp = await tenant(authz, admin_key, gw, ["tools"], kind="mcp_server")
    async with httpx.AsyncClient(base_url=gw.admin_url, headers=bearer(admin_key)) as admin:
        response = await admin.get("/steward/export", params={"format": "kong"})
        assert response.status_code == 200
        assert (await admin.get("/steward/export", params={"format": "nginx"})).status_code == 422
    document = yaml.safe_load(response.text)
    (tmp_path / "kong.yml").write_text(response.text)
    config = parse(document)  # what Kong would load
    services = {s["name"]: s for s in document["services"]}
    assert "model-echo" in services and "model-unapproved" not in services
    assert "mcp-tools" in services
    echo = services["model-echo"]
    assert echo["routes"][0]["paths"] == ["/models/echo/v1"]
    assert {p["name"] for p in echo["plugins"]} == {"key-auth", "acl", "steward-quota"}
    acl = next(p for p in echo["plugins"] if p["name"] == "acl")
    assert acl["config"]["allow"] == ["model:echo"]
    consumers = {c["username"]: c for c in document["consumers"]}
    assert {a["group"] for a in consumers[t.project]["acls"]} == {"model:echo"}
    assert {a["group"] for a in consumers[mcp.project]["acls"]} == {"mcp:tools"}
    assert not document.get("keyauth_credentials")  # secrets never leave authz
    assert config.find("services", "model-echo") is not None


def test_the_kong_plugin_counts_tokens_from_json_and_sse_answers() -> None:
    assert steward_quota.usage_from_body(
        json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
    ) == (3, 4)
    stream = (
        b'data: {"choices":[{"delta":{"content":"abcdefgh"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert steward_quota.usage_from_body(stream) == (5, 2)
    no_usage = b'data: {"choices":[{"delta":{"content":"abcdefgh"}}]}\n\ndata: [DONE]\n\n'
    assert steward_quota.usage_from_body(no_usage) is None
    assert steward_quota.estimate_completion(no_usage) == 2
    # Counts no call could have used are not believed: the plugin estimates instead.
    for prompt, completion in [(-1, 4), (3, -4), (10**15, 4), ("3", 4), (3.0, 4), (True, 4)]:
        lie = {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}
        assert steward_quota.usage_from_body(json.dumps(lie).encode()) is None, lie


def test_the_kong_plugin_refuses_a_spent_budget_until_the_window_turns() -> None:
    budget = steward_quota.TokenBudget()
    limits: dict[str, int | None] = {"minute": 100, "day": None}
    start = 1_000_040.0  # 20 s into a minute
    assert budget.remaining("p", limits, start) == (True, 0)
    budget.add("p", 100, start)
    allowed, retry = budget.remaining("p", limits, start + 1)
    assert not allowed and retry == 39
    assert budget.remaining("other", limits, start + 1) == (True, 0)
    assert budget.remaining("p", limits, start + 40)[0] is True


async def test_usage_sent_by_the_kong_plugin_is_taken_in_and_published(
    gw: RunningGateway, admin_key: str, settings: Settings
) -> None:
    payload = steward_quota.usage_payload(
        project="via-kong",
        credential_id="cred",
        model="model-echo",
        prompt=3,
        completion=4,
        estimated=False,
        status=200,
        duration_ms=12.5,
    )
    async with httpx.AsyncClient(base_url=gw.admin_url) as admin:
        refused = await admin.post("/steward/usage", json=[payload])
        assert refused.status_code == 401
        accepted = await admin.post("/steward/usage", json=[payload], headers={"apikey": admin_key})
        assert accepted.status_code == 202
    [event] = await usage_events(settings.nats_url, settings.event_namespace, "via-kong", 1)
    assert event["id"] == payload["event_id"]
    assert event["data"]["total_tokens"] == 7


async def test_the_status_page_shows_replicas_routes_and_usage(
    gw: RunningGateway, admin_key: str
) -> None:
    async with httpx.AsyncClient(base_url=gw.admin_url, headers=bearer(admin_key)) as admin:
        status = (await admin.get("/status")).json()
        metrics = (await admin.get("/metrics")).text
    assert status["checks"]["authz_replica"] == "ok"
    assert status["replicas"]["authz"]["loaded"] is True
    assert "echo" in status["routes"]["models"] and "tools" in status["routes"]["mcp_servers"]
    assert "steward_gateway_calls_total" in metrics
    await eventually(lambda: status["usage"]["published"] >= 0)


async def test_the_cli_writes_the_export_to_a_file(
    gw: RunningGateway, admin_key: str, tmp_path: Path
) -> None:
    import asyncio

    from typer.testing import CliRunner

    from cli.main import app

    target = tmp_path / "kong.yml"
    env = {"STEWARD_GATEWAY_ADMIN_URL": gw.admin_url, "STEWARD_API_KEY": admin_key}
    result = await asyncio.to_thread(
        CliRunner().invoke,
        app,
        ["gateway", "export", "--format", "kong", "-o", str(target)],
        env=env,
    )
    assert result.exit_code == 0, result.output
    assert parse(yaml.safe_load(target.read_text())).find("services", "model-echo") is not None
    refused = await asyncio.to_thread(
        CliRunner().invoke, app, ["gateway", "export"], env={**env, "STEWARD_API_KEY": "stw_x"}
    )
    assert refused.exit_code == 1
