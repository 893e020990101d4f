"""The replica revision: what a gateway cut off from the events polls. Every committed change to
keys, entitlements or members advances it exactly once; nothing else does; an unchanged replica
is a 304."""

from __future__ import annotations

import asyncio

import httpx

from tests.helpers import bearer, issue_key, new_project, ok, unique


async def _revision(authz: httpx.AsyncClient, admin_key: str) -> tuple[int, str]:
    response = await authz.get("/v1/snapshot", headers=bearer(admin_key))
    snapshot = await ok(response)
    assert response.headers["ETag"] == f'"{snapshot["revision"]}"'
    return snapshot["revision"], response.headers["ETag"]


async def _unchanged(authz: httpx.AsyncClient, admin_key: str, etag: str) -> bool:
    response = await authz.get("/v1/snapshot", headers={**bearer(admin_key), "If-None-Match": etag})
    assert response.status_code in (200, 304)
    assert response.headers["ETag"] != etag or response.status_code == 304
    return response.status_code == 304 and not response.content


async def test_an_unchanged_replica_is_a_304_and_each_change_moves_the_revision(
    authz: httpx.AsyncClient, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "revision")
    revision, etag = await _revision(authz, admin_key)
    assert await _unchanged(authz, admin_key, etag)

    # Reads and key use change nothing the replica holds.
    key = await issue_key(authz, admin_key, project, ["projects:read"])
    revision, etag = await _revision(authz, admin_key)
    await ok(await authz.get("/v1/whoami", headers=bearer(key["key"])))
    await ok(await authz.get(f"/v1/projects/{project}/keys", headers=bearer(admin_key)))
    assert await _unchanged(authz, admin_key, etag)

    subject = unique("member")
    changes: list[tuple[str, str, dict[str, str] | None]] = [
        ("PUT", f"/v1/projects/{project}/members/{subject}", {"role": "developer"}),
        ("PUT", f"/v1/projects/{project}/entitlements/model/acme/chat", {"reason": "test"}),
        ("DELETE", f"/v1/projects/{project}/keys/{key['id']}", None),
        ("DELETE", f"/v1/projects/{project}/members/{subject}", None),
    ]
    for method, path, body in changes:
        answer = await authz.request(method, path, json=body, headers=bearer(admin_key))
        assert answer.status_code < 300, answer.text
        assert not await _unchanged(authz, admin_key, etag)
        after, etag = await _revision(authz, admin_key)
        assert after == revision + 1, (method, path)
        revision = after

    # A list of tags, as HTTP allows, matches too.
    assert await _unchanged(authz, admin_key, f'"0", {etag}')


async def test_concurrent_changes_each_advance_the_revision_once(
    authz: httpx.AsyncClient, admin_key: str
) -> None:
    """Ten keys issued at once in one project: no lost update of the counter, no deadlock with
    the key rows, and a revision read by any reader covers what it says."""
    project = await new_project(authz, admin_key, "racing")
    before, _ = await _revision(authz, admin_key)
    issued = await asyncio.gather(
        *(issue_key(authz, admin_key, project, ["projects:read"]) for _ in range(10))
    )
    after = await ok(await authz.get("/v1/snapshot", headers=bearer(admin_key)))
    assert after["revision"] == before + 10
    assert {k["id"] for k in issued} <= {k["key_id"] for k in after["keys"]}
