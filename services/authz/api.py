"""Authz HTTP routes: parse, authorise, call the domain, shape the response."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError

from libs.common.auth import Authorized, Principal, PrincipalDep, Role, decide
from libs.common.db import Clock
from libs.common.errors import (
    Conflict,
    Forbidden,
    NotFound,
    authenticated_responses,
    problem_responses,
)
from libs.common.events.authz import EntitlementState, KeyState
from libs.common.names import AssetPath, KeyIdPath, SubjectPath
from libs.common.service import SessionDep, UnitOfWorkDep, context
from services.authz import domain
from services.authz import repository as repo
from services.authz.models import ApiKey, Entitlement, Project
from services.authz.schemas import (
    AssetKind,
    AuthorizeRequest,
    AuthorizeResponse,
    EntitlementPut,
    EntitlementRead,
    FallbacksPut,
    KeyCreate,
    KeyCreated,
    KeyRead,
    KeyRotate,
    MemberPut,
    MemberRead,
    PlatformKeyCreate,
    PrincipalRead,
    ProjectCreate,
    ProjectPatch,
    ProjectRead,
    Snapshot,
)

router = APIRouter(prefix="/v1", tags=["authz"], responses=authenticated_responses())


def _pepper(request: Request) -> bytes:
    return context(request).settings.pepper


PepperDep = Annotated[bytes, Depends(_pepper)]


def _now(request: Request) -> datetime:
    """The time of this call, read once from the service's clock (the wall clock, or a test's)."""
    clock: Clock = request.app.state.clock
    return clock()


NowDep = Annotated[datetime, Depends(_now)]


def _ahead(expires_at: datetime | None, now: datetime) -> datetime | None:
    """A new key's expiry must lie ahead of ``now``; refused like any other invalid field."""
    if expires_at is not None and expires_at <= now:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("body", "expires_at"),
                    "msg": "Value error, is in the past",
                    "input": expires_at.isoformat(),
                }
            ]
        )
    return expires_at


def _grace(request: Request, body: KeyRotate | None = None) -> timedelta:
    """The rotation grace period asked for, or the configured default."""
    if body is not None and body.grace_seconds is not None:
        return timedelta(seconds=body.grace_seconds)
    return timedelta(seconds=context(request).settings.key_rotation_grace_seconds)


GraceDep = Annotated[timedelta, Depends(_grace)]


async def _project(project: str, session: SessionDep) -> Project:
    return await repo.project_by_name(session, project)


ProjectDep = Annotated[Project, Depends(_project)]


def _project_read(p: Project) -> ProjectRead:
    return ProjectRead(
        name=p.name, display_name=p.display_name, created_at=p.created_at, created_by=p.created_by
    )


def _key_read(key: ApiKey, project: str | None, now: datetime) -> KeyRead:
    return KeyRead(
        id=key.id,
        name=key.name,
        project=project,
        owner=key.owner,
        role=key.role,
        scopes=list(key.scopes),
        status=domain.key_status(key, now),
        created_at=key.created_at,
        created_by=key.created_by,
        expires_at=key.expires_at,
        revoked_at=key.revoked_at,
        last_used_at=key.last_used_at,
        rotated_to=key.rotated_to,
        service=domain.is_service_key(key),
    )


def _issued(issued: domain.IssuedKey, now: datetime) -> KeyCreated:
    return KeyCreated(**_key_read(issued.key, issued.project, now).model_dump(), key=issued.secret)


def _entitlement_read(e: Entitlement, project: str) -> EntitlementRead:
    return EntitlementRead(
        project=project,
        asset_kind=e.asset_kind,
        asset_name=e.asset_name,
        granted_at=e.granted_at,
        granted_by=e.granted_by,
        reason=e.reason,
        tool_access=e.tool_access,
        tools=e.tools,
        fallbacks=e.fallbacks,
    )


# -- identity ---------------------------------------------------------------------------------


@router.get("/whoami", response_model=PrincipalRead)
async def whoami(principal: PrincipalDep) -> PrincipalRead:
    return PrincipalRead(**principal.to_dict())


