"""The embedded mode (SQLite) across a restart of the inference service: its local servers stop
with it and their routes go at once; the next start brings them back, ready again."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import update

from libs.common.db import make_engine
from libs.common.migrate import upgrade_async
from libs.common.settings import Settings
from services.inference.app import create_app
from services.inference.config import InferenceConfig
from services.inference.models import Endpoint
from services.inference.reconciler import RESTARTED, STOPPED
from tests.approval.support import eventually
from tests.conftest import running
from tests.helpers import bearer, delete_streams, ok, unique
from tests.inference.support import approved_model, listening, team, wait_status


@pytest.fixture
async def embedded(
    settings: Settings, inference_config: InferenceConfig, tmp_path: Path
) -> AsyncIterator[Settings]:
    """Inference alone on SQLite and its own NATS namespace (no competing consumer)."""
    embedded = settings.model_copy(
        update={
            "database_url": f"sqlite+aiosqlite:///{tmp_path}/{{service}}.db",
            "event_namespace": unique("tr").replace("-", ""),
            "data_dir": tmp_path,
        }
    )
    await upgrade_async("inference", embedded)
    yield embedded
    await delete_streams(embedded.event_namespace)


async def _start(
    embedded: Settings, config: InferenceConfig, authz_app: FastAPI, catalog_app: FastAPI
) -> AsyncIterator[FastAPI]:
    transports = {
        "authz": httpx.ASGITransport(app=authz_app),
        "catalog": httpx.ASGITransport(app=catalog_app),
    }
    app = create_app(embedded, config=config, transports=transports)
    async for started in running(app):
        yield started


async def test_local_routes_go_when_the_service_stops_and_come_back_when_it_starts(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    authz_app: FastAPI,
    catalog_app: FastAPI,
    admin_key: str,
    embedded: Settings,
    inference_config: InferenceConfig,
) -> None:
    who = await team(authz, admin_key)
    name = await approved_model(authz, catalog, approval, admin_key, who)
    body = {"model_name": name, "version": "1.0.0", "runtime": "local"}
    async with listening(embedded) as heard:
        first = _start(embedded, inference_config, authz_app, catalog_app)
        app = await anext(first)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://inference"
        ) as inference:
            created = await ok(
                await inference.post(
                    f"/v1/projects/{who.project}/endpoints", json=body, headers=bearer(who.admin)
                ),
                201,
            )
            ready = await wait_status(inference, who.dev, who.project, created["id"], "ready")
        with pytest.raises(StopAsyncIteration):
            await anext(first)  # the service stops, and its server with it
        # A crash would not have had the chance: the row still says ready.
        engine = make_engine(embedded.database_url_for("inference"), "inference")
        async with engine.begin() as conn:
            await conn.execute(
                update(Endpoint).where(Endpoint.id == created["id"]).values(status="ready")
            )
        await engine.dispose()

        second = _start(embedded, inference_config, authz_app, catalog_app)
        app = await anext(second)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://inference"
        ) as inference:
            url = f"/v1/projects/{who.project}/endpoints/{created['id']}"

            async def served_again() -> bool:
                return heard.statuses(created["id"]).count("ready") >= 2

            await eventually(served_again, what="the restarted endpoint to be ready again")
            again = await wait_status(inference, who.dev, who.project, created["id"], "ready")
            async with httpx.AsyncClient() as http:
                models = await http.get(again["upstream_url"] + "/models")
            assert models.json()["data"][0]["id"] == name
            await ok(await inference.delete(url, headers=bearer(who.admin)), 202)
            await wait_status(inference, who.dev, who.project, created["id"], "deleted")
        with pytest.raises(StopAsyncIteration):
            await anext(second)

    events = heard.about(created["id"])
    statuses = [e["data"]["status"] for e in events]
    assert statuses[:3] == ["provisioning", "ready", "provisioning"]
    assert events[2]["data"]["reason"] == STOPPED
    assert statuses[-3:] == ["ready", "deleting", "deleted"]
    # After the "crash", the next start drops the stale route first, then serves again.
    assert (statuses[3], events[3]["data"]["reason"]) == ("provisioning", RESTARTED)
    assert statuses[4] == "ready"
    assert events[4]["data"]["upstream_url"] == again["upstream_url"]
    assert ready["ready_at"] == again["ready_at"]  # lead time keeps the first ready
