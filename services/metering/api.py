"""Metering HTTP routes: parse, authorise, call the domain or the repository, shape the answer.

Usage and quotas are read with ``usage.read`` (any role in a project; the repository's tenant
filter narrows every answer to the caller's projects). Quotas and prices are changed with
``quota.manage`` (platform-admin with ``quotas:manage``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from libs.common.auth import Authorized, Principal, credential_from
from libs.common.db import Clock
from libs.common.errors import (
    Conflict,
    NotFound,
    ServiceUnavailable,
    Unprocessable,
    authenticated_responses,
    problem_responses,
)
from libs.common.names import PROJECT_PATTERN, AssetPath, ProjectPath, UUIDPath
from libs.common.service import ContextDep, SessionDep, UnitOfWorkDep
from services.metering import domain, endpoints, sketch
from services.metering import repository as repo
from services.metering.models import (
    DURATION_BOUNDS_MS,
    DURATION_BUCKETS,
    TTFT_BOUNDS_MS,
    TTFT_BUCKETS,
    EndpointPlan,
    Price,
    Quota,
)
from services.metering.schemas import (
    CatalogVersion,
    EndpointCostQuery,
    EndpointCostRead,
    EndpointCostReport,
    EndpointPlanRead,
    Latency,
    PriceQuery,
    PriceRead,
    PriceSet,
    QuotaCreate,
    QuotaRead,
    QuotaSnapshot,
    QuotaUpdate,
    SeriesQuery,
    TopEntry,
    TopQuery,
    TopReport,
    TotalsQuery,
    UsageEventRead,
    UsageEventsQuery,
    UsageFilter,
    UsageReport,
    UsageRow,
)

router = APIRouter(prefix="/v1", responses=authenticated_responses())

QuotaIdPath = UUIDPath
ModelPath = AssetPath
Reader = Annotated[Principal, Authorized("usage.read")]
Manager = Annotated[Principal, Authorized("quota.manage")]


def _clock(request: Request) -> Clock:
    clock: Clock = request.app.state.clock
    return clock


ClockDep = Annotated[Clock, Depends(_clock)]


# -- shaping -----------------------------------------------------------------------------------


def _cost(nanos: int) -> float:
    return float(domain.from_nanos(int(nanos)))


def _latency(
    row: Any,
    count: int,
    total_ms: float,
    columns: list[str],
    bounds: Sequence[float],
    bins: Mapping[int, int],
) -> Latency:
    """From the sketch when it holds every call; else (minutes from before the sketches) from
    the coarse histogram: the upper bound of the bucket holding each percentile."""
    mean = round(total_ms / count, 3) if count else None
    if sum(bins.values()) == count:
        p50, p95, p99 = sketch.quantiles(bins, (0.5, 0.95, 0.99))
        return Latency(count=count, mean=mean, p50=p50, p95=p95, p99=p99)
    counts = [int(getattr(row, c)) for c in columns]

    def quantile(p: float) -> float | None:
        rank, seen = p * count, 0
        for bound, n in zip(bounds, counts, strict=True):
            seen += n
            if seen >= rank:
                return None if bound == float("inf") else float(bound)
        return None

    return Latency(count=count, mean=mean, p50=quantile(0.5), p95=quantile(0.95))


def _sketched(bins: Mapping[int, int]) -> Latency:
    p50, p95, p99 = sketch.quantiles(bins, (0.5, 0.95, 0.99))
    return Latency(count=sum(bins.values()), mean=sketch.mean(bins), p50=p50, p95=p95, p99=p99)


def _usage_row(
    row: Any, group_by: Sequence[str], series: bool, sketches: repo.Sketches
) -> UsageRow:
    group = tuple(getattr(row, k) for k in (["start"] if series else []) + list(group_by))
    bins = sketches.get(group, {})
    prompt, completion = int(row.prompt_tokens), int(row.completion_tokens)
    return UsageRow(
        start=row.start if series else None,
        **{g: getattr(row, g) for g in group_by},
        requests=int(row.requests),
        errors=int(row.errors),
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cost=_cost(row.cost_nanos),
        rate_limited=int(row.rate_limited),
        client_errors=int(row.client_errors),
        server_errors=int(row.server_errors),
        request_bytes=int(row.request_bytes),
        response_bytes=int(row.response_bytes),
        ttft_ms=_latency(
            row,
            int(row.ttft_count),
            float(row.ttft_sum_ms),
            TTFT_BUCKETS,
            TTFT_BOUNDS_MS,
            bins.get("ttft", {}),
        ),
        duration_ms=_latency(
            row,
            int(row.requests),
            float(row.duration_sum_ms),
            DURATION_BUCKETS,
            DURATION_BOUNDS_MS,
            bins.get("duration", {}),
        ),
        tpot_ms=_sketched(bins.get("tpot", {})),
    )


async def _usage_rows(
    session: SessionDep,
    principal: Principal,
    query: UsageFilter,
    start: datetime,
    end: datetime,
    group_by: Sequence[str],
    interval: str | None = None,
    limit: int | None = None,
) -> list[UsageRow]:
    """The report's rows: the aggregates and the latency sketches of the same groups."""
    rows = await repo.usage(session, principal, query, start, end, group_by, interval, limit)
    sketches = await repo.latency_sketches(
        session, principal, query, start, end, group_by, interval
    )
    return [_usage_row(r, group_by, interval is not None, sketches) for r in rows]


