"""Quotas: management and bad input, approved quota requests, the soft warning (event and a real
webhook on a loopback socket), the hard limit and its recovery at the window's end, and two
gateway ledgers sharing one budget through metering's events."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from nats.js.api import DeliverPolicy
from prometheus_client import REGISTRY

from libs.common import quota as q
from libs.common.bus import Bus
from libs.common.events import CloudEvent
from libs.common.events.metering import QuotaState
from libs.common.settings import Settings
from tests.common.support import until
from tests.helpers import bearer, issue_key, member_key, new_project, ok, serve
from tests.metering.conftest import Clock
from tests.metering.support import (
    Heard,
    asyncpg_dsn,
    db_count,
    eventually,
    hearing,
    metering_settled,
    publish,
    usage,
)


@pytest.fixture
async def quota_events(gateway_bus: Bus) -> AsyncIterator[Heard]:
    async with hearing(gateway_bus, "metering.quota.>", "quota_id") as heard:
        yield heard


class Hook:
    """A webhook receiver on a real socket that fails its first ``failures`` calls."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.app = FastAPI()
        self.app.add_api_route("/hook", self.receive, methods=["POST"])

    async def receive(self, request: Request) -> Response:
        self.calls.append((dict(request.headers), await request.body()))
        return Response(status_code=503 if len(self.calls) <= self.failures else 204)


@contextlib.asynccontextmanager
async def hook_server(failures: int) -> AsyncIterator[tuple[Hook, str]]:
    hook = Hook(failures)
    async with serve(hook.app) as url:
        yield hook, f"{url}/hook"


async def create(
    metering: httpx.AsyncClient, key: str, project: str, body: dict[str, Any], status: int = 201
) -> Any:
    return await ok(
        await metering.post(f"/v1/projects/{project}/quotas", json=body, headers=bearer(key)),
        status,
    )


