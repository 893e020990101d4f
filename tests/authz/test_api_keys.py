"""API key lifecycle: issue, use, rotate with grace, expire, revoke — and the limits on issuing."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event

from tests.helpers import add_member, bearer, issue_key, member_key, new_project, ok


async def status_of(client: httpx.AsyncClient, key: str) -> int:
    return (await client.get("/v1/whoami", headers=bearer(key))).status_code


async def keys_of(client: httpx.AsyncClient, admin: str, project: str) -> dict[str, Any]:
    listed = await ok(await client.get(f"/v1/projects/{project}/keys", headers=bearer(admin)))
    return {k["id"]: k for k in listed}


@pytest.mark.parametrize("header", ["apikey", "x-api-key", "authorization"])
async def test_a_key_is_accepted_in_each_supported_header(
    authz: httpx.AsyncClient, admin_key: str, header: str
) -> None:
    value = f"Bearer {admin_key}" if header == "authorization" else admin_key
    assert (await authz.get("/v1/whoami", headers={header: value})).status_code == 200


@pytest.mark.parametrize(
    "credential",
    ["", "stw_short", "stw_AAAAAAAA_" + "B" * 32, "stw_AAAAAAAA_" + "!" * 32, "garbage"],
)
async def test_malformed_unknown_or_missing_credentials_get_401(
    authz: httpx.AsyncClient, credential: str
) -> None:
    headers = {"apikey": credential} if credential else {}
    response = await authz.get("/v1/whoami", headers=headers)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"


async def test_a_key_with_a_right_id_but_a_wrong_secret_is_refused(
    authz: httpx.AsyncClient, admin_key: str
) -> None:
    forged = admin_key[:13] + ("A" if admin_key[13] != "A" else "B") + admin_key[14:]
    assert await status_of(authz, forged) == 401


async def test_rotation_keeps_the_old_key_working_for_the_grace_period_only(
    authz: httpx.AsyncClient, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "rotate")
    old = await issue_key(authz, admin_key, project, ["projects:read"])
    rotated = await ok(
        await authz.post(
            f"/v1/projects/{project}/keys/{old['id']}/rotate",
            json={"grace_seconds": 1},
            headers=bearer(admin_key),
        ),
        201,
    )
    assert rotated["id"] != old["id"]
    assert rotated["scopes"] == old["scopes"] and rotated["role"] == old["role"]
    assert await status_of(authz, old["key"]) == 200
    assert await status_of(authz, rotated["key"]) == 200
    listed = await keys_of(authz, admin_key, project)
    assert listed[old["id"]]["rotated_to"] == rotated["id"]

    await asyncio.sleep(1.2)
    response = await authz.get("/v1/whoami", headers=bearer(old["key"]))
    assert response.status_code == 401 and response.json()["detail"] == "API key expired"
    assert await status_of(authz, rotated["key"]) == 200

    again = await authz.post(
        f"/v1/projects/{project}/keys/{old['id']}/rotate", headers=bearer(admin_key)
    )
    assert again.status_code == 409


async def test_a_key_stops_working_when_it_expires(
    authz: httpx.AsyncClient, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "expiry")
    soon = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    key = await issue_key(authz, admin_key, project, ["projects:read"], expires_at=soon)
    assert await status_of(authz, key["key"]) == 200
    await asyncio.sleep(1.2)
    assert await status_of(authz, key["key"]) == 401
    assert (await keys_of(authz, admin_key, project))[key["id"]]["status"] == "expired"


async def test_revocation_is_immediate_and_idempotent(
    authz: httpx.AsyncClient, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "revoke")
    key = await issue_key(authz, admin_key, project, ["projects:read"])
    url = f"/v1/projects/{project}/keys/{key['id']}"
    first = await ok(await authz.delete(url, headers=bearer(admin_key)))
    assert first["status"] == "revoked"
    response = await authz.get("/v1/whoami", headers=bearer(key["key"]))
    assert response.status_code == 401 and response.json()["detail"] == "API key revoked"
    second = await ok(await authz.delete(url, headers=bearer(admin_key)))
    assert second["revoked_at"] == first["revoked_at"]
    rotate = await authz.post(f"{url}/rotate", headers=bearer(admin_key))
    assert rotate.status_code == 409


async def test_a_key_cannot_carry_scopes_its_creator_lacks(
    authz: httpx.AsyncClient, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "subset")
    dev = await member_key(
        authz, admin_key, project, "developer", ["keys:manage", "inference:invoke"]
    )
    before = set(await keys_of(authz, admin_key, project))
    response = await authz.post(
        f"/v1/projects/{project}/keys",
        json={"name": "wider", "scopes": ["inference:invoke", "projects:manage"]},
        headers=bearer(dev),
    )
    assert response.status_code == 403
    assert "projects:manage" in response.json()["detail"]
    assert set(await keys_of(authz, admin_key, project)) == before  # no new key id
    narrower = await ok(
        await authz.post(
            f"/v1/projects/{project}/keys",
            json={"name": "narrower", "scopes": ["inference:invoke"]},
            headers=bearer(dev),
        ),
        201,
    )
    assert narrower["role"] == "developer"


async def test_a_developer_cannot_mint_a_stronger_key_or_one_for_someone_else(
    authz: httpx.AsyncClient, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "caps")
    await add_member(authz, admin_key, project, "colleague", "developer")
    dev = await member_key(authz, admin_key, project, "developer", ["keys:manage"])
    url = f"/v1/projects/{project}/keys"
    stronger = await authz.post(
        url,
        json={"name": "x", "scopes": ["keys:manage"], "role": "project-admin"},
        headers=bearer(dev),
    )
    assert stronger.status_code == 403
    theirs = await authz.post(
        url,
        json={"name": "x", "scopes": ["keys:manage"], "owner": "colleague"},
        headers=bearer(dev),
    )
    assert theirs.status_code == 403


async def test_a_key_for_a_non_member_is_refused(authz: httpx.AsyncClient, admin_key: str) -> None:
    project = await new_project(authz, admin_key, "nonmember")
    response = await authz.post(
        f"/v1/projects/{project}/keys",
        json={"name": "x", "scopes": ["projects:read"], "owner": "stranger"},
        headers=bearer(admin_key),
    )
    assert response.status_code == 422
    assert "not a member" in response.json()["detail"]


async def test_removing_a_member_revokes_their_keys_and_lowering_a_role_revokes_stronger_keys(
    authz: httpx.AsyncClient, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "offboard")
    leaver = await member_key(authz, admin_key, project, "developer", ["projects:read"], "leaver")
    lead = await member_key(authz, admin_key, project, "project-admin", ["projects:read"], "lead")
    assert await status_of(authz, leaver) == 200

    await ok(
        await authz.delete(f"/v1/projects/{project}/members/leaver", headers=bearer(admin_key)),
        204,
    )
    assert await status_of(authz, leaver) == 401

    await add_member(authz, admin_key, project, "lead", "viewer")
    assert await status_of(authz, lead) == 401
    members = await ok(
        await authz.get(f"/v1/projects/{project}/members", headers=bearer(admin_key))
    )
    assert members == [{**members[0], "subject": "lead", "role": "viewer"}]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "scopes": ["no:such"]}, "scopes"),
        ({"name": "x", "scopes": []}, "scopes"),
        ({"name": "x", "scopes": ["projects:read", "projects:read"]}, "scopes"),
        ({"name": "", "scopes": ["projects:read"]}, "name"),
        (
            {"name": "x", "scopes": ["projects:read"], "expires_at": "2001-01-01T00:00:00Z"},
            "expires_at",
        ),
        (
            {"name": "x", "scopes": ["projects:read"], "expires_at": "2099-01-01T00:00:00"},
            "expires_at",
        ),
        ({"name": "x", "scopes": ["projects:read"], "role": "platform-admin"}, "role"),
        ({"name": "x", "scopes": ["projects:read"], "colour": "red"}, "colour"),
    ],
)
async def test_bad_key_requests_get_a_field_level_422_and_create_nothing(
    authz: httpx.AsyncClient, admin_key: str, body: dict[str, Any], field: str
) -> None:
    project = await new_project(authz, admin_key, "bad")
    response = await authz.post(
        f"/v1/projects/{project}/keys", json=body, headers=bearer(admin_key)
    )
    assert response.status_code == 422
    problem = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    assert any(e["field"].startswith(field) for e in problem["errors"]), problem
    assert await keys_of(authz, admin_key, project) == {}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/projects", {"name": "Not_A_DNS_Label"}),
        ("POST", "/v1/projects", {"name": "-leading-dash"}),
        ("POST", "/v1/projects", {"name": "ok", "extra": 1}),
        ("POST", "/v1/projects", "not json"),
        ("POST", "/v1/authorize", {"action": "launch.missiles"}),
    ],
)
async def test_bad_input_elsewhere_gets_a_422(
    authz: httpx.AsyncClient, admin_key: str, method: str, path: str, body: Any
) -> None:
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, str) else {"json": body}
    response = await authz.request(method, path, headers=bearer(admin_key), **kwargs)
    assert response.status_code == 422, response.text


async def test_a_duplicate_project_is_a_409(authz: httpx.AsyncClient, admin_key: str) -> None:
    project = await new_project(authz, admin_key, "dup")
    response = await authz.post("/v1/projects", json={"name": project}, headers=bearer(admin_key))
    assert response.status_code == 409


async def test_last_use_is_recorded_in_batches_not_one_write_per_request(
    authz: httpx.AsyncClient, authz_app: FastAPI, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "lastused")
    key = await issue_key(authz, admin_key, project, ["projects:read"])
    updates: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE API_KEYS"):
            updates.append(statement)

    engine = authz_app.state.ctx.engine.sync_engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        for _ in range(100):
            assert await status_of(authz, key["key"]) == 200
        await asyncio.sleep(0.5)  # a couple of flush intervals
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert 1 <= len(updates) < 20
    listed = await keys_of(authz, admin_key, project)
    assert listed[key["id"]]["last_used_at"] is not None