def _quota_read(quota: Quota, state: Any) -> QuotaRead:
    return QuotaRead(
        id=quota.id,
        project=quota.project,
        key_id=quota.key_id,
        model=quota.model,
        window=state.window,
        limits=state.limits,
        soft_threshold=quota.soft_threshold,
        webhook_url=quota.webhook_url,
        revision=quota.revision,
        source=quota.source,
        created_at=quota.created_at,
        created_by=quota.created_by,
        updated_at=quota.updated_at,
        updated_by=quota.updated_by,
        window_start=state.window_start,
        window_end=state.window_end,
        input_used=state.input_used,
        output_used=state.output_used,
        requests_used=state.requests_used,
        status=state.status,
    )


async def _quota_reads(
    session: SessionDep, quotas: Sequence[Quota], now: datetime
) -> list[QuotaRead]:
    states = await domain.current_states(session, quotas, now, None)
    return [_quota_read(x, s) for x, s in zip(quotas, states, strict=True)]


def _price_reads(
    rows: Sequence[Price], currency: str, now: datetime, history: bool
) -> list[PriceRead]:
    """Rows ordered by asset, version and time; each ends where the next of its key begins.
    Without ``history``: the price in force now (unless withdrawn) and the scheduled ones."""
    reads: list[PriceRead] = []
    for i, p in enumerate(rows):
        following = rows[i + 1] if i + 1 < len(rows) else None
        same_key = following is not None and (following.asset, following.version) == (
            p.asset,
            p.version,
        )
        until = following.effective_from if following is not None and same_key else None
        if not history and (p.withdrawn or (until is not None and until <= now)):
            continue
        reads.append(
            PriceRead(
                model=p.asset,
                version=p.version or None,
                currency=currency,
                input_per_1k=domain.from_nanos(p.input_per_1k_nanos),
                output_per_1k=domain.from_nanos(p.output_per_1k_nanos),
                gpu_hour=None if p.gpu_hour_nanos is None else domain.from_nanos(p.gpu_hour_nanos),
                effective_from=p.effective_from,
                effective_until=until,
                withdrawn=p.withdrawn,
                created_at=p.created_at,
                created_by=p.created_by,
            )
        )
    return reads


# -- usage -------------------------------------------------------------------------------------


@router.get("/usage", tags=["usage"])
async def usage_totals(
    query: Annotated[TotalsQuery, Query()],
    principal: Reader,
    session: SessionDep,
    ctx: ContextDep,
    clock: ClockDep,
) -> UsageReport:
    """Totals over ``[start, end)`` per group (``group_by``), or one row for everything."""
    start, end = query.bounds(clock())
    return UsageReport(
        start=start,
        end=end,
        group_by=query.group_by,
        currency=ctx.settings.metering_currency,
        rows=await _usage_rows(session, principal, query, start, end, query.group_by),
    )


