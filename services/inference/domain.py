"""Inference rules and state changes: creating endpoints within the GPU pool, their lifecycle
``provisioning → ready | failed``, ``stopped``, ``deleting → deleted``, and the reactions to
approvals and revocations.

Every change emits its ``inference.endpoint.<status>`` event (with the full routable state) and
an audit record in the same transaction. The reconciler does the slow work (runtimes) and
reports back through the ``runtime_*`` functions here, which only move an endpoint along a
permitted transition (a stale report changes nothing).
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import Counter, Histogram
from sqlalchemy import event as sa_event
from sqlalchemy.orm.attributes import flag_modified

from libs.common.db import new_id, utcnow
from libs.common.errors import Conflict, Unprocessable
from libs.common.events.approval import EndpointPayload, RequestApproved
from libs.common.events.inference import EVENTS_BY_STATUS, HOLDS_GPUS
from libs.common.mcp_packages import StdioPackage
from libs.common.uow import UnitOfWork
from services.inference import repository as repo
from services.inference.models import Endpoint

log = logging.getLogger("steward.inference")

SYSTEM = "steward-inference"

TRANSITIONS_TOTAL = Counter(
    "steward_inference_endpoint_transitions_total",
    "Endpoint status changes, by runtime and new status",
    ["runtime", "status"],
)
REQUEST_TO_READY = Histogram(
    "steward_inference_request_to_ready_seconds",
    "Lead time of endpoints from request filed to first ready",
    ["runtime"],
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400, 30 * 86400),
)

# status → the statuses it may move to.
TRANSITIONS: dict[str, frozenset[str]] = {
    "provisioning": frozenset({"ready", "failed", "stopped", "deleting", "provisioning"}),
    "ready": frozenset({"provisioning", "failed", "stopped", "deleting", "ready"}),
    "failed": frozenset({"deleting"}),
    "stopped": frozenset({"provisioning", "deleting"}),
    "deleting": frozenset({"deleted"}),
    "deleted": frozenset(),
}


@dataclass(frozen=True)
class CatalogVersion:
    """What inference needs from the catalog about one model or MCP server version."""

    status: str
    source_uri: str | None
    # The engine the catalog says serves it (``serving.runtime``: vllm, llama.cpp…).
    serving_runtime: str | None = None
    # An MCP server: its first stdio package (None: it has none to run).
    package: StdioPackage | None = None


# Asks the catalog about (kind, name, version): None when the asset or version is unknown.
VersionLookup = Callable[[str, str, str], Awaitable[CatalogVersion | None]]


@dataclass(frozen=True)
class NewEndpoint:
    project: str
    owner: str
    asset_name: str
    version: str
    runtime: str
    replicas: int
    gpus: int
    asset_kind: str = "model"
    package: dict[str, Any] | None = None
    sealed_environment: str | None = None
    gpu_type: str = "any"
    profile: str | None = None
    served_model_name: str | None = None
    route_name: str | None = None
    network_exposure: str = "project"
    source_uri: str | None = None
    upstream_url: str | None = None
    sealed_credential: str | None = None
    request_id: str | None = None
    plan: dict[str, Any] | None = None
    requested_at: datetime | None = None
    approved_at: datetime | None = None


@dataclass(frozen=True)
class Pool:
    """The configured GPU pool and the per-project allowances."""

    total: Mapping[str, int]
    project_limit: Callable[[str], int | None] = lambda _project: None


class CapacityExceeded(Conflict):
    type_ = "capacity-exceeded"
    title = "Not enough GPUs"


# -- reading ----------------------------------------------------------------------------------


def event_state(endpoint: Endpoint) -> dict[str, Any]:
    """The fields of every ``inference.endpoint.*`` event and of the routes snapshot."""
    return {
        "endpoint_id": endpoint.id,
        "project": endpoint.project,
        "status": endpoint.status,
        "route_name": endpoint.route_name,
        "served_model_name": endpoint.served_model_name,
        "asset_kind": endpoint.asset_kind,
        "asset_name": endpoint.asset_name,
        "version": endpoint.version,
        "runtime": endpoint.runtime,
        "upstream_url": endpoint.upstream_url,
        "upstream_urls": endpoint.upstream_urls or [],
        "upstream_credential": endpoint.upstream_credential,
        "network_exposure": endpoint.network_exposure,
        "replicas": endpoint.replicas,
        "gpus": endpoint.gpus,
        "gpu_type": endpoint.gpu_type,
        "reason": endpoint.reason,
        "request_id": endpoint.request_id,
        "changed_at": endpoint.status_changed_at,
    }


def _summary(endpoint: Endpoint) -> dict[str, Any]:
    """What the audit log keeps: never the credential, sealed or not."""
    return {
        "status": endpoint.status,
        "reason": endpoint.reason,
        "replicas": endpoint.replicas,
        "gpus": endpoint.gpus,
        "gpu_type": endpoint.gpu_type,
        "upstream_url": endpoint.upstream_url,
        "route_name": endpoint.route_name,
    }


def target(endpoint: Endpoint) -> str:
    return f"endpoint/{endpoint.id}"


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50)


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile (what a person reading "p90" expects), None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


# -- GPU pool ---------------------------------------------------------------------------------


def _free(pool: Pool, usage: repo.PoolUsage) -> dict[str, int]:
    return {t: total - usage.by_type.get(t, 0) for t, total in sorted(pool.total.items())}


def describe_free(pool: Pool, usage: repo.PoolUsage) -> str:
    free = _free(pool, usage)
    return ", ".join(f"{t}: {n} of {pool.total[t]}" for t, n in free.items()) or "no GPU pool"


def allocate(
    pool: Pool, usage: repo.PoolUsage, project: str, gpus: int, replicas: int, wanted: str
) -> str | None:
    """The GPU type to run on, or a refusal that names what is free. None when no GPU is needed."""
    need = gpus * replicas
    if need == 0:
        return None
    if wanted != "any" and wanted not in pool.total:
        raise Unprocessable(
            f"the GPU pool has no type {wanted!r}; it has {sorted(pool.total)} (or ask for 'any')"
        )
    free = _free(pool, usage)
    limit = pool.project_limit(project)
    held = usage.project_total(project)
    if limit is not None and held + need > limit:
        raise CapacityExceeded(
            f"project {project!r} may hold {limit} GPUs and holds {held}; this needs {need} "
            f"({replicas} replica(s) x {gpus})",
            free=free,
            project_limit=limit,
            project_held=held,
        )
    candidates = [wanted] if wanted != "any" else sorted(free, key=lambda t: (-free[t], t))
    for gpu_type in candidates:
        if free[gpu_type] >= need:
            return gpu_type
    raise CapacityExceeded(
        f"not enough free GPUs: this needs {need} ({replicas} replica(s) x {gpus} of type "
        f"{wanted}); free: {describe_free(pool, usage)}",
        free=free,
    )


def _without(usage: repo.PoolUsage, endpoint: Endpoint) -> repo.PoolUsage:
    """Usage as if this endpoint held nothing (to re-check it at a new size)."""
    if endpoint.status not in HOLDS_GPUS or not endpoint.gpu_type:
        return usage
    held = endpoint.gpus * endpoint.replicas
    by_type = dict(usage.by_type)
    by_type[endpoint.gpu_type] = by_type.get(endpoint.gpu_type, 0) - held
    by_project = {p: dict(v) for p, v in usage.by_project.items()}
    mine = by_project.setdefault(endpoint.project, {})
    mine[endpoint.gpu_type] = mine.get(endpoint.gpu_type, 0) - held
    return repo.PoolUsage(by_type=by_type, by_project=by_project)


# -- status changes ---------------------------------------------------------------------------


async def _set_status(
    uow: UnitOfWork, endpoint: Endpoint, status: str, reason: str = "", action: str | None = None
) -> None:
    if status not in TRANSITIONS[endpoint.status]:
        raise Conflict(f"endpoint {endpoint.id} is {endpoint.status}; it cannot become {status}")
    before = _summary(endpoint)
    now = utcnow()
    endpoint.status = status
    endpoint.reason = reason[:2000]
    endpoint.status_changed_at = now
    first_ready = status == "ready" and endpoint.ready_at is None
    if first_ready:
        endpoint.ready_at = now
    if status == "provisioning":
        endpoint.released = False
        flag_modified(endpoint, "released")  # written even if this session read it False
    if status == "deleted":
        endpoint.deleted_at = now
        endpoint.released = True
    await uow.session.flush()
    _count_after_commit(uow, endpoint, first_ready)
    await uow.emit(EVENTS_BY_STATUS[status](**event_state(endpoint)), entity=endpoint.id)
    await uow.audit(
        action or f"endpoint.{status}",
        target(endpoint),
        project=endpoint.project,
        before=before,
        after=_summary(endpoint),
    )


def _count_after_commit(uow: UnitOfWork, endpoint: Endpoint, first_ready: bool) -> None:
    """Metrics count what committed, not what a rolled-back transaction tried."""
    runtime, status = endpoint.runtime, endpoint.status
    lead = None
    if first_ready and endpoint.ready_at is not None:
        lead = (endpoint.ready_at - endpoint.requested_at).total_seconds()

    def observe(_session: object) -> None:
        TRANSITIONS_TOTAL.labels(runtime, status).inc()
        if lead is not None:
            REQUEST_TO_READY.labels(runtime).observe(lead)

    sa_event.listen(uow.session.sync_session, "after_commit", observe, once=True)


def _default_names(new: NewEndpoint) -> tuple[str, list[str]]:
    """The served model name and route names to try, most wanted first."""
    served = new.served_model_name or new.asset_name
    if new.route_name:
        return served, [new.route_name]
    base = f"{new.project}/{new.asset_name}"
    names = [base, f"{base}@{new.version}", f"{base}@{new.version}-{secrets.token_hex(3)}"]
    return served, [_fit(name) for name in names]


def _fit(name: str, limit: int = 255) -> str:
    """Route names are at most 255 characters (the gateway's and the table's limit)."""
    if len(name) <= limit:
        return name
    return name[: limit - 7] + "-" + hashlib.sha256(name.encode()).hexdigest()[:6]


async def _route_name(uow: UnitOfWork, candidates: list[str], explicit: bool) -> str:
    for name in candidates:
        if not await repo.live_route_taken(uow.session, name):
            return name
    if explicit:
        raise Conflict(f"the route name {candidates[0]!r} is taken by a live endpoint")
    return candidates[-1]


def _runtime_name(endpoint_id: str) -> str:
    """A DNS-1035 label for Kubernetes objects: the random tail of the UUIDv7."""
    return "ep-" + endpoint_id.replace("-", "")[-12:]


async def create_endpoint(
    uow: UnitOfWork, pool: Pool, new: NewEndpoint, *, fail_softly: bool = False
) -> Endpoint:
    """A new endpoint in ``provisioning`` (the reconciler takes it from there).

    When the pool cannot hold it: refused (409, naming what is free), or, for an approval that
    cannot be refused any more (``fail_softly``), recorded as ``failed`` with that reason.
    """
    now = utcnow()
    served, candidates = _default_names(new)
    route = await _route_name(uow, candidates, explicit=new.route_name is not None)
    await repo.lock_pool(uow.session)
    usage = await repo.pool_usage(uow.session)
    failure = ""
    gpu_type: str | None = None
    try:
        gpu_type = allocate(pool, usage, new.project, new.gpus, new.replicas, new.gpu_type)
    except (CapacityExceeded, Unprocessable) as problem:
        if not fail_softly:
            raise
        failure = problem.detail
    endpoint_id = new_id()
    endpoint = Endpoint(
        id=endpoint_id,
        project=new.project,
        asset_kind=new.asset_kind,
        asset_name=new.asset_name,
        version=new.version,
        source_uri=new.source_uri,
        package=new.package,
        sealed_environment=new.sealed_environment,
        runtime=new.runtime,
        profile=new.profile,
        replicas=new.replicas,
        gpus=new.gpus,
        gpu_type=gpu_type,
        served_model_name=served,
        route_name=route,
        network_exposure=new.network_exposure,
        status="provisioning",
        reason="",
        upstream_url=new.upstream_url,
        upstream_credential=new.sealed_credential,
        runtime_name=_runtime_name(endpoint_id),
        released=False,
        owner=new.owner,
        request_id=new.request_id,
        plan={**(new.plan or {}), "gpu_type": new.gpu_type},
        requested_at=new.requested_at or now,
        approved_at=new.approved_at or now,
        created_at=now,
        status_changed_at=now,
    )
    uow.session.add(endpoint)
    await uow.session.flush()
    await uow.emit(EVENTS_BY_STATUS["provisioning"](**event_state(endpoint)), entity=endpoint.id)
    await uow.audit(
        "endpoint.create",
        target(endpoint),
        project=endpoint.project,
        after={
            **_summary(endpoint),
            "model": f"{endpoint.asset_name}@{endpoint.version}",
            "runtime": endpoint.runtime,
            "request_id": endpoint.request_id,
        },
    )
    if failure:
        endpoint.released = True
        await _set_status(uow, endpoint, "failed", failure)
    return endpoint


async def scale(uow: UnitOfWork, pool: Pool, endpoint: Endpoint, replicas: int) -> Endpoint:
    """Change the replicas; 0 stops the endpoint, and a stopped one starts again at > 0."""
    if endpoint.status in ("failed", "deleting", "deleted"):
        raise Conflict(f"endpoint {endpoint.id} is {endpoint.status}; it cannot be scaled")
    if replicas == 0:
        return await stop(uow, endpoint)
    if replicas == endpoint.replicas and endpoint.status != "stopped":
        return endpoint
    await repo.lock_pool(uow.session)
    usage = _without(await repo.pool_usage(uow.session), endpoint)
    wanted = endpoint.gpu_type or str((endpoint.plan or {}).get("gpu_type", "any"))
    if endpoint.status == "stopped":
        wanted = str((endpoint.plan or {}).get("gpu_type", "any"))
    gpu_type = allocate(pool, usage, endpoint.project, endpoint.gpus, replicas, wanted)
    before = endpoint.replicas
    endpoint.replicas = replicas
    endpoint.gpu_type = gpu_type
    if endpoint.status == "stopped":
        await _set_status(
            uow, endpoint, "provisioning", f"started by {uow.actor}", "endpoint.start"
        )
        return endpoint
    await uow.session.flush()
    await uow.emit(EVENTS_BY_STATUS[endpoint.status](**event_state(endpoint)), entity=endpoint.id)
    await uow.audit(
        "endpoint.scale",
        target(endpoint),
        project=endpoint.project,
        before={"replicas": before},
        after={"replicas": replicas, "gpu_type": gpu_type},
    )
    return endpoint


async def stop(uow: UnitOfWork, endpoint: Endpoint) -> Endpoint:
    """Release the endpoint's runtime and GPUs but keep it, to start again by scaling up."""
    if endpoint.status == "stopped":
        return endpoint
    if endpoint.status not in ("provisioning", "ready"):
        raise Conflict(f"endpoint {endpoint.id} is {endpoint.status}; only a running one stops")
    await _set_status(uow, endpoint, "stopped", f"stopped by {uow.actor}")
    return endpoint


