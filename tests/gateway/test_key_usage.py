"""A key's "last used": gateways verify keys locally, so each reports the keys it let through
(``gateway.keys.used``) and authz moves their ``last_used_at`` forward."""

from __future__ import annotations

import httpx

from tests.gateway.conftest import RunningGateway, tenant
from tests.gateway.support import eventually
from tests.gateway.test_openai import client
from tests.helpers import bearer, ok


async def test_a_key_used_at_the_gateway_shows_when_in_authz(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    keys = f"/v1/projects/{t.project}/keys"
    [before] = await ok(await authz.get(keys, headers=bearer(admin_key)))
    assert before["last_used_at"] is None
    await client(gw, t.key).chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "remember me"}]
    )
    assert await gw.gateway.report_key_usage() >= 1
    assert await gw.gateway.report_key_usage() == 0  # reported once

    async def last_used() -> bool:
        [key] = await ok(await authz.get(keys, headers=bearer(admin_key)))
        return key["last_used_at"] is not None

    await eventually(last_used)
