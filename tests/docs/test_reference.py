"""docs/reference.md runs as written: its blocks in order, in one reader's shell that began with
the README's tour, against the whole stack; after each block, what it printed and what it changed
are what the page says."""

from __future__ import annotations

import functools
import re
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.approval.support import eventually
from tests.docs.conftest import Stack
from tests.docs.runner import (
    ROOT,
    Session,
    block,
    checkout,
    documents,
    need,
    reader_env,
    run_python,
    substitute,
)
from tests.helpers import bearer, ok, unique

DOC = "docs/reference.md"
KEY = re.compile(r"stw_[A-Za-z0-9]{8}_[A-Za-z0-9]{32}")


def by(items: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    """The one item with these fields."""
    found = [i for i in items if all(i.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, items)
    return found[0]


async def test_the_references_blocks_run_in_order_as_one_readers_session(
    stack: Stack, tmp_path: Path
) -> None:
    need("curl", "jq")
    project = unique("fraud-detection")
    route = f"{project}/acme/chat-8b"
    http = httpx.AsyncClient(timeout=30)

    fill = functools.partial(stack.fill, project=project)
    get = functools.partial(stack.get, http)

    env = reader_env(tmp_path, **stack.env)
    folder = checkout(tmp_path)
    async with http, Session(env, folder) as shell:
        tour = substitute(
            block("README.md", "## A five-minute tour"), {"=stw_...": f"={stack.admin_key}"}
        )
        await shell.run(fill(tour))
        alice = await shell.value("ALICE")

        # -- The catalog and approval tour
        out = documents(await shell.run(fill(block(DOC, "## The catalog and approval tour"))))
        models, servers, dropdown, queue, admitted, granted, audit, verified, checkpoint = out
        assert {v["name"]: v["outcome"] for v in models["versions"]}["acme/chat-8b"] == "created"
        assert {v["name"] for v in servers["versions"]} >= {"io.github.acme/tickets"}
        assert dropdown["items"] == []  # alice's first look
        asked = by(queue["items"], project=project, kind="asset")
        assert (asked["requester"], asked["status"]) == ("alice", "pending")
        assert (admitted["id"], admitted["status"]) == (asked["id"], "approved")
        assert (granted["kind"], granted["status"]) == ("access", "approved")
        # Approval's own records (the other services' arrive as their events do).
        assert {"request.create", "request.approve"} <= {r["action"] for r in audit["items"]}
        assert verified["ok"] is True
        # The key that verifies checkpoints; the first is signed within seconds of a change.
        assert checkpoint["public_key"] and "checkpoint" in checkpoint
        [version] = (await get("catalog", "/v1/assets/model/acme/chat-8b"))["versions"]
        assert version["status"] == "approved"

        # -- Inference endpoints
        out = documents(await shell.run(fill(block(DOC, "## Inference endpoints"))))
        decided, listed, scaled, deleted, pool, lead_time, routes = out
        assert (decided["kind"], decided["status"]) == ("endpoint", "approved")
        ready = by(listed, request_id=decided["id"])
        assert (ready["status"], ready["runtime"], ready["route_name"]) == ("ready", "local", route)
        assert (scaled["runtime"], scaled["replicas"]) == ("kubernetes", 3)
        assert (deleted["id"], deleted["status"]) == (scaled["id"], "deleting")
        assert project in pool["projects"]
        assert lead_time["endpoints"] >= 1 and lead_time["request_to_ready_median_seconds"] > 0
        assert route in {r["route_name"] for r in routes["routes"]}

        # -- The gateway: the OpenAI client, once the gateway has the route (it hears of it from
        # inference's events), with alice's key from the README's tour.
        async def routed() -> bool:
            models = await get("gateway", "/v1/models", alice)
            return route in {m["id"] for m in models["data"]}

        await eventually(routed, what="the gateway to route the endpoint")
        python = substitute(block(DOC, "## The gateway"), {'"stw_..."': f'"{alice}"'})
        first, streamed = (await run_python(fill(python), env, cwd=folder)).ok().splitlines()
        assert first == str([route])
        assert len(streamed.split()) >= 4  # the simulator's words, streamed
        # A client's own call, whose X-Request-Id the metering block looks up.
        call = await http.post(
            stack.urls["gateway"] + "/v1/chat/completions",
            json={"model": route, "messages": [{"role": "user", "content": "Hi"}]},
            headers=bearer(alice),
        )
        await ok(call)
        rid = call.headers["x-request-id"]

        [revoked] = documents(await shell.run(fill(block(DOC, "## The gateway", 1))))
        assert (revoked["status"], revoked["status_reason"]) == ("revoked", "licence withdrawn")

        async def refused() -> bool:
            again = await http.post(
                stack.urls["gateway"] + "/v1/chat/completions",
                json={"model": route, "messages": [{"role": "user", "content": "Hi"}]},
                headers=bearer(alice),
            )
            return again.status_code in (403, 404)

        async def torn_down() -> bool:
            found = await get("inference", f"/v1/projects/{project}/endpoints/{ready['id']}")
            return found["status"] in ("deleting", "deleted")

        await eventually(refused, what="the gateway to refuse the revoked model")
        await eventually(torn_down, what="the revoked version's endpoint to be torn down")

        # -- Metering and quotas, once metering counted the client's call.
        async def counted() -> bool:
            return bool(await get("metering", f"/v1/usage/events?request_id={rid}"))

        await eventually(counted, what="metering to count the call")
        code = block(DOC, "## Metering and quotas")
        scheduled = re.findall(r'"effective_from": "([^"]+)"', code)
        assert all(datetime.fromisoformat(s) > datetime.now(UTC) for s in scheduled), (
            "the page schedules a price change in the past: move its date on"
        )
        out = documents(await shell.run(fill(substitute(code, {"$RID": rid}))))
        (totals, ranged, series, top, events, one) = out[:6]  # usage
        (price, planned, prices, gpu) = out[6:10]  # prices and dedicated endpoints
        (daily, calls, quotas, more) = out[10:]  # quotas
        assert by(totals["rows"], project=project)["requests"] >= 1
        assert (ranged["start"], ranged["end"]) == ("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z")
        assert series["interval"] == "hour" and series["rows"]
        assert top["by"] == "credential" and top["entries"]
        csv = (folder / "usage.csv").read_text().splitlines()
        assert csv[0].startswith("start,") and any(project in line for line in csv[1:])
        assert rid in {e["request_id"] for e in events}
        assert [e["request_id"] for e in one] == [rid]
        assert (price["model"], price["version"], price["gpu_hour"]) == (
            "acme/chat-8b",
            None,
            "2.5",
        )
        assert (planned["version"], planned["effective_from"]) == ("2.0.0", scheduled[0])
        assert [p["version"] for p in prices] == [None, "2.0.0"]
        assert by(gpu["endpoints"], endpoint_id=ready["id"])["plan"]["estimated_cost"] == 20.0
        assert daily["limits"]["output_tokens"] == 300000 and daily["soft_threshold"] == 0.8
        assert (calls["model"], calls["limits"]["requests"]) == ("io.github.acme/tickets", 500)
        assert {q["id"] for q in quotas} == {daily["id"], calls["id"]}
        assert (more["kind"], more["status"], more["requester"]) == ("quota", "pending", "alice")

        # -- The gateway's side: a ledger of one's own, from metering's snapshot.
        ledger = block(DOC, "### The gateway's side")
        ran = await run_python(fill(ledger), {**env, "STEWARD_API_KEY": stack.admin_key})
        admitted_line, refused_line = ran.ok().splitlines()
        assert admitted_line.startswith("200 {") and "'RateLimit-Limit': '300000'" in admitted_line
        assert refused_line.startswith("429 ") and "'Retry-After'" in refused_line

        # -- The CLI: the reader pastes their key at the prompt, and approves alice's request.
        code = substitute(block(DOC, "## The CLI and GitOps"), {"<request-id>": more["id"]})
        out_text = await shell.run(fill(code), stdin=stack.admin_key + "\n")
        assert "Logged in as admin" in out_text
        stored = tmp_path / "config" / "steward" / "credentials"
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
        models = yaml.safe_load((ROOT / "examples/gitops/models.yaml").read_text())["models"]
        assert f"created 0, updated 0, unchanged {len(models)} (dry run)" in out_text
        keys = KEY.findall(out_text)
        assert len(keys) == 2  # the key for ci, shown once, and keygen's
        assert "verified" in out_text
        decided = await get("approval", f"/v1/requests/{more['id']}")
        assert (decided["status"], decided["decision_comment"]) == ("approved", "ok for the pilot")
        filed = await get("approval", f"/v1/projects/{project}/requests?status=pending")
        assert by(filed["items"], kind="asset")["requester"] == "admin"
