"""MCP governed from the catalog: an approved server version with a streamable-HTTP remote is
routed live (no routes file, no restart) and unrouted when revoked; ``GET /mcp/`` tells a caller
what it may use and where; ``tools/list`` shows only the catalogued tools; a client without a
credential is pointed at the OAuth metadata (MCP authorization spec, RFC 9728)."""

from __future__ import annotations

import json

import httpx
import pytest

from libs.common.bus import Bus
from libs.common.events.catalog import ToolRef, VersionApproved, VersionRevoked
from libs.common.events.metering import QuotaLimits
from libs.common.settings import Settings
from tests.gateway.conftest import RunningGateway, tenant, version
from tests.gateway.support import audit_events, eventually, publish, quota, usage_events
from tests.gateway.test_mcp import ACCEPT, INIT, mcp_client
from tests.helpers import bearer, unique

ECHO = ToolRef(name="echo", access="read_only")


async def _approve(
    bus: Bus, gw: RunningGateway, name: str, remote: str, tools: list[ToolRef]
) -> VersionApproved:
    approved = VersionApproved(
        **version(name, kind="mcp_server", tools=tools, remote=remote).model_dump()
    )
    await publish(bus, approved)
    await eventually(lambda: name in gw.gateway.routes.mcp)
    return approved


async def _discover(gw: RunningGateway, key: str) -> dict[str, dict[str, object]]:
    async with httpx.AsyncClient(base_url=gw.url) as http:
        listed = await http.get("/mcp/", headers=bearer(key))
    assert listed.status_code == 200, listed.text
    return {s["name"]: s for s in listed.json()["data"]}


async def test_an_approved_catalog_server_is_routed_live_and_unrouted_when_revoked(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, bus: Bus, mcp_upstream: str
) -> None:
    # A registry name, slash included, as server.json spells them.
    name = f"io.github.steward/{unique('weather')}"
    t = await tenant(authz, admin_key, gw, [name], kind="mcp_server")
    outsider = await tenant(authz, admin_key, gw, ["echo"])
    assert name not in await _discover(gw, t.key)

    approved = await _approve(bus, gw, name, mcp_upstream, [ECHO])
    listed = await _discover(gw, t.key)
    assert listed[name]["url"] == f"{gw.url}/mcp/{name}/"
    assert listed[name]["tools"] == [{"name": "echo", "access": "read_only"}]
    assert name not in await _discover(gw, outsider.key)  # not entitled: not shown

    async with mcp_client(str(listed[name]["url"]), t.key) as client:
        tools = await client.list_tools()
        # The server has two tools; the catalog lists one: the other is never advertised.
        assert [tool.name for tool in tools.tools] == ["echo"]
        result = await client.call_tool("echo", {"text": "live"})
        assert result.content[0].text == "echo: live"  # type: ignore[union-attr]

    await publish(bus, VersionRevoked(**{**approved.model_dump(), "status": "revoked"}))
    await eventually(lambda: name not in gw.gateway.routes.mcp)
    async with httpx.AsyncClient(base_url=gw.url) as http:
        gone = await http.post(f"/mcp/{name}/", json=INIT, headers={**bearer(t.key), **ACCEPT})
    assert gone.status_code == 404
    assert name not in await _discover(gw, t.key)


async def test_a_version_that_lists_no_tools_advertises_none(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, bus: Bus, mcp_upstream: str
) -> None:
    name = unique("toolless")
    t = await tenant(authz, admin_key, gw, [name], kind="mcp_server")
    await _approve(bus, gw, name, mcp_upstream, [])
    async with mcp_client(f"{gw.url}/mcp/{name}/", t.key) as client:
        assert (await client.list_tools()).tools == []
        with pytest.raises(Exception, match="not approved"):
            await client.call_tool("echo", {"text": "x"})


async def test_a_remote_the_address_policy_denies_is_never_connected(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, bus: Bus
) -> None:
    """A publisher names the remote: cloud metadata (link-local) is refused at connect time."""
    name = unique("metadata")
    t = await tenant(authz, admin_key, gw, [name], kind="mcp_server")
    await _approve(bus, gw, name, "http://169.254.169.254/mcp", [ECHO])
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        refused = await http.post(f"/mcp/{name}/", json=INIT, headers={**bearer(t.key), **ACCEPT})
    assert refused.status_code == 502
    assert refused.json()["error"]["code"] < 0  # a JSON-RPC error, in the MCP client's terms


