"""Nobody locks the platform out: the last admin credential stays, whoever asks, however two
admins race; ``steward admin recover`` is the way back with the database; key changes that race
(revoke vs rotate) run one after the other. A module of its own: it revokes admin keys."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from libs.common.settings import Settings
from tests.helpers import bearer, issue_key, member_key, new_project, ok

ROUNDS = 10


async def _platform_key(authz: httpx.AsyncClient, creator: str, scopes: list[str]) -> str:
    body = {"name": "admin-key", "scopes": scopes}
    created = await ok(
        await authz.post("/v1/platform/keys", json=body, headers=bearer(creator)), 201
    )
    return str(created["key"])


def _id(key: str) -> str:
    return key.split("_")[1]


async def _admin_keys(authz: httpx.AsyncClient, key: str) -> list[dict[str, Any]]:
    """The active platform keys of people that can manage keys."""
    keys = await ok(await authz.get("/v1/platform/keys", headers=bearer(key)))
    return [
        k
        for k in keys
        if k["status"] == "active"
        and "keys:manage" in k["scopes"]
        and not k["owner"].startswith("steward-")
    ]


async def test_the_last_admin_key_cannot_be_revoked_even_by_itself_nor_by_two_racing_admins(
    authz: httpx.AsyncClient, admin_key: str
) -> None:
    for left in await _admin_keys(authz, admin_key):  # whatever other tests left
        if left["id"] != _id(admin_key):
            await ok(
                await authz.delete(f"/v1/platform/keys/{left['id']}", headers=bearer(admin_key))
            )
    # Alone (the service keys do not count): refused, and still working.
    alone = await authz.delete(f"/v1/platform/keys/{_id(admin_key)}", headers=bearer(admin_key))
    assert alone.status_code == 409, alone.text
    assert "last active platform-admin key" in alone.json()["detail"]
    await ok(await authz.get("/v1/whoami", headers=bearer(admin_key)))

    # A key without keys:manage is no way back in: it does not count either.
    await _platform_key(authz, admin_key, ["catalog:read", "projects:read"])
    again = await authz.delete(f"/v1/platform/keys/{_id(admin_key)}", headers=bearer(admin_key))
    assert again.status_code == 409, again.text

    # With a second admin key, the first may go.
    holder = await _platform_key(authz, admin_key, ["keys:manage", "projects:read"])
    await ok(await authz.delete(f"/v1/platform/keys/{_id(admin_key)}", headers=bearer(holder)))
    assert [k["id"] for k in await _admin_keys(authz, holder)] == [_id(holder)]

    # Two admins revoke each other at once, many times: one wins, one key always stays.
    for _ in range(ROUNDS):
        other = await _platform_key(authz, holder, ["keys:manage", "projects:read"])
        first, second = await asyncio.gather(
            authz.delete(f"/v1/platform/keys/{_id(other)}", headers=bearer(holder)),
            authz.delete(f"/v1/platform/keys/{_id(holder)}", headers=bearer(other)),
        )
        codes = sorted([first.status_code, second.status_code])
        # The loser is refused by the rule (409), or, when its own key was already revoked
        # by the time it was checked, as a revoked key (401).
        assert codes in ([200, 401], [200, 409]), (first.text, second.text)
        holder = holder if first.status_code == 200 else other
        survivors = await _admin_keys(authz, holder)
        assert [k["id"] for k in survivors] == [_id(holder)]


async def test_admin_recover_mints_a_working_platform_key_from_the_database(
    authz: httpx.AsyncClient, admin_key: str, settings: Settings
) -> None:
    from services.authz.app import recover

    key = await recover(settings, "pat", "steward-admin-recover:test")
    me = await ok(await authz.get("/v1/whoami", headers=bearer(key)))
    assert me["subject"] == "pat"
    assert me["platform_admin"] is True
    assert "keys:manage" in me["scopes"]
    # A working admin credential: it manages keys through the API like any other.
    project = await new_project(authz, key)
    await issue_key(authz, key, project, ["inference:invoke"])


async def test_revoke_racing_rotate_never_rotates_a_revoked_key(
    authz: httpx.AsyncClient, settings: Settings
) -> None:
    from services.authz.app import recover

    admin = await recover(settings, "admin", "steward-admin-recover:test")
    project = await new_project(authz, admin)
    owner = await member_key(authz, admin, project, "developer", ["keys:manage"])
    for _ in range(ROUNDS):
        key = await issue_key(authz, owner, project, ["keys:manage"])
        url = f"/v1/projects/{project}/keys/{key['id']}"
        rotated, revoked = await asyncio.gather(
            authz.post(url + "/rotate", headers=bearer(owner)),
            authz.delete(url, headers=bearer(owner)),
        )
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["status"] == "revoked"
        if rotated.status_code == 201:
            # The rotation came first, and the revocation saw it.
            assert revoked.json()["rotated_to"] == rotated.json()["id"]
        else:
            assert rotated.status_code == 409, rotated.text
            assert "revoked" in rotated.json()["detail"]