@router.post("/authorize", response_model=AuthorizeResponse)
async def authorize(body: AuthorizeRequest, principal: PrincipalDep) -> AuthorizeResponse:
    """May the credential in ``Authorization`` perform ``action`` in ``project``?

    Services forward their caller's credential here; a refusal is an answer (200), not an error.
    """
    decision = decide(principal, body.action, body.project)
    return AuthorizeResponse(
        allowed=decision.allowed,
        reason=decision.reason,
        principal=PrincipalRead(**principal.to_dict()),
    )


# -- projects and members ---------------------------------------------------------------------


@router.post(
    "/projects",
    status_code=201,
    responses=problem_responses(Forbidden, Conflict),
    tags=["projects"],
)
async def create_project(
    body: ProjectCreate,
    principal: Annotated[Principal, Authorized("project.create")],
    uow: UnitOfWorkDep,
) -> ProjectRead:
    return _project_read(await domain.create_project(uow, body.name, body.display_name))


@router.get("/projects", tags=["projects"])
async def list_projects(
    principal: Annotated[Principal, Authorized("project.read")], session: SessionDep
) -> list[ProjectRead]:
    return [_project_read(p) for p in await repo.visible_projects(session, principal)]


@router.get("/projects/{project}", responses=problem_responses(NotFound), tags=["projects"])
async def get_project(
    principal: Annotated[Principal, Authorized("project.read")], project: ProjectDep
) -> ProjectRead:
    return _project_read(project)


@router.patch("/projects/{project}", responses=problem_responses(NotFound), tags=["projects"])
async def update_project(
    body: ProjectPatch,
    principal: Annotated[Principal, Authorized("project.update")],
    project: ProjectDep,
    uow: UnitOfWorkDep,
) -> ProjectRead:
    """Rename a project for people (its ``name`` stays)."""
    return _project_read(await domain.rename_project(uow, project, body.display_name))


@router.get("/projects/{project}/members", tags=["members"], responses=problem_responses(NotFound))
async def list_members(
    principal: Annotated[Principal, Authorized("member.read")],
    project: ProjectDep,
    session: SessionDep,
) -> list[MemberRead]:
    return [
        MemberRead(subject=m.subject, role=m.role, created_at=m.created_at)
        for m in await repo.members(session, project)
    ]


@router.put(
    "/projects/{project}/members/{subject}", tags=["members"], responses=problem_responses(NotFound)
)
async def put_member(
    subject: SubjectPath,
    body: MemberPut,
    principal: Annotated[Principal, Authorized("member.write")],
    project: ProjectDep,
    uow: UnitOfWorkDep,
    now: NowDep,
) -> MemberRead:
    member = await domain.put_member(uow, project, subject, Role(body.role), now=now)
    return MemberRead(subject=member.subject, role=member.role, created_at=member.created_at)


@router.delete(
    "/projects/{project}/members/{subject}",
    status_code=204,
    tags=["members"],
    responses=problem_responses(NotFound),
)
async def remove_member(
    subject: SubjectPath,
    principal: Annotated[Principal, Authorized("member.write")],
    project: ProjectDep,
    uow: UnitOfWorkDep,
    now: NowDep,
) -> Response:
    await domain.remove_member(uow, project, subject, now=now)
    return Response(status_code=204)


# -- project keys -----------------------------------------------------------------------------


@router.get("/projects/{project}/keys", tags=["keys"], responses=problem_responses(NotFound))
async def list_keys(
    principal: Annotated[Principal, Authorized("key.read")],
    project: ProjectDep,
    session: SessionDep,
    now: NowDep,
) -> list[KeyRead]:
    """Project-admins see every key of the project; others see their own."""
    role = principal.role_in(project.name)
    owner = None if role and role.at_least(Role.PROJECT_ADMIN) else principal.subject
    return [_key_read(k, project.name, now) for k in await repo.keys_in(session, project, owner)]