@router.get("/usage/series", tags=["usage"])
async def usage_series(
    query: Annotated[SeriesQuery, Query()],
    principal: Reader,
    session: SessionDep,
    ctx: ContextDep,
    clock: ClockDep,
) -> UsageReport:
    """A time series: one row per ``interval`` (UTC) and group; intervals without usage are
    left out."""
    start, end = query.bounds(clock())
    rows = await _usage_rows(session, principal, query, start, end, query.group_by, query.interval)
    return UsageReport(
        start=start,
        end=end,
        group_by=query.group_by,
        interval=query.interval,
        currency=ctx.settings.metering_currency,
        rows=rows,
    )


@router.get("/usage/top", tags=["usage"])
async def usage_top(
    query: Annotated[TopQuery, Query()],
    principal: Reader,
    session: SessionDep,
    ctx: ContextDep,
    clock: ClockDep,
) -> TopReport:
    """The biggest consumers (projects, models, credentials or endpoints) by ``metric``."""
    start, end = query.bounds(clock())
    rows = await repo.top(
        session, principal, query, start, end, query.by, query.metric, query.limit
    )
    entries = [
        TopEntry(
            key=r.key,
            project=r.project if query.by != "project" else None,
            value=_cost(r.value) if query.metric == "cost" else float(r.value),
            requests=int(r.requests),
            total_tokens=int(r.total_tokens),
            cost=_cost(r.cost_nanos),
        )
        for r in rows
    ]
    return TopReport(
        start=start,
        end=end,
        by=query.by,
        metric=query.metric,
        currency=ctx.settings.metering_currency,
        entries=entries,
    )


