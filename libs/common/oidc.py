"""OIDC bearer tokens: discovery, a JWKS cache, and strict verification.

Only asymmetric algorithms are accepted (no ``none``, no HMAC: a public key can never serve as a
shared secret). An unknown ``kid`` triggers at most one JWKS refetch per interval, so a flood of
forged tokens cannot turn into a flood of requests to the identity provider.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from jwt import PyJWK

from libs.common.auth import PROJECT_ROLES, Role
from libs.common.settings import Settings

ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)

JWKSFetcher = Callable[[], Awaitable[Mapping[str, Any]]]
# Seconds from an arbitrary origin, never going back: ``time.monotonic``, or a test's clock.
Monotonic = Callable[[], float]


class InvalidToken(Exception):
    """The token is not acceptable; the message says why (safe to show the caller)."""


@dataclass(frozen=True)
class SigningKey:
    jwk: PyJWK
    alg: str | None  # the algorithm the JWK declares, if any


class JWKSCache:
    """Keys are refetched once older than ``ttl`` seconds, or for an unknown ``kid`` once
    ``min_refresh`` seconds have passed since the last fetch; both measured on ``monotonic``."""

    def __init__(
        self,
        fetch: JWKSFetcher,
        *,
        ttl: float,
        min_refresh: float,
        monotonic: Monotonic = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._min_refresh = min_refresh
        self._monotonic = monotonic
        self._keys: dict[str, SigningKey] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self.fetch_count = 0

    async def _refresh(self) -> None:
        self._fetched_at = self._monotonic()
        self.fetch_count += 1
        jwks = await self._fetch()
        keys: dict[str, SigningKey] = {}
        for raw in jwks.get("keys", []):
            if raw.get("use", "sig") != "sig" or "kid" not in raw:
                continue
            try:
                keys[raw["kid"]] = SigningKey(PyJWK(raw), raw.get("alg"))
            except jwt.PyJWTError:
                continue  # a key type we do not support; others may still verify
        self._keys = keys

    async def get(self, kid: str) -> SigningKey | None:
        async with self._lock:
            now = self._monotonic()
            stale = now - self._fetched_at > self._ttl
            unknown = kid not in self._keys and now - self._fetched_at >= self._min_refresh
            if stale or unknown:
                try:
                    await self._refresh()
                except (httpx.HTTPError, ValueError) as exc:
                    if not self._keys:
                        raise InvalidToken("identity provider keys unavailable") from exc
            return self._keys.get(kid)


def discovery_fetcher(issuer: str, client: httpx.AsyncClient) -> JWKSFetcher:
    """Any OIDC issuer: ``/.well-known/openid-configuration`` → ``jwks_uri``."""
    jwks_uri: str | None = None

    async def fetch() -> Mapping[str, Any]:
        nonlocal jwks_uri
        if jwks_uri is None:
            url = issuer.rstrip("/") + "/.well-known/openid-configuration"
            response = await client.get(url)
            response.raise_for_status()
            jwks_uri = str(response.json()["jwks_uri"])
        response = await client.get(jwks_uri)
        response.raise_for_status()
        data: Mapping[str, Any] = response.json()
        return data

    return fetch


def keycloak_fetcher(server_url: str, realm: str, client_id: str) -> JWKSFetcher:
    """Keycloak, through python-keycloak's own client (realm certs endpoint)."""
    from keycloak import KeycloakOpenID

    openid = KeycloakOpenID(server_url=server_url, realm_name=realm, client_id=client_id)

    async def fetch() -> Mapping[str, Any]:
        try:
            return await openid.a_certs()
        except Exception as exc:  # python-keycloak raises its own error hierarchy
            raise ValueError(f"keycloak certs: {exc}") from exc

    return fetch


@dataclass(frozen=True)
class TokenIdentity:
    subject: str
    token_id: str
    scopes: frozenset[str]
    platform_admin: bool
    project_roles: Mapping[str, Role] = field(default_factory=dict)


def identity_from_claims(claims: Mapping[str, Any]) -> TokenIdentity:
    """Scopes from ``scope``/``scp``; roles from ``realm_access.roles``, ``roles`` and ``groups``.

    A group ``/steward/<project>/<role>`` grants that project role, so an identity provider can
    carry project membership as well as the authz member table.
    """
    raw_scope = claims.get("scope", claims.get("scp", ""))
    scopes = raw_scope.split() if isinstance(raw_scope, str) else list(raw_scope)
    realm_roles = claims.get("realm_access", {}).get("roles", [])
    roles = set(realm_roles) | set(claims.get("roles", []))
    project_roles: dict[str, Role] = {}
    for group in claims.get("groups", []):
        parts = str(group).strip("/").split("/")
        if len(parts) == 3 and parts[0] == "steward" and parts[2] in PROJECT_ROLES:
            role = Role(parts[2])
            current = project_roles.get(parts[1])
            if current is None or role.at_least(current):
                project_roles[parts[1]] = role
    return TokenIdentity(
        subject=str(claims["sub"]),
        token_id=str(claims.get("jti", claims["sub"])),
        scopes=frozenset(scopes),
        platform_admin=Role.PLATFORM_ADMIN.value in roles,
        project_roles=project_roles,
    )


class OIDCVerifier:
    def __init__(
        self,
        *,
        issuer: str,
        audience: str | None,
        jwks: JWKSCache,
        algorithms: list[str],
        leeway: float = 30.0,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.jwks = jwks
        self.algorithms = [a for a in algorithms if a in ASYMMETRIC]
        self.leeway = leeway

    async def verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken("malformed token") from exc
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise InvalidToken(f"algorithm {alg!r} is not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise InvalidToken("token has no key id (kid)")
        key = await self.jwks.get(kid)
        if key is None:
            raise InvalidToken("unknown signing key")
        if key.alg is not None and key.alg != alg:
            raise InvalidToken("token algorithm does not match its key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key.jwk.key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={
                    "require": ["exp", "iss", "sub"],
                    "verify_aud": self.audience is not None,
                },
            )
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("token expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise InvalidToken("token not yet valid") from exc
        except jwt.InvalidAudienceError as exc:
            raise InvalidToken("wrong audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise InvalidToken("wrong issuer") from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken("invalid token") from exc
        return claims


def verifier_from_settings(
    settings: Settings, client: httpx.AsyncClient, *, monotonic: Monotonic = time.monotonic
) -> OIDCVerifier | None:
    """The configured verifier, or None when no identity provider is configured.

    ``monotonic`` times the JWKS cache (its lifetime and refetch interval)."""
    if settings.oidc_provider == "keycloak" and settings.keycloak_url and settings.keycloak_realm:
        issuer = f"{settings.keycloak_url.rstrip('/')}/realms/{settings.keycloak_realm}"
        fetch = keycloak_fetcher(
            settings.keycloak_url, settings.keycloak_realm, settings.keycloak_client_id
        )
    elif settings.oidc_issuer:
        issuer = settings.oidc_issuer
        fetch = discovery_fetcher(issuer, client)
    else:
        return None
    cache = JWKSCache(
        fetch,
        ttl=settings.oidc_jwks_ttl_seconds,
        min_refresh=settings.oidc_jwks_min_refresh_seconds,
        monotonic=monotonic,
    )
    return OIDCVerifier(
        issuer=settings.oidc_issuer or issuer,
        audience=settings.oidc_audience,
        jwks=cache,
        algorithms=settings.oidc_algorithms,
        leeway=settings.oidc_leeway_seconds,
    )