async def delete(uow: UnitOfWork, endpoint: Endpoint, reason: str) -> Endpoint:
    """Begin the teardown: the route goes at once, the runtime's resources soon after."""
    if endpoint.status in ("deleting", "deleted"):
        return endpoint
    await _set_status(uow, endpoint, "deleting", reason)
    return endpoint


# -- reports from the reconciler --------------------------------------------------------------


async def runtime_ready(
    uow: UnitOfWork, endpoint: Endpoint, url: str | None, urls: Sequence[str] = ()
) -> None:
    """Serving at ``url`` (and, for replicas the gateway balances, at ``urls``): a change of
    the set is a new ``ready`` event, so the gateway's routes follow replicas coming and going."""
    if endpoint.status not in ("provisioning", "ready"):
        return
    replicas = list(urls) or None
    if (
        endpoint.status == "ready"
        and endpoint.upstream_url == url
        and endpoint.upstream_urls == replicas
    ):
        return
    endpoint.upstream_url = url
    endpoint.upstream_urls = replicas
    await _set_status(uow, endpoint, "ready")


async def runtime_pending(uow: UnitOfWork, endpoint: Endpoint, reason: str) -> None:
    """Not serving (yet, or any more): a ready endpoint loses its route until it is back."""
    if endpoint.status == "ready":
        await _set_status(uow, endpoint, "provisioning", reason)
    elif endpoint.status == "provisioning" and endpoint.reason != reason[:2000]:
        endpoint.reason = reason[:2000]  # progress, not a state change: no event
        await uow.session.flush()


