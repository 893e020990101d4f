"""Version transitions that race: the stronger outcome wins, whatever the interleaving."""

from __future__ import annotations

import asyncio

import httpx

from tests.approval.support import (
    DEV_SCOPES,
    admitted,
    asset,
    catalog_yaml,
    import_yaml,
    model,
    uname,
)
from tests.helpers import bearer, member_key, new_project

PAIRS = 10


async def test_revoke_racing_deprecate_always_ends_revoked(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
) -> None:
    project = await new_project(authz, admin_key)
    dev = await member_key(authz, admin_key, project, "developer", DEV_SCOPES)
    names = [uname("race") for _ in range(PAIRS)]
    imported = await import_yaml(catalog, admin_key, catalog_yaml([model(n) for n in names]))
    ids = {v["name"]: v["version_id"] for v in imported["versions"]}
    for name in names:  # one at a time: the race under test is the next one
        await admitted(catalog, approval, admin_key, dev, project, "model", name)

    for name in names:
        deprecated, revoked = await asyncio.gather(
            catalog.post(f"/v1/versions/{ids[name]}/deprecate", headers=bearer(admin_key)),
            catalog.post(f"/v1/versions/{ids[name]}/revoke", headers=bearer(admin_key)),
        )
        # Revoke moves from either approved or deprecated: it always succeeds. Deprecate
        # succeeds only when it came first; after a revocation it is refused.
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["status"] == "revoked"
        assert deprecated.status_code in (200, 409), deprecated.text
        found = await asset(catalog, admin_key, "model", name)
        assert found is not None
        assert [v["status"] for v in found["versions"]] == ["revoked"], name
