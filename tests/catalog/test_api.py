"""Catalog search, lifecycle rules and who may call what."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.approval.support import (
    DEV_SCOPES,
    admitted,
    asset,
    catalog_yaml,
    import_yaml,
    mcp_server,
    model,
    uname,
)
from tests.helpers import bearer, issue_key, member_key, new_project, ok


async def test_search_filters_by_kind_tag_status_provider_and_text_with_cursor_pages(
    catalog: httpx.AsyncClient, admin_key: str
) -> None:
    prefix = uname("search")
    text = catalog_yaml(
        [
            model(f"{prefix}/a", tags=["general"], provider="Acme"),
            model(f"{prefix}/b", tags=["general", "vision"], provider="Other"),
            model(f"{prefix}/c", provider="Acme"),
        ],
        [mcp_server(f"{prefix}-mcp", tags=["general"])],
    )
    await import_yaml(catalog, admin_key, text)

    async def names(**params: Any) -> list[str]:
        page = await ok(
            await catalog.get(
                "/v1/catalog", params={"q": prefix, **params}, headers=bearer(admin_key)
            )
        )
        return [item["name"] for item in page["items"]]

    assert await names() == [f"{prefix}-mcp", f"{prefix}/a", f"{prefix}/b", f"{prefix}/c"]
    assert await names(kind="model") == [f"{prefix}/a", f"{prefix}/b", f"{prefix}/c"]
    assert await names(kind="mcp_server") == [f"{prefix}-mcp"]
    assert await names(tag="general", kind="model") == [f"{prefix}/a", f"{prefix}/b"]
    assert await names(tag=["general", "vision"]) == [f"{prefix}/b"]
    assert await names(provider="acme") == [f"{prefix}/a", f"{prefix}/c"]
    assert await names(status="draft", kind="model") == [
        f"{prefix}/a",
        f"{prefix}/b",
        f"{prefix}/c",
    ]
    assert await names(status="approved") == []
    # LIKE wildcards in the text are literal.
    assert await names(q="%") == []

    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"q": prefix, "limit": 1}
        if cursor:
            params["cursor"] = cursor
        page = await ok(await catalog.get("/v1/catalog", params=params, headers=bearer(admin_key)))
        seen += [item["name"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == await names()

    bad = await catalog.get("/v1/catalog", params={"cursor": "%%%"}, headers=bearer(admin_key))
    assert bad.status_code == 400
    bad = await catalog.get("/v1/catalog", params={"status": "live"}, headers=bearer(admin_key))
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "query.status.0"


async def test_lifecycle_refuses_moves_out_of_order(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
) -> None:
    name = uname("life")
    imported = await import_yaml(catalog, admin_key, catalog_yaml([model(name)]))
    version_id = imported["versions"][0]["version_id"]

    # A draft cannot be deprecated (only approved versions can).
    refused = await catalog.post(f"/v1/versions/{version_id}/deprecate", headers=bearer(admin_key))
    assert refused.status_code == 409
    assert "deprecate needs one of ['approved']" in refused.json()["detail"]

    project = await new_project(authz, admin_key)
    dev = await member_key(authz, admin_key, project, "developer", DEV_SCOPES)
    await admitted(catalog, approval, admin_key, dev, project, "model", name)

    deprecated = await ok(
        await catalog.post(
            f"/v1/versions/{version_id}/deprecate",
            json={"reason": "superseded by 2.0"},
            headers=bearer(admin_key),
        )
    )
    assert deprecated["status"] == "deprecated"
    assert deprecated["status_reason"] == "superseded by 2.0"
    again = await catalog.post(f"/v1/versions/{version_id}/deprecate", headers=bearer(admin_key))
    assert again.status_code == 409
    revoked = await ok(
        await catalog.post(f"/v1/versions/{version_id}/revoke", headers=bearer(admin_key))
    )
    assert revoked["status"] == "revoked"
    again = await catalog.post(f"/v1/versions/{version_id}/revoke", headers=bearer(admin_key))
    assert again.status_code == 409


async def test_no_api_writes_approved_directly(catalog: httpx.AsyncClient, admin_key: str) -> None:
    name = uname("direct")
    imported = await import_yaml(catalog, admin_key, catalog_yaml([model(name)]))
    version_id = imported["versions"][0]["version_id"]
    for path in (f"/v1/versions/{version_id}/approve", f"/v1/versions/{version_id}/submit"):
        response = await catalog.post(path, headers=bearer(admin_key))
        assert response.status_code in (404, 405)
    # An import cannot smuggle a status in either: unknown fields are ignored.
    await import_yaml(catalog, admin_key, catalog_yaml([model(uname("x"), status="approved")]))
    found = await asset(catalog, admin_key, "model", name)
    assert found is not None and found["versions"][0]["status"] == "draft"


async def test_unknown_versions_and_assets_are_404_problems(
    catalog: httpx.AsyncClient, admin_key: str
) -> None:
    missing = "00000000-0000-7000-8000-000000000000"
    for response in (
        await catalog.get(f"/v1/versions/{missing}", headers=bearer(admin_key)),
        await catalog.post(f"/v1/versions/{missing}/revoke", headers=bearer(admin_key)),
        await catalog.get("/v1/assets/model/no/such-model", headers=bearer(admin_key)),
    ):
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
    bad_kind = await catalog.get("/v1/assets/dataset/x", headers=bearer(admin_key))
    assert bad_kind.status_code == 422


@pytest.fixture
async def keys(authz: httpx.AsyncClient, admin_key: str) -> dict[str, str]:
    """One key per kind of caller the catalog must tell apart."""
    project = await new_project(authz, admin_key, "cat")
    platform_reader = await ok(
        await authz.post(
            "/v1/platform/keys",
            json={"name": uname("reader"), "scopes": ["catalog:read"]},
            headers=bearer(admin_key),
        ),
        201,
    )
    replica = await ok(
        await authz.post(
            "/v1/platform/keys",
            json={"name": uname("replica"), "scopes": ["snapshots:read"]},
            headers=bearer(admin_key),
        ),
        201,
    )
    return {
        "viewer": await member_key(authz, admin_key, project, "viewer", ["catalog:read"]),
        "developer": await member_key(authz, admin_key, project, "developer", DEV_SCOPES),
        "project-admin": await member_key(
            authz, admin_key, project, "project-admin", ["catalog:read", "catalog:write"]
        ),
        "no-scope": (await issue_key(authz, admin_key, project, ["requests:write"]))["key"],
        "platform-reader": platform_reader["key"],
        "replica": replica["key"],  # a gateway's key: the snapshot and nothing else
        "platform-admin": admin_key,
    }


async def test_who_may_call_each_catalog_endpoint(
    catalog: httpx.AsyncClient, admin_key: str, keys: dict[str, str]
) -> None:
    imported = await import_yaml(catalog, admin_key, catalog_yaml([model(uname("bola"))]))
    version_id = imported["versions"][0]["version_id"]
    name = imported["versions"][0]["name"]
    yaml_body = catalog_yaml([model(uname("bola"))]).encode()
    calls = {
        "list": ("GET", "/v1/catalog", None),
        "asset": ("GET", f"/v1/assets/model/{name}", None),
        "version": ("GET", f"/v1/versions/{version_id}", None),
        "snapshot": ("GET", "/v1/snapshot", None),
        "import": ("POST", "/v1/imports/catalog", yaml_body),
        "import-mcp": ("POST", "/v1/imports/mcp-servers", b"[]"),
        "deprecate": ("POST", f"/v1/versions/{version_id}/deprecate", None),
    }
    readers = {"viewer", "developer", "project-admin", "platform-reader", "platform-admin"}
    allowed = {
        "list": readers,
        "asset": readers,
        "version": readers,
        "snapshot": {"replica", "platform-admin"},
        "import": {"platform-admin"},
        "import-mcp": {"platform-admin"},
        "deprecate": {"platform-admin"},
    }
    for call, (method, path, body) in calls.items():
        for who, key in keys.items():
            response = await catalog.request(method, path, content=body, headers=bearer(key))
            if who in allowed[call]:
                # Allowed callers get past authorisation (a draft cannot be deprecated: 409).
                assert response.status_code in (200, 409), (call, who, response.text)
            else:
                assert response.status_code == 403, (call, who, response.text)
                assert response.headers["content-type"] == "application/problem+json"
        anonymous = await catalog.request(method, path, content=body)
        assert anonymous.status_code == 401, call
