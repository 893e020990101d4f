"""Kong compatibility: declarative files loaded, validated and round-tripped as Kong does, the
DB-less admin API, and Kong's plugins, headers and messages on the proxy."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml

from gateway.kong.config import load_file
from gateway.kong.runtime import KongRuntime
from gateway.kong.schema import InvalidConfig, KongConfig, entity_id, parse
from libs.common.settings import Settings
from tests.gateway.conftest import RunningGateway, running_gateway, tenant
from tests.helpers import bearer

KONG_YML = """
_format_version: "3.0"
services:
- name: echo
  url: http://127.0.0.1:{port}/anything
  routes:
  - name: open
    paths: [/open]
  - name: keyed
    paths: [/keyed]
    plugins:
    - name: key-auth
      config: {{hide_credentials: true}}
    - name: acl
      config: {{allow: [gold]}}
  - name: limited
    paths: [/limited]
    plugins:
    - name: key-auth
    - name: rate-limiting
      config: {{minute: 2, policy: local}}
  - name: jwt
    paths: [/jwt]
    plugins:
    - name: jwt
      config: {{claims_to_verify: [exp]}}
consumers:
- username: alice
  custom_id: alice-1
  keyauth_credentials: [{{key: alice-key}}]
  acls: [{{group: gold}}]
  jwt_secrets: [{{key: alice-iss, secret: alice-secret-of-at-least-32-bytes!}}]
- username: bob
  keyauth_credentials: [{{key: bob-key}}]
  acls: [{{group: silver}}]