async def test_an_anonymous_client_is_pointed_at_the_oauth_metadata(
    gw: RunningGateway,
) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as http:
        anonymous = await http.post("/mcp/tools/", json=INIT, headers=ACCEPT)
        assert anonymous.status_code == 401
        challenge = anonymous.headers["www-authenticate"]
        metadata_url = f"{gw.url}/.well-known/oauth-protected-resource/mcp/tools/"
        assert challenge.startswith("Bearer ")
        assert f'resource_metadata="{metadata_url}"' in challenge
        metadata = await http.get(metadata_url)
        assert metadata.status_code == 200
        document = metadata.json()
        assert document["resource"] == f"{gw.url}/mcp/tools/"
        assert document["bearer_methods_supported"] == ["header"]
        issuer = gw.settings.oidc_issuer
        assert document.get("authorization_servers") == ([issuer] if issuer else None)
        root = await http.get("/.well-known/oauth-protected-resource")
        assert root.json()["resource"] == f"{gw.url}/mcp/"
        assert (await http.get("/.well-known/oauth-protected-resource/v1/")).status_code == 404


BOTH = [ECHO, ToolRef(name="delete_everything", access="execute")]


async def _limit(
    authz: httpx.AsyncClient,
    admin_key: str,
    gw: RunningGateway,
    project: str,
    name: str,
    **body: object,
) -> None:
    path = f"/v1/projects/{project}/entitlements/mcp_server/{name}"
    answer = await authz.put(path, json=body, headers=bearer(admin_key))
    assert answer.status_code in (200, 201), answer.text
    await eventually(
        lambda: (
            (grant := gw.gateway.auth.limits(project, "mcp_server", name)) is not None
            and grant.tool_access == body.get("tool_access")
            and grant.tools == body.get("tools")
        )
    )


async def test_a_grant_of_read_only_tools_shows_and_calls_only_those(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, bus: Bus, mcp_upstream: str
) -> None:
    name = unique("granted")
    t = await tenant(authz, admin_key, gw, [name], kind="mcp_server")
    await _approve(bus, gw, name, mcp_upstream, BOTH)
    async with mcp_client(f"{gw.url}/mcp/{name}/", t.key) as client:  # the whole server
        assert {tool.name for tool in (await client.list_tools()).tools} == {
            "echo",
            "delete_everything",
        }
    await _limit(authz, admin_key, gw, t.project, name, tool_access=["read_only"])
    assert (await _discover(gw, t.key))[name]["tools"] == [{"name": "echo", "access": "read_only"}]
    async with mcp_client(f"{gw.url}/mcp/{name}/", t.key) as client:
        assert [tool.name for tool in (await client.list_tools()).tools] == ["echo"]
        with pytest.raises(Exception, match="outside project") as refused:
            await client.call_tool("delete_everything", {})
        assert "limited to read_only tools" in str(refused.value)
        assert (await client.call_tool("echo", {"text": "ok"})).content[0].text == "echo: ok"  # type: ignore[union-attr]


async def test_a_grant_of_named_tools_does_not_reach_resources_or_prompts(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, bus: Bus, mcp_upstream: str
) -> None:
    name = unique("named")
    t = await tenant(authz, admin_key, gw, [name], kind="mcp_server")
    await _approve(bus, gw, name, mcp_upstream, BOTH)
    await _limit(authz, admin_key, gw, t.project, name, tools=["delete_everything"])
    read = {"jsonrpc": "2.0", "id": 7, "method": "resources/read", "params": {"uri": "x://y"}}
    async with httpx.AsyncClient(base_url=gw.url) as http:
        answer = await http.post(f"/mcp/{name}/", json=read, headers={**bearer(t.key), **ACCEPT})
    assert answer.status_code == 200
    assert answer.json()["id"] == 7
    assert "not its resources or prompts" in answer.json()["error"]["message"]
    async with mcp_client(f"{gw.url}/mcp/{name}/", t.key) as client:
        assert [tool.name for tool in (await client.list_tools()).tools] == ["delete_everything"]


