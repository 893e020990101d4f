"""Catalog rules: imports, and the version lifecycle ``draft → submitted → approved →
deprecated → revoked``.

``submitted`` and ``approved`` are entered only on approval's events (a request filed, a request
approved); there is no API that writes them. Every change emits its event (when others must hear
of it) and an audit record in the same transaction.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from libs.common.artifacts import LOCAL_SCHEMES
from libs.common.db import utcnow
from libs.common.errors import Conflict
from libs.common.events import EventPayload
from libs.common.events.approval import AssetPayload, RequestDecided, RequestState
from libs.common.events.catalog import (
    ToolRef,
    VersionApproved,
    VersionDeprecated,
    VersionRevoked,
    VersionState,
    VersionSubmitted,
)
from libs.common.uow import UnitOfWork
from services.catalog import repository as repo
from services.catalog.importers import Entry, refuse
from services.catalog.models import Asset, Version

log = logging.getLogger("steward.catalog")

# For each move: the states it may start from, and where it goes.
MOVES: dict[str, tuple[frozenset[str], str]] = {
    "submit": (frozenset({"draft"}), "submitted"),
    "approve": (frozenset({"draft", "submitted"}), "approved"),
    "return": (frozenset({"submitted"}), "draft"),
    "deprecate": (frozenset({"approved"}), "deprecated"),
    "revoke": (frozenset({"draft", "submitted", "approved", "deprecated"}), "revoked"),
}
EVENTS: dict[str, type[VersionState]] = {
    "submitted": VersionSubmitted,
    "approved": VersionApproved,
    "deprecated": VersionDeprecated,
    "revoked": VersionRevoked,
}


def target(asset: Asset, version: Version | str) -> str:
    label = version if isinstance(version, str) else version.version
    return f"{asset.kind}/{asset.name}@{label}"


def version_state(version: Version, asset: Asset) -> dict[str, Any]:
    """The fields of every ``catalog.version.*`` event and of the snapshot."""
    return {
        "asset_id": asset.id,
        "asset_kind": asset.kind,
        "asset_name": asset.name,
        "version_id": version.id,
        "version": version.version,
        "status": version.status,
        "tags": list(version.tags),
        "tools": [ToolRef.model_validate(t) for t in version.tools],
        "tokenizer": tokenizer_of(version.spec),
        "remote": mcp_remote(version.spec) if asset.kind == "mcp_server" else None,
    }


def tokenizer_of(spec: dict[str, Any]) -> str | None:
    """Where the gateway finds the model's tokenizer: ``serving.tokenizer``, else the model's
    own GGUF when it is a file on the serving host (it carries its vocabulary)."""
    named = (spec.get("serving") or {}).get("tokenizer")
    if named:
        return str(named)
    source = spec.get("source_uri")
    if not isinstance(source, str) or not source.endswith(".gguf"):
        return None
    return source if source.startswith(tuple(f"{s}://" for s in LOCAL_SCHEMES)) else None


_VARIABLE = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)\}")


def mcp_remote(spec: dict[str, Any]) -> str | None:
    """The streamable-HTTP URL an MCP server version is reached at, for the gateway to route:
    server.json's ``remotes`` (URL variables filled with their defaults; None when one has
    none) or a Kubeflow entry's ``endpoints``. SSE-only remotes are not routed: their message
    URLs point past the gateway."""
    if spec.get("format") == "mcp-server.json":
        server = spec.get("server") or {}
        for remote in server.get("remotes") or []:
            if remote.get("type") != "streamable-http" or not remote.get("url"):
                continue
            variables = remote.get("variables") or {}
            url = str(remote["url"])
            for name in _VARIABLE.findall(url):
                default = (variables.get(name) or {}).get("default")
                if not isinstance(default, str) or not default:
                    return None
                url = url.replace("{" + name + "}", default)
            return url
        return None
    endpoints = spec.get("endpoints") or {}
    found = endpoints.get("streamable-http") or endpoints.get("http")
    return str(found) if found else None


# -- imports ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Imported:
    entry: Entry
    version_id: str | None  # None in a dry run, for a version not created yet
    outcome: str  # created | updated | unchanged


async def import_entries(
    uow: UnitOfWork, entries: Sequence[Entry], *, dry_run: bool = False
) -> list[Imported]:
    """Write validated entries as ``draft`` versions; all or nothing.

    An identical entry changes nothing. A changed entry may replace a draft, but a version that
    has left ``draft`` is immutable: the import is refused, naming the entry. A dry run reports
    the outcomes (``steward diff``) and writes nothing.
    """
    session = uow.session
    errors: list[dict[str, str]] = []
    existing: dict[int, tuple[Asset | None, Version | None]] = {}
    for i, entry in enumerate(entries):
        asset = await repo.asset_by_key(session, entry.kind, entry.name)
        version = await repo.version_of(session, asset, entry.version) if asset else None
        existing[i] = (asset, version)
        if (
            version is not None
            and version.status != "draft"
            and version.content_hash != entry.content_hash
        ):
            errors.append(
                {
                    "field": f"{entry.where}.version",
                    "message": f"{entry.kind} {entry.name!r} version {entry.version!r} is "
                    f"{version.status} and immutable; give the change a new version",
                    "type": "immutable",
                }
            )
    if errors:
        raise refuse(errors, "import")

    results: list[Imported] = []
    for i, entry in enumerate(entries):
        asset, version = existing[i]
        if version is not None and version.content_hash == entry.content_hash:
            results.append(Imported(entry, version.id, "unchanged"))
            continue
        outcome = "updated" if version else "created"
        if dry_run:
            results.append(Imported(entry, version.id if version else None, outcome))
            continue
        if asset is None:
            asset = Asset(kind=entry.kind, name=entry.name, created_by=uow.actor)
            session.add(asset)
            await session.flush()
        before = _summary(version) if version else None
        if version is None:
            version = Version(
                asset_id=asset.id,
                version=entry.version,
                status="draft",
                created_by=uow.actor,
                spec={},
                tags=[],
                tools=[],
                checklist=[],
            )
            session.add(version)
        version.description = entry.description
        version.provider = entry.provider
        version.spec = entry.spec
        version.tags = entry.tags
        version.tools = [t.model_dump() for t in entry.tools]
        version.checklist = entry.checklist
        version.content_hash = entry.content_hash
        version.source = entry.source
        version.updated_at = utcnow()
        await session.flush()
        await repo.set_tags(session, version, entry.tags)
        await session.flush()
        await uow.audit(
            f"version.import.{outcome}",
            target(asset, version),
            before=before,
            after=_summary(version),
        )
        results.append(Imported(entry, version.id, outcome))
    return results


def _summary(version: Version) -> dict[str, Any]:
    return {
        "status": version.status,
        "content_hash": version.content_hash,
        "source": version.source,
        "tags": list(version.tags),
    }


# -- lifecycle --------------------------------------------------------------------------------


async def _move(
    uow: UnitOfWork,
    version: Version,
    asset: Asset,
    move: str,
    *,
    reason: str,
    request_id: str | None = None,
) -> None:
    sources, destination = MOVES[move]
    await repo.lock_status(uow.session, version)
    if version.status not in sources:
        raise Conflict(
            f"{target(asset, version)} is {version.status}; {move} needs one of {sorted(sources)}"
        )
    before = {"status": version.status}
    version.status = destination
    version.status_changed_at = utcnow()
    version.status_reason = reason[:500]
    if request_id is not None:
        version.request_id = request_id
    await uow.session.flush()
    event = EVENTS.get(destination)
    if event is not None:
        payload: EventPayload = event(**version_state(version, asset))
        await uow.emit(payload, entity=version.id)
    await uow.audit(
        f"version.{move}",
        target(asset, version),
        before=before,
        after={"status": destination, "reason": reason, "request_id": version.request_id},
    )


async def deprecate(uow: UnitOfWork, version: Version, asset: Asset, reason: str) -> Version:
    await _move(uow, version, asset, "deprecate", reason=reason or f"deprecated by {uow.actor}")
    return version


async def revoke(uow: UnitOfWork, version: Version, asset: Asset, reason: str) -> Version:
    """Revocation cuts traffic: the gateway drops the version on ``catalog.version.revoked``."""
    await _move(uow, version, asset, "revoke", reason=reason or f"revoked by {uow.actor}")
    return version


# -- reactions to approval's decisions ---------------------------------------------------------


async def _requested_version(
    uow: UnitOfWork, request: RequestState
) -> tuple[Version, Asset] | None:
    payload = AssetPayload.model_validate(request.payload)
    row = await repo.version_by_key(
        uow.session, payload.asset_kind, payload.asset_name, payload.version
    )
    if row is None:
        log.warning(
            "asset request names a version the catalog does not have",
            extra={"request_id": request.request_id, "asset": payload.asset_name},
        )
    return row


async def on_asset_requested(uow: UnitOfWork, request: RequestState) -> None:
    """A request to admit the version was filed: ``draft → submitted``."""
    row = await _requested_version(uow, request)
    if row is None or row[0].status != "draft":
        return
    await _move(
        uow,
        row[0],
        row[1],
        "submit",
        reason=f"asset request {request.request_id}",
        request_id=request.request_id,
    )


async def on_asset_approved(uow: UnitOfWork, request: RequestDecided) -> None:
    """The only way into ``approved``. Repeats and stale requests change nothing."""
    row = await _requested_version(uow, request)
    if row is None:
        return
    version, asset = row
    if version.status not in MOVES["approve"][0]:
        if version.status != "approved":
            log.warning(
                "approved asset request ignored: the version moved on",
                extra={"request_id": request.request_id, "status": version.status},
            )
        return
    await _move(
        uow,
        version,
        asset,
        "approve",
        reason=request.comment or f"asset request {request.request_id} approved",
        request_id=request.request_id,
    )


async def on_asset_closed(uow: UnitOfWork, request: RequestDecided) -> None:
    """Rejected, withdrawn or expired: the version goes back to ``draft`` to be fixed."""
    row = await _requested_version(uow, request)
    if row is None:
        return
    version, asset = row
    if version.status != "submitted" or version.request_id != request.request_id:
        return
    await _move(
        uow,
        version,
        asset,
        "return",
        reason=f"asset request {request.request_id} {request.status}: {request.comment}",
        request_id=request.request_id,
    )