@router.post(
    "/projects/{project}/keys",
    status_code=201,
    tags=["keys"],
    responses=problem_responses(NotFound),
)
async def create_key(
    body: KeyCreate,
    principal: Annotated[Principal, Authorized("key.write")],
    project: ProjectDep,
    uow: UnitOfWorkDep,
    pepper: PepperDep,
    now: NowDep,
) -> KeyCreated:
    issued = await domain.create_project_key(
        uow,
        pepper,
        principal,
        project,
        name=body.name,
        scopes=body.scopes,
        role=Role(body.role) if body.role else None,
        owner=body.owner,
        expires_at=_ahead(body.expires_at, now),
        now=now,
    )
    return _issued(issued, now)


@router.post(
    "/projects/{project}/keys/{key_id}/rotate",
    status_code=201,
    tags=["keys"],
    responses=problem_responses(NotFound, Conflict),
)
async def rotate_key(
    key_id: KeyIdPath,
    principal: Annotated[Principal, Authorized("key.write")],
    project: ProjectDep,
    uow: UnitOfWorkDep,
    pepper: PepperDep,
    grace: GraceDep,
    now: NowDep,
) -> KeyCreated:
    key = await domain.find_key(uow, principal, project, key_id, for_update=True)
    return _issued(await domain.rotate_key(uow, pepper, key, project, grace, now=now), now)


@router.delete(
    "/projects/{project}/keys/{key_id}",
    tags=["keys"],
    responses=problem_responses(NotFound, Conflict),
)
async def revoke_key(
    key_id: KeyIdPath,
    principal: Annotated[Principal, Authorized("key.write")],
    project: ProjectDep,
    uow: UnitOfWorkDep,
    now: NowDep,
) -> KeyRead:
    key = await domain.find_key(uow, principal, project, key_id, for_update=True)
    revoked = await domain.revoke_key(uow, key, project.name, now=now)
    return _key_read(revoked, project.name, now)


# -- platform keys (act as platform-admin; only platform-admins manage them) ------------------


@router.get("/platform/keys", tags=["keys"])
async def list_platform_keys(
    principal: Annotated[Principal, Authorized("platform_key.write")],
    session: SessionDep,
    now: NowDep,
) -> list[KeyRead]:
    return [_key_read(k, None, now) for k in await repo.keys_in(session, None)]


@router.post("/platform/keys", status_code=201, tags=["keys"])
async def create_platform_key(
    body: PlatformKeyCreate,
    principal: Annotated[Principal, Authorized("platform_key.write")],
    uow: UnitOfWorkDep,
    pepper: PepperDep,
    now: NowDep,
) -> KeyCreated:
    issued = await domain.create_platform_key(
        uow,
        pepper,
        principal,
        name=body.name,
        scopes=body.scopes,
        expires_at=_ahead(body.expires_at, now),
        now=now,
    )
    return _issued(issued, now)


@router.post(
    "/platform/keys/{key_id}/rotate",
    status_code=201,
    tags=["keys"],
    responses=problem_responses(NotFound, Conflict),
)
async def rotate_platform_key(
    key_id: KeyIdPath,
    principal: Annotated[Principal, Authorized("platform_key.write")],
    uow: UnitOfWorkDep,
    pepper: PepperDep,
    grace: GraceDep,
    now: NowDep,
) -> KeyCreated:
    key = await domain.find_key(uow, principal, None, key_id, for_update=True)
    return _issued(await domain.rotate_key(uow, pepper, key, None, grace, now=now), now)


@router.delete(
    "/platform/keys/{key_id}", tags=["keys"], responses=problem_responses(NotFound, Conflict)
)
async def revoke_platform_key(
    key_id: KeyIdPath,
    principal: Annotated[Principal, Authorized("platform_key.write")],
    uow: UnitOfWorkDep,
    now: NowDep,
    force: Annotated[
        bool, Query(description="Revoke a service's own key too (a leaked one)")
    ] = False,
) -> KeyRead:
    """Revoke a platform key. A service's key (``service``) only with ``force``: the service is
    cut off until its deployment gets a new key."""
    key = await domain.find_key(uow, principal, None, key_id, for_update=True)
    return _key_read(await domain.revoke_key(uow, key, None, now=now, force=force), None, now)


# -- entitlements -----------------------------------------------------------------------------


