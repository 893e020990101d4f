"""Endpoint transitions that race: delete beats scale, stop and a runtime's "ready" whatever the
interleaving, and two claims on the last GPU never both win."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from services.inference.models import Endpoint, bus_tables
from services.inference.runtimes.base import RuntimeStatus
from tests.helpers import bearer, ok
from tests.inference.support import Team, approved_model, team

ROUNDS = 10


@pytest.fixture(scope="module")
async def crew(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
) -> tuple[Team, str]:
    who = await team(authz, admin_key)
    return who, await approved_model(authz, catalog, approval, admin_key, who)


async def _create(
    inference: httpx.AsyncClient, who: Team, name: str, **extra: Any
) -> httpx.Response:
    body = {"model_name": name, "version": "1.0.0", "runtime": "kubernetes", "gpus": 0, **extra}
    return await inference.post(
        f"/v1/projects/{who.project}/endpoints", json=body, headers=bearer(who.admin)
    )


async def _row(app: FastAPI, endpoint_id: str) -> Endpoint:
    async with app.state.ctx.sessionmaker() as session:
        endpoint: Endpoint | None = await session.get(Endpoint, endpoint_id)
        assert endpoint is not None
        return endpoint


async def _events(app: FastAPI, endpoint_id: str) -> list[str]:
    outbox = bus_tables.outbox
    query = select(outbox.c.subject, outbox.c.event).where(
        outbox.c.subject.like("inference.endpoint.%")
    )
    async with app.state.ctx.sessionmaker() as session:
        rows = (await session.execute(query.order_by(outbox.c.created_at))).all()
    return [subject for subject, event in rows if endpoint_id in event]


async def test_delete_racing_scale_stop_and_ready_always_ends_deleted(
    inference: httpx.AsyncClient, inference_app: FastAPI, crew: tuple[Team, str]
) -> None:
    who, name = crew
    reconciler = inference_app.state.plane.reconciler
    for _ in range(ROUNDS):
        created = await ok(await _create(inference, who, name), 201)
        base = f"/v1/projects/{who.project}/endpoints/{created['id']}"
        ready = RuntimeStatus("ready", url="http://127.0.0.1:9/v1")
        deleted, scaled, stopped, _ = await asyncio.gather(
            inference.delete(base, headers=bearer(who.admin)),
            inference.post(f"{base}/scale", json={"replicas": 2}, headers=bearer(who.admin)),
            inference.post(f"{base}/stop", headers=bearer(who.admin)),
            reconciler._apply(created["id"], ready),
        )
        assert deleted.status_code == 202, deleted.text
        for answer in (scaled, stopped):
            assert answer.status_code in (200, 409), answer.text
            if answer.status_code == 409:
                assert "deleting" in answer.json()["detail"] or "deleted" in answer.json()["detail"]
        endpoint = await _row(inference_app, created["id"])
        assert endpoint.status in ("deleting", "deleted")
        subjects = await _events(inference_app, created["id"])
        assert subjects.count("inference.endpoint.deleting") == 1, subjects
        after = subjects[subjects.index("inference.endpoint.deleting") + 1 :]
        assert set(after) <= {"inference.endpoint.deleted"}, subjects


async def test_two_claims_on_the_last_gpu_never_both_win(
    inference: httpx.AsyncClient, inference_app: FastAPI, crew: tuple[Team, str]
) -> None:
    """The pool's "tiny" type has 2 GPUs; one is held, and a scale-up and a new endpoint both
    want the other at once."""
    who, name = crew
    tiny = {"gpus": 1, "gpu_type": "tiny"}
    for _ in range(ROUNDS):
        held = await ok(await _create(inference, who, name, **tiny), 201)
        base = f"/v1/projects/{who.project}/endpoints/{held['id']}"
        scaled, other = await asyncio.gather(
            inference.post(f"{base}/scale", json={"replicas": 2}, headers=bearer(who.admin)),
            _create(inference, who, name, **tiny),
        )
        won = [r for r in (scaled, other) if r.status_code in (200, 201)]
        lost = [r for r in (scaled, other) if r.status_code == 409]
        assert (len(won), len(lost)) == (1, 1), (scaled.text, other.text)
        assert "not enough free GPUs" in lost[0].json()["detail"]
        pool = await ok(await inference.get("/v1/gpu-pool", headers=bearer(who.admin)))
        assert pool["types"]["tiny"]["used"] == pool["types"]["tiny"]["total"] == 2
        # Deleting frees the GPUs at once (whatever the runtime's cleanup does): next round.
        ids = [held["id"]] + ([other.json()["id"]] if other.status_code == 201 else [])
        for endpoint_id in ids:
            await ok(
                await inference.delete(
                    f"/v1/projects/{who.project}/endpoints/{endpoint_id}",
                    headers=bearer(who.admin),
                ),
                202,
            )
