"""OIDC bearer tokens: the accepted ones, and the classic attacks, against a real JWKS server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from libs.common.settings import Settings
from tests.authz.conftest import authz_trusting
from tests.authz.oidc_issuer import Issuer, SigningKey, new_key
from tests.authz.support import ManualClock, client_of, clocked_authz
from tests.helpers import add_member, bearer, new_project, ok


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: Mapping[str, object], claims: Mapping[str, object], signature: bytes) -> str:
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(claims).encode())
    return f"{head}.{body}.{b64(signature)}"


def valid_claims(issuer: Issuer) -> dict[str, object]:
    now = int(time.time())
    return {"iss": issuer.issuer, "aud": "steward", "sub": "mallory", "exp": now + 300, "nbf": now}


async def whoami(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.get("/v1/whoami", headers=bearer(token))


async def test_a_valid_token_yields_its_subject_scopes_and_member_roles(
    oidc_authz: httpx.AsyncClient, issuer: Issuer, rsa_key: SigningKey, admin_key: str
) -> None:
    project = await new_project(oidc_authz, admin_key, "oidc")
    await add_member(oidc_authz, admin_key, project, "user-1", "project-admin")
    me = await ok(await whoami(oidc_authz, issuer.token(rsa_key)))
    assert me["subject"] == "user-1"
    assert me["credential"] == "oidc"
    assert me["scopes"] == ["keys:manage", "openid", "projects:read"]
    assert me["project_roles"][project] == "project-admin"
    assert me["platform_admin"] is False


async def test_groups_give_project_roles_and_the_realm_role_gives_platform_admin(
    oidc_authz: httpx.AsyncClient, issuer: Issuer, rsa_key: SigningKey
) -> None:
    token = issuer.token(
        rsa_key,
        sub="group-user",
        groups=["/steward/team-a/developer", "/other/x", "/steward/team-b/nonsense"],
    )
    me = await ok(await whoami(oidc_authz, token))
    assert me["project_roles"] == {"team-a": "developer"}
    admin = issuer.token(rsa_key, sub="pat", realm_access={"roles": ["platform-admin"]})
    assert (await ok(await whoami(oidc_authz, admin)))["platform_admin"] is True


async def test_alg_none_is_refused(oidc_authz: httpx.AsyncClient, issuer: Issuer) -> None:
    token = handmade({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, valid_claims(issuer), b"")
    response = await whoami(oidc_authz, token)
    assert response.status_code == 401
    assert "not allowed" in response.json()["detail"]


async def test_hs256_signed_with_the_public_key_is_refused(
    oidc_authz: httpx.AsyncClient, issuer: Issuer, rsa_key: SigningKey
) -> None:
    """The key-confusion attack: the public key used as an HMAC secret."""
    pem = rsa_key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid}
    unsigned = handmade(header, valid_claims(issuer), b"").rsplit(".", 1)[0]
    signature = hmac.new(pem, unsigned.encode(), hashlib.sha256).digest()
    response = await whoami(oidc_authz, f"{unsigned}.{b64(signature)}")
    assert response.status_code == 401


async def test_a_tampered_payload_is_refused(
    oidc_authz: httpx.AsyncClient, issuer: Issuer, rsa_key: SigningKey
) -> None:
    head, _, signature = issuer.token(rsa_key).split(".")
    forged = b64(
        json.dumps({**valid_claims(issuer), "realm_access": {"roles": ["platform-admin"]}}).encode()
    )
    assert (await whoami(oidc_authz, f"{head}.{forged}.{signature}")).status_code == 401


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"lifetime": -120}, "token expired"),
        ({"nbf": int(time.time()) + 3600}, "token not yet valid"),
        ({"issuer": "https://evil.example"}, "wrong issuer"),
        ({"audience": "someone-else"}, "wrong audience"),
    ],
)
async def test_out_of_bounds_claims_are_refused(
    oidc_authz: httpx.AsyncClient,
    issuer: Issuer,
    rsa_key: SigningKey,
    claims: dict[str, object],
    reason: str,
) -> None:
    response = await whoami(oidc_authz, issuer.token(rsa_key, **claims))  # type: ignore[arg-type]
    assert response.status_code == 401
    assert response.json()["detail"] == reason
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_a_token_without_exp_is_refused(
    oidc_authz: httpx.AsyncClient, issuer: Issuer, rsa_key: SigningKey
) -> None:
    import jwt

    claims = valid_claims(issuer)
    del claims["exp"]
    token = jwt.encode(claims, rsa_key.private, algorithm="RS256", headers={"kid": rsa_key.kid})
    assert (await whoami(oidc_authz, token)).status_code == 401


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def clocked_oidc_authz(
    settings: Settings, issuer: Issuer, clock: ManualClock
) -> AsyncIterator[httpx.AsyncClient]:
    """A fresh authz trusting the issuer, its JWKS cache on ``clock`` with the configured
    lifetime and refetch interval (the production defaults)."""
    async for app in clocked_authz(
        settings, clock, oidc_issuer=issuer.issuer, oidc_audience="steward"
    ):
        async for client in client_of(app):
            yield client


async def test_an_unknown_kid_refetches_the_jwks_once_per_interval(
    clocked_oidc_authz: httpx.AsyncClient,
    clock: ManualClock,
    settings: Settings,
    issuer: Issuer,
    rsa_key: SigningKey,
) -> None:
    client = clocked_oidc_authz
    interval = timedelta(seconds=settings.oidc_jwks_min_refresh_seconds)
    await ok(await whoami(client, issuer.token(rsa_key)))  # keys are cached now
    rotated = issuer.add(new_key("ec-2", "ES256"))
    before = issuer.jwks_hits
    # Within the refresh interval the new key stays unknown: no refetch.
    clock.advance(interval - timedelta(seconds=1))
    assert (await whoami(client, issuer.token(rotated))).status_code == 401
    assert issuer.jwks_hits == before
    # Once the interval has passed, one refetch finds it.
    clock.advance(timedelta(seconds=1))
    await ok(await whoami(client, issuer.token(rotated)))
    assert issuer.jwks_hits == before + 1
    # Forged kids within the next interval do not reach the identity provider again.
    stranger = new_key("stranger")
    for _ in range(5):
        assert (await whoami(client, issuer.token(stranger))).status_code == 401
    clock.advance(interval - timedelta(seconds=1))
    assert (await whoami(client, issuer.token(stranger))).status_code == 401
    assert issuer.jwks_hits == before + 1


async def test_a_token_signed_with_a_key_of_the_wrong_type_is_refused(
    oidc_authz: httpx.AsyncClient, issuer: Issuer, rsa_key: SigningKey
) -> None:
    """An EC signature presented under the RSA key's kid."""
    impostor = new_key(rsa_key.kid, "ES256")
    assert (await whoami(oidc_authz, issuer.token(impostor))).status_code == 401