async def test_a_call_that_may_change_something_is_audited_with_secrets_redacted(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    bus: Bus,
    mcp_upstream: str,
    settings: Settings,
) -> None:
    name = unique("audited")
    t = await tenant(authz, admin_key, gw, [name], kind="mcp_server")
    tools = [ECHO, ToolRef(name="write_note", access="read_write")]
    await _approve(bus, gw, name, mcp_upstream, tools)
    async with mcp_client(f"{gw.url}/mcp/{name}/", t.key) as client:
        await client.call_tool("echo", {"text": "only reads"})
        result = await client.call_tool("write_note", {"text": "hi", "api_token": "s3cr3t"})
        assert result.content[0].text == "noted: hi"  # type: ignore[union-attr]
    namespace = settings.event_namespace
    [event] = await audit_events(settings.nats_url, namespace, t.project, "gateway", 1)
    record = event["data"]
    assert record["service"] == "gateway" and record["action"] == "mcp.tool.call"
    assert record["target"] == f"mcp_server/{name}/write_note"
    assert record["actor"].startswith("developer-")  # the key's owner (tenant())
    assert record["after"]["credential_id"] == t.key_id
    assert record["after"]["access"] == "read_write"
    assert record["after"]["arguments"] == {"text": "hi", "api_token": "[redacted]"}
    assert record["after"]["status"] == "ok"
    assert "s3cr3t" not in str(event)


async def test_each_tool_call_of_a_batch_is_metered_once(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    bus: Bus,
    mcp_upstream: str,
    settings: Settings,
) -> None:
    """A JSON-RPC batch (MCP before 2025-06) may carry several tool calls: each is a usage event,
    whatever the server makes of the batch, and the one that may change something is audited."""
    name = unique("batch")
    t = await tenant(authz, admin_key, gw, [name], kind="mcp_server")
    tools = [ECHO, ToolRef(name="write_note", access="read_write")]
    await _approve(bus, gw, name, mcp_upstream, tools)
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "write_note"}},
    ]
    async with httpx.AsyncClient(base_url=gw.url) as http:
        answer = await http.post(f"/mcp/{name}/", json=batch, headers={**bearer(t.key), **ACCEPT})
    namespace = settings.event_namespace
    events = await usage_events(settings.nats_url, namespace, t.project, 2)
    assert sorted(e["data"]["endpoint"] for e in events) == [f"{name}/echo", f"{name}/write_note"]
    # Bytes: each call's own message; the answer shared among them, to the byte.
    sizes = {len(json.dumps(m, separators=(",", ":")).encode()) for m in batch}
    assert {e["data"]["request_bytes"] for e in events} == sizes
    assert sum(e["data"]["response_bytes"] for e in events) == len(answer.content) > 0
    [audit] = await audit_events(settings.nats_url, namespace, t.project, "gateway", 1)
    assert audit["data"]["target"] == f"mcp_server/{name}/write_note"


async def test_a_call_quota_on_a_server_refuses_the_call_past_it_and_no_token_budget_does(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    bus: Bus,
    mcp_upstream: str,
    settings: Settings,
) -> None:
    """Calls per window on one server: the calls within it pass with ``RateLimit-*``, the next
    is a 429 with a JSON-RPC error (recorded, not admitted, not sent); a spent token budget of
    the project does not stop tool calls; listing tools is not a call."""
    name = unique("limited")
    t = await tenant(authz, admin_key, gw, [name], kind="mcp_server")
    await _approve(bus, gw, name, mcp_upstream, [ECHO])
    ledger = gw.gateway.quota
    now = ledger.clock()
    ledger.apply(quota(t.project, 100, now, used=100))  # the project's tokens: all spent
    calls = quota(t.project, 1, now).model_copy(
        update={
            "quota_id": f"calls-{t.project}",
            "model": name,
            "limits": QuotaLimits(requests=2),
        }
    )
    ledger.apply(calls)
    call = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "hi"}},
    }
    headers = {**bearer(t.key), **ACCEPT}
    async with httpx.AsyncClient(base_url=f"{gw.url}/mcp/{name}/") as http:
        session = await http.post("", json=INIT, headers=headers)
        assert session.status_code == 200, session.text
        headers["mcp-session-id"] = session.headers["mcp-session-id"]
        listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        answers = [await http.post("", json=call, headers=headers) for _ in range(2)]
        answers.append(await http.post("", json=listing, headers=headers))
        refused = await http.post("", json=call, headers=headers)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.headers.get("ratelimit-remaining") for a in answers] == ["2", "1", None]
    assert refused.status_code == 429
    assert refused.headers["retry-after"]
    error = refused.json()["error"]
    assert (
        f"call quota of 2 per hour reached for project {t.project} on model {name}"
        in (error["message"])
    )
    assert ledger.usage(calls.quota_id, ledger.clock()) == (0, 0, 2)
    events = await usage_events(settings.nats_url, settings.event_namespace, t.project, 3)
    assert sorted((e["data"]["admitted"], e["data"]["http_status"]) for e in events) == [
        (False, 429),
        (True, 200),
        (True, 200),
    ]
