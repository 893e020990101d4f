"""Who may see and do what with requests, policies and the audit log (object level, per project)."""

from __future__ import annotations

import httpx
import pytest

from tests.approval.support import DEV_SCOPES, file_request, uname
from tests.helpers import bearer, issue_key, member_key, new_project, ok


@pytest.fixture
async def world(authz: httpx.AsyncClient, admin_key: str) -> dict[str, str]:
    a, b = (
        await new_project(authz, admin_key, "bola-a"),
        await new_project(authz, admin_key, "bola-b"),
    )
    return {
        "a": a,
        "b": b,
        "dev_a": await member_key(authz, admin_key, a, "developer", DEV_SCOPES),
        "viewer_a": await member_key(authz, admin_key, a, "viewer", DEV_SCOPES),
        "lead_a": await member_key(authz, admin_key, a, "project-admin", DEV_SCOPES),
        "dev_b": await member_key(authz, admin_key, b, "developer", DEV_SCOPES),
        "noscope_a": (await issue_key(authz, admin_key, a, ["catalog:read"]))["key"],
        "admin": admin_key,
    }


QUOTA = {"window": "day", "token_limit": 1000}


async def test_filing_and_listing_requests_are_per_project(
    approval: httpx.AsyncClient, world: dict[str, str]
) -> None:
    a = world["a"]
    for who, status in (
        ("dev_a", 201),
        ("lead_a", 201),
        ("admin", 201),
        ("viewer_a", 403),
        ("dev_b", 403),
        ("noscope_a", 403),
    ):
        response = await approval.post(
            f"/v1/projects/{a}/requests",
            json={"kind": "quota", "payload": QUOTA},
            headers=bearer(world[who]),
        )
        assert response.status_code == status, (who, response.text)
    for who, status in (
        ("dev_a", 200),
        ("viewer_a", 200),
        ("lead_a", 200),
        ("admin", 200),
        ("dev_b", 403),
        ("noscope_a", 403),
    ):
        response = await approval.get(f"/v1/projects/{a}/requests", headers=bearer(world[who]))
        assert response.status_code == status, (who, response.text)
    anonymous = await approval.get(f"/v1/projects/{a}/requests")
    assert anonymous.status_code == 401


async def test_another_projects_request_reads_as_absent_and_cannot_be_touched(
    approval: httpx.AsyncClient, world: dict[str, str]
) -> None:
    request = await file_request(approval, world["dev_a"], world["a"], "quota", QUOTA)
    rid = request["id"]
    for who in ("dev_a", "viewer_a", "lead_a", "admin"):
        assert (await approval.get(f"/v1/requests/{rid}", headers=bearer(world[who]))).is_success
    outsider = bearer(world["dev_b"])
    assert (await approval.get(f"/v1/requests/{rid}", headers=outsider)).status_code == 404
    withdraw = await approval.post(f"/v1/requests/{rid}/withdraw", headers=outsider)
    assert withdraw.status_code == 404
    comment = await approval.post(
        f"/v1/requests/{rid}/comments", json={"body": "hi"}, headers=outsider
    )
    assert comment.status_code == 404
    listed = await ok(await approval.get("/v1/requests", headers=outsider))
    assert rid not in [r["id"] for r in listed["items"]]
    filtered = await ok(
        await approval.get("/v1/requests", params={"project": world["a"]}, headers=outsider)
    )
    assert filtered["items"] == []
    stats = await ok(await approval.get("/v1/requests/stats", headers=outsider))
    assert world["a"] not in stats["by_project"]

    # Viewers read but do not write.
    viewer = bearer(world["viewer_a"])
    assert (await approval.post(f"/v1/requests/{rid}/withdraw", headers=viewer)).status_code == 403
    assert (
        await approval.post(f"/v1/requests/{rid}/comments", json={"body": "x"}, headers=viewer)
    ).status_code == 403

    # Only a platform-admin with approvals:review decides.
    for who in ("dev_a", "viewer_a", "lead_a", "dev_b", "noscope_a"):
        for verb, body in (("approve", {}), ("reject", {"comment": "no"})):
            response = await approval.post(
                f"/v1/requests/{rid}/{verb}", json=body, headers=bearer(world[who])
            )
            assert response.status_code == 403, (who, verb)
    missing = "00000000-0000-7000-8000-000000000000"
    response = await approval.post(
        f"/v1/requests/{missing}/approve", headers=bearer(world["admin"])
    )
    assert response.status_code == 404


async def test_policies_and_the_audit_log_are_for_platform_admins(
    approval: httpx.AsyncClient, world: dict[str, str]
) -> None:
    rule = {"kind": "quota", "max_token_limit": 10, "projects": [world["a"]]}
    name = uname("bola")
    for who in ("dev_a", "viewer_a", "lead_a", "dev_b"):
        key = bearer(world[who])
        assert (
            await approval.put(f"/v1/policies/{name}", json=rule, headers=key)
        ).status_code == 403
        assert (await approval.delete(f"/v1/policies/{name}", headers=key)).status_code == 403
        assert (await approval.get("/v1/policies", headers=key)).status_code == 200
        assert (await approval.get("/v1/audit", headers=key)).status_code == 403
        assert (await approval.get("/v1/audit/verify", headers=key)).status_code == 403
    admin = bearer(world["admin"])
    assert (await approval.put(f"/v1/policies/{name}", json=rule, headers=admin)).status_code == 201
    assert (await approval.put(f"/v1/policies/{name}", json=rule, headers=admin)).status_code == 200
    assert (await approval.get("/v1/audit", headers=admin)).status_code == 200
    assert (await approval.delete(f"/v1/policies/{name}", headers=admin)).status_code == 204