async def test_a_key_removed_from_the_jwks_stops_verifying_once_the_cache_expires(
    clocked_oidc_authz: httpx.AsyncClient, clock: ManualClock, settings: Settings, issuer: Issuer
) -> None:
    client = clocked_oidc_authz
    lifetime = timedelta(seconds=settings.oidc_jwks_ttl_seconds)
    leaving = issuer.add(new_key("leaving"))
    token = issuer.token(leaving)
    await ok(await whoami(client, token))  # keys are cached now
    issuer.remove("leaving")
    clock.advance(lifetime)  # the cache's last instant: still the keys it holds
    await ok(await whoami(client, token))
    clock.advance(timedelta(seconds=1))  # past its lifetime: refetched, the key is gone
    assert (await whoami(client, token)).status_code == 401


@pytest.fixture
async def keycloak_authz(settings: Settings, issuer: Issuer) -> AsyncIterator[httpx.AsyncClient]:
    async for client in authz_trusting(
        settings,
        oidc_provider="keycloak",
        keycloak_url=issuer.base_url,
        keycloak_realm="steward",
        oidc_audience="steward",
    ):
        yield client


async def test_keycloak_mode_verifies_realm_tokens_through_python_keycloak(
    keycloak_authz: httpx.AsyncClient, issuer: Issuer, rsa_key: SigningKey
) -> None:
    token = issuer.token(
        rsa_key,
        issuer=issuer.keycloak_issuer,
        sub="pat",
        realm_access={"roles": ["platform-admin", "offline_access"]},
    )
    me = await ok(await whoami(keycloak_authz, token))
    assert me["platform_admin"] is True
    # The generic issuer is not the realm's: refused.
    assert (await whoami(keycloak_authz, issuer.token(rsa_key))).status_code == 401


async def test_tokens_are_refused_when_no_identity_provider_is_configured(
    authz: httpx.AsyncClient, issuer: Issuer, rsa_key: SigningKey
) -> None:
    response = await whoami(authz, issuer.token(rsa_key))
    assert response.status_code == 401
    assert "no identity provider" in response.json()["detail"]