async def runtime_failed(uow: UnitOfWork, endpoint: Endpoint, reason: str) -> None:
    if endpoint.status in ("provisioning", "ready"):
        await _set_status(uow, endpoint, "failed", reason)


async def runtime_released(uow: UnitOfWork, endpoint: Endpoint) -> None:
    """The runtime removed everything: a deleting endpoint is deleted; others are marked."""
    if endpoint.status == "deleting":
        await _set_status(uow, endpoint, "deleted", endpoint.reason)
    elif endpoint.status in ("failed", "stopped") and not endpoint.released:
        endpoint.released = True
        await uow.session.flush()


# -- reactions to other services' events ------------------------------------------------------


async def provision_approved(
    uow: UnitOfWork,
    pool: Pool,
    approved: RequestApproved,
    lookup: VersionLookup | None,
    profile_for: Callable[[str | None], str],
) -> Endpoint | None:
    """Provision what an approved ``endpoint`` request describes, once per request."""
    if approved.kind != "endpoint":
        return None
    existing = await repo.by_request(uow.session, approved.request_id)
    if existing is not None:
        return existing
    payload = EndpointPayload.model_validate(approved.payload)
    plan = payload.plan
    mcp = payload.asset_kind == "mcp_server"
    problem = ""
    found: CatalogVersion | None = None
    if await repo.is_revoked(uow.session, payload.model_name, payload.version):
        problem = f"{payload.model_name}@{payload.version} was revoked in the catalog"
    elif lookup is not None:
        found = await lookup(payload.asset_kind, payload.model_name, payload.version)
        if found is None:
            problem = f"the catalog has no {payload.model_name}@{payload.version}"
        elif found.status != "approved":
            problem = f"{payload.model_name}@{payload.version} is {found.status} in the catalog"
        elif mcp and found.package is None:
            problem = f"{payload.model_name}@{payload.version} has no stdio package to run"
    elif mcp:
        problem = "an MCP server endpoint needs the catalog's package: inference has no catalog key"
    source_uri = found.source_uri if found else None
    local_profile = profile_for(found.serving_runtime if found else None)
    new = NewEndpoint(
        project=approved.project,
        owner=approved.requester,
        asset_kind=payload.asset_kind,
        asset_name=payload.model_name,
        version=payload.version,
        runtime=payload.runtime,
        replicas=plan.replicas,
        gpus=plan.gpus,
        gpu_type=plan.gpu_type,
        package=found.package.as_dict() if found and found.package else None,
        sealed_environment=payload.sealed_environment,
        profile=local_profile if payload.runtime == "local" and not mcp else None,
        network_exposure=plan.network_exposure,
        source_uri=source_uri,
        request_id=approved.request_id,
        plan=plan.model_dump(mode="json"),
        requested_at=approved.created_at,
        approved_at=approved.decided_at,
    )
    endpoint = await create_endpoint(uow, pool, new, fail_softly=True)
    if problem and endpoint.status == "provisioning":
        endpoint.released = True
        await _set_status(uow, endpoint, "failed", problem)
    return endpoint


async def teardown(uow: UnitOfWork, endpoints: Sequence[Endpoint], reason: str) -> int:
    """Delete every endpoint given (revocations); returns how many began deleting."""
    count = 0
    for endpoint in endpoints:
        if endpoint.status not in ("deleting", "deleted"):
            await _set_status(uow, endpoint, "deleting", reason, "endpoint.teardown")
            count += 1
    return count


async def on_version_revoked(uow: UnitOfWork, kind: str, asset_name: str, version: str) -> int:
    if kind == "model":  # what a late approval must not deploy (MCP servers: the package check)
        await repo.remember_revoked(uow.session, asset_name, version)
    endpoints = await repo.live_of_version(uow.session, kind, asset_name, version)
    return await teardown(uow, endpoints, f"{asset_name}@{version} was revoked in the catalog")


async def on_entitlement_revoked(uow: UnitOfWork, project: str, kind: str, asset_name: str) -> int:
    endpoints = await repo.live_of_version(uow.session, kind, asset_name, None, project)
    return await teardown(
        uow, endpoints, f"project {project!r} lost its entitlement to {asset_name!r}"
    )
