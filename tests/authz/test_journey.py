"""The journey a new platform engineer takes with curl, on the authz API."""

from __future__ import annotations

import httpx

from tests.helpers import add_member, bearer, issue_key, new_project, ok


async def test_admin_sets_up_a_project_and_a_limited_developer_key(
    authz: httpx.AsyncClient, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "fraud")
    other = await new_project(authz, admin_key, "other")
    await add_member(authz, admin_key, project, "alice", "developer")

    created = await issue_key(authz, admin_key, project, ["inference:invoke"], owner="alice")
    assert created["role"] == "developer"
    assert created["scopes"] == ["inference:invoke"]
    assert created["key"].startswith("stw_")
    dev = created["key"]

    me = await ok(await authz.get("/v1/whoami", headers=bearer(dev)))
    assert me["subject"] == "alice"
    assert me["project_roles"] == {project: "developer"}

    # A project-admin action in its own project: refused, as problem+json.
    refused = await authz.put(
        f"/v1/projects/{project}/members/bob", json={"role": "viewer"}, headers=bearer(dev)
    )
    assert refused.status_code == 403
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["status"] == 403

    # Another project: refused too.
    foreign = await authz.get(f"/v1/projects/{other}/members", headers=bearer(dev))
    assert foreign.status_code == 403
    assert foreign.headers["content-type"] == "application/problem+json"

    # The decision API agrees, and says why.
    decision = await ok(
        await authz.post(
            "/v1/authorize",
            json={"action": "inference.invoke", "project": project},
            headers=bearer(dev),
        )
    )
    assert decision["allowed"] is True
    decision = await ok(
        await authz.post(
            "/v1/authorize",
            json={"action": "inference.invoke", "project": other},
            headers=bearer(dev),
        )
    )
    assert decision == {**decision, "allowed": False, "reason": f"no role in project '{other}'"}
