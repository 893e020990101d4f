"""Approval HTTP routes: parse, authorise, call the domain, shape the response."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from libs.common.auth import (
    Authorized,
    Principal,
    PrincipalDep,
    credential_from,
    decide,
)
from libs.common.db import Clock
from libs.common.errors import (
    Conflict,
    Forbidden,
    NotFound,
    Unprocessable,
    authenticated_responses,
    problem_responses,
)
from libs.common.events.approval import RequestKind, RequestStatus
from libs.common.events.inference import seal_environment
from libs.common.names import ProjectPath
from libs.common.service import SessionDep, UnitOfWorkDep, context
from services.approval import audit, domain, report
from services.approval import repository as repo
from services.approval.config import ApprovalConfig
from services.approval.models import AuditRecord, Comment, Policy
from services.approval.models import Request as RequestRow
from services.approval.policies import Rule
from services.approval.schemas import (
    AuditAnchor,
    AuditCheckpoint,
    AuditPage,
    AuditProblem,
    AuditRead,
    AuditReport,
    AuditVerification,
    CommentCreate,
    CommentRead,
    Cost,
    Decision,
    KindStats,
    PolicyRead,
    ProjectQueue,
    Rejection,
    RequestCreate,
    RequestDetail,
    RequestPage,
    RequestRead,
    Stats,
)

router = APIRouter(prefix="/v1", tags=["approval"], responses=authenticated_responses())

RequestIdPath = Annotated[str, Path(pattern=r"^[0-9a-f-]{36}$")]
PolicyNamePath = Annotated[str, Path(pattern=r"^[a-z0-9]([-a-z0-9]{0,98}[a-z0-9])?$")]


def _readers(request: Request, principal: PrincipalDep) -> Principal:
    """Requesters (``request.read``) and reviewers (``request.review``) may look at requests."""
    project = request.path_params.get("project")
    first = decide(principal, "request.read", project)
    if first.allowed or decide(principal, "request.review", project).allowed:
        return principal
    raise Forbidden(first.reason)


Reader = Annotated[Principal, Depends(_readers)]


def _config(request: Request) -> ApprovalConfig:
    config: ApprovalConfig = request.app.state.approval_config
    return config


ConfigDep = Annotated[ApprovalConfig, Depends(_config)]


def _now(request: Request) -> datetime:
    """The time of this call, read once from the service's clock (the wall clock, or a test's)."""
    clock: Clock = request.app.state.clock
    return clock()


NowDep = Annotated[datetime, Depends(_now)]


def _catalog(request: Request) -> domain.CatalogLookup:
    """Catalog look-ups made with the caller's own credential (never more power than theirs)."""
    credential = credential_from(request) or ""
    client = context(request).catalog

    async def lookup(kind: str, name: str) -> dict[str, Any] | None:
        return await client.asset(credential, kind, name)

    return lookup


CatalogDep = Annotated[domain.CatalogLookup, Depends(_catalog)]


def request_read(row: RequestRow, now: datetime) -> RequestRead:
    cost = None
    if row.kind == "endpoint":
        plan = row.payload["plan"]
        cost = Cost(
            gpu_hours=plan["gpu_hours"],
            estimated_cost=plan["estimated_cost"],
            currency=plan["currency"],
        )
    return RequestRead(
        id=row.id,
        kind=row.kind,
        project=row.project,
        requester=row.requester,
        status=row.status,
        payload=row.payload,
        cost=cost,
        created_at=row.created_at,
        due_at=row.due_at,
        expires_at=row.expires_at,
        overdue=domain.overdue(row, now),
        age_seconds=((row.decided_at or now) - row.created_at).total_seconds(),
        decided_at=row.decided_at,
        decided_by=row.decided_by,
        decision_comment=row.decision_comment,
        policy=row.policy,
        lead_time_seconds=row.lead_time_seconds,
    )


def _comment_read(c: Comment) -> CommentRead:
    return CommentRead(id=c.id, author=c.author, body=c.body, created_at=c.created_at)


async def _detail(session: SessionDep, row: RequestRow, now: datetime) -> RequestDetail:
    comments = [_comment_read(c) for c in await repo.comments_of(session, row)]
    return RequestDetail(**request_read(row, now).model_dump(), comments=comments)


# -- requests ---------------------------------------------------------------------------------