async def quotas_of(metering: httpx.AsyncClient, key: str, project: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = await ok(
        await metering.get("/v1/quotas", params={"project": project}, headers=bearer(key))
    )
    return result


async def webhooks_settled(settings: Settings, url: str) -> None:
    """Wait until every webhook delivery to ``url`` is over (delivered or given up): none is
    left to be attempted again."""
    dsn = asyncpg_dsn(settings.database_url)

    async def settled() -> bool:
        unfinished = await db_count(
            dsn,
            "SELECT count(*) FROM metering.webhook_deliveries "
            "WHERE url = $1 AND delivered_at IS NULL AND failed_at IS NULL",
            url,
        )
        return unfinished == 0

    await until(settled, what=f"the webhook deliveries to {url} finished")


def align(clock: Clock, window_seconds: int = 60, into: float = 5.0) -> None:
    """Move the clock to ``into`` seconds after the start of the next window, so a test's
    calls all fall in one window whatever the wall time."""
    now = clock()
    elapsed = now.timestamp() % window_seconds
    clock.travel(window_seconds - elapsed + into)


# -- management --------------------------------------------------------------------------------


async def test_a_platform_admin_sets_changes_and_removes_a_quota_with_events_and_audit(
    authz: httpx.AsyncClient,
    metering: httpx.AsyncClient,
    admin_key: str,
    quota_events: Heard,
    approval: httpx.AsyncClient,
) -> None:
    project = await new_project(authz, admin_key, "quota")
    key = await issue_key(authz, admin_key, project, ["inference:invoke"])
    created = await create(
        metering,
        admin_key,
        project,
        {"window": "day", "limits": {"total_tokens": 5000}, "key_id": key["id"], "model": "llama"},
    )
    assert created["limits"] == {
        "input_tokens": None,
        "output_tokens": None,
        "total_tokens": 5000,
        "requests": None,
    }
    assert (created["status"], created["revision"], created["soft_threshold"]) == ("ok", 1, 0.8)
    assert created["window_end"] > created["window_start"]
    quota_id = created["id"]

    changed = await ok(
        await metering.patch(
            f"/v1/projects/{project}/quotas/{quota_id}",
            json={"limits": {"output_tokens": 1000}, "soft_threshold": 0.5},
            headers=bearer(admin_key),
        )
    )
    assert changed["limits"] == {
        "input_tokens": None,
        "output_tokens": 1000,
        "total_tokens": 5000,
        "requests": None,
    }
    assert (changed["revision"], changed["soft_threshold"]) == (2, 0.5)
    same = await ok(
        await metering.patch(
            f"/v1/projects/{project}/quotas/{quota_id}",
            json={"soft_threshold": 0.5},
            headers=bearer(admin_key),
        )
    )
    assert same["revision"] == 2  # nothing changed, nothing announced

    viewer = await member_key(authz, admin_key, project, "viewer", ["usage:read"])
    [seen] = await quotas_of(metering, viewer, project)
    assert seen["id"] == quota_id
    got = await ok(
        await metering.get(f"/v1/projects/{project}/quotas/{quota_id}", headers=bearer(viewer))
    )
    assert got["revision"] == 2

    assert (
        await metering.delete(
            f"/v1/projects/{project}/quotas/{quota_id}", headers=bearer(admin_key)
        )
    ).status_code == 204
    assert await quotas_of(metering, admin_key, project) == []

    async def announced() -> bool:
        return len(quota_events.of("metering.quota.deleted", quota_id)) == 1

    await eventually(announced, what="the deletion event")
    updates = quota_events.of("metering.quota.updated", quota_id)
    assert [u.data["revision"] for u in updates] == [1, 2]
    assert updates[1].data["limits"]["output_tokens"] == 1000

    async def audited() -> list[str]:
        page = await ok(
            await approval.get(
                "/v1/audit",
                params={"service": "metering", "target": f"project/{project}/quota/{quota_id}"},
                headers=bearer(admin_key),
            )
        )
        return [item["action"] for item in page["items"]]

    async def all_audited() -> bool:
        return len(await audited()) == 3

    await eventually(all_audited, what="the audit records")
    assert sorted(await audited()) == ["quota.create", "quota.delete", "quota.update"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"window": "week", "limits": {"total_tokens": 10}}, "window"),
        ({"window": "day", "limits": {}}, "at least one"),
        ({"window": "day", "limits": {"total_tokens": 0}}, "total_tokens"),
        ({"window": "day", "limits": {"total_tokens": -5}}, "total_tokens"),
        ({"window": "day", "limits": {"total_tokens": 10}, "soft_threshold": 1.5}, "soft"),
        ({"window": "day", "limits": {"total_tokens": 10}, "webhook_url": "ftp://x"}, "webhook"),
        ({"window": "day", "limits": {"total_tokens": 10}, "key_id": "short"}, "key_id"),
        ({"window": "day", "limits": {"total_tokens": 10}, "colour": "red"}, "colour"),
        ({"window": "day", "limits": {"total_tokens": 10, "tokens": 5}}, "tokens"),
    ],
)
async def test_bad_quotas_are_refused_with_422_and_nothing_is_written(
    authz: httpx.AsyncClient,
    metering: httpx.AsyncClient,
    admin_key: str,
    body: dict[str, Any],
    message: str,
) -> None:
    project = await new_project(authz, admin_key, "badq")
    response = await metering.post(
        f"/v1/projects/{project}/quotas", json=body, headers=bearer(admin_key)
    )
    assert response.status_code == 422, response.text
    assert message in response.text
    assert await quotas_of(metering, admin_key, project) == []


async def test_quota_targets_and_conflicts_are_checked_before_writing(
    authz: httpx.AsyncClient, metering: httpx.AsyncClient, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "target")
    other = await new_project(authz, admin_key, "other")
    foreign = await issue_key(authz, admin_key, other, ["inference:invoke"])
    body = {"window": "hour", "limits": {"input_tokens": 10}}

    missing = await metering.post(
        "/v1/projects/no-such-project-x/quotas", json=body, headers=bearer(admin_key)
    )
    assert missing.status_code == 404
    wrong_key = await metering.post(
        f"/v1/projects/{project}/quotas",
        json={**body, "key_id": foreign["id"]},
        headers=bearer(admin_key),
    )
    assert wrong_key.status_code == 422
    assert "not a key of project" in wrong_key.json()["detail"]

    created = await create(metering, admin_key, project, body)
    twice = await metering.post(
        f"/v1/projects/{project}/quotas", json=body, headers=bearer(admin_key)
    )
    assert twice.status_code == 409
    emptied = await metering.patch(
        f"/v1/projects/{project}/quotas/{created['id']}",
        json={"limits": {"input_tokens": None}},
        headers=bearer(admin_key),
    )
    assert emptied.status_code == 422
    nothing = await metering.patch(
        f"/v1/projects/{project}/quotas/{created['id']}", json={}, headers=bearer(admin_key)
    )
    assert nothing.status_code == 422
    elsewhere = await metering.patch(
        f"/v1/projects/{other}/quotas/{created['id']}",
        json={"soft_threshold": 0.9},
        headers=bearer(admin_key),
    )
    assert elsewhere.status_code == 404
    [kept] = await quotas_of(metering, admin_key, project)
    assert (kept["revision"], kept["limits"]["input_tokens"]) == (1, 10)
    assert await quotas_of(metering, admin_key, "no-such-project-x") == []


