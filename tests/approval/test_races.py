"""Decisions that race: approve, reject, withdraw and expiry of one request end in exactly one
decision, whatever the interleaving; the loser is told the request's state (409)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from libs.common.settings import Settings
from services.approval import domain
from services.approval.models import Request, bus_tables
from tests.approval.support import (
    DEV_SCOPES,
    Clock,
    catalog_yaml,
    clocked_approval,
    file_request,
    import_yaml,
    model,
    uname,
)
from tests.helpers import bearer, member_key, new_project, ok

ROUNDS = 10
DECIDED = {cls.subject for cls in domain.DECISIONS.values()}


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
async def approval_app(
    settings: Settings, authz_app: FastAPI, catalog_app: FastAPI, clock: Clock
) -> AsyncIterator[FastAPI]:
    async for app in clocked_approval(settings, authz_app, catalog_app, clock):
        yield app


@pytest.fixture(scope="module")
async def team(authz: httpx.AsyncClient, admin_key: str) -> dict[str, str]:
    project = await new_project(authz, admin_key, "racing")
    return {
        "project": project,
        "dev": await member_key(authz, admin_key, project, "developer", DEV_SCOPES),
    }


async def _pending(
    catalog: httpx.AsyncClient, approval: httpx.AsyncClient, admin_key: str, team: dict[str, str]
) -> dict[str, Any]:
    name = uname("raced")
    await import_yaml(catalog, admin_key, catalog_yaml([model(name)]))
    payload = {"asset_kind": "model", "asset_name": name, "version": "1.0.0"}
    return await file_request(approval, team["dev"], team["project"], "asset", payload)


async def _decisions(app: FastAPI, request_id: str) -> list[str]:
    """The decision events written for the request (each decision writes exactly one)."""
    outbox = bus_tables.outbox
    async with app.state.ctx.sessionmaker() as session:
        rows = (
            await session.execute(
                select(outbox.c.subject, outbox.c.event).where(outbox.c.subject.in_(DECIDED))
            )
        ).all()
    return [subject for subject, event in rows if request_id in event]


async def _status(app: FastAPI, request_id: str) -> str:
    async with app.state.ctx.sessionmaker() as session:
        request = await session.get(Request, request_id)
        assert request is not None
        return str(request.status)


def _winner(answers: dict[str, httpx.Response]) -> str:
    """The one decision that went through; every other answer is a 409 naming it."""
    won = [verb for verb, answer in answers.items() if answer.status_code == 200]
    assert len(won) == 1, {verb: (a.status_code, a.text) for verb, a in answers.items()}
    status = answers[won[0]].json()["status"]
    for verb, answer in answers.items():
        if verb != won[0]:
            assert answer.status_code == 409, answer.text
            assert f"is already {status}" in answer.json()["detail"]
    return str(status)


async def test_approve_reject_and_withdraw_racing_end_in_one_decision(
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    approval_app: FastAPI,
    admin_key: str,
    team: dict[str, str],
) -> None:
    outcomes: set[str] = set()
    for _ in range(ROUNDS):
        request = await _pending(catalog, approval, admin_key, team)
        base = f"/v1/requests/{request['id']}"
        approve, reject, withdraw = await asyncio.gather(
            approval.post(f"{base}/approve", headers=bearer(admin_key)),
            approval.post(f"{base}/reject", json={"comment": "no"}, headers=bearer(admin_key)),
            approval.post(f"{base}/withdraw", headers=bearer(team["dev"])),
        )
        status = _winner({"approve": approve, "reject": reject, "withdraw": withdraw})
        outcomes.add(status)
        assert await _status(approval_app, request["id"]) == status
        assert len(await _decisions(approval_app, request["id"])) == 1
    assert outcomes <= {"approved", "rejected", "withdrawn"}


async def test_approval_racing_expiry_ends_in_one_decision(
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    approval_app: FastAPI,
    admin_key: str,
    team: dict[str, str],
    clock: Clock,
) -> None:
    """The expiry sweep runs at a time past every deadline while a reviewer approves."""
    ctx = approval_app.state.ctx
    for _ in range(ROUNDS):
        request = await _pending(catalog, approval, admin_key, team)
        approved, expired = await asyncio.gather(
            approval.post(f"/v1/requests/{request['id']}/approve", headers=bearer(admin_key)),
            domain.expire_due(ctx.sessionmaker, ctx.outbox, clock() + timedelta(days=3650)),
        )
        status = await _status(approval_app, request["id"])
        if approved.status_code == 200:
            assert (status, expired) == ("approved", 0)
        else:
            assert approved.status_code == 409, approved.text
            assert (status, expired) == ("expired", 1)
            assert "is already expired" in approved.json()["detail"]
        assert len(await _decisions(approval_app, request["id"])) == 1
        shown = await ok(
            await approval.get(f"/v1/requests/{request['id']}", headers=bearer(admin_key))
        )
        assert shown["status"] == status
