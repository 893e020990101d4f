"""Approval events delivered twice change nothing in catalog or authz: a redelivery (same event
id) is dropped by the inbox, and a repeated decision (a new event id) finds the work done."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import nats
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from libs.common.db import make_engine, new_id
from libs.common.settings import Settings
from tests.approval.support import (
    DEV_SCOPES,
    admitted,
    approve,
    catalog_yaml,
    eventually,
    file_request,
    import_yaml,
    model,
    uname,
)
from tests.helpers import NATS_URL, bearer, member_key, new_project, ok


@pytest.fixture
async def engines(settings: Settings) -> AsyncIterator[dict[str, AsyncEngine]]:
    engines = {
        s: make_engine(settings.database_url_for(s), s) for s in ("authz", "catalog", "approval")
    }
    yield engines
    for engine in engines.values():
        await engine.dispose()


async def _scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar()


async def _approved_event(engine: AsyncEngine, request_id: str) -> dict[str, Any]:
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT event FROM outbox WHERE subject = 'approval.request.approved'")
            )
        ).scalars()
        for row in rows:
            event: dict[str, Any] = json.loads(row)
            if event["data"]["request_id"] == request_id:
                return event
    raise AssertionError(f"no approved event for {request_id}")


async def test_duplicate_approval_events_change_nothing(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
    settings: Settings,
    engines: dict[str, AsyncEngine],
) -> None:
    name = uname("dup")
    await import_yaml(catalog, admin_key, catalog_yaml([model(name)]))
    project = await new_project(authz, admin_key, "dup")
    dev = await member_key(authz, admin_key, project, "developer", DEV_SCOPES)
    await admitted(catalog, approval, admin_key, dev, project, "model", name)
    access = await file_request(
        approval, dev, project, "access", {"asset_kind": "model", "asset_name": name}
    )
    await approve(approval, admin_key, access["id"])

    async def granted() -> list[dict[str, Any]] | None:
        rows = await ok(
            await authz.get(f"/v1/projects/{project}/entitlements", headers=bearer(admin_key))
        )
        return [e for e in rows if e["asset_name"] == name] or None

    before_grant = await eventually(granted, what="the entitlement")
    found = await ok(await catalog.get(f"/v1/assets/model/{name}", headers=bearer(admin_key)))
    before_version = found["versions"][0]
    outbox_sql = "SELECT count(*) FROM outbox"
    before_catalog = await _scalar(engines["catalog"], outbox_sql)
    before_authz = await _scalar(engines["authz"], outbox_sql)

    asset_request_id = before_version["request_id"]
    events = [
        await _approved_event(engines["approval"], asset_request_id),
        await _approved_event(engines["approval"], access["id"]),
    ]
    ns = settings.event_namespace
    nc = await nats.connect(NATS_URL)
    fresh_ids = []
    try:
        js = nc.jetstream()
        for event in events:
            body = json.dumps(event).encode()
            # The same event again (JetStream would drop the same Nats-Msg-Id; the inbox must).
            await js.publish(
                f"{ns}.approval.request.approved",
                body,
                stream=f"{ns}_EVENTS".upper(),
                headers={"Nats-Msg-Id": new_id()},
            )
            # The same decision as a new event: the handlers themselves must be idempotent.
            copy = {**event, "id": new_id()}
            fresh_ids.append(copy["id"])
            await js.publish(
                f"{ns}.approval.request.approved",
                json.dumps(copy).encode(),
                stream=f"{ns}_EVENTS".upper(),
                headers={"Nats-Msg-Id": copy["id"]},
            )
    finally:
        await nc.close()

    inbox_sql = "SELECT count(*) FROM inbox WHERE consumer = :c AND event_id = :e"
    for consumer in ("catalog", "authz"):
        for event_id in fresh_ids:

            async def processed(consumer: str = consumer, event_id: str = event_id) -> bool:
                return bool(await _scalar(engines[consumer], inbox_sql, c=consumer, e=event_id))

            await eventually(processed, what=f"{consumer} to process {event_id}")

    assert await granted() == before_grant
    after = await ok(await catalog.get(f"/v1/assets/model/{name}", headers=bearer(admin_key)))
    assert after["versions"][0] == before_version
    assert await _scalar(engines["catalog"], outbox_sql) == before_catalog
    assert await _scalar(engines["authz"], outbox_sql) == before_authz
