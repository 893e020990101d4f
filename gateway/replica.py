"""Local replicas of what authz and the catalog know: keys, entitlements, catalog versions.

They are plain dictionaries changed only by idempotent upserts and deletes (from a snapshot or an
event), so applying the same event twice, or an event already reflected in a snapshot, is
harmless. The request path reads them without awaiting anything.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from libs.common import apikeys
from libs.common.auth import Principal, Role
from libs.common.db import Clock, utcnow
from libs.common.events.authz import EntitlementState, KeyState
from libs.common.events.catalog import VersionState

# Compared against when a key id is unknown, so a miss costs the same HMAC as a hit.
_NO_DIGEST = "0" * 64


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as the replica holds it: its digest and the principal it stands for."""

    key_id: str
    digest: str
    project: str | None
    expires_at: float | None  # epoch seconds
    principal: Principal

    @classmethod
    def from_state(cls, state: KeyState) -> KeyRecord:
        scopes = frozenset(state.scopes)
        if state.project is None:
            principal = Principal(
                subject=state.owner,
                credential="api_key",
                credential_id=state.key_id,
                scopes=scopes,
                platform_admin=True,
            )
        else:
            principal = Principal(
                subject=state.owner,
                credential="api_key",
                credential_id=state.key_id,
                scopes=scopes,
                project_roles={state.project: Role(state.role)},
            )
        return cls(
            key_id=state.key_id,
            digest=state.digest,
            project=state.project,
            expires_at=_epoch(state.expires_at),
            principal=principal,
        )


