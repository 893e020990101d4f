"""Who is calling: API keys against the local replica, OIDC tokens against the cached JWKS.

Nothing here waits on another service for an API key. A JWT costs one signature check the first
time it is seen and a dictionary lookup afterwards (until it expires).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

from starlette.types import Scope

from gateway.replica import AuthReplica, KeyRejected
from libs.common import apikeys
from libs.common.auth import Principal
from libs.common.oidc import InvalidToken, OIDCVerifier, identity_from_claims

# Where a credential may come from; Kong's key-auth default is ``apikey``.
KEY_HEADERS = (b"apikey", b"x-api-key")
PROJECT_HEADERS = (b"x-steward-project", b"openai-project")
TOKEN_CACHE_SIZE = 10_000
TOKEN_CACHE_SECONDS = 300.0
WHOAMI_SECONDS = 1.0

log = logging.getLogger("steward.gateway.authn")


class AuthFailure(Exception):
    """Why a request is refused; ``status`` is 401, 403 or 503, ``message`` safe to show."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


NO_CREDENTIAL = AuthFailure(401, "No API key found in request", "missing_credential")


def credential(scope: Scope) -> str | None:
    """The credential: ``apikey`` or ``x-api-key`` header, else ``Authorization: Bearer``."""
    bearer: str | None = None
    for key, value in scope["headers"]:
        if key in KEY_HEADERS and value:
            return str(value.decode("latin-1").strip())
        if key == b"authorization":
            scheme, _, rest = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and rest.strip():
                bearer = rest.strip()
    return bearer


Whoami = Callable[[str], Awaitable[Principal]]


class Authenticator:
    """``whoami`` (authz's ``GET /v1/whoami``) is asked once per new token, to add the project
    roles authz's member table gives the token's subject; while authz is unreachable the roles
    the token itself carries (``groups``) are used."""

    def __init__(
        self, replica: AuthReplica, verifier: OIDCVerifier | None, whoami: Whoami | None = None
    ) -> None:
        self.replica = replica
        self.verifier = verifier
        self.whoami = whoami
        self._tokens: dict[bytes, tuple[float, Principal]] = {}
        self._by_subject: dict[str, set[bytes]] = {}

    def forget(self, subject: str | None) -> None:
        """Drop the cached principals of ``subject`` (all of them for None): their project
        roles changed, and the next call asks authz again."""
        if subject is None:
            self._tokens.clear()
            self._by_subject.clear()
            return
        for cache_key in self._by_subject.pop(subject, ()):
            self._tokens.pop(cache_key, None)

    async def principal(self, scope: Scope) -> Principal:
        """The caller's principal; raises AuthFailure (401 or 503)."""
        secret = credential(scope)
        if not secret:
            raise NO_CREDENTIAL
        if secret.startswith(apikeys.PREFIX):
            if not self.replica.loaded:
                raise AuthFailure(503, "the gateway has not loaded its key replica yet", "loading")
            try:
                return self.replica.verify(secret)
            except KeyRejected as exc:
                raise AuthFailure(401, str(exc), "invalid_api_key") from exc
        return await self._token(secret)

    async def _token(self, token: str) -> Principal:
        if self.verifier is None:
            raise AuthFailure(401, "Invalid authentication credentials", "invalid_api_key")
        cache_key = hashlib.sha256(token.encode()).digest()
        hit = self._tokens.get(cache_key)
        now = time.time()
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            claims = await self.verifier.verify(token)
        except InvalidToken as exc:
            raise AuthFailure(401, f"Unauthorized: {exc}", "invalid_token") from exc
        identity = identity_from_claims(claims)
        principal = Principal(
            subject=identity.subject,
            credential="oidc",
            credential_id=identity.token_id,
            scopes=identity.scopes,
            platform_admin=identity.platform_admin,
            project_roles=identity.project_roles,
        )
        if self.whoami is not None:
            try:
                async with asyncio.timeout(WHOAMI_SECONDS):
                    remote = await self.whoami(token)
                if remote.subject == principal.subject:
                    principal = remote
            except Exception as exc:  # authz down or refusing: the token's own roles stand
                log.info("whoami unavailable; using the token's roles", extra={"error": str(exc)})
        if len(self._tokens) >= TOKEN_CACHE_SIZE:
            self.forget(None)  # crude but bounded; a re-verify is cheap next to a leak
        expires = float(claims.get("exp", now))
        self._tokens[cache_key] = (min(expires, now + TOKEN_CACHE_SECONDS), principal)
        self._by_subject.setdefault(principal.subject, set()).add(cache_key)
        return principal


def project_of(principal: Principal, scope: Scope) -> str:
    """The project a call counts against.

    A project key belongs to one project. A token or platform key names it with
    ``X-Steward-Project`` (or ``OpenAI-Project``, which the OpenAI SDKs send), or has a role in
    exactly one project.
    """
    if principal.credential == "api_key" and not principal.platform_admin:
        return next(iter(principal.project_roles))
    for key, value in scope["headers"]:
        if key in PROJECT_HEADERS and value:
            return str(value.decode("latin-1"))
    if len(principal.project_roles) == 1:
        return next(iter(principal.project_roles))
    raise AuthFailure(
        400,
        "this credential is not bound to one project: name it with the X-Steward-Project header",
        "project_required",
    )
