"""API key lifecycle: issue, use, rotate with grace, expire, revoke — and the limits on issuing.

Expiry and grace are decided on the service's clock: those tests run an authz on a clock they
move (``clocked``), never waiting for time to pass.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event

from libs.common.settings import Settings
from tests.authz.support import ManualClock, client_of, clocked_authz
from tests.common.support import until
from tests.helpers import add_member, bearer, issue_key, member_key, new_project, ok

MICROSECOND = timedelta(microseconds=1)


@pytest.fixture(scope="module")
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(scope="module")
async def clocked_app(settings: Settings, clock: ManualClock) -> AsyncIterator[FastAPI]:
    """A second authz on ``clock``. Its last-use flush loop waits a day, so key use is written
    only when a test flushes it (as the loop does every interval)."""
    async for app in clocked_authz(settings, clock, key_last_used_flush_seconds=24 * 3600.0):
        yield app


@pytest.fixture(scope="module")
async def clocked(clocked_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async for client in client_of(clocked_app):
        yield client


async def status_of(client: httpx.AsyncClient, key: str) -> int:
    return (await client.get("/v1/whoami", headers=bearer(key))).status_code


async def keys_of(client: httpx.AsyncClient, admin: str, project: str) -> dict[str, Any]:
    listed = await ok(await client.get(f"/v1/projects/{project}/keys", headers=bearer(admin)))
    return {k["id"]: k for k in listed}


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


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
    clocked: httpx.AsyncClient, clock: ManualClock, admin_key: str
) -> None:
    project = await new_project(clocked, admin_key, "rotate")
    old = await issue_key(clocked, admin_key, project, ["projects:read"])
    rotated = await ok(
        await clocked.post(
            f"/v1/projects/{project}/keys/{old['id']}/rotate",
            json={"grace_seconds": 3600},
            headers=bearer(admin_key),
        ),
        201,
    )
    grace_end = clock() + timedelta(hours=1)
    assert rotated["id"] != old["id"]
    assert rotated["scopes"] == old["scopes"] and rotated["role"] == old["role"]
    assert await status_of(clocked, old["key"]) == 200
    assert await status_of(clocked, rotated["key"]) == 200
    listed = await keys_of(clocked, admin_key, project)
    assert listed[old["id"]]["rotated_to"] == rotated["id"]
    assert at(listed[old["id"]]["expires_at"]) == grace_end

    clock.advance(grace_end - MICROSECOND - clock())  # the grace period's last instant
    assert await status_of(clocked, old["key"]) == 200
    clock.advance(MICROSECOND)
    response = await clocked.get("/v1/whoami", headers=bearer(old["key"]))
    assert response.status_code == 401 and response.json()["detail"] == "API key expired"
    assert await status_of(clocked, rotated["key"]) == 200

    again = await clocked.post(
        f"/v1/projects/{project}/keys/{old['id']}/rotate", headers=bearer(admin_key)
    )
    assert again.status_code == 409
    assert "is expired" in again.json()["detail"]


async def snapshot_ids(client: httpx.AsyncClient, admin: str) -> set[str]:
    snapshot = await ok(await client.get("/v1/snapshot", headers=bearer(admin)))
    return {k["key_id"] for k in snapshot["keys"]}


async def test_a_key_stops_working_when_it_expires(
    clocked: httpx.AsyncClient, clock: ManualClock, admin_key: str
) -> None:
    project = await new_project(clocked, admin_key, "expiry")
    expires = clock() + timedelta(hours=1)
    key = await issue_key(
        clocked, admin_key, project, ["projects:read"], expires_at=expires.isoformat()
    )
    assert at(key["expires_at"]) == expires

    clock.advance(expires - MICROSECOND - clock())  # its last instant
    assert await status_of(clocked, key["key"]) == 200
    assert (await keys_of(clocked, admin_key, project))[key["id"]]["status"] == "active"
    assert key["id"] in await snapshot_ids(clocked, admin_key)

    clock.advance(MICROSECOND)
    response = await clocked.get("/v1/whoami", headers=bearer(key["key"]))
    assert response.status_code == 401 and response.json()["detail"] == "API key expired"
    assert (await keys_of(clocked, admin_key, project))[key["id"]]["status"] == "expired"
    assert key["id"] not in await snapshot_ids(clocked, admin_key)


async def test_a_new_key_must_expire_after_now_on_the_service_clock(
    clocked: httpx.AsyncClient, clock: ManualClock, admin_key: str
) -> None:
    """The service's clock says what "now" is, not the wall clock: moved a day ahead, it
    refuses an expiry that the wall clock would still call the future."""
    project = await new_project(clocked, admin_key, "ahead")
    clock.advance(timedelta(days=1))
    for expires in (clock(), clock() - timedelta(hours=1)):
        for url in (f"/v1/projects/{project}/keys", "/v1/platform/keys"):
            response = await clocked.post(
                url,
                json={"name": "x", "scopes": ["projects:read"], "expires_at": expires.isoformat()},
                headers=bearer(admin_key),
            )
            assert response.status_code == 422, response.text
            problem = response.json()
            assert response.headers["content-type"] == "application/problem+json"
            assert problem["detail"] == "expires_at: Value error, is in the past"
            assert problem["errors"] == [
                {
                    "field": "expires_at",
                    "message": "Value error, is in the past",
                    "type": "value_error",
                }
            ]
    assert await keys_of(clocked, admin_key, project) == {}
    later = (clock() + MICROSECOND).isoformat()
    await issue_key(clocked, admin_key, project, ["projects:read"], expires_at=later)


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
    clocked: httpx.AsyncClient, clocked_app: FastAPI, clock: ManualClock, admin_key: str
) -> None:
    project = await new_project(clocked, admin_key, "lastused")
    key = await issue_key(clocked, admin_key, project, ["projects:read"])
    last_used = clocked_app.state.principal_resolver.last_used
    sessionmaker = clocked_app.state.ctx.sessionmaker
    await last_used.flush(sessionmaker)  # the admin's calls so far
    updates: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE API_KEYS"):
            updates.append(statement)

    engine = clocked_app.state.ctx.engine.sync_engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        for _ in range(100):
            assert await status_of(clocked, key["key"]) == 200
        used_at = clock()
        await last_used.flush(sessionmaker)  # what the flush loop does every interval
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(updates) == 1  # one write for a hundred uses
    listed = await keys_of(clocked, admin_key, project)
    assert at(listed[key["id"]]["last_used_at"]) == used_at


async def test_the_flush_loop_writes_last_use_on_its_own(
    authz: httpx.AsyncClient, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "flushloop")
    key = await issue_key(authz, admin_key, project, ["projects:read"])
    assert (await keys_of(authz, admin_key, project))[key["id"]]["last_used_at"] is None
    assert await status_of(authz, key["key"]) == 200

    async def recorded() -> bool:
        listed = await keys_of(authz, admin_key, project)
        return listed[key["id"]]["last_used_at"] is not None

    await until(recorded, what="the key's last use written by the flush loop")