@router.post(
    "/projects/{project}/requests",
    status_code=201,
    responses=problem_responses(Forbidden, Conflict),
    tags=["requests"],
)
async def file_request(
    project: ProjectPath,
    body: RequestCreate,
    principal: Annotated[Principal, Authorized("request.write")],
    uow: UnitOfWorkDep,
    catalog: CatalogDep,
    config: ConfigDep,
    now: NowDep,
    request: Request,
) -> RequestDetail:
    """File a request for the project. A matching auto-approve policy decides it at once."""
    key = context(request).settings.upstream_credential_fernet_key
    row = await domain.file_request(
        uow,
        principal,
        project,
        body.kind,
        body.payload,
        catalog,
        config,
        now=now,
        seal=lambda values: seal_environment(key, values),
    )
    return await _detail(uow.session, row, now)


def _page(rows: list[RequestRow] | Any, limit: int, now: datetime) -> RequestPage:
    items = list(rows)[:limit]
    more = len(rows) > limit
    return RequestPage(
        items=[request_read(r, now) for r in items], next_cursor=items[-1].id if more else None
    )


@router.get("/projects/{project}/requests", tags=["requests"])
async def list_project_requests(
    project: str,
    principal: Reader,
    session: SessionDep,
    now: NowDep,
    status: Annotated[list[RequestStatus] | None, Query()] = None,
    kind: Annotated[list[RequestKind] | None, Query()] = None,
    cursor: Annotated[str | None, Query(max_length=36)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> RequestPage:
    filters = repo.RequestFilters(status=status or (), kind=kind or (), project=project)
    rows = await repo.list_requests(
        session, principal, filters, newest_first=True, cursor=cursor, limit=limit, now=now
    )
    return _page(rows, limit, now)


@router.get("/requests", tags=["requests"])
async def list_requests(
    principal: Reader,
    session: SessionDep,
    now: NowDep,
    status: Annotated[list[RequestStatus] | None, Query()] = None,
    kind: Annotated[list[RequestKind] | None, Query()] = None,
    project: Annotated[str | None, Query(max_length=63)] = None,
    requester: Annotated[str | None, Query(max_length=255)] = None,
    overdue: bool | None = None,
    order: Annotated[str, Query(pattern="^(oldest|newest)$")] = "oldest",
    cursor: Annotated[str | None, Query(max_length=36)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> RequestPage:
    """The queue: ``?status=pending`` oldest first (by age), ``&overdue=true``, ``&project=``.
    Reviewers see every project; others see their own projects' requests."""
    filters = repo.RequestFilters(
        status=status or (), kind=kind or (), project=project, requester=requester, overdue=overdue
    )
    rows = await repo.list_requests(
        session,
        principal,
        filters,
        newest_first=order == "newest",
        cursor=cursor,
        limit=limit,
        now=now,
    )
    return _page(rows, limit, now)


@router.get("/requests/stats", tags=["requests"])
async def request_stats(
    principal: Reader,
    session: SessionDep,
    now: NowDep,
    days: Annotated[int, Query(ge=1, le=3650, description="Decisions in the last N days")] = 90,
) -> Stats:
    """Lead time (median, p90) per kind, and the pending/overdue queue per project."""
    since = now - timedelta(days=days)
    rows = await repo.for_stats(session, principal, since)
    by_kind: dict[str, KindStats] = {}
    by_project: dict[str, ProjectQueue] = {}
    for kind in ("asset", "access", "endpoint", "quota"):
        of_kind = [r for r in rows if r.kind == kind]
        decided = [
            r for r in of_kind if r.status in ("approved", "rejected") and r.decided_at is not None
        ]
        lead = [r.lead_time_seconds for r in decided if r.lead_time_seconds is not None]
        pending = [r for r in of_kind if r.status == "pending"]
        by_kind[kind] = KindStats(
            decided=len(decided),
            approved=sum(r.status == "approved" for r in decided),
            rejected=sum(r.status == "rejected" for r in decided),
            pending=len(pending),
            overdue=sum(domain.overdue(r, now) for r in pending),
            lead_time_median_seconds=domain.median(lead),
            lead_time_p90_seconds=domain.percentile(lead, 90),
        )
    for r in rows:
        if r.status != "pending":
            continue
        queue = by_project.setdefault(
            r.project, ProjectQueue(pending=0, overdue=0, oldest_pending_at=None)
        )
        queue.pending += 1
        queue.overdue += domain.overdue(r, now)
        if queue.oldest_pending_at is None or r.created_at < queue.oldest_pending_at:
            queue.oldest_pending_at = r.created_at
    return Stats(since=since, by_kind=by_kind, by_project=dict(sorted(by_project.items())))


@router.get("/requests/{request_id}", responses=problem_responses(NotFound), tags=["requests"])
async def get_request(
    request_id: RequestIdPath, principal: Reader, session: SessionDep, now: NowDep
) -> RequestDetail:
    return await _detail(session, await repo.request_for(session, principal, request_id), now)


@router.post(
    "/requests/{request_id}/approve",
    responses=problem_responses(Forbidden, NotFound, Conflict),
    tags=["review"],
)
async def approve_request(
    request_id: RequestIdPath,
    principal: Annotated[Principal, Authorized("request.review")],
    uow: UnitOfWorkDep,
    catalog: CatalogDep,
    now: NowDep,
    body: Decision | None = None,
) -> RequestDetail:
    """Approve (never one's own request); the owning service acts on the event."""
    row = await repo.request_for(uow.session, principal, request_id, for_update=True)
    await domain.approve(uow, principal, row, body.comment if body else "", catalog, now=now)
    return await _detail(uow.session, row, now)


@router.post(
    "/requests/{request_id}/reject",
    responses=problem_responses(Forbidden, NotFound, Conflict),
    tags=["review"],
)
async def reject_request(
    request_id: RequestIdPath,
    body: Rejection,
    principal: Annotated[Principal, Authorized("request.review")],
    uow: UnitOfWorkDep,
    now: NowDep,
) -> RequestDetail:
    row = await repo.request_for(uow.session, principal, request_id, for_update=True)
    await domain.reject(uow, principal, row, body.comment, now=now)
    return await _detail(uow.session, row, now)


@router.post(
    "/requests/{request_id}/withdraw",
    responses=problem_responses(Forbidden, NotFound, Conflict),
    tags=["requests"],
)
async def withdraw_request(
    request_id: RequestIdPath,
    principal: Annotated[Principal, Authorized("request.write")],
    uow: UnitOfWorkDep,
    now: NowDep,
    body: Decision | None = None,
) -> RequestDetail:
    row = await repo.request_for(uow.session, principal, request_id, for_update=True)
    await domain.withdraw(uow, principal, row, body.comment if body else "", now=now)
    return await _detail(uow.session, row, now)


@router.post(
    "/requests/{request_id}/comments",
    status_code=201,
    responses=problem_responses(NotFound),
    tags=["requests"],
)
async def comment_request(
    request_id: RequestIdPath,
    body: CommentCreate,
    principal: Annotated[Principal, Authorized("request.write")],
    uow: UnitOfWorkDep,
    now: NowDep,
) -> CommentRead:
    row = await repo.request_for(uow.session, principal, request_id)
    return _comment_read(await domain.add_comment(uow, row, body.body, now=now))


# -- policies ---------------------------------------------------------------------------------


def _policy_read(p: Policy) -> PolicyRead:
    return PolicyRead(**p.rule, name=p.name, updated_at=p.updated_at, updated_by=p.updated_by)


@router.get("/policies", tags=["policies"])
async def list_policies(
    principal: Annotated[Principal, Authorized("policy.read")], session: SessionDep
) -> list[PolicyRead]:
    return [_policy_read(p) for p in await repo.policies(session)]


@router.put(
    "/policies/{name}",
    tags=["policies"],
    responses={201: {"description": "Created (200: replaced)"}},
)
async def put_policy(
    name: PolicyNamePath,
    body: Rule,
    principal: Annotated[Principal, Authorized("policy.write")],
    uow: UnitOfWorkDep,
    response: Response,
    now: NowDep,
) -> PolicyRead:
    """Create or replace an auto-approve policy (audited like every change)."""
    policy, created = await domain.put_policy(uow, name, body, now=now)
    response.status_code = 201 if created else 200
    return _policy_read(policy)


@router.delete(
    "/policies/{name}", status_code=204, responses=problem_responses(NotFound), tags=["policies"]
)
async def delete_policy(
    name: PolicyNamePath,
    principal: Annotated[Principal, Authorized("policy.write")],
    uow: UnitOfWorkDep,
) -> Response:
    await domain.delete_policy(uow, name)
    return Response(status_code=204)


# -- audit ------------------------------------------------------------------------------------


def _audit_read(r: AuditRecord) -> AuditRead:
    return AuditRead(
        seq=r.seq,
        event_id=r.event_id,
        service=r.service,
        actor=r.actor,
        action=r.action,
        target=r.target,
        project=r.project,
        before=r.before,
        after=r.after,
        request_id=r.request_id,
        at=r.at,
        recorded_at=r.recorded_at,
        prev_hash=r.prev_hash,
        hash=r.hash,
    )


@router.get("/audit", tags=["audit"])
async def list_audit(
    principal: Annotated[Principal, Authorized("audit.read")],
    session: SessionDep,
    service: Annotated[str | None, Query(max_length=32)] = None,
    actor: Annotated[str | None, Query(max_length=255)] = None,
    action: Annotated[str | None, Query(max_length=100)] = None,
    project: Annotated[str | None, Query(max_length=63)] = None,
    target: Annotated[str | None, Query(max_length=500, description="Target prefix")] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    order: Annotated[str, Query(pattern="^(oldest|newest)$")] = "newest",
    cursor: Annotated[str | None, Query(max_length=20)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> AuditPage:
    filters = repo.AuditFilters(
        service=service,
        actor=actor,
        action=action,
        project=project,
        target_prefix=target,
        since=since,
        until=until,
    )
    rows = await repo.audit_page(
        session,
        filters,
        newest_first=order == "newest",
        cursor=repo.parse_cursor(cursor),
        limit=limit,
    )
    items = list(rows)[:limit]
    more = len(rows) > limit
    return AuditPage(
        items=[_audit_read(r) for r in items], next_cursor=str(items[-1].seq) if more else None
    )


@router.get("/audit/verify", tags=["audit"])
async def verify_audit(
    principal: Annotated[Principal, Authorized("audit.read")],
    session: SessionDep,
    request: Request,
) -> AuditVerification:
    """Replay the keyed hash chain and hold it against the latest signed checkpoint: ``ok`` is
    false, with the records named, after any edit, deletion, reordering, cut tail or rewrite."""
    return await _verification(session, request.app.state.audit_anchor)


async def _verification(session: SessionDep, anchor: audit.Anchor) -> AuditVerification:
    checkpoint, forged = await anchor.latest()
    result = await audit.verify(session, anchor.keys, checkpoint)
    for what in forged:
        result.problem(None, "forged-checkpoint", what)
    return AuditVerification(
        ok=result.ok,
        records=result.records,
        head_seq=result.head_seq,
        head_hash=result.head_hash,
        checkpoint=_checkpoint_read(result.checkpoint),
        problems=[AuditProblem.model_validate(p) for p in result.problems],
    )


_REPORT_TYPES = {"csv": "text/csv; charset=utf-8", "html": "text/html; charset=utf-8"}


@router.get(
    "/reports/audit",
    response_model=AuditReport,
    tags=["audit"],
    responses={
        200: {
            "description": "JSON; or the same as CSV or a readable HTML document (format)",
            "content": {"text/csv": {}, "text/html": {}},
        },
        **problem_responses(Unprocessable),
    },
)
async def audit_report(
    principal: Annotated[Principal, Authorized("audit.read")],
    session: SessionDep,
    request: Request,
    now: NowDep,
    start: Annotated[datetime, Query(description="From (ISO date or time; UTC without a zone)")],
    end: Annotated[datetime, Query(description="To, excluded")],
    format: Annotated[Literal["json", "csv", "html"], Query()] = "json",
) -> AuditReport | Response:
    """What an audit asks for, for ``[start, end)``: approvals with their decisions and lead
    times against the SLA, keys created and revoked, access and catalog changes, and the audit
    chain's verification with its signed checkpoint."""
    start, end = _utc(start), _utc(end)
    if end <= start or end - start > timedelta(days=366):
        raise Unprocessable("end: must be after start, and the period at most 366 days")
    anchor: audit.Anchor = request.app.state.audit_anchor
    # First: the verification opens one snapshot, and the rest of the report reads the same one.
    verification = await _verification(session, anchor)
    built = report.build(
        start=start,
        end=end,
        now=now,
        generated_by=principal.subject,
        decided=await repo.decided_between(session, start, end),
        open_requests=await repo.open_at(session, end),
        records=await repo.audit_between(session, start, end, report.MAX_ROWS),
        verification=verification,
        public_key=anchor.keys.public_key,
    )
    if format == "json":
        return built
    body = report.to_csv(built) if format == "csv" else report.to_html(built)
    name = f"steward-audit-{start.date().isoformat()}-{end.date().isoformat()}.{format}"
    return Response(
        body,
        media_type=_REPORT_TYPES[format],
        headers={"content-disposition": f'attachment; filename="{name}"'},
    )


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _checkpoint_read(checkpoint: audit.Checkpoint | None) -> AuditCheckpoint | None:
    if checkpoint is None:
        return None
    return AuditCheckpoint(
        seq=checkpoint.seq, hash=checkpoint.hash, at=checkpoint.at, signature=checkpoint.signature
    )


@router.get("/audit/checkpoint", tags=["audit"])
async def audit_checkpoint(
    principal: Annotated[Principal, Authorized("audit.read")], request: Request
) -> AuditAnchor:
    """The latest signed checkpoint and the Ed25519 key that verifies it, to keep or check
    elsewhere (the signature covers ``{"at", "hash", "seq"}`` as compact, sorted JSON)."""
    anchor: audit.Anchor = request.app.state.audit_anchor
    checkpoint, _ = await anchor.latest()
    return AuditAnchor(public_key=anchor.keys.public_key, checkpoint=_checkpoint_read(checkpoint))