async def test_only_a_platform_admin_with_quotas_manage_changes_quotas(
    authz: httpx.AsyncClient, metering: httpx.AsyncClient, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "perm")
    pa = await member_key(
        authz, admin_key, project, "project-admin", ["quotas:manage", "usage:read"]
    )
    body = {"window": "hour", "limits": {"total_tokens": 10}}
    refused = await metering.post(f"/v1/projects/{project}/quotas", json=body, headers=bearer(pa))
    assert refused.status_code == 403
    other = await new_project(authz, admin_key, "perm-other")
    created = await create(metering, admin_key, other, body)
    # Reading another project's quota is refused too (tenant filter on the path).
    peek = await metering.get(f"/v1/projects/{other}/quotas/{created['id']}", headers=bearer(pa))
    assert peek.status_code == 403
    assert await quotas_of(metering, pa, project) == []


# -- approval ----------------------------------------------------------------------------------


async def test_an_approved_quota_request_sets_the_quota(
    authz: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    metering: httpx.AsyncClient,
    admin_key: str,
) -> None:
    project = await new_project(authz, admin_key, "raise")
    dev = await member_key(authz, admin_key, project, "developer", ["requests:write", "usage:read"])
    filed = await ok(
        await approval.post(
            f"/v1/projects/{project}/requests",
            json={"kind": "quota", "payload": {"window": "month", "token_limit": 2_000_000}},
            headers=bearer(dev),
        ),
        201,
    )
    assert filed["status"] == "pending"
    assert await quotas_of(metering, dev, project) == []
    await ok(
        await approval.post(
            f"/v1/requests/{filed['id']}/approve",
            json={"comment": "for the launch"},
            headers=bearer(admin_key),
        )
    )

    async def quota_set() -> bool:
        return bool(await quotas_of(metering, dev, project))

    await eventually(quota_set, what="the approved quota")
    [quota] = await quotas_of(metering, dev, project)
    assert quota["window"] == "month"
    assert quota["limits"]["total_tokens"] == 2_000_000
    assert quota["source"] == f"approval:{filed['id']}"
    assert quota["updated_by"] == "admin"


# -- thresholds --------------------------------------------------------------------------------


