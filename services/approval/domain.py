"""Approval rules: filing, deciding, withdrawing and expiring requests; policies.

Each change emits its ``approval.request.*`` event and an audit record in the same transaction;
the owning service (catalog, authz, inference, metering) acts on the event.

Time comes in as ``now``, read once per call from the service's clock (``libs.common.db.Clock``:
the wall clock in production, one a test moves), never from the wall clock here.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Gauge
from pydantic import BaseModel, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.auth import Principal, Role
from libs.common.errors import Conflict, Forbidden, NotFound, Unprocessable
from libs.common.events.approval import (
    PAYLOADS,
    AccessPayload,
    AssetPayload,
    EndpointPayload,
    RequestApproved,
    RequestCreated,
    RequestDecided,
    RequestExpired,
    RequestPayload,
    RequestRejected,
    RequestWithdrawn,
)
from libs.common.mcp_packages import PackageProblem, stdio_package
from libs.common.outbox import Outbox
from libs.common.uow import UnitOfWork
from services.approval import repository as repo
from services.approval.config import ApprovalConfig
from services.approval.models import Comment, Policy, Request
from services.approval.policies import Rule, matches
from services.approval.schemas import PAYLOAD_INPUTS

# Looks an asset up in the catalog (with the caller's credential): the asset and its versions.
CatalogLookup = Callable[[str, str], Awaitable[dict[str, Any] | None]]

SYSTEM = "steward-approval"
DECISIONS: dict[str, type[RequestDecided]] = {
    "approved": RequestApproved,
    "rejected": RequestRejected,
    "withdrawn": RequestWithdrawn,
    "expired": RequestExpired,
}


def state(request: Request) -> dict[str, Any]:
    return {
        "request_id": request.id,
        "kind": request.kind,
        "project": request.project,
        "requester": request.requester,
        "status": request.status,
        "payload": request.payload,
        "created_at": request.created_at,
        "due_at": request.due_at,
    }


def target(request: Request) -> str:
    return f"request/{request.id}"


def _field_error(field: str, message: str) -> Unprocessable:
    return Unprocessable(
        f"{field}: {message}", errors=[{"field": field, "message": message, "type": "value_error"}]
    )


def parse_payload(kind: str, payload: dict[str, Any]) -> BaseModel:
    """The kind's input model, with errors reported as ``payload.<field>``."""
    try:
        return PAYLOAD_INPUTS[kind].model_validate(payload)
    except ValidationError as exc:
        errors = [
            {
                "field": "payload." + ".".join(str(p) for p in err["loc"]),
                "message": err["msg"].removeprefix("Value error, "),
                "type": err["type"],
            }
            for err in exc.errors()
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise Unprocessable(detail, errors=errors) from exc


def _version(asset: dict[str, Any], version: str) -> dict[str, Any] | None:
    return next((v for v in asset["versions"] if v["version"] == version), None)


async def _asset(catalog: CatalogLookup, kind: str, name: str, field: str) -> dict[str, Any]:
    asset = await catalog(kind, name)
    if asset is None:
        raise _field_error(field, f"the catalog has no {kind} {name!r}")
    return asset


def _mcp_environment(
    data: dict[str, Any],
    version: dict[str, Any],
    environment: dict[str, str],
    seal: Callable[[dict[str, str]], str | None],
) -> dict[str, Any]:
    """An MCP server endpoint runs the version's stdio package (local runtime; on Kubernetes, an
    OCI package with ToolHive): check the environment against what the package declares and
    seal it (names stay readable)."""
    try:
        package = stdio_package((version.get("spec") or {}).get("server") or {})
        if package is None:
            raise PackageProblem(
                "the version has no stdio package to run (a server with remotes is routed "
                "without an endpoint)"
            )
        values = package.check_environment(environment)
    except PackageProblem as problem:
        raise _field_error("payload.environment", str(problem)) from None
    try:
        package.check_runtime(data["runtime"])
    except PackageProblem as problem:
        raise _field_error("payload.runtime", str(problem)) from None
    return {"environment_names": sorted(values), "sealed_environment": seal(values)}


async def _enrich(
    session: AsyncSession,
    catalog: CatalogLookup,
    kind: str,
    project: str,
    given: BaseModel,
    seal: Callable[[dict[str, str]], str | None],
) -> tuple[dict[str, Any], tuple[str, str, str | None] | None]:
    """Check the request against the catalog; returns the stored payload and its asset key."""
    data = given.model_dump()
    payload: RequestPayload
    if kind == "asset":
        asset = await _asset(catalog, data["asset_kind"], data["asset_name"], "payload.asset_name")
        version = _version(asset, data["version"])
        if version is None:
            raise _field_error("payload.version", f"{data['asset_name']!r} has no such version")
        if version["status"] not in ("draft", "submitted"):
            raise Conflict(
                f"version {data['version']!r} is {version['status']}; only a draft is submitted"
            )
        duplicate = await repo.pending_duplicate(
            session, "asset", None, data["asset_kind"], data["asset_name"], data["version"]
        )
        if duplicate is not None:
            raise Conflict(f"request {duplicate.id} already asks to admit this version")
        payload = AssetPayload(**data, checklist=version["checklist"])
        key = (data["asset_kind"], data["asset_name"], data["version"])
    elif kind == "access":
        asset = await _asset(catalog, data["asset_kind"], data["asset_name"], "payload.asset_name")
        usable = [v for v in asset["versions"] if v["status"] == "approved"]
        if not usable:
            raise Conflict(
                f"{data['asset_name']!r} has no approved version yet; an asset request must "
                "admit one first"
            )
        duplicate = await repo.pending_duplicate(
            session, "access", project, data["asset_kind"], data["asset_name"], None
        )
        if duplicate is not None:
            raise Conflict(f"request {duplicate.id} already asks for this access")
        tags = sorted({t for v in usable for t in v["tags"]})
        payload = AccessPayload(**data, tags=tags)
        key = (data["asset_kind"], data["asset_name"], None)
    elif kind == "endpoint":
        asset_kind = data["asset_kind"]
        asset = await _asset(catalog, asset_kind, data["model_name"], "payload.model_name")
        version = _version(asset, data["version"])
        if version is None or version["status"] != "approved":
            raise _field_error("payload.version", f"needs an approved version of the {asset_kind}")
        environment = {k: v.get_secret_value() for k, v in (data.pop("environment") or {}).items()}
        if asset_kind == "mcp_server":
            data.update(_mcp_environment(data, version, environment, seal))
        payload = EndpointPayload.model_validate(data)
        key = (asset_kind, data["model_name"], data["version"])
    else:
        payload = PAYLOADS[kind].model_validate(data)
        key = None
    return payload.model_dump(mode="json"), key


async def _still_valid(request: Request, catalog: CatalogLookup) -> None:
    """Things may have moved since the request was filed: refuse to approve the impossible."""
    if request.kind not in ("asset", "access", "endpoint"):
        return
    assert request.asset_kind and request.asset_name
    asset = await catalog(request.asset_kind, request.asset_name)
    if asset is None:
        raise Conflict(f"the catalog no longer has {request.asset_name!r}; reject the request")
    if request.kind == "asset":
        assert request.asset_version
        version = _version(asset, request.asset_version)
        if version is None or version["status"] not in ("draft", "submitted"):
            status = version["status"] if version else "gone"
            raise Conflict(f"the version is now {status}; reject the request instead")
    elif request.kind == "access":
        if not any(v["status"] == "approved" for v in asset["versions"]):
            raise Conflict("the asset has no approved version any more; reject the request")
    else:
        assert request.asset_version
        version = _version(asset, request.asset_version)
        if version is None or version["status"] != "approved":
            raise Conflict("the model version is no longer approved; reject the request")


# -- filing -----------------------------------------------------------------------------------


async def file_request(
    uow: UnitOfWork,
    principal: Principal,
    project: str,
    kind: str,
    payload: dict[str, Any],
    catalog: CatalogLookup,
    config: ApprovalConfig,
    *,
    now: datetime,
    seal: Callable[[dict[str, str]], str | None],
) -> Request:
    """``seal`` encrypts what a request carries in secret (an MCP server's environment) with
    the key inference opens it with."""
    given = parse_payload(kind, payload)
    stored, key = await _enrich(uow.session, catalog, kind, project, given, seal)
    due = now + timedelta(days=config.sla_for(kind))
    request = Request(
        kind=kind,
        project=project,
        requester=principal.subject,
        status="pending",
        payload=stored,
        asset_kind=key[0] if key else None,
        asset_name=key[1] if key else None,
        asset_version=key[2] if key else None,
        created_at=now,
        due_at=due,
        expires_at=due + timedelta(days=config.expire_after_days),
    )
    uow.session.add(request)
    await uow.session.flush()
    await uow.emit(RequestCreated(**state(request)), entity=request.id)
    await uow.audit(
        "request.create",
        target(request),
        project=project,
        after={"kind": kind, "status": "pending", "payload": stored, "due_at": due.isoformat()},
    )
    policy = await _matching_policy(uow.session, request, now)
    if policy is not None:
        await _decide(
            uow,
            request,
            "approved",
            by=f"policy:{policy.name}",
            comment=f"auto-approved by policy {policy.name!r}",
            policy=policy.name,
            now=now,
        )
    return request


async def _matching_policy(session: AsyncSession, request: Request, now: datetime) -> Policy | None:
    for policy in await repo.policies(session, request.kind):
        rule = Rule.model_validate(policy.rule)
        if not matches(rule, request.kind, request.project, request.payload):
            continue
        if policy.updated_by == request.requester:
            continue  # nobody approves their own request, not even through a policy they wrote
        if rule.require_good_standing and await repo.recently_rejected(
            session, request.project, now - timedelta(days=rule.lookback_days)
        ):
            continue
        return policy
    return None


# -- deciding ---------------------------------------------------------------------------------


def _pending(request: Request) -> None:
    if request.status != "pending":
        raise Conflict(f"request {request.id} is already {request.status}")


async def _decide(
    uow: UnitOfWork,
    request: Request,
    status: str,
    *,
    by: str,
    comment: str,
    now: datetime,
    policy: str | None = None,
) -> Request:
    request.status = status
    request.decided_at = now
    request.decided_by = by
    request.decision_comment = comment
    request.policy = policy
    request.lead_time_seconds = (now - request.created_at).total_seconds()
    await uow.session.flush()
    extra: dict[str, Any] = {"policy": policy} if status == "approved" else {}
    event = DECISIONS[status](
        **state(request),
        decided_by=by,
        decided_at=now,
        comment=comment,
        lead_time_seconds=request.lead_time_seconds,
        **extra,
    )
    await uow.emit(event, entity=request.id)
    await uow.audit(
        "request.auto_approve" if policy else f"request.{_VERB[status]}",
        target(request),
        project=request.project,
        before={"status": "pending"},
        after={
            "status": status,
            "decided_by": by,
            "comment": comment,
            "policy": policy,
            "lead_time_seconds": request.lead_time_seconds,
        },
    )
    return request


_VERB = {"approved": "approve", "rejected": "reject", "withdrawn": "withdraw", "expired": "expire"}


async def approve(
    uow: UnitOfWork,
    principal: Principal,
    request: Request,
    comment: str,
    catalog: CatalogLookup,
    *,
    now: datetime,
) -> Request:
    _pending(request)
    if request.requester == principal.subject:
        raise Forbidden("a requester can never approve their own request")
    await _still_valid(request, catalog)
    return await _decide(uow, request, "approved", by=principal.subject, comment=comment, now=now)


async def reject(
    uow: UnitOfWork, principal: Principal, request: Request, comment: str, *, now: datetime
) -> Request:
    _pending(request)
    return await _decide(uow, request, "rejected", by=principal.subject, comment=comment, now=now)


async def withdraw(
    uow: UnitOfWork, principal: Principal, request: Request, comment: str, *, now: datetime
) -> Request:
    _pending(request)
    role = principal.role_in(request.project)
    is_admin = role is not None and role.at_least(Role.PROJECT_ADMIN)
    if request.requester != principal.subject and not is_admin:
        raise Forbidden("only the requester or a project-admin may withdraw a request")
    return await _decide(uow, request, "withdrawn", by=principal.subject, comment=comment, now=now)


async def add_comment(uow: UnitOfWork, request: Request, body: str, *, now: datetime) -> Comment:
    comment = Comment(request_id=request.id, author=uow.actor, body=body, created_at=now)
    uow.session.add(comment)
    await uow.session.flush()
    await uow.audit(
        "request.comment", target(request), project=request.project, after={"comment": body}
    )
    return comment


async def expire_due(
    sessionmaker: async_sessionmaker[AsyncSession], outbox: Outbox, now: datetime
) -> int:
    """Expire every pending request past its expiry at ``now``; returns how many."""
    async with sessionmaker() as session, session.begin():
        uow = UnitOfWork(session, outbox, actor=SYSTEM)
        due = await repo.expiring(session, now)
        for request in due:
            await _decide(
                uow,
                request,
                "expired",
                by=SYSTEM,
                comment=f"no decision by {request.expires_at.isoformat()}",
                now=now,
            )
    return len(due)


# -- the SLA clock and statistics -------------------------------------------------------------


OVERDUE = Gauge(
    "steward_approval_overdue_requests",
    "Pending requests past their SLA due date, by kind (an SLA breach while above 0)",
    ["kind"],
)


async def measure_overdue(sessionmaker: async_sessionmaker[AsyncSession], now: datetime) -> int:
    """Count the requests past their due date into ``steward_approval_overdue_requests``."""
    async with sessionmaker() as session:
        counts = await repo.overdue_by_kind(session, now)
    for kind in ("asset", "access", "endpoint", "quota"):
        OVERDUE.labels(kind).set(counts.get(kind, 0))
    return sum(counts.values())


def overdue(request: Request, now: datetime) -> bool:
    """Still pending past its due date (``repository.list_requests`` filters the same way)."""
    return request.status == "pending" and request.due_at < now


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


# -- policies ---------------------------------------------------------------------------------


async def put_policy(
    uow: UnitOfWork, name: str, rule: Rule, *, now: datetime
) -> tuple[Policy, bool]:
    existing = await repo.policy(uow.session, name)
    before = existing.rule if existing else None
    body = rule.model_dump(mode="json")
    if existing is None:
        policy = Policy(
            name=name,
            kind=rule.kind,
            rule=body,
            enabled=rule.enabled,
            created_at=now,
            updated_at=now,
            updated_by=uow.actor,
        )
        uow.session.add(policy)
    else:
        policy = existing
        policy.kind, policy.rule, policy.enabled = rule.kind, body, rule.enabled
        policy.updated_at, policy.updated_by = now, uow.actor
    await uow.session.flush()
    await uow.audit("policy.put", f"policy/{name}", before=before, after=body)
    return policy, existing is None


async def delete_policy(uow: UnitOfWork, name: str) -> None:
    policy = await repo.policy(uow.session, name)
    if policy is None:
        raise NotFound(f"no policy {name!r}")
    await uow.session.delete(policy)
    await uow.session.flush()
    await uow.audit("policy.delete", f"policy/{name}", before=policy.rule)
