"""The embedded mode (SQLite), retention, and signed webhooks."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from pydantic import SecretStr
from sqlalchemy import func, select

from libs.common.bus import Bus
from libs.common.db import make_engine, make_sessionmaker, new_id, utcnow
from libs.common.migrate import upgrade_async
from libs.common.settings import Settings
from services.metering.models import (
    QuotaAlert,
    WebhookDelivery,
    bus_tables,
    usage_events,
    usage_minutes,
)
from tests.conftest import make_settings, running
from tests.helpers import bearer, delete_streams, new_project, ok, serve, unique
from tests.metering.support import eventually, publish, usage


@pytest.fixture
async def sqlite_settings(tmp_path: Path, run_id: str) -> AsyncIterator[Settings]:
    namespace = f"s{run_id}{unique('x')[-6:]}"
    settings = make_settings(
        "sqlite+aiosqlite:///{data_dir}/{service}.db",
        namespace,
        tmp_path,
        metering_quota_publish_seconds=0.1,
    )
    await upgrade_async("metering", settings)
    yield settings
    await delete_streams(namespace)


async def test_the_embedded_mode_on_sqlite_counts_once_and_answers_queries(
    sqlite_settings: Settings,
    authz: httpx.AsyncClient,
    authz_app: FastAPI,
    admin_key: str,
) -> None:
    from services.metering.app import create_app

    project = await new_project(authz, admin_key, "lite")
    bus = Bus(sqlite_settings.nats_url, sqlite_settings.event_namespace, name="sqlite-test")
    await bus.connect(wait=True)
    app = create_app(sqlite_settings, transports={"authz": httpx.ASGITransport(app=authz_app)})
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metering")

    async def counted() -> bool:
        body = await ok(
            await client.get("/v1/usage", params={"project": project}, headers=bearer(admin_key))
        )
        return bool(body["rows"] and body["rows"][0]["requests"] >= 450)

    try:
        async for _ in running(app):
            async with client:
                quota = await ok(
                    await client.post(
                        f"/v1/projects/{project}/quotas",
                        json={"window": "day", "limits": {"total_tokens": 1000}},
                        headers=bearer(admin_key),
                    ),
                    201,
                )
                events = [
                    usage(project, prompt=100, completion=20, ttft_ms=30.0) for _ in range(450)
                ]
                await publish(bus, events)
                await publish(bus, events[:100], fresh_msg_id=True)  # re-sent: counted once
                await eventually(counted, what="the events on SQLite")
                series = await ok(
                    await client.get(
                        "/v1/usage/series",
                        params={"project": project, "interval": "hour", "group_by": "model"},
                        headers=bearer(admin_key),
                    )
                )
                assert sum(r["requests"] for r in series["rows"]) == 450
                assert sum(r["total_tokens"] for r in series["rows"]) == 450 * 120
                assert series["rows"][0]["start"].endswith(":00:00Z")
                [read] = await ok(
                    await client.get(
                        "/v1/quotas", params={"project": project}, headers=bearer(admin_key)
                    )
                )
                assert read["id"] == quota["id"]
                assert (read["status"], read["input_used"]) == ("exceeded", 45_000)

            engine = make_engine(sqlite_settings.database_url_for("metering"), "metering")
            try:
                async with make_sessionmaker(engine)() as session:
                    raw = await session.scalar(select(func.count()).select_from(usage_events))
                    alerts = await session.scalar(select(func.count()).select_from(QuotaAlert))
            finally:
                await engine.dispose()
            assert raw == 450
            assert alerts == 2  # the warning and the exceeded, once each
    finally:
        await bus.close()


async def test_retention_deletes_what_is_older_than_its_period_and_keeps_the_rest(
    metering_app: FastAPI, metering_settings: Settings
) -> None:
    from services.metering.background import USAGE_DURABLE, Retention

    ctx = metering_app.state.ctx
    project = unique("retention")
    old, recent = utcnow() - timedelta(days=500), utcnow() - timedelta(hours=1)
    ids = {"old": new_id(), "recent": new_id(), "inbox_old": new_id(), "inbox_recent": new_id()}
    async with ctx.sessionmaker() as session, session.begin():
        for key, at in (("old", utcnow() - timedelta(days=40)), ("recent", recent)):
            await session.execute(
                usage_events.insert().values(
                    event_id=ids[key],
                    time=at,
                    received_at=at,
                    project=project,
                    credential_id="k",
                    subject_id="s",
                    model="m",
                    endpoint="e",
                    kind="chat",
                    prompt_tokens=1,
                    completion_tokens=1,
                    duration_ms=1.0,
                    http_status=200,
                    status="ok",
                    usage_source="upstream",
                    stream=False,
                    cost_nanos=0,
                )
            )
        for at in (old, recent):
            await session.execute(
                usage_minutes.insert().values(
                    minute=at.replace(second=0, microsecond=0),
                    project=project,
                    model="m",
                    credential_id="k",
                    endpoint="e",
                    requests=1,
                )
            )
        for key, at in (("inbox_old", utcnow() - timedelta(days=9)), ("inbox_recent", recent)):
            await session.execute(
                bus_tables.inbox.insert().values(
                    consumer=USAGE_DURABLE, event_id=ids[key], processed_at=at
                )
            )
    # (The service's own retention task may get there first: what counts is what is left.)
    deleted = await Retention(ctx.sessionmaker, metering_settings, utcnow).run_once()
    assert set(deleted) >= {"usage_events", "usage_minutes", "inbox", "quota_counters"}
    async with ctx.sessionmaker() as session:
        events = (
            await session.scalars(
                select(usage_events.c.event_id).where(usage_events.c.project == project)
            )
        ).all()
        minutes = await session.scalar(
            select(func.count())
            .select_from(usage_minutes)
            .where(usage_minutes.c.project == project)
        )
        inbox = (
            await session.scalars(
                select(bus_tables.inbox.c.event_id).where(
                    bus_tables.inbox.c.event_id.in_([ids["inbox_old"], ids["inbox_recent"]])
                )
            )
        ).all()
    assert events == [ids["recent"]]
    assert minutes == 1
    assert inbox == [ids["inbox_recent"]]


async def test_webhooks_are_signed_when_a_secret_is_set(
    metering_app: FastAPI, metering_settings: Settings
) -> None:
    from services.metering.webhooks import WebhookSender

    received: list[tuple[dict[str, str], bytes]] = []
    hook = FastAPI()

    async def receive(request: Request) -> Response:
        received.append((dict(request.headers), await request.body()))
        return Response(status_code=200)

    hook.add_api_route("/hook", receive, methods=["POST"])
    ctx = metering_app.state.ctx
    settings = metering_settings.model_copy(update={"metering_webhook_secret": SecretStr("s3cret")})
    body = json.dumps({"id": new_id(), "type": "dev.steward.metering.quota.warning.v1"})
    async with serve(hook) as url, httpx.AsyncClient() as http:
        delivery_id = new_id()
        async with ctx.sessionmaker() as session, session.begin():
            session.add(
                WebhookDelivery(
                    id=delivery_id,
                    url=f"{url}/hook",
                    event_id="e1",
                    event_type="metering.quota.warning",
                    body=body,
                    # Due only for this sender's clock, so the service's own sender leaves it.
                    next_attempt_at=utcnow() + timedelta(days=1),
                )
            )
        sender = WebhookSender(
            ctx.sessionmaker, http, settings, lambda: utcnow() + timedelta(days=2)
        )

        async def delivered() -> bool:
            await sender.deliver_due()
            return bool(received)

        await eventually(delivered, what="the signed delivery")
    headers, raw = received[0]
    expected = hmac.new(b"s3cret", raw, hashlib.sha256).hexdigest()
    assert headers["x-steward-signature"] == f"sha256={expected}"
    assert raw.decode() == body
    async with ctx.sessionmaker() as session:
        row = await session.get(WebhookDelivery, delivery_id)
    assert row is not None and row.delivered_at is not None and row.attempts == 1