async def test_the_soft_warning_fires_once_per_window_and_its_webhook_is_retried(
    authz: httpx.AsyncClient,
    metering: httpx.AsyncClient,
    gateway_bus: Bus,
    admin_key: str,
    quota_events: Heard,
    clock: Clock,
    metering_settings: Settings,
) -> None:
    align(clock, 3600, into=60)  # all in one hour whatever the wall time
    project = await new_project(authz, admin_key, "soft")
    async with hook_server(failures=2) as (hook, url):
        quota = await create(
            metering,
            admin_key,
            project,
            {"window": "hour", "limits": {"total_tokens": 1000}, "webhook_url": url},
        )
        # 790 tokens: below 80%; then 10 more cross it; then 150 more stay under the limit.
        await publish(
            gateway_bus, [usage(project, prompt=70, completion=9, time=clock()) for _ in range(10)]
        )
        # Counted, and whatever alert that raised relayed and heard: there is none.
        await metering_settled(gateway_bus, metering_settings, quota_events)
        [below] = await quotas_of(metering, admin_key, project)
        assert (below["status"], below["input_used"] + below["output_used"]) == ("ok", 790)
        assert quota_events.of("metering.quota.warning", quota["id"]) == []
        await publish(gateway_bus, [usage(project, prompt=10, completion=0, time=clock())])
        for _ in range(3):
            await publish(gateway_bus, [usage(project, prompt=50, completion=0, time=clock())])

        # Every call counted, every alert relayed and heard, every webhook delivery settled:
        # a second warning or another attempt would have shown by now.
        await metering_settled(gateway_bus, metering_settings, quota_events)
        await webhooks_settled(metering_settings, url)

    [warning] = quota_events.of("metering.quota.warning", quota["id"])
    assert warning.data["threshold"] == 0.8
    assert warning.data["dimensions"] == ["total"]
    # The counts when the batch that crossed 80% was applied (later calls may share the batch).
    assert 800 <= warning.data["input_used"] + warning.data["output_used"] <= 950
    assert quota_events.of("metering.quota.exceeded", quota["id"]) == []
    assert len(hook.calls) == 3  # two 503s, then accepted; never again
    bodies = {json.loads(body)["id"] for _, body in hook.calls}
    assert bodies == {warning.id}
    headers = hook.calls[-1][0]
    assert headers["content-type"] == "application/cloudevents+json"
    assert headers["x-steward-event"] == "metering.quota.warning"
    assert headers["x-steward-event-id"] == warning.id

    [read] = await quotas_of(metering, admin_key, project)
    assert (read["status"], read["input_used"] + read["output_used"]) == ("warning", 950)


async def test_the_hard_limit_blocks_with_headers_and_recovers_when_the_window_resets(
    authz: httpx.AsyncClient,
    metering: httpx.AsyncClient,
    gateway_bus: Bus,
    admin_key: str,
    quota_events: Heard,
    clock: Clock,
) -> None:
    align(clock, 60, into=5)  # 55 s left in the minute
    project = await new_project(authz, admin_key, "hard")
    quota = await create(
        metering, admin_key, project, {"window": "minute", "limits": {"output_tokens": 100}}
    )
    for _ in range(2):
        await publish(gateway_bus, [usage(project, prompt=500, completion=60, time=clock())])

    async def exceeded() -> bool:
        return bool(quota_events.of("metering.quota.exceeded", quota["id"]))

    await eventually(exceeded, what="the exceeded event")
    [event] = quota_events.of("metering.quota.exceeded", quota["id"])
    assert (event.data["output_used"], event.data["dimensions"]) == (120, ["output"])

    snapshot = await ok(await metering.get("/v1/quotas/snapshot", headers=bearer(admin_key)))
    states = [QuotaState.model_validate(s) for s in snapshot["quotas"]]
    [state] = [s for s in states if s.quota_id == quota["id"]]
    assert (state.status, state.output_used) == ("exceeded", 120)

    ledger = q.QuotaLedger()
    ledger.replace(states)
    refused = ledger.reserve(
        project=project, credential_id="k", model="m", input_tokens=1, output_tokens=1, now=clock()
    )
    assert not refused.allowed
    assert refused.retry_after_seconds is not None and 50 <= refused.retry_after_seconds <= 55
    assert refused.headers["Retry-After"] == str(refused.retry_after_seconds)
    assert refused.headers["RateLimit-Limit"] == "100"
    assert refused.headers["RateLimit-Remaining"] == "0"

    clock.travel(60)  # the next minute
    fresh = await ok(await metering.get("/v1/quotas/snapshot", headers=bearer(admin_key)))
    [again] = [s for s in fresh["quotas"] if s["quota_id"] == quota["id"]]
    assert (again["status"], again["output_used"]) == ("ok", 0)
    ledger.replace([QuotaState.model_validate(s) for s in fresh["quotas"]])
    allowed = ledger.reserve(
        project=project, credential_id="k", model="m", input_tokens=1, output_tokens=1, now=clock()
    )
    assert allowed.allowed
    assert allowed.headers["RateLimit-Remaining"] == "100"