@router.get(
    "/projects/{project}/entitlements", tags=["entitlements"], responses=problem_responses(NotFound)
)
async def list_entitlements(
    principal: Annotated[Principal, Authorized("entitlement.read")],
    project: ProjectDep,
    session: SessionDep,
) -> list[EntitlementRead]:
    return [
        _entitlement_read(e, project.name) for e in await repo.entitlements_of(session, project)
    ]


@router.put(
    "/projects/{project}/entitlements/{asset_kind}/{asset_name:path}",
    tags=["entitlements"],
    responses={
        201: {"description": "Granted now (200: it already was, or what it covers changed)"},
        **problem_responses(NotFound),
    },
)
async def grant_entitlement(
    asset_kind: AssetKind,
    asset_name: AssetPath,
    principal: Annotated[Principal, Authorized("entitlement.write")],
    project: ProjectDep,
    uow: UnitOfWorkDep,
    response: Response,
    body: EntitlementPut | None = None,
) -> EntitlementRead:
    body = body or EntitlementPut()
    limits = domain.ToolLimits(tool_access=body.tool_access, tools=body.tools)
    entitlement, created = await domain.grant_entitlement(
        uow, project, asset_kind, asset_name, body.reason, limits
    )
    response.status_code = 201 if created else 200
    return _entitlement_read(entitlement, project.name)


@router.put(
    "/projects/{project}/fallbacks/{model:path}",
    tags=["entitlements"],
    responses=problem_responses(NotFound),
)
async def set_fallbacks(
    model: AssetPath,
    body: FallbacksPut,
    principal: Annotated[Principal, Authorized("project.update")],
    project: ProjectDep,
    uow: UnitOfWorkDep,
) -> EntitlementRead:
    """The project's fallback chain for a model it is entitled to (a project admin's choice):
    gateway model names tried in order when the model cannot serve a call. The gateway uses a
    fallback only while the project is entitled to it and it has an approved version."""
    entitlement = await domain.set_fallbacks(uow, project, model, body.chain)
    return _entitlement_read(entitlement, project.name)


@router.delete(
    "/projects/{project}/entitlements/{asset_kind}/{asset_name:path}",
    status_code=204,
    tags=["entitlements"],
    responses=problem_responses(NotFound),
)
async def revoke_entitlement(
    asset_kind: AssetKind,
    asset_name: AssetPath,
    principal: Annotated[Principal, Authorized("entitlement.write")],
    project: ProjectDep,
    uow: UnitOfWorkDep,
) -> Response:
    await domain.revoke_entitlement(uow, project, asset_kind, asset_name)
    return Response(status_code=204)


# -- replica feed for the gateway -------------------------------------------------------------


@router.get(
    "/snapshot",
    tags=["replica"],
    response_model=Snapshot,
    responses={304: {"description": "Nothing changed since the revision in If-None-Match"}},
)
async def snapshot(
    principal: Annotated[Principal, Authorized("key.snapshot")],
    session: SessionDep,
    now: NowDep,
    response: Response,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Snapshot | Response:
    """Active keys (digests only) and entitlements; the gateway follows ``authz.*`` events after.
    The ETag is the replica revision: with ``If-None-Match`` set to it, an unchanged replica is a
    304 for one row read (what a gateway polls while the events cannot reach it)."""
    # Read before the rows: a change committed in between shows in the rows and, at the next
    # poll, as a newer revision; never the other way round.
    revision = await repo.replica_revision(session)
    etag = f'"{revision}"'
    if if_none_match is not None and etag in (t.strip() for t in if_none_match.split(",")):
        return Response(status_code=304, headers={"ETag": etag})
    response.headers["ETag"] = etag
    keys = [KeyState(**domain.key_state(k, p)) for k, p in await repo.active_keys(session, now)]
    entitlements = [
        EntitlementState(
            project=p,
            asset_kind=e.asset_kind,
            asset_name=e.asset_name,
            tool_access=e.tool_access,
            tools=e.tools,
            fallbacks=e.fallbacks,
        )
        for e, p in await repo.all_entitlements(session)
    ]
    return Snapshot(generated_at=now, revision=revision, keys=keys, entitlements=entitlements)