def _epoch(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


class KeyRejected(Exception):
    """The key is not acceptable; the message is safe to show the caller."""


class AuthReplica:
    """API keys (digests only) and entitlements, as authz last told us.

    Whether a key has expired is decided on ``clock`` (the gateway's clock: the wall clock, or a
    test's), read only for keys that expire."""

    def __init__(self, pepper: bytes, clock: Clock = utcnow) -> None:
        self._pepper = pepper
        self.clock = clock
        self._keys: dict[str, KeyRecord] = {}
        # key id → the full key last verified against that record: a later request with the
        # same key costs a dict lookup and a constant-time compare instead of an HMAC.
        self._verified: dict[str, tuple[KeyRecord, str]] = {}
        self._entitlements: set[tuple[str, str, str]] = set()
        # The grants that cover less than their MCP server (most cover all of it).
        self._limited: dict[tuple[str, str, str], EntitlementState] = {}
        # Keys let through since the last report to authz (their last_used_at).
        self.used: set[str] = set()
        # (project, model asset) → the project's fallback chain for it.
        self._fallbacks: dict[tuple[str, str], tuple[str, ...]] = {}
        self.loaded = False

    # -- changes (snapshot and events) --------------------------------------------------------

    def replace(self, keys: Iterable[KeyState], entitlements: Iterable[EntitlementState]) -> None:
        """Install a snapshot wholesale (events received since are re-applied by the caller)."""
        self._keys = {k.key_id: KeyRecord.from_state(k) for k in keys}
        self._verified = {}
        entitlements = list(entitlements)
        self._entitlements = {(e.project, e.asset_kind, e.asset_name) for e in entitlements}
        self._limited = {
            (e.project, e.asset_kind, e.asset_name): e for e in entitlements if e.limited
        }
        self._fallbacks = {}
        for e in entitlements:
            self._set_fallbacks(e)
        self.loaded = True

    def upsert_key(self, state: KeyState) -> None:
        self._keys[state.key_id] = KeyRecord.from_state(state)
        self._verified.pop(state.key_id, None)

    def remove_key(self, key_id: str) -> None:
        self._keys.pop(key_id, None)
        self._verified.pop(key_id, None)

    def grant(self, state: EntitlementState) -> None:
        """A new grant, or a change of what one covers."""
        triple = (state.project, state.asset_kind, state.asset_name)
        self._entitlements.add(triple)
        if state.limited:
            self._limited[triple] = state
        else:
            self._limited.pop(triple, None)
        self._set_fallbacks(state)

    def revoke(self, state: EntitlementState) -> None:
        triple = (state.project, state.asset_kind, state.asset_name)
        self._entitlements.discard(triple)
        self._limited.pop(triple, None)
        self._fallbacks.pop((state.project, state.asset_name), None)

    def _set_fallbacks(self, state: EntitlementState) -> None:
        if state.asset_kind != "model":
            return
        key = (state.project, state.asset_name)
        if state.fallbacks:
            self._fallbacks[key] = tuple(state.fallbacks)
        else:
            self._fallbacks.pop(key, None)

    # -- reads (the request path) ---------------------------------------------------------------

    def verify(self, key: str) -> Principal:
        """The principal of a valid, unexpired key; raises KeyRejected otherwise."""
        key_id = apikeys.key_id_of(key)
        if key_id is None:
            raise KeyRejected("Invalid authentication credentials")
        cached = self._verified.get(key_id)
        if cached is not None and hmac.compare_digest(cached[1], key):
            record = cached[0]
        else:
            found = self._keys.get(key_id)
            digest = found.digest if found is not None else _NO_DIGEST
            if not apikeys.matches(self._pepper, key, digest) or found is None:
                raise KeyRejected("Invalid authentication credentials")
            record = found
            self._verified[key_id] = (record, key)
        if record.expires_at is not None and record.expires_at <= self.clock().timestamp():
            raise KeyRejected("API key expired")
        self.used.add(key_id)
        return record.principal

    def take_used(self) -> set[str]:
        """The keys used since the last call (for the report to authz)."""
        used, self.used = self.used, set()
        return used

    def entitled(self, project: str, kind: str, name: str) -> bool:
        return (project, kind, name) in self._entitlements

    def limits(self, project: str, kind: str, name: str) -> EntitlementState | None:
        """What an entitlement is limited to, if it covers less than the whole asset."""
        return self._limited.get((project, kind, name))

    def fallbacks(self, project: str, model: str) -> tuple[str, ...]:
        """The project's fallback chain for a model asset (gateway model names), or ()."""
        return self._fallbacks.get((project, model), ())

    def entitlement_triples(self) -> set[tuple[str, str, str]]:
        """Every (project, asset kind, asset name) entitled, for exports."""
        return set(self._entitlements)

    def entitlements_of(self, project: str, kind: str) -> set[str]:
        return {n for p, k, n in self._entitlements if p == project and k == kind}

    def key(self, key_id: str) -> KeyRecord | None:
        return self._keys.get(key_id)

    @property
    def key_count(self) -> int:
        return len(self._keys)

    @property
    def entitlement_count(self) -> int:
        return len(self._entitlements)


class CatalogReplica:
    """Catalog versions; only ``approved`` ones may be offered or called."""

    def __init__(self) -> None:
        self._versions: dict[str, VersionState] = {}
        # (kind, asset name) → {version string: state}, for lookups by what routes name.
        self._by_asset: dict[tuple[str, str], dict[str, VersionState]] = {}
        self.loaded = False

    def replace(self, versions: Iterable[VersionState]) -> None:
        self._versions = {}
        self._by_asset = {}
        for v in versions:
            self.upsert(v)
        self.loaded = True

    def upsert(self, state: VersionState) -> None:
        previous = self._versions.get(state.version_id)
        if previous is not None:
            old = self._by_asset.get((previous.asset_kind, previous.asset_name))
            if old is not None:
                old.pop(previous.version, None)
        self._versions[state.version_id] = state
        self._by_asset.setdefault((state.asset_kind, state.asset_name), {})[state.version] = state

    def approved(self, kind: str, name: str, version: str | None = None) -> VersionState | None:
        """The approved version named (or, with no version, the newest approved one)."""
        versions = self._by_asset.get((kind, name))
        if not versions:
            return None
        if version is not None:
            found = versions.get(version)
            return found if found is not None and found.status == "approved" else None
        approved = [v for v in versions.values() if v.status == "approved"]
        if not approved:
            return None
        return max(approved, key=lambda v: v.version_id)

    def versions(self) -> list[VersionState]:
        return list(self._versions.values())