async def test_a_call_quota_counts_admitted_calls_per_gateway_and_blocks_at_its_limit(
    authz: httpx.AsyncClient,
    metering: httpx.AsyncClient,
    gateway_bus: Bus,
    admin_key: str,
    quota_events: Heard,
    clock: Clock,
) -> None:
    """A call quota on one MCP server: tool calls the gateway admitted count, refused ones (a
    tool outside the grant, a quota refusal) do not; the state says which gateway made them."""
    align(clock, 3600, into=60)
    project = await new_project(authz, admin_key, "calls")
    quota = await create(
        metering,
        admin_key,
        project,
        {"window": "hour", "model": "github", "limits": {"requests": 3}},
    )

    def tool_call(admitted: bool, gateway: str = "gw1") -> Any:
        return usage(
            project,
            model="github",
            endpoint="github/search",
            prompt=0,
            completion=0,
            time=clock(),
            kind="mcp",
            admitted=admitted,
            gateway_id=gateway,
        )

    await publish(gateway_bus, [tool_call(True), tool_call(False), tool_call(True, "gw2")])
    await publish(gateway_bus, [usage(project, model="other", time=clock())])  # not this server

    async def counted(n: int) -> bool:
        [read] = await quotas_of(metering, admin_key, project)
        return bool(read["requests_used"] == n)

    await eventually(lambda: counted(2), what="two admitted calls")
    [read] = await quotas_of(metering, admin_key, project)
    # 2 of 3: under the soft threshold (80% of 3 calls is reached at the third).
    assert (read["status"], read["limits"]["requests"]) == ("ok", 3)
    snapshot = await ok(await metering.get("/v1/quotas/snapshot", headers=bearer(admin_key)))
    [state] = [
        QuotaState.model_validate(x) for x in snapshot["quotas"] if x["quota_id"] == quota["id"]
    ]
    assert state.requests_by_gateway == {"gw1": 1, "gw2": 1}

    # A gateway's ledger takes metering's count of the other gateway's call and its own count
    # of its own (gw1 made its call before it started over: nothing of it is local).
    ledger = q.QuotaLedger(gateway_id="gw1")
    ledger.replace([state])
    assert ledger.usage(quota["id"], clock()) == (0, 0, 1)
    for remaining in ("2", "1"):
        call = ledger.reserve(
            project=project,
            credential_id="k",
            model="github",
            input_tokens=0,
            output_tokens=0,
            now=clock(),
        )
        assert call.allowed and call.headers["RateLimit-Remaining"] == remaining
        ledger.settle(call, input_tokens=0, output_tokens=0, at=clock())
    ledger.apply(state)  # a late re-read of the same count changes nothing
    assert ledger.usage(quota["id"], clock()) == (0, 0, 3)
    refused = ledger.reserve(
        project=project,
        credential_id="k",
        model="github",
        input_tokens=0,
        output_tokens=0,
        now=clock(),
    )
    assert not refused.allowed
    assert "call quota of 3 per hour reached" in refused.reason

    await publish(gateway_bus, [tool_call(True)])

    async def exceeded() -> bool:
        return bool(quota_events.of("metering.quota.exceeded", quota["id"]))

    await eventually(exceeded, what="the exceeded event")
    [event] = quota_events.of("metering.quota.exceeded", quota["id"])
    assert (event.data["requests_used"], event.data["dimensions"]) == (3, ["requests"])

    async def gauged() -> bool:
        """What the dashboard's quota panel reads, as metering last published the quota."""
        labels = {
            "project": project,
            "quota_id": quota["id"],
            "window": "hour",
            "dimension": "requests",
        }
        return REGISTRY.get_sample_value("steward_metering_quota_used_ratio", labels) == 1.0

    await eventually(gauged, what="the quota's use in /metrics")


async def test_lowering_a_limit_below_current_usage_flags_it_at_once(
    authz: httpx.AsyncClient,
    metering: httpx.AsyncClient,
    gateway_bus: Bus,
    admin_key: str,
    quota_events: Heard,
    clock: Clock,
) -> None:
    align(clock, 86400, into=3600)
    project = await new_project(authz, admin_key, "lower")
    quota = await create(
        metering, admin_key, project, {"window": "day", "limits": {"input_tokens": 10_000}}
    )
    await publish(gateway_bus, [usage(project, prompt=300, completion=0, time=clock())])

    async def counted() -> bool:
        [read] = await quotas_of(metering, admin_key, project)
        return bool(read["input_used"] == 300)

    await eventually(counted, what="usage counted against the quota")
    await ok(
        await metering.patch(
            f"/v1/projects/{project}/quotas/{quota['id']}",
            json={"limits": {"input_tokens": 200}},
            headers=bearer(admin_key),
        )
    )

    async def flagged() -> bool:
        return bool(quota_events.of("metering.quota.exceeded", quota["id"]))

    await eventually(flagged, what="exceeded after lowering the limit")
    assert len(quota_events.of("metering.quota.warning", quota["id"])) == 1


