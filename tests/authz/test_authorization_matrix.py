"""Every authz endpoint, every role, own and foreign project (OWASP API1: no cross-project access).

Each case prepares its own target with the admin key, calls the endpoint as the role under test,
and then checks the outcome: 2xx when the role is strong enough in its own project, otherwise
403 and nothing changed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.helpers import add_member, bearer, issue_key, member_key, new_project, ok, unique

ROLES = ("viewer", "developer", "project-admin", "platform-admin")
RANK = {role: rank for rank, role in enumerate(ROLES)}
ALL_SCOPES = [
    "projects:read",
    "projects:manage",
    "keys:manage",
    "catalog:read",
    "inference:invoke",
]


@dataclass
class World:
    client: httpx.AsyncClient
    admin: str
    own: str
    foreign: str
    keys: dict[str, str]


@pytest.fixture(scope="module")
async def world(authz: httpx.AsyncClient, admin_key: str) -> World:
    own = await new_project(authz, admin_key, "own")
    foreign = await new_project(authz, admin_key, "foreign")
    keys = {"platform-admin": admin_key}
    for role in ROLES[:3]:
        keys[role] = await member_key(authz, admin_key, own, role, ALL_SCOPES)
    return World(authz, admin_key, own, foreign, keys)


Prepared = dict[str, Any]
Prepare = Callable[[World, str], Awaitable[Prepared]]
Check = Callable[[World, str, Prepared], Awaitable[bool]]  # True when the target changed


async def nothing(world: World, project: str) -> Prepared:
    return {}


async def a_member(world: World, project: str) -> Prepared:
    subject = unique("target")
    await add_member(world.client, world.admin, project, subject, "viewer")
    return {"subject": subject}


async def a_key_of_another_member(world: World, project: str) -> Prepared:
    owner = unique("owner")
    await add_member(world.client, world.admin, project, owner, "developer")
    created = await issue_key(world.client, world.admin, project, ["inference:invoke"], owner=owner)
    return {"key_id": created["id"], "subject": owner}


async def an_entitlement(world: World, project: str) -> Prepared:
    name = unique("model")
    await ok(
        await world.client.put(
            f"/v1/projects/{project}/entitlements/model/{name}", headers=bearer(world.admin)
        ),
        201,
    )
    return {"asset": name}


async def members_of(world: World, project: str) -> dict[str, str]:
    listed = await ok(
        await world.client.get(f"/v1/projects/{project}/members", headers=bearer(world.admin))
    )
    return {m["subject"]: m["role"] for m in listed}


async def member_changed(world: World, project: str, prepared: Prepared) -> bool:
    members = await members_of(world, project)
    return members.get(prepared["subject"]) != "viewer"  # a_member() made them a viewer


async def new_member_added(world: World, project: str, prepared: Prepared) -> bool:
    return prepared["new_subject"] in await members_of(world, project)


async def key_changed(world: World, project: str, prepared: Prepared) -> bool:
    keys = await ok(
        await world.client.get(f"/v1/projects/{project}/keys", headers=bearer(world.admin))
    )
    key = next(k for k in keys if k["id"] == prepared["key_id"])
    return bool(key["status"] != "active" or key["rotated_to"] is not None)


async def entitlements_of(world: World, project: str) -> set[str]:
    listed = await ok(
        await world.client.get(f"/v1/projects/{project}/entitlements", headers=bearer(world.admin))
    )
    return {e["asset_name"] for e in listed}


async def entitlement_gone(world: World, project: str, prepared: Prepared) -> bool:
    return prepared["asset"] not in await entitlements_of(world, project)


async def entitlement_added(world: World, project: str, prepared: Prepared) -> bool:
    return prepared["new_asset"] in await entitlements_of(world, project)


async def new_subject(world: World, project: str) -> Prepared:
    return {"new_subject": unique("new")}


async def new_asset(world: World, project: str) -> Prepared:
    return {"new_asset": unique("model")}


async def key_count(world: World, project: str) -> int:
    keys = await ok(
        await world.client.get(f"/v1/projects/{project}/keys", headers=bearer(world.admin))
    )
    return len(keys)


async def count_keys(world: World, project: str) -> Prepared:
    return {"count": await key_count(world, project)}


async def key_added(world: World, project: str, prepared: Prepared) -> bool:
    return bool(await key_count(world, project) != prepared["count"])


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    min_role: str
    prepare: Prepare = nothing
    body: dict[str, Any] | None = None
    changed: Check | None = None

    def url(self, project: str, prepared: Prepared) -> str:
        return self.path.format(p=project, **prepared)

    def json(self, prepared: Prepared) -> dict[str, Any] | None:
        """The body, its string values filled in from what ``prepare`` made."""
        if self.body is None:
            return None
        return {k: v.format(**prepared) if isinstance(v, str) else v for k, v in self.body.items()}


async def display_name(world: World, project: str) -> Prepared:
    return {"display_name": unique("Team")}


async def renamed(world: World, project: str, prepared: Prepared) -> bool:
    found = await ok(await world.client.get(f"/v1/projects/{project}", headers=bearer(world.admin)))
    return bool(found["display_name"] == prepared["display_name"])


PROJECT_CASES = [
    Case("GET", "/v1/projects/{p}", "viewer"),
    Case(
        "PATCH",
        "/v1/projects/{p}",
        "project-admin",
        display_name,
        {"display_name": "{display_name}"},
        renamed,
    ),
    Case("GET", "/v1/projects/{p}/members", "viewer"),
    Case(
        "PUT",
        "/v1/projects/{p}/members/{new_subject}",
        "project-admin",
        new_subject,
        {"role": "viewer"},
        new_member_added,
    ),
    Case(
        "PUT",
        "/v1/projects/{p}/members/{subject}",
        "project-admin",
        a_member,
        {"role": "developer"},
        member_changed,
    ),
    Case(
        "DELETE",
        "/v1/projects/{p}/members/{subject}",
        "project-admin",
        a_member,
        None,
        member_changed,
    ),
    Case("GET", "/v1/projects/{p}/keys", "developer"),
    Case(
        "POST",
        "/v1/projects/{p}/keys",
        "developer",
        count_keys,
        {"name": "k", "scopes": ["inference:invoke"]},
        key_added,
    ),
    Case(
        "POST",
        "/v1/projects/{p}/keys/{key_id}/rotate",
        "project-admin",
        a_key_of_another_member,
        None,
        key_changed,
    ),
    Case(
        "DELETE",
        "/v1/projects/{p}/keys/{key_id}",
        "project-admin",
        a_key_of_another_member,
        None,
        key_changed,
    ),
    Case("GET", "/v1/projects/{p}/entitlements", "viewer"),
    Case(
        "PUT",
        "/v1/projects/{p}/entitlements/model/{new_asset}",
        "platform-admin",
        new_asset,
        None,
        entitlement_added,
    ),
    Case(
        "DELETE",
        "/v1/projects/{p}/entitlements/model/{asset}",
        "platform-admin",
        an_entitlement,
        None,
        entitlement_gone,
    ),
]


@pytest.mark.parametrize("where", ["own", "foreign"])
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("case", PROJECT_CASES, ids=lambda c: f"{c.method} {c.path}")
async def test_project_endpoint_allows_exactly_the_roles_it_should(
    world: World, case: Case, role: str, where: str
) -> None:
    project = world.own if where == "own" else world.foreign
    prepared = await case.prepare(world, project)
    response = await world.client.request(
        case.method,
        case.url(project, prepared),
        json=case.json(prepared),
        headers=bearer(world.keys[role]),
    )
    allowed = role == "platform-admin" or (where == "own" and RANK[role] >= RANK[case.min_role])
    if allowed:
        assert response.status_code < 300, response.text
    else:
        assert response.status_code == 403, response.text
        assert response.headers["content-type"] == "application/problem+json"
    if case.changed is not None:
        assert await case.changed(world, project, prepared) is allowed


GLOBAL_CASES = [
    Case("POST", "/v1/projects", "platform-admin", body={"name": "placeholder"}),
    Case("GET", "/v1/projects", "viewer"),
    Case("GET", "/v1/snapshot", "platform-admin"),
    Case("GET", "/v1/platform/keys", "platform-admin"),
    Case(
        "POST",
        "/v1/platform/keys",
        "platform-admin",
        body={"name": "p", "scopes": ["catalog:read"]},
    ),
    Case("GET", "/v1/whoami", "viewer"),
]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("case", GLOBAL_CASES, ids=lambda c: f"{c.method} {c.path}")
async def test_global_endpoint_allows_exactly_the_roles_it_should(
    world: World, case: Case, role: str
) -> None:
    body = case.body
    if body is not None and "name" in body and case.path == "/v1/projects":
        body = {"name": unique("made")}
    response = await world.client.request(
        case.method, case.path, json=body, headers=bearer(world.keys[role])
    )
    if RANK[role] >= RANK[case.min_role]:
        assert response.status_code < 300, response.text
    else:
        assert response.status_code == 403, response.text


async def test_a_project_lists_only_the_projects_of_its_member(world: World) -> None:
    listed = await ok(await world.client.get("/v1/projects", headers=bearer(world.keys["viewer"])))
    assert [p["name"] for p in listed] == [world.own]


async def test_a_key_of_another_project_reads_as_absent(world: World) -> None:
    theirs = await a_key_of_another_member(world, world.foreign)
    url = f"/v1/projects/{world.own}/keys/{theirs['key_id']}"
    response = await world.client.delete(url, headers=bearer(world.keys["project-admin"]))
    assert response.status_code == 404
    assert not await key_changed(world, world.foreign, theirs)


async def test_a_developer_manages_their_own_key_but_not_a_colleagues(world: World) -> None:
    project = await new_project(world.client, world.admin, "dev")
    mine = await member_key(world.client, world.admin, project, "developer", ["keys:manage"])
    theirs = await a_key_of_another_member(world, project)
    own_keys = await ok(
        await world.client.get(f"/v1/projects/{project}/keys", headers=bearer(mine))
    )
    assert len(own_keys) == 1 and own_keys[0]["id"] != theirs["key_id"]

    refused = await world.client.delete(
        f"/v1/projects/{project}/keys/{theirs['key_id']}", headers=bearer(mine)
    )
    assert refused.status_code == 403
    revoked = await world.client.delete(
        f"/v1/projects/{project}/keys/{own_keys[0]['id']}", headers=bearer(mine)
    )
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
