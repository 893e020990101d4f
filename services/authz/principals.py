"""Turning a credential (API key or OIDC token) into a Principal, inside the authz service."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common import apikeys
from libs.common.auth import Principal, Role
from libs.common.db import Clock, utcnow
from libs.common.errors import Unauthorized
from libs.common.oidc import InvalidToken, OIDCVerifier, identity_from_claims
from services.authz import repository as repo
from services.authz.domain import key_status

log = logging.getLogger("steward.authz")


class LastUsed:
    """Remembers key use in memory and writes it in batches: no database write per request.

    The time of use is read from ``clock`` (the service's clock)."""

    def __init__(self, clock: Clock = utcnow) -> None:
        self.clock = clock
        self._pending: dict[str, datetime] = {}

    def record(self, key_id: str) -> None:
        self._pending[key_id] = self.clock()

    async def flush(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        pending, self._pending = self._pending, {}
        if pending:
            await repo.touch_keys(sessionmaker, pending.items())

    async def run(self, sessionmaker: async_sessionmaker[AsyncSession], every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.flush(sessionmaker)
            except Exception:
                log.exception("could not record key last use; will retry")


class AuthzResolver:
    """Whether a key has expired is decided on ``clock`` (the service's clock)."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        pepper: bytes,
        verifier: OIDCVerifier | None,
        last_used: LastUsed,
        clock: Clock = utcnow,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.pepper = pepper
        self.verifier = verifier
        self.last_used = last_used
        self.clock = clock

    async def resolve(self, credential: str) -> Principal:
        if credential.startswith(apikeys.PREFIX):
            return await self._api_key(credential)
        return await self._token(credential)

    async def _api_key(self, credential: str) -> Principal:
        key_id = apikeys.key_id_of(credential)
        if key_id is None:
            raise Unauthorized("invalid API key")
        async with self.sessionmaker() as session:
            found = await repo.key_with_project(session, key_id)
        # Compare even when the id is unknown, so timing says nothing about which ids exist.
        stored = found[0].digest if found else "0" * 64
        if not apikeys.matches(self.pepper, credential, stored) or found is None:
            raise Unauthorized("invalid API key")
        key, project = found
        status = key_status(key, self.clock())
        if status != "active":
            raise Unauthorized(f"API key {status}")
        self.last_used.record(key.id)
        if project is None:
            return Principal(
                subject=key.owner,
                credential="api_key",
                credential_id=key.id,
                scopes=frozenset(key.scopes),
                platform_admin=True,
            )
        return Principal(
            subject=key.owner,
            credential="api_key",
            credential_id=key.id,
            scopes=frozenset(key.scopes),
            project_roles={project: Role(key.role)},
        )

    async def _token(self, credential: str) -> Principal:
        if self.verifier is None:
            raise Unauthorized("bearer tokens are not accepted: no identity provider is configured")
        try:
            claims = await self.verifier.verify(credential)
        except InvalidToken as exc:
            raise Unauthorized(str(exc)) from exc
        identity = identity_from_claims(claims)
        async with self.sessionmaker() as session:
            roles = await repo.roles_of(session, identity.subject)
            admin = await repo.is_platform_admin(session, identity.subject)
        for project, role in identity.project_roles.items():
            current = roles.get(project)
            if current is None or role.rank > current.rank:
                roles[project] = role
        return Principal(
            subject=identity.subject,
            credential="oidc",
            credential_id=identity.token_id,
            scopes=identity.scopes,
            platform_admin=admin or identity.platform_admin,
            project_roles=roles,
        )
