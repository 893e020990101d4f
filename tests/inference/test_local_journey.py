"""The issue's journey on the ``local`` runtime, through real NATS and PostgreSQL: a developer files
an endpoint request, Pat approves it, the endpoint is provisioned with no human step (a simulator
process on this host), answers the official ``openai`` client with a streaming chat completion,
shows up in the gateway's routes snapshot and events, and goes away when deleted."""

from __future__ import annotations

import socket
from datetime import datetime
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from fastapi import FastAPI

from libs.common.db import new_id, utcnow
from libs.common.events import CloudEvent
from libs.common.events.approval import RequestApproved
from libs.common.settings import Settings
from tests.approval.support import eventually
from tests.helpers import bearer, ok
from tests.inference.support import (
    approved_model,
    endpoint_of_request,
    endpoints,
    listening,
    request_endpoint,
    team,
    wait_status,
)


def _port_open(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((parts.hostname or "", parts.port or 80)) == 0


async def test_approved_request_becomes_a_ready_local_endpoint_that_streams_to_openai(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    inference_app: FastAPI,
    admin_key: str,
    settings: Settings,
) -> None:
    who = await team(authz, admin_key)
    name = await approved_model(authz, catalog, approval, admin_key, who)

    async with listening(settings) as heard:
        decided = await request_endpoint(approval, admin_key, who, name, "local")
        found = await endpoint_of_request(inference, who.dev, who.project, decided["id"])
        ready = await wait_status(inference, who.dev, who.project, found["id"], "ready")

        # Provisioned as the plan says, owned by the requester, from that request.
        assert ready["model_name"] == name and ready["version"] == "1.0.0"
        assert ready["runtime"] == "local" and ready["profile"] == "simulator"
        assert (ready["replicas"], ready["gpus"], ready["gpu_type"]) == (1, 1, "nvidia-a100")
        assert ready["owner"] == decided["requester"]
        assert ready["request_id"] == decided["id"]
        assert ready["route_name"] == f"{who.project}/{name}"
        assert ready["served_model_name"] == name
        assert ready["source_uri"].startswith("oci://registry.example.com/")
        assert ready["upstream_url"].startswith("http://127.0.0.1:")
        assert ready["upstream_url"].endswith("/v1")
        # Lead time: filed → approved → ready, in order, and measured in seconds, not days.
        assert ready["requested_at"] <= ready["approved_at"] <= ready["ready_at"]
        span = datetime.fromisoformat(ready["ready_at"]) - datetime.fromisoformat(
            ready["requested_at"]
        )
        assert ready["lead_time_seconds"] == pytest.approx(span.total_seconds())
        assert ready["lead_time_seconds"] > 0
        print(f"\nrequest-to-ready on the local runtime: {ready['lead_time_seconds']:.2f}s")

        # The official OpenAI client, pointed at the upstream URL, gets a streamed answer.
        client = openai.AsyncOpenAI(base_url=ready["upstream_url"], api_key="unused")
        stream = await client.chat.completions.create(
            model=ready["served_model_name"],
            messages=[{"role": "user", "content": "Say something deterministic."}],
            stream=True,
            max_tokens=5,
            stream_options={"include_usage": True},
        )
        pieces: list[str] = []
        usage = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        await client.close()
        assert len(pieces) == 5
        assert usage is not None and usage.completion_tokens == 5

        # The gateway's snapshot lists it with what it needs to route.
        snapshot = await ok(await inference.get("/v1/routes", headers=bearer(admin_key)))
        route = next(r for r in snapshot["routes"] if r["endpoint_id"] == found["id"])
        assert route == {
            **route,
            "status": "ready",
            "project": who.project,
            "route_name": ready["route_name"],
            "served_model_name": name,
            "asset_kind": "model",
            "asset_name": name,
            "version": "1.0.0",
            "runtime": "local",
            "upstream_url": ready["upstream_url"],
            "upstream_credential": None,
        }

        # Delete: the route goes at once (deleting), the process goes, then deleted.
        deleting = await ok(
            await inference.delete(
                f"/v1/projects/{who.project}/endpoints/{found['id']}", headers=bearer(who.admin)
            ),
            202,
        )
        assert deleting["status"] in ("deleting", "deleted")
        await wait_status(inference, who.dev, who.project, found["id"], "deleted")
        assert not _port_open(ready["upstream_url"])
        snapshot = await ok(await inference.get("/v1/routes", headers=bearer(admin_key)))
        assert found["id"] not in [r["endpoint_id"] for r in snapshot["routes"]]

    statuses = heard.statuses(found["id"])
    assert statuses[0] == "provisioning"
    assert statuses[-3:] == ["ready", "deleting", "deleted"]
    first_ready = next(e for e in heard.about(found["id"]) if e["data"]["status"] == "ready")
    assert first_ready["type"] == "dev.steward.inference.endpoint.ready.v1"
    assert first_ready["data"]["upstream_url"] == ready["upstream_url"]

    # The log of the process was captured under data_dir.
    log = inference_app.state.ctx.settings.data_dir / "inference" / "logs" / f"{found['id']}.log"
    assert "steward simulator (NOT a model)" in log.read_text()


async def test_a_redelivered_approval_never_creates_a_second_endpoint(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    inference_app: FastAPI,
    admin_key: str,
) -> None:
    who = await team(authz, admin_key)
    name = await approved_model(authz, catalog, approval, admin_key, who)
    decided = await request_endpoint(approval, admin_key, who, name, "local", gpus=0)
    found = await endpoint_of_request(inference, who.dev, who.project, decided["id"])

    # The same decision, re-sent under a new event id (past JetStream's de-duplication and
    # the inbox), reaches the consumer: the unique request id keeps it to one endpoint.
    approved = RequestApproved(
        request_id=decided["id"],
        kind="endpoint",
        project=who.project,
        requester=decided["requester"],
        status="approved",
        payload=decided["payload"],
        created_at=decided["created_at"],
        due_at=decided["due_at"],
        decided_by="admin",
        decided_at=utcnow(),
        lead_time_seconds=1.0,
    )
    event = CloudEvent.wrap(approved, source="approval")
    ctx = inference_app.state.ctx
    await ctx.bus.publish(approved.subject, event.model_dump_json().encode(), event.id)
    # And the very same event twice more, past JetStream's de-duplication: the inbox drops it.
    for _ in range(2):
        await ctx.bus.publish(approved.subject, event.model_dump_json().encode(), new_id())

    async def inbox_saw_it() -> bool:
        async with ctx.sessionmaker() as session:
            from sqlalchemy import select

            from services.inference.models import bus_tables

            found = await session.scalar(
                select(bus_tables.inbox.c.event_id).where(bus_tables.inbox.c.event_id == event.id)
            )
            return found is not None

    await eventually(inbox_saw_it, what="the re-sent approval to be consumed")
    mine = [e for e in await endpoints(inference, who.dev, who.project) if e["request_id"]]
    assert [e["id"] for e in mine] == [found["id"]]
    await ok(
        await inference.delete(
            f"/v1/projects/{who.project}/endpoints/{found['id']}", headers=bearer(who.admin)
        ),
        202,
    )
    await wait_status(inference, who.dev, who.project, found["id"], "deleted")
