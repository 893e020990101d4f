"""The audit log: every service's changes land in one hash chain that detects tampering."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.approval.support import eventually, uname
from tests.helpers import bearer, new_project, ok


async def _verify(approval: httpx.AsyncClient, key: str) -> dict[str, Any]:
    result: dict[str, Any] = await ok(await approval.get("/v1/audit/verify", headers=bearer(key)))
    return result


async def _recorded(approval: httpx.AsyncClient, key: str, project: str) -> dict[str, Any]:
    """The audit record of creating ``project`` (published by authz, stored by approval)."""

    async def probe() -> dict[str, Any] | None:
        page = await ok(
            await approval.get(
                "/v1/audit",
                params={"project": project, "action": "project.create"},
                headers=bearer(key),
            )
        )
        return page["items"][0] if page["items"] else None

    return await eventually(probe, what="the audit record")


async def test_changes_in_every_service_reach_the_log_with_actor_target_and_summary(
    authz: httpx.AsyncClient, approval: httpx.AsyncClient, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "audited")
    record = await _recorded(approval, admin_key, project)
    assert record["service"] == "authz"
    assert record["actor"] == "admin"
    assert record["target"] == f"project/{project}"
    assert record["after"] == {"display_name": project}
    assert record["request_id"]
    assert len(record["hash"]) == 64 and len(record["prev_hash"]) == 64


async def test_audit_filters_and_pages_without_gaps(
    authz: httpx.AsyncClient, approval: httpx.AsyncClient, admin_key: str
) -> None:
    prefix = uname("paged")
    projects = [await new_project(authz, admin_key, prefix) for _ in range(3)]
    for project in projects:
        await _recorded(approval, admin_key, project)
    seen: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"target": f"project/{prefix}", "limit": 2, "order": "oldest"}
        if cursor:
            params["cursor"] = cursor
        page = await ok(await approval.get("/v1/audit", params=params, headers=bearer(admin_key)))
        seen += [r["seq"] for r in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) >= 3 and seen == sorted(seen)
    bad = await approval.get("/v1/audit", params={"cursor": "x"}, headers=bearer(admin_key))
    assert bad.status_code == 400


async def test_an_edited_record_is_detected_and_named(
    authz: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
    approval_db: AsyncEngine,
) -> None:
    project = await new_project(authz, admin_key, "tamper")
    seq = (await _recorded(approval, admin_key, project))["seq"]
    assert (await _verify(approval, admin_key))["ok"] is True

    async with approval_db.begin() as conn:
        await conn.execute(
            text("UPDATE audit_records SET actor = 'mallory' WHERE seq = :seq"), {"seq": seq}
        )
    try:
        result = await _verify(approval, admin_key)
        assert result["ok"] is False
        assert {"seq": seq, "problem": "edited"} in [
            {"seq": p["seq"], "problem": p["problem"]} for p in result["problems"]
        ]
    finally:
        async with approval_db.begin() as conn:
            await conn.execute(
                text("UPDATE audit_records SET actor = 'admin' WHERE seq = :seq"), {"seq": seq}
            )
    assert (await _verify(approval, admin_key))["ok"] is True


async def test_a_deleted_record_is_detected(
    authz: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
    approval_db: AsyncEngine,
) -> None:
    project = await new_project(authz, admin_key, "deleted")
    seq = (await _recorded(approval, admin_key, project))["seq"]
    async with approval_db.begin() as conn:
        row = (
            (await conn.execute(text("SELECT * FROM audit_records WHERE seq = :s"), {"s": seq}))
            .mappings()
            .one()
        )
        await conn.execute(text("DELETE FROM audit_records WHERE seq = :s"), {"s": seq})
    try:
        result = await _verify(approval, admin_key)
        assert result["ok"] is False
        problems = {p["problem"] for p in result["problems"]}
        assert problems & {"missing", "truncated"}
    finally:
        names = list(row.keys())
        columns = ", ".join(names)
        values = ", ".join(f":{k}" for k in names)
        async with approval_db.begin() as conn:
            restored = dict(row)
            for key in ("before", "after"):
                if restored[key] is not None and not isinstance(restored[key], str):
                    restored[key] = json.dumps(restored[key])
            await conn.execute(
                text(f"INSERT INTO audit_records ({columns}) VALUES ({values})"),  # noqa: S608
                restored,
            )
    assert (await _verify(approval, admin_key))["ok"] is True


async def test_reordered_records_are_detected(
    authz: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
    approval_db: AsyncEngine,
) -> None:
    first = (await _recorded(approval, admin_key, await new_project(authz, admin_key)))["seq"]
    second = (await _recorded(approval, admin_key, await new_project(authz, admin_key)))["seq"]
    swap = text("UPDATE audit_records SET seq = -1 WHERE seq = :a")

    async def exchange() -> None:
        async with approval_db.begin() as conn:
            await conn.execute(swap, {"a": first})
            await conn.execute(
                text("UPDATE audit_records SET seq = :a WHERE seq = :b"), {"a": first, "b": second}
            )
            await conn.execute(
                text("UPDATE audit_records SET seq = :b WHERE seq = -1"), {"b": second}
            )

    await exchange()
    try:
        result = await _verify(approval, admin_key)
        assert result["ok"] is False
        flagged = {p["seq"] for p in result["problems"]}
        assert flagged & {first, second}
    finally:
        await exchange()
    assert (await _verify(approval, admin_key))["ok"] is True


async def test_a_record_committed_while_the_chain_is_replayed_is_no_cut_tail(
    authz: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The race: the replay reads the records, another change commits its record and the
    chain's head, then the head is read. Verified in one snapshot, the chain is whole."""
    from services.approval import repository

    real = repository.audit_batch
    raced: list[str] = []

    async def replay_then_race(session: Any, after: int, limit: int) -> Any:
        records = await real(session, after, limit)
        if not records and not raced:  # the replay's last read: a writer commits now
            project = await new_project(authz, admin_key, "race")
            raced.append(str((await _recorded(approval, admin_key, project))["seq"]))
        return records

    monkeypatch.setattr(repository, "audit_batch", replay_then_race)
    result = await _verify(approval, admin_key)
    assert raced, "the race did not happen"
    assert result["ok"] is True, result
    assert result["head_seq"] < int(raced[0])  # the snapshot ends before the racing record