EXPORT_MAX_ROWS = 200_000
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """Text that a spreadsheet would run as a formula is quoted (CSV injection)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


@router.get(
    "/usage/export.csv",
    tags=["usage"],
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}, "description": "The series as CSV"}},
)
async def usage_export(
    query: Annotated[SeriesQuery, Query()],
    principal: Reader,
    session: SessionDep,
    ctx: ContextDep,
    clock: ClockDep,
) -> Response:
    """The series of ``/usage/series`` as CSV, one line per interval and group."""
    start, end = query.bounds(clock())
    rows = await _usage_rows(
        session,
        principal,
        query,
        start,
        end,
        query.group_by,
        query.interval,
        limit=EXPORT_MAX_ROWS + 1,
    )
    if len(rows) > EXPORT_MAX_ROWS:
        raise Unprocessable(
            f"more than {EXPORT_MAX_ROWS} lines: narrow the range or widen the interval"
        )
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [
            "start",
            *query.group_by,
            "requests",
            "errors",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            f"cost_{ctx.settings.metering_currency.lower()}",
            "ttft_mean_ms",
            "duration_mean_ms",
        ]
    )
    for row in rows:
        assert row.start is not None
        writer.writerow(
            [
                row.start.isoformat().replace("+00:00", "Z"),
                *(_cell(getattr(row, g)) for g in query.group_by),
                row.requests,
                row.errors,
                row.prompt_tokens,
                row.completion_tokens,
                row.total_tokens,
                format(Decimal(str(row.cost)), "f"),
                "" if row.ttft_ms.mean is None else row.ttft_ms.mean,
                "" if row.duration_ms.mean is None else row.duration_ms.mean,
            ]
        )
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="usage.csv"'},
    )


@router.get("/usage/events", tags=["usage"])
async def usage_events(
    query: Annotated[UsageEventsQuery, Query()],
    principal: Reader,
    session: SessionDep,
    clock: ClockDep,
) -> list[UsageEventRead]:
    """Raw usage events (kept ``metering_raw_retention_days``), newest first."""
    start, end = query.bounds(clock())
    rows = await repo.raw_events(session, principal, query, start, end)
    return [UsageEventRead.model_validate(r, from_attributes=True) for r in rows]


# -- dedicated endpoints -----------------------------------------------------------------------


def _plan_read(plan: EndpointPlan) -> EndpointPlanRead:
    return EndpointPlanRead(
        request_id=plan.request_id,
        gpus=plan.gpus,
        replicas=plan.replicas,
        hours=plan.hours,
        gpu_hours=plan.gpu_hours,
        gpu_hour_rate=_cost(plan.gpu_hour_rate_nanos),
        estimated_cost=_cost(plan.estimated_cost_nanos),
        currency=plan.currency,
        approved_at=plan.approved_at,
        approved_by=plan.approved_by,
    )


def _endpoint_cost_read(c: endpoints.EndpointCost) -> EndpointCostRead:
    run = c.run
    return EndpointCostRead(
        endpoint_id=run.endpoint_id,
        project=run.project,
        model=run.route_name,
        asset_name=run.asset_name,
        version=run.version,
        runtime=run.runtime,
        gpu_type=run.gpu_type,
        status=run.status,
        gpus_held=c.gpus_held,
        first_held_at=c.first_held_at,
        gpu_hours=round(c.gpu_hours, 6),
        cost=_cost(c.cost_nanos),
        currency=c.currency,
        plan=None if c.plan is None else _plan_read(c.plan),
        planned_until=c.planned_until,
        plan_used=None if c.plan_used is None else round(c.plan_used, 6),
        over_plan=c.over_plan,
        over_plan_at=run.over_plan_at,
    )


@router.get("/usage/endpoints", tags=["usage"])
async def endpoint_costs(
    query: Annotated[EndpointCostQuery, Query()],
    principal: Reader,
    session: SessionDep,
    ctx: ContextDep,
    clock: ClockDep,
) -> EndpointCostReport:
    """Dedicated endpoints' GPU-hours and cost so far, each beside the plan approved for it.

    Cost is GPU-hours at the model's GPU-hour price (the price table), or at the plan's rate
    when the table has none; an endpoint still running counts up to now.
    """
    now = clock()
    currency = ctx.settings.metering_currency
    rows = await repo.endpoint_costs(session, principal, query.project, query.status, query.limit)
    costs = endpoints.costs(rows, currency, now)
    return EndpointCostReport(
        generated_at=now,
        currency=currency,
        gpu_hours=round(sum(c.gpu_hours for c in costs), 6),
        cost=_cost(sum(c.cost_nanos for c in costs)),
        # Each approved plan once, though a request may have had several endpoints (a failed
        # one, then its replacement).
        estimated_cost=_cost(
            sum(
                {
                    c.plan.request_id: c.plan.estimated_cost_nanos
                    for c in costs
                    if c.plan and c.comparable
                }.values()
            )
        ),
        endpoints=[_endpoint_cost_read(c) for c in costs],
    )


# -- quotas ------------------------------------------------------------------------------------


@router.get("/quotas", tags=["quotas"])
async def list_quotas(
    principal: Reader,
    session: SessionDep,
    clock: ClockDep,
    project: Annotated[str | None, Query(pattern=PROJECT_PATTERN)] = None,
) -> list[QuotaRead]:
    """Quotas of the caller's projects (all of them for a platform-admin), with current usage."""
    quotas = await repo.visible_quotas(session, principal, project)
    return await _quota_reads(session, quotas, clock())


@router.get("/quotas/snapshot", tags=["quotas", "replica"])
async def quota_snapshot(
    principal: Annotated[Principal, Authorized("quota.snapshot")],
    session: SessionDep,
    request: Request,
    clock: ClockDep,
) -> QuotaSnapshot:
    """Every visible quota with its limits and current window usage: the gateway loads its
    ``QuotaLedger`` from this, then follows ``metering.quota.*`` events."""
    through = request.app.state.metering.usage.watermark  # before reading the counts
    now = clock()
    quotas = await repo.visible_quotas(session, principal, None)
    states = await domain.current_states(session, quotas, now, through)
    return QuotaSnapshot(generated_at=now, counted_through=through, quotas=states)


