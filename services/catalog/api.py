"""Catalog HTTP routes: parse, authorise, call the domain, shape the response."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request

from libs.common.auth import Authorized, Principal
from libs.common.db import utcnow
from libs.common.errors import (
    BadRequest,
    Conflict,
    NotFound,
    Problem,
    authenticated_responses,
    problem_responses,
)
from libs.common.events.catalog import ToolRef, VersionState
from libs.common.names import AssetPath
from libs.common.service import SessionDep, UnitOfWorkDep
from services.catalog import domain
from services.catalog import repository as repo
from services.catalog.importers import parse_catalog_yaml, parse_server_jsons, refuse
from services.catalog.models import Asset, Version
from services.catalog.schemas import (
    AssetKind,
    AssetRead,
    CheckRead,
    ImportedVersion,
    ImportResult,
    Snapshot,
    Status,
    StatusChange,
    VersionPage,
    VersionRead,
)

router = APIRouter(prefix="/v1", tags=["catalog"], responses=authenticated_responses())

MAX_IMPORT_BYTES = 10 * 1024 * 1024
VersionIdPath = Annotated[str, Path(pattern=r"^[0-9a-f-]{36}$")]


class PayloadTooLarge(Problem):
    status = 413
    type_ = "payload-too-large"
    title = "Payload too large"


def version_read(version: Version, asset: Asset) -> VersionRead:
    return VersionRead(
        id=version.id,
        asset_id=asset.id,
        kind=asset.kind,
        name=asset.name,
        version=version.version,
        status=version.status,
        description=version.description,
        provider=version.provider,
        tags=list(version.tags),
        tools=[ToolRef.model_validate(t) for t in version.tools],
        spec=version.spec,
        checklist=[CheckRead.model_validate(c) for c in version.checklist],
        source=version.source,
        created_at=version.created_at,
        created_by=version.created_by,
        status_changed_at=version.status_changed_at,
        status_reason=version.status_reason,
        request_id=version.request_id,
    )


async def _body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_IMPORT_BYTES:
        raise PayloadTooLarge(f"an import may be at most {MAX_IMPORT_BYTES} bytes")
    body = await request.body()
    if len(body) > MAX_IMPORT_BYTES:
        raise PayloadTooLarge(f"an import may be at most {MAX_IMPORT_BYTES} bytes")
    if not body.strip():
        raise BadRequest("the request body is empty")
    return body


def _import_result(imported: list[domain.Imported]) -> ImportResult:
    outcomes = [i.outcome for i in imported]
    return ImportResult(
        created=outcomes.count("created"),
        updated=outcomes.count("updated"),
        unchanged=outcomes.count("unchanged"),
        versions=[
            ImportedVersion(
                kind=i.entry.kind,
                name=i.entry.name,
                version=i.entry.version,
                version_id=i.version_id,
                outcome=i.outcome,
            )
            for i in imported
        ],
    )


_YAML_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/yaml": {"schema": {"type": "string"}}},
        "description": "A Kubeflow-shaped catalog source file: models[] and/or mcp_servers[]",
    }
}
_JSON_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {}}},
        "description": "One MCP registry server.json document, or an array of them",
    }
}


@router.post(
    "/imports/catalog",
    openapi_extra=_YAML_BODY,
    responses=problem_responses(PayloadTooLarge),
    tags=["imports"],
)
async def import_catalog(
    request: Request,
    principal: Annotated[Principal, Authorized("catalog.write")],
    uow: UnitOfWorkDep,
    dry_run: bool = False,
) -> ImportResult:
    """Import a GitOps ``catalog.yaml``: new versions arrive as ``draft``; importing the same
    file twice changes nothing; one bad entry refuses the whole file. ``dry_run`` only reports."""
    text = (await _body(request)).decode("utf-8", errors="replace")
    entries = parse_catalog_yaml(text)
    return _import_result(await domain.import_entries(uow, entries, dry_run=dry_run))


@router.post(
    "/imports/mcp-servers",
    openapi_extra=_JSON_BODY,
    responses=problem_responses(PayloadTooLarge),
    tags=["imports"],
)
async def import_mcp_servers(
    request: Request,
    principal: Annotated[Principal, Authorized("catalog.write")],
    uow: UnitOfWorkDep,
    dry_run: bool = False,
) -> ImportResult:
    """Import MCP registry ``server.json`` documents (``jq -s . servers/*.json`` makes a folder
    into one array). ``dry_run`` only reports."""
    try:
        data = json.loads(await _body(request))
    except RecursionError:
        error = {"field": "", "message": "not valid JSON: nested too deeply", "type": "json"}
        raise refuse([error], "server.json import") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        error = {"field": "", "message": f"not valid JSON: {exc}", "type": "json"}
        raise refuse([error], "server.json import") from exc
    documents = data if isinstance(data, list) else [data]
    entries = parse_server_jsons(documents, prefix_index=isinstance(data, list))
    return _import_result(await domain.import_entries(uow, entries, dry_run=dry_run))


@router.get("/catalog")
async def list_catalog(
    principal: Annotated[Principal, Authorized("catalog.read")],
    session: SessionDep,
    kind: AssetKind | None = None,
    status: Annotated[list[Status] | None, Query()] = None,
    tag: Annotated[list[str] | None, Query(max_length=10)] = None,
    provider: Annotated[str | None, Query(max_length=255)] = None,
    q: Annotated[str | None, Query(max_length=200, description="Text in name/description")] = None,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> VersionPage:
    """Search the catalog. ``?status=approved`` is the dropdown: only usable versions."""
    filters = repo.Filters(kind=kind, status=status or (), tag=tag or (), provider=provider, text=q)
    rows = await repo.search(session, filters, cursor, limit)
    page = rows[:limit]
    next_cursor = repo.encode_cursor(*page[-1]) if len(rows) > limit else None
    return VersionPage(items=[version_read(v, a) for v, a in page], next_cursor=next_cursor)


@router.get("/versions/{version_id}", responses=problem_responses(NotFound))
async def get_version(
    version_id: VersionIdPath,
    principal: Annotated[Principal, Authorized("catalog.read")],
    session: SessionDep,
) -> VersionRead:
    return version_read(*await repo.version_by_id(session, version_id))


async def _version(version_id: VersionIdPath, session: SessionDep) -> tuple[Version, Asset]:
    return await repo.version_by_id(session, version_id)


VersionDep = Annotated[tuple[Version, Asset], Depends(_version)]


@router.post("/versions/{version_id}/deprecate", responses=problem_responses(NotFound, Conflict))
async def deprecate_version(
    principal: Annotated[Principal, Authorized("catalog.write")],
    found: VersionDep,
    uow: UnitOfWorkDep,
    body: StatusChange | None = None,
) -> VersionRead:
    version, asset = found
    await domain.deprecate(uow, version, asset, body.reason if body else "")
    return version_read(version, asset)


@router.post("/versions/{version_id}/revoke", responses=problem_responses(NotFound, Conflict))
async def revoke_version(
    principal: Annotated[Principal, Authorized("catalog.write")],
    found: VersionDep,
    uow: UnitOfWorkDep,
    body: StatusChange | None = None,
) -> VersionRead:
    """Revoking cuts traffic: the gateway drops the version when it hears the event."""
    version, asset = found
    await domain.revoke(uow, version, asset, body.reason if body else "")
    return version_read(version, asset)


@router.get("/assets/{kind}/{name:path}", responses=problem_responses(NotFound))
async def get_asset(
    kind: AssetKind,
    name: AssetPath,
    principal: Annotated[Principal, Authorized("catalog.read")],
    session: SessionDep,
) -> AssetRead:
    """An asset and all its versions, by the name every service knows it by."""
    asset = await repo.asset_by_key(session, kind, name)
    if asset is None:
        raise NotFound(f"the catalog has no {kind} {name!r}")
    versions = await repo.versions_of(session, asset)
    return AssetRead(
        id=asset.id,
        kind=kind,
        name=asset.name,
        created_at=asset.created_at,
        versions=[version_read(v, asset) for v in versions],
    )


@router.get("/snapshot", tags=["replica"])
async def snapshot(
    principal: Annotated[Principal, Authorized("catalog.snapshot")], session: SessionDep
) -> Snapshot:
    """Approved versions; the gateway's replica starts here, then follows the events."""
    generated_at = utcnow()
    versions = [VersionState(**domain.version_state(v, a)) for v, a in await repo.approved(session)]
    return Snapshot(generated_at=generated_at, versions=versions)
