"""Inference HTTP routes: parse, authorise, call the domain, shape the response."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request

from libs.common.auth import Authorized, Principal, credential_from, decide
from libs.common.db import utcnow
from libs.common.errors import (
    Conflict,
    Forbidden,
    NotFound,
    Unprocessable,
    authenticated_responses,
    problem_responses,
)
from libs.common.events.inference import EndpointState, seal_credential, seal_environment
from libs.common.mcp_packages import PackageProblem
from libs.common.names import ProjectPath
from libs.common.netpolicy import AddressDenied
from libs.common.service import SessionDep, UnitOfWorkDep
from services.inference import domain
from services.inference import repository as repo
from services.inference.models import Endpoint
from services.inference.plane import Plane
from services.inference.schemas import (
    EndpointCreate,
    EndpointRead,
    LeadTime,
    PoolRead,
    PoolType,
    RoutesSnapshot,
    Scale,
)

router = APIRouter(prefix="/v1", tags=["inference"], responses=authenticated_responses())

EndpointIdPath = Annotated[str, Path(pattern=r"^[0-9a-f-]{36}$")]


def _plane(request: Request) -> Plane:
    plane: Plane = request.app.state.plane
    return plane


PlaneDep = Annotated[Plane, Depends(_plane)]


async def _endpoint(
    project: ProjectPath, endpoint_id: EndpointIdPath, session: SessionDep
) -> Endpoint:
    return await repo.endpoint_in(session, project, endpoint_id)


EndpointDep = Annotated[Endpoint, Depends(_endpoint)]


async def _endpoint_for_update(
    project: ProjectPath, endpoint_id: EndpointIdPath, session: SessionDep
) -> Endpoint:
    return await repo.endpoint_in(session, project, endpoint_id, for_update=True)


# For the routes that change an endpoint: its row stays locked until the change commits.
LockedEndpointDep = Annotated[Endpoint, Depends(_endpoint_for_update)]


def _field_error(field: str, message: str) -> Unprocessable:
    return Unprocessable(
        f"{field}: {message}", errors=[{"field": field, "message": message, "type": "value_error"}]
    )


def _check_local_replicas(plane: Plane, runtime: str, replicas: int) -> None:
    most = plane.config.local_max_replicas
    if runtime == "local" and replicas > most:
        raise _field_error("replicas", f"the local runtime runs at most {most} replicas here")


def endpoint_read(e: Endpoint) -> EndpointRead:
    lead = (e.ready_at - e.requested_at).total_seconds() if e.ready_at else None
    return EndpointRead(
        id=e.id,
        project=e.project,
        asset_kind=e.asset_kind,
        model_name=e.asset_name,
        version=e.version,
        source_uri=e.source_uri,
        runtime=e.runtime,
        profile=e.profile,
        replicas=e.replicas,
        gpus=e.gpus,
        gpu_type=e.gpu_type,
        served_model_name=e.served_model_name,
        route_name=e.route_name,
        network_exposure=e.network_exposure,
        status=e.status,
        reason=e.reason,
        upstream_url=e.upstream_url,
        upstream_urls=e.upstream_urls or [],
        has_upstream_credential=e.upstream_credential is not None,
        owner=e.owner,
        request_id=e.request_id,
        requested_at=e.requested_at,
        approved_at=e.approved_at,
        ready_at=e.ready_at,
        created_at=e.created_at,
        status_changed_at=e.status_changed_at,
        deleted_at=e.deleted_at,
        lead_time_seconds=lead,
    )


# -- endpoints --------------------------------------------------------------------------------


@router.get("/projects/{project}/endpoints", tags=["endpoints"])
async def list_endpoints(
    project: ProjectPath,
    principal: Annotated[Principal, Authorized("endpoint.read")],
    session: SessionDep,
    include_deleted: bool = False,
) -> list[EndpointRead]:
    rows = await repo.endpoints_of(session, project, include_deleted=include_deleted)
    return [endpoint_read(e) for e in rows]


@router.post(
    "/projects/{project}/endpoints",
    status_code=201,
    responses=problem_responses(Forbidden, Conflict),
    tags=["endpoints"],
)
async def create_endpoint(
    project: ProjectPath,
    body: EndpointCreate,
    request: Request,
    principal: Annotated[Principal, Authorized("endpoint.manage")],
    uow: UnitOfWorkDep,
    plane: PlaneDep,
) -> EndpointRead:
    """Deploy an approved catalog version now, within the GPU pool and the project's allowance.

    The catalog is asked with the caller's own credential (never more power than theirs).
    """
    profiles = plane.config.local_profiles
    _check_local_replicas(plane, body.runtime, body.replicas)
    if body.runtime == "local" and body.profile is not None and body.profile not in profiles:
        known = sorted(profiles)
        raise _field_error("profile", f"no local runtime profile {body.profile!r}; known: {known}")
    if body.upstream_url is not None:
        try:
            await plane.address_policy.check_url(body.upstream_url)
        except AddressDenied as exc:
            raise _field_error("upstream_url", str(exc)) from None
    found = await plane.catalog_version(
        credential_from(request) or "", body.asset_kind, body.model_name, body.version
    )
    if found is None:
        raise _field_error("version", f"the catalog has no {body.model_name}@{body.version}")
    if found.status != "approved" or await repo.is_revoked(
        uow.session, body.model_name, body.version
    ):
        raise Conflict(
            f"{body.model_name}@{body.version} is {found.status}; only approved versions deploy"
        )
    sealed = None
    if body.upstream_api_key is not None:
        sealed = seal_credential(plane.credential_key, body.upstream_api_key.get_secret_value())
    mcp = body.asset_kind == "mcp_server"
    sealed_environment = None
    if mcp:
        if found.package is None:
            raise _field_error("model_name", "the MCP server version has no stdio package to run")
        try:
            found.package.check_runtime(body.runtime)
        except PackageProblem as problem:
            raise _field_error("runtime", str(problem)) from None
        given = {k: v.get_secret_value() for k, v in (body.environment or {}).items()}
        try:
            values = found.package.check_environment(given)
        except PackageProblem as problem:
            raise _field_error("environment", str(problem)) from None
        sealed_environment = seal_environment(plane.credential_key, values)
    new = domain.NewEndpoint(
        project=project,
        owner=principal.subject,
        asset_kind=body.asset_kind,
        package=found.package.as_dict() if found.package else None,
        sealed_environment=sealed_environment,
        asset_name=body.model_name,
        version=body.version,
        runtime=body.runtime,
        replicas=body.replicas,
        gpus=body.gpus,
        gpu_type=body.gpu_type,
        profile=plane.config.profile_for(found.serving_runtime, body.profile)
        if body.runtime == "local" and not mcp
        else None,
        served_model_name=body.served_model_name,
        route_name=body.route_name,
        network_exposure=body.network_exposure,
        source_uri=found.source_uri,
        upstream_url=body.upstream_url,
        sealed_credential=sealed,
    )
    endpoint = await domain.create_endpoint(uow, plane.pool, new)
    plane.reconciler.wake_on_commit(uow.session)
    return endpoint_read(endpoint)


@router.get(
    "/projects/{project}/endpoints/{endpoint_id}",
    responses=problem_responses(NotFound),
    tags=["endpoints"],
)
async def get_endpoint(
    principal: Annotated[Principal, Authorized("endpoint.read")], endpoint: EndpointDep
) -> EndpointRead:
    return endpoint_read(endpoint)


@router.post(
    "/projects/{project}/endpoints/{endpoint_id}/scale",
    responses=problem_responses(Forbidden, NotFound, Conflict),
    tags=["endpoints"],
)
async def scale_endpoint(
    body: Scale,
    principal: Annotated[Principal, Authorized("endpoint.manage")],
    endpoint: LockedEndpointDep,
    uow: UnitOfWorkDep,
    plane: PlaneDep,
) -> EndpointRead:
    """Set the replicas (within the pool); 0 stops it, and more than 0 starts a stopped one."""
    _check_local_replicas(plane, endpoint.runtime, body.replicas)
    await domain.scale(uow, plane.pool, endpoint, body.replicas)
    plane.reconciler.wake_on_commit(uow.session)
    return endpoint_read(endpoint)


@router.post(
    "/projects/{project}/endpoints/{endpoint_id}/stop",
    responses=problem_responses(Forbidden, NotFound, Conflict),
    tags=["endpoints"],
)
async def stop_endpoint(
    principal: Annotated[Principal, Authorized("endpoint.manage")],
    endpoint: LockedEndpointDep,
    uow: UnitOfWorkDep,
    plane: PlaneDep,
) -> EndpointRead:
    """Release the runtime and the GPUs, keep the endpoint; scale it up to start it again."""
    await domain.stop(uow, endpoint)
    plane.reconciler.wake_on_commit(uow.session)
    return endpoint_read(endpoint)


@router.delete(
    "/projects/{project}/endpoints/{endpoint_id}",
    status_code=202,
    responses=problem_responses(Forbidden, NotFound),
    tags=["endpoints"],
)
async def delete_endpoint(
    principal: Annotated[Principal, Authorized("endpoint.manage")],
    endpoint: LockedEndpointDep,
    uow: UnitOfWorkDep,
    plane: PlaneDep,
) -> EndpointRead:
    """The route goes at once (``deleting``); ``deleted`` follows when the runtime is clean."""
    await domain.delete(uow, endpoint, f"deleted by {uow.actor}")
    plane.reconciler.wake_on_commit(uow.session)
    return endpoint_read(endpoint)


# -- the pool, lead time, and the gateway's snapshot ------------------------------------------


@router.get("/gpu-pool", tags=["pool"])
async def gpu_pool(
    principal: Annotated[Principal, Authorized("endpoint.read")],
    session: SessionDep,
    plane: PlaneDep,
) -> PoolRead:
    """The pool by type (total, used, free) and what each project holds (the projects the
    caller may read; every project for platform admins)."""
    usage = await repo.pool_usage(session)
    types = {
        t: PoolType(total=total, used=usage.by_type.get(t, 0), free=total - usage.by_type.get(t, 0))
        for t, total in sorted(plane.pool.total.items())
    }
    projects = {
        p: held
        for p, held in sorted(usage.by_project.items())
        if decide(principal, "endpoint.read", p).allowed
    }
    return PoolRead(types=types, projects=projects, project_limit=plane.config.project_gpu_limit)


@router.get("/stats/lead-time", tags=["stats"])
async def lead_time(
    principal: Annotated[Principal, Authorized("endpoint.read")], session: SessionDep
) -> LeadTime:
    """Request filed → ready (and approved → ready), median and p90, over the endpoints the
    caller may see that reached ready."""
    rows = await repo.ready_once(session, principal)
    request_to_ready = [(e.ready_at - e.requested_at).total_seconds() for e in rows if e.ready_at]
    approval_to_ready = [(e.ready_at - e.approved_at).total_seconds() for e in rows if e.ready_at]
    return LeadTime(
        endpoints=len(rows),
        request_to_ready_median_seconds=domain.median(request_to_ready),
        request_to_ready_p90_seconds=domain.percentile(request_to_ready, 90),
        approval_to_ready_median_seconds=domain.median(approval_to_ready),
        approval_to_ready_p90_seconds=domain.percentile(approval_to_ready, 90),
    )


@router.get("/routes", tags=["replica"])
async def routes(
    principal: Annotated[Principal, Authorized("route.snapshot")], session: SessionDep
) -> RoutesSnapshot:
    """Every ready endpoint; the gateway starts here, then follows ``inference.endpoint.*``."""
    generated_at = utcnow()
    ready = [EndpointState(**domain.event_state(e)) for e in await repo.routes(session)]
    return RoutesSnapshot(generated_at=generated_at, routes=ready)