# -- two gateways, one budget ------------------------------------------------------------------


async def test_two_gateway_ledgers_share_one_budget_within_the_documented_overshoot(
    authz: httpx.AsyncClient,
    metering: httpx.AsyncClient,
    gateway_bus: Bus,
    admin_key: str,
    clock: Clock,
) -> None:
    """Two replicas, each with its own ledger fed by the snapshot and metering's events, spend
    one hourly budget. A replica sees the other's calls only once metering has counted and
    published them: the overshoot is what the other replicas admit meanwhile, (R - 1) x rate x
    (L + D). Here that lag is counted in calls rather than left to the machine's speed: in each
    round both replicas make up to ``per_round`` calls that the other cannot have seen, then both
    wait until metering's events bring their ledgers up to the truth. Together they stop near
    the limit: never more than (R - 1) x ``per_round`` calls past it, and never as much as one
    call's estimate below it."""
    align(clock, 3600, into=60)
    project = await new_project(authz, admin_key, "shared")
    limit = 6000
    quota = await create(
        metering, admin_key, project, {"window": "hour", "limits": {"total_tokens": limit}}
    )
    snapshot = await ok(await metering.get("/v1/quotas/snapshot", headers=bearer(admin_key)))
    ledgers = [q.QuotaLedger(gateway_id=f"gw{i}") for i in range(2)]
    for ledger in ledgers:
        ledger.replace(QuotaState.model_validate(s) for s in snapshot["quotas"])

    async def follow(msg: Any) -> None:
        event = CloudEvent.model_validate_json(msg.data)
        if event.relative_subject != "metering.quota.deleted":
            state = QuotaState.model_validate(event.data)
            for ledger in ledgers:
                ledger.apply(state)

    sub = await gateway_bus.js.subscribe(
        gateway_bus.subject("metering.quota.>"),
        cb=follow,
        stream=gateway_bus.stream("EVENTS"),
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
    )
    per_round, call_tokens, estimate = 5, 80, 100  # 40 + 40 tokens used, 50 + 50 reserved
    admitted = [0, 0]

    async def gateway(i: int) -> int:
        """Up to ``per_round`` calls, while the ledger admits them; how many it made."""
        made = 0
        while made < per_round:
            r = ledgers[i].reserve(
                project=project,
                credential_id=f"gw{i}",
                model="m",
                input_tokens=estimate // 2,
                output_tokens=estimate // 2,
                now=clock(),
            )
            if not r.allowed:
                break
            ledgers[i].settle(r, input_tokens=40, output_tokens=40, at=clock())
            call = usage(project, prompt=40, completion=40, time=clock(), gateway_id=f"gw{i}")
            await publish(gateway_bus, [call])
            made += 1
        admitted[i] += made
        return made

    async def in_step() -> bool:
        """Each ledger knows exactly what was spent: metering's count includes every call, and
        no call is still held as a local copy (counted twice) or missing."""
        spent = sum(admitted) * call_tokens
        for ledger in ledgers:
            [state] = [s for s in ledger.states() if s.quota_id == quota["id"]]
            if state.input_used + state.output_used != spent:
                return False
            if sum(ledger.usage(quota["id"], clock())[:2]) != spent:
                return False
        return True

    try:
        for _ in range(limit // call_tokens):  # a bound on a broken ledger only
            made = await asyncio.gather(gateway(0), gateway(1))
            await until(in_step, what="both ledgers in step with metering's count")
            if not any(made):
                break  # both refused, knowing all that was spent
        else:
            pytest.fail(f"the replicas never stopped: {admitted} calls admitted")
    finally:
        await sub.unsubscribe()

    used = sum(admitted) * call_tokens
    assert min(admitted) > 0, "both replicas must have spent the budget"
    bound = (2 - 1) * per_round * call_tokens
    assert used <= limit + bound, f"{used} tokens used of {limit} (+{bound} allowed)"
    assert used > limit - estimate, f"{used} tokens used of {limit}: the budget was not spent"