"""


def kong_yml(upstream: str) -> str:
    return KONG_YML.format(port=upstream.rsplit(":", 1)[1])


async def post_config(gw: RunningGateway, admin_key: str, **kwargs: Any) -> httpx.Response:
    headers = {**bearer(admin_key), **kwargs.pop("headers", {})}
    async with httpx.AsyncClient(base_url=gw.admin_url) as admin:
        return await admin.post("/config", headers=headers, **kwargs)


@pytest.fixture
async def kong(gw: RunningGateway, admin_key: str, upstream: str) -> RunningGateway:
    response = await post_config(
        gw,
        admin_key,
        content=kong_yml(upstream),
        headers={**bearer(admin_key), "content-type": "text/yaml"},
    )
    assert response.status_code == 201, response.text
    return gw


# -- the declarative format -----------------------------------------------------------------------


def test_a_kong_file_loads_with_kong_defaults_and_deterministic_ids(tmp_path: Path) -> None:
    path = tmp_path / "kong.yml"
    path.write_text(KONG_YML.format(port=9))
    config = load_file(path)
    [service] = config["services"]
    assert (service["protocol"], service["host"], service["port"], service["path"]) == (
        "http",
        "127.0.0.1",
        9,
        "/anything",
    )
    assert (service["retries"], service["connect_timeout"], service["read_timeout"]) == (
        5,
        60000,
        60000,
    )
    assert service["id"] == entity_id("services", "echo") == load_file(path)["services"][0]["id"]
    route = config.find("routes", "open")
    assert route is not None
    assert route["strip_path"] is True and route["protocols"] == ["http", "https"]
    assert route["service"] == {"id": service["id"]}
    key_auth = next(p for p in config["plugins"] if p["name"] == "key-auth")
    assert key_auth["config"]["key_names"] == ["apikey"]
    limiter = next(p for p in config["plugins"] if p["name"] == "rate-limiting")
    assert limiter["config"]["limit_by"] == "consumer" and limiter["config"]["policy"] == "local"
    assert limiter["config"]["error_message"] == "API rate limit exceeded"
    assert limiter["protocols"] == ["grpc", "grpcs", "http", "https"]


def test_a_declarative_file_round_trips(tmp_path: Path) -> None:
    first = parse(yaml.safe_load(KONG_YML.format(port=9)))
    exported = yaml.safe_dump(first.to_declarative())
    second = parse(yaml.safe_load(exported))

    def strip(c: KongConfig) -> dict[str, list[dict[str, Any]]]:
        auto = ("created_at", "updated_at")
        return {
            k: [{f: v for f, v in e.items() if f not in auto} for e in items]
            for k, items in c.entities.items()
        }

    assert strip(second) == strip(first)
    (tmp_path / "again.yml").write_text(exported)
    assert strip(load_file(tmp_path / "again.yml")) == strip(first)


@pytest.mark.parametrize(
    ("document", "fields"),
    [
        (
            {"_format_version": "3.0", "services": [{"name": "s", "host": "h", "colour": "blue"}]},
            {"services": [{"colour": "unknown field"}]},
        ),
        (
            {
                "_format_version": "3.0",
                "services": [
                    {"name": "s", "host": "h", "routes": [{"paths": ["/a"], "strip_pathz": True}]}
                ],
            },
            {"services": [{"routes": [{"strip_pathz": "unknown field"}]}]},
        ),
        (
            {
                "_format_version": "3.0",
                "plugins": [{"name": "key-auth", "config": {"key_nams": ["x"]}}],
            },
            {"plugins": [{"config": {"key_nams": "unknown field"}}]},
        ),
        (
            {"_format_version": "3.0", "plugins": [{"name": "bot-detection"}]},
            {
                "plugins": [
                    {
                        "name": "plugin 'bot-detection' not enabled; add it to the 'plugins' configuration property"  # noqa: E501
                    }
                ]
            },
        ),
        (
            {"_format_version": "9.9"},
            {"_format_version": "expected one of: 1.1, 2.1, 3.0"},
        ),
        ({"services": []}, {"_format_version": "required field missing"}),
        (
            {
                "_format_version": "3.0",
                "routes": [{"name": "r", "paths": ["/r"], "service": "ghost"}],
            },
            {
                "routes": [
                    {
                        "@entity": [
                            "invalid reference 'service: ghost' (no such entry in 'services')"
                        ]
                    }
                ]
            },
        ),
        (
            {"_format_version": "3.0", "consumers": [{"username": "a"}, {"username": "a"}]},
            {
                "consumers": [
                    None,
                    {
                        "@entity": [
                            "uniqueness violation: 'consumers' entity with username set to 'a' already declared"  # noqa: E501
                        ]
                    },
                ]
            },
        ),
        (
            {
                "_format_version": "3.0",
                "plugins": [{"name": "rate-limiting", "config": {"minute": 10, "hour": 5}}],
            },
            {
                "plugins": [
                    {
                        "config": "The limit for hour(5.0) cannot be lower than the limit for minute(10.0)"  # noqa: E501
                    }
                ]
            },
        ),
    ],
)
def test_invalid_files_are_refused_with_kongs_messages(
    document: dict[str, Any], fields: dict[str, Any]
) -> None:
    with pytest.raises(InvalidConfig) as refused:
        parse(document)
    assert refused.value.fields == fields
    body = refused.value.body()
    assert body["code"] == 14 and body["name"] == "invalid declarative configuration"


# -- the admin API --------------------------------------------------------------------------------


async def test_post_config_in_every_form_kong_accepts_and_the_listings(
    gw: RunningGateway, admin_key: str, upstream: str
) -> None:
    text = kong_yml(upstream)
    as_json = parse(yaml.safe_load(text)).to_declarative()
    forms: list[dict[str, Any]] = [
        {"content": text, "headers": {**bearer(admin_key), "content-type": "application/yaml"}},
        {"json": as_json},
        {"json": {"config": text}},
        {"files": {"config": ("kong.yml", text.encode(), "application/yaml")}},
    ]
    for form in forms:
        response = await post_config(gw, admin_key, **form)
        assert response.status_code == 201, response.text
        assert entity_id("services", "echo") in response.json()["services"]
    async with httpx.AsyncClient(base_url=gw.admin_url, headers=bearer(admin_key)) as admin:
        services = (await admin.get("/services")).json()
        assert [s["name"] for s in services["data"]] == ["echo"] and services["next"] is None
        routes = (await admin.get("/services/echo/routes")).json()["data"]
        assert {r["name"] for r in routes} == {"open", "keyed", "limited", "jwt"}
        consumers = (await admin.get("/consumers")).json()["data"]
        assert {c["username"] for c in consumers} == {"alice", "bob"}
        assert (await admin.get("/consumers/alice")).json()["custom_id"] == "alice-1"
        plugins = (await admin.get("/plugins")).json()["data"]
        assert sorted(p["name"] for p in plugins) == [
            "acl",
            "jwt",
            "key-auth",
            "key-auth",
            "rate-limiting",
        ]
        assert (await admin.get("/routes/nope")).status_code == 404
        node = (await admin.get("/")).json()
        assert node["configuration"]["database"] == "off"
        current = yaml.safe_load((await admin.get("/config")).json()["config"])
        assert current["_format_version"] == "3.0"
        assert {s["name"] for s in current["services"]} == {"echo"}


async def test_an_invalid_config_changes_nothing(kong: RunningGateway, admin_key: str) -> None:
    response = await post_config(
        kong, admin_key, json={"_format_version": "3.0", "services": [{"name": "x", "hots": "h"}]}
    )
    assert response.status_code == 400
    body = response.json()
    assert body["name"] == "invalid declarative configuration"
    assert body["fields"]["services"][0]["hots"] == "unknown field"
    async with httpx.AsyncClient(base_url=kong.url) as client:
        assert (await client.get("/open/still")).status_code == 200


async def test_the_admin_api_needs_a_platform_admin(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, [])
    async with httpx.AsyncClient(base_url=gw.admin_url) as admin:
        assert (await admin.get("/services")).status_code == 401
        assert (await admin.get("/services", headers=bearer(t.key))).status_code == 403
        assert (await admin.post("/config", json={}, headers=bearer(t.key))).status_code == 403
        assert (await admin.get("/healthz")).status_code == 200


# -- the proxy ------------------------------------------------------------------------------------


async def test_routes_strip_their_path_and_carry_kongs_headers(kong: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=kong.url) as client:
        response = await client.get("/open/a/b?x=1", headers={"x-consumer-id": "forged"})
        assert response.status_code == 200
        echoed = response.json()
        assert echoed["path"] == "/anything/a/b" and echoed["query"] == "x=1"
        upstream_headers = echoed["headers"]
        assert upstream_headers["x-forwarded-path"] == "/open/a/b"
        assert upstream_headers["x-forwarded-prefix"] == "/open"
        assert upstream_headers["x-kong-request-id"] == response.headers["x-kong-request-id"]
        assert "x-consumer-id" not in upstream_headers  # a client cannot claim an identity
        assert int(response.headers["x-kong-upstream-latency"]) >= 0
        assert int(response.headers["x-kong-proxy-latency"]) >= 0
        assert "steward" in response.headers["via"]
        missing = await client.get("/nowhere")
        assert missing.status_code == 404
        assert missing.json() == {"message": "no Route matched with those values"}


async def test_key_auth_and_acl_speak_kong(kong: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=kong.url) as client:
        none = await client.get("/keyed/x")
        assert none.status_code == 401
        assert none.json() == {"message": "No API key found in request"}
        assert none.headers["www-authenticate"] == 'Key realm="kong"'
        wrong = await client.get("/keyed/x", headers={"apikey": "nope"})
        assert wrong.status_code == 401
        assert wrong.json() == {"message": "Invalid authentication credentials"}
        denied = await client.get("/keyed/x", headers={"apikey": "bob-key"})
        assert denied.status_code == 403
        assert denied.json() == {"message": "You cannot consume this service"}
        alice = await client.get("/keyed/x", headers={"apikey": "alice-key"})
        assert alice.status_code == 200
        seen = alice.json()["headers"]
        assert seen["x-consumer-username"] == "alice"
        assert seen["x-consumer-custom-id"] == "alice-1"
        assert seen["x-consumer-id"] == entity_id("consumers", "alice")
        assert seen["x-credential-identifier"] == entity_id("keyauth_credentials", "alice-key")
        assert seen["x-consumer-groups"] == "gold"
        assert "apikey" not in seen  # hide_credentials
        by_query = await client.get("/keyed/x?apikey=alice-key")
        assert by_query.status_code == 200


async def test_rate_limiting_counts_per_consumer_with_kongs_headers(kong: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=kong.url, headers={"apikey": "alice-key"}) as client:
        first = await client.get("/limited/x")
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-minute"] == "2"
        assert first.headers["x-ratelimit-remaining-minute"] == "1"
        assert first.headers["ratelimit-limit"] == "2"
        assert first.headers["ratelimit-remaining"] == "1"
        assert 0 < int(first.headers["ratelimit-reset"]) <= 60
        second = await client.get("/limited/x")
        assert second.headers["x-ratelimit-remaining-minute"] == "0"
        third = await client.get("/limited/x")
        if third.status_code == 200:  # the minute rolled over between the calls
            third = await client.get("/limited/x")
            third = await client.get("/limited/x")
        assert third.status_code == 429
        assert third.json() == {"message": "API rate limit exceeded"}
        assert int(third.headers["retry-after"]) > 0
        bob = await client.get("/limited/x", headers={"apikey": "bob-key"})
        assert bob.status_code == 200  # another consumer, another counter


async def test_jwt_plugin_verifies_kong_style_credentials(kong: RunningGateway) -> None:
    now = int(time.time())
    good = jwt.encode(
        {"iss": "alice-iss", "exp": now + 60},
        "alice-secret-of-at-least-32-bytes!",
        algorithm="HS256",
    )
    forged = jwt.encode(
        {"iss": "alice-iss", "exp": now + 60}, "guess-guess-guess-guess-guess-32", algorithm="HS256"
    )
    expired = jwt.encode(
        {"iss": "alice-iss", "exp": now - 60},
        "alice-secret-of-at-least-32-bytes!",
        algorithm="HS256",
    )
    stranger = jwt.encode({"iss": "who", "exp": now + 60}, "x" * 32, algorithm="HS256")
    async with httpx.AsyncClient(base_url=kong.url) as client:
        ok = await client.get("/jwt/x", headers=bearer(good))
        assert ok.status_code == 200
        assert ok.json()["headers"]["x-consumer-username"] == "alice"
        assert ok.json()["headers"]["x-credential-identifier"] == "alice-iss"
        assert (await client.get(f"/jwt/x?jwt={good}")).status_code == 200
        cases = [
            ({}, 401, {"message": "Unauthorized"}),
            (bearer(forged), 401, {"message": "Invalid signature"}),
            (bearer(expired), 401, {"exp": "token expired"}),
            (bearer(stranger), 401, {"message": "No credentials found for given 'iss'"}),
        ]
        for headers, status, body in cases:
            response = await client.get("/jwt/x", headers=headers)
            assert (response.status_code, response.json()) == (status, body)


async def test_api_prefix_proxies_the_control_plane_with_the_callers_credential(
    gw: RunningGateway, admin_key: str
) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as client:
        me = await client.get("/api/authz/v1/whoami", headers=bearer(admin_key))
        assert me.status_code == 200, me.text
        assert me.json()["platform_admin"] is True
        assert "x-kong-upstream-latency" in me.headers
        anonymous = await client.get("/api/authz/v1/whoami")
        assert anonymous.status_code == 401
        assert anonymous.headers["content-type"] == "application/problem+json"
        assert (await client.get("/api/nonesuch/x")).status_code == 404


async def test_a_kong_file_from_settings_is_served_and_survives_restarts(
    gateway_settings: Settings, upstream: str, admin_key: str, tmp_path: Path
) -> None:
    path = tmp_path / "kong.yml"
    path.write_text(kong_yml(upstream))
    settings = gateway_settings.model_copy(
        update={"gateway_kong_config": path, "data_dir": tmp_path / "gw"}
    )
    async with running_gateway(settings) as local, httpx.AsyncClient(base_url=local.url) as c:
        assert (await c.get("/open/x")).status_code == 200
    # POST /config is kept across a restart (as Kong's DB-less node keeps it).
    settings = settings.model_copy(update={"gateway_kong_config": None})
    async with running_gateway(settings) as local:
        await local.gateway.wait_loaded(10)
        doc = {
            "_format_version": "3.0",
            "services": [
                {
                    "name": "only",
                    "url": f"{upstream}/anything",
                    "routes": [{"name": "only", "paths": ["/only"]}],
                }
            ],
        }
        assert (await post_config(local, admin_key, json=doc)).status_code == 201
    async with running_gateway(settings) as local, httpx.AsyncClient(base_url=local.url) as c:
        assert (await c.get("/only/x")).status_code == 200
        assert (await c.get("/open/x")).status_code == 404
    assert isinstance(local.gateway.kong, KongRuntime)