@router.post(
    "/projects/{project}/quotas",
    status_code=201,
    tags=["quotas"],
    responses=problem_responses(NotFound, Conflict, ServiceUnavailable),
)
async def create_quota(
    project: ProjectPath,
    body: QuotaCreate,
    principal: Manager,
    request: Request,
    uow: UnitOfWorkDep,
    ctx: ContextDep,
    clock: ClockDep,
) -> QuotaRead:
    """A token budget for the project, or for one of its keys, and/or one model."""
    await domain.verify_target(ctx.authz, credential_from(request), project, body.key_id)
    now = clock()
    quota = await domain.create_quota(uow, ctx.settings, project, body, now)
    [read] = await _quota_reads(uow.session, [quota], now)
    return read


@router.get(
    "/projects/{project}/quotas/{quota_id}",
    tags=["quotas"],
    responses=problem_responses(NotFound),
)
async def get_quota(
    project: ProjectPath,
    quota_id: QuotaIdPath,
    principal: Reader,
    session: SessionDep,
    clock: ClockDep,
) -> QuotaRead:
    quota = await repo.quota_in(session, project, quota_id, lock=False)
    [read] = await _quota_reads(session, [quota], clock())
    return read


@router.patch(
    "/projects/{project}/quotas/{quota_id}",
    tags=["quotas"],
    responses=problem_responses(NotFound),
)
async def update_quota(
    project: ProjectPath,
    quota_id: QuotaIdPath,
    body: QuotaUpdate,
    principal: Manager,
    uow: UnitOfWorkDep,
    ctx: ContextDep,
    clock: ClockDep,
) -> QuotaRead:
    now = clock()
    quota = await repo.quota_in(uow.session, project, quota_id, lock=True)
    quota = await domain.update_quota(uow, ctx.settings, quota, body, now)
    [read] = await _quota_reads(uow.session, [quota], now)
    return read


@router.delete(
    "/projects/{project}/quotas/{quota_id}",
    status_code=204,
    tags=["quotas"],
    responses=problem_responses(NotFound),
)
async def delete_quota(
    project: ProjectPath, quota_id: QuotaIdPath, principal: Manager, uow: UnitOfWorkDep
) -> Response:
    quota = await repo.quota_in(uow.session, project, quota_id, lock=True)
    await domain.delete_quota(uow, quota)
    return Response(status_code=204)


# -- prices ------------------------------------------------------------------------------------


@router.get("/prices", tags=["prices"])
async def list_prices(
    query: Annotated[PriceQuery, Query()],
    principal: Reader,
    session: SessionDep,
    ctx: ContextDep,
    clock: ClockDep,
) -> list[PriceRead]:
    """Prices by catalog asset (and version): the one in force now and those scheduled, or
    (``history``) every one since the first."""
    rows = await repo.all_prices(session, query.model)
    return _price_reads(rows, ctx.settings.metering_currency, clock(), query.history)


VersionQuery = Annotated[
    CatalogVersion | None,
    Query(description="Price this version of the asset only (it beats the asset's price)"),
]


@router.put("/prices/{model:path}", tags=["prices"], responses=problem_responses(Conflict))
async def set_price(
    model: ModelPath,
    body: PriceSet,
    principal: Manager,
    uow: UnitOfWorkDep,
    ctx: ContextDep,
    clock: ClockDep,
    version: VersionQuery = None,
) -> PriceRead:
    """Price a catalog asset (``model`` is its catalog name, whatever route or endpoint serves
    it), or one version of it, from ``effective_from`` (default now) on. Usage is priced at the
    price in force at its own time; an ``effective_from`` in the past is refused (409)."""
    now = clock()
    price = await domain.set_price(uow, model, version, body, now)
    mine = [r for r in await repo.all_prices(uow.session, model) if r.version == price.version]
    reads = _price_reads(mine, ctx.settings.metering_currency, now, True)
    return next(r for r in reads if r.effective_from == price.effective_from)


@router.delete(
    "/prices/{model:path}", status_code=204, tags=["prices"], responses=problem_responses(NotFound)
)
async def delete_price(
    model: ModelPath,
    principal: Manager,
    uow: UnitOfWorkDep,
    clock: ClockDep,
    version: VersionQuery = None,
) -> Response:
    """Withdraw the price from now on (scheduled ones are dropped); past usage keeps its cost."""
    await domain.withdraw_price(uow, model, version, clock())
    return Response(status_code=204)
