"""Bootstrap: the first platform admin once, and the configured service keys on every start."""

from __future__ import annotations

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import update

from libs.common import apikeys
from libs.common.db import make_engine
from libs.common.errors import Conflict
from libs.common.settings import Settings
from services.authz.app import bootstrap
from services.authz.models import ApiKey
from tests.helpers import bearer, ok


async def test_configured_service_keys_are_installed_once_with_least_scopes(
    authz: httpx.AsyncClient, admin_key: str, settings: Settings
) -> None:
    _, gateway = apikeys.generate()
    _, inference = apikeys.generate()
    configured = settings.model_copy(
        update={"gateway_api_key": SecretStr(gateway), "inference_api_key": SecretStr(inference)}
    )
    assert await bootstrap(configured) is None  # the admin exists: no new admin key
    assert await bootstrap(configured) is None  # a second start changes nothing

    me = await ok(await authz.get("/v1/whoami", headers=bearer(gateway)))
    assert me["subject"] == "steward-gateway" and me["platform_admin"] is True
    assert me["scopes"] == ["snapshots:read"]
    me = await ok(await authz.get("/v1/whoami", headers=bearer(inference)))
    assert me["scopes"] == ["catalog:read"]
    keys = await ok(await authz.get("/v1/platform/keys", headers=bearer(admin_key)))
    names = [k["name"] for k in keys if k["id"] in (gateway[4:12], inference[4:12])]
    assert sorted(names) == ["gateway", "inference"]


async def test_a_different_key_under_an_installed_id_is_refused(
    settings: Settings,
    admin_key: str,  # the first start has minted the admin: this start installs only the key
) -> None:
    _, key = apikeys.generate()
    await bootstrap(settings.model_copy(update={"gateway_api_key": SecretStr(key)}))
    forged = key[:13] + ("A" if key[13] != "A" else "B") + key[14:]
    with pytest.raises(Conflict):
        await bootstrap(settings.model_copy(update={"gateway_api_key": SecretStr(forged)}))


async def test_the_gateway_key_reads_snapshots_and_changes_nothing_even_if_installed_wider(
    authz: httpx.AsyncClient, admin_key: str, settings: Settings
) -> None:
    key_id, gateway = apikeys.generate()
    configured = settings.model_copy(update={"gateway_api_key": SecretStr(gateway)})
    await bootstrap(configured)
    # As an earlier release installed it: wide enough to mint keys.
    engine = make_engine(settings.database_url_for("authz"), schema="authz")
    async with engine.begin() as conn:
        wide = ["catalog:read", "endpoints:manage", "keys:manage", "usage:read"]
        await conn.execute(update(ApiKey).where(ApiKey.id == key_id).values(scopes=wide))
    await engine.dispose()
    minted = await authz.post(
        "/v1/platform/keys", json={"name": "x", "scopes": ["catalog:read"]}, headers=bearer(gateway)
    )
    assert minted.status_code == 201  # what the narrowing is for

    await bootstrap(configured)  # the next start narrows it
    me = await ok(await authz.get("/v1/whoami", headers=bearer(gateway)))
    assert me["scopes"] == ["snapshots:read"]
    await ok(await authz.get("/v1/snapshot", headers=bearer(gateway)))
    refused = await authz.post(
        "/v1/platform/keys", json={"name": "x", "scopes": ["catalog:read"]}, headers=bearer(gateway)
    )
    assert refused.status_code == 403, refused.text


async def test_a_service_key_is_marked_and_not_revoked_or_rotated_by_a_slip(
    authz: httpx.AsyncClient, admin_key: str, settings: Settings
) -> None:
    """Beside the user keys, a service's key is marked; revoking or rotating it is refused with
    what to do instead; an incident (a leaked key) revokes it with force."""
    key_id, gateway = apikeys.generate()
    await bootstrap(settings.model_copy(update={"gateway_api_key": SecretStr(gateway)}))
    keys = await ok(await authz.get("/v1/platform/keys", headers=bearer(admin_key)))
    marked = {k["id"]: k["service"] for k in keys}
    assert marked[key_id] is True and marked[admin_key[4:12]] is False
    path = f"/v1/platform/keys/{key_id}"
    refused = await authz.delete(path, headers=bearer(admin_key))
    assert refused.status_code == 409
    assert "STEWARD_GATEWAY_API_KEY" in refused.json()["detail"]
    rotated = await authz.post(f"{path}/rotate", headers=bearer(admin_key))
    assert rotated.status_code == 409
    await ok(await authz.get("/v1/whoami", headers=bearer(gateway)))  # still working
    revoked = await ok(
        await authz.delete(path, params={"force": "true"}, headers=bearer(admin_key))
    )
    assert revoked["status"] == "revoked"
    assert (await authz.get("/v1/whoami", headers=bearer(gateway))).status_code == 401
