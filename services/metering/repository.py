"""All SQL of the metering service.

Tenant filtering lives in one helper, ``tenant``: every query that reads usage or quotas goes
through it with the caller's principal, so a project member sees only their projects and a
platform-admin sees all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Select,
    String,
    case,
    delete,
    func,
    literal,
    literal_column,
    null,
    select,
    text,
    true,
    type_coerce,
    union_all,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.auth import Principal, decide
from libs.common.db import UTCDateTime
from libs.common.errors import Forbidden, NotFound
from libs.common.quota import Used
from services.metering.models import (
    DIMENSIONS,
    DURATION_BUCKETS,
    MINUTE_SUMS,
    TTFT_BUCKETS,
    EndpointPlan,
    EndpointRun,
    GpuPeriod,
    Price,
    Quota,
    QuotaAlert,
    QuotaCounter,
    QuotaGatewayCounter,
    WebhookDelivery,
    bus_tables,
    usage_events,
    usage_latency_bins,
    usage_minutes,
)
from services.metering.pricing import PriceBook
from services.metering.schemas import UsageEventsQuery, UsageFilter

# -- tenant filtering: the one place -----------------------------------------------------------


def visible_projects(principal: Principal, project: str | None) -> list[str] | None:
    """Projects whose usage the caller may read (None: all of them, for a platform-admin).

    Asking for a project the caller may not read is refused rather than answered empty, so a
    typo is not mistaken for "no usage".
    """
    if project is not None:
        decision = decide(principal, "usage.read", project)
        if not decision.allowed:
            raise Forbidden(decision.reason)
        return [project]
    if principal.platform_admin:
        return None
    return sorted(p for p in principal.project_roles if decide(principal, "usage.read", p).allowed)


def tenant(column: Any, principal: Principal, project: str | None) -> ColumnElement[bool]:
    projects = visible_projects(principal, project)
    if projects is None:
        return true()
    return column.in_(projects)  # type: ignore[no-any-return]


def is_postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _insert(session: AsyncSession, table: Any) -> Any:
    """The dialect's INSERT, which knows ``ON CONFLICT``."""
    return pg_insert(table) if is_postgres(session) else sqlite_insert(table)


# -- ingest ------------------------------------------------------------------------------------

# Raw event columns written by the ingest, in the order of its row tuples, with the PostgreSQL
# types they are staged in (see insert_events).
EVENT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("event_id", "text"),
    ("time", "timestamptz"),
    ("project", "text"),
    ("credential_id", "text"),
    ("subject_id", "text"),
    ("model", "text"),
    ("endpoint", "text"),
    ("kind", "text"),
    ("prompt_tokens", "int8"),
    ("completion_tokens", "int8"),
    ("ttft_ms", "float8"),
    ("duration_ms", "float8"),
    ("http_status", "int4"),
    ("status", "text"),
    ("error_type", "text"),
    ("usage_source", "text"),
    ("stream", "bool"),
    ("cost_nanos", "int8"),
    ("request_bytes", "int8"),
    ("response_bytes", "int8"),
    ("request_id", "text"),
)

EVENT_NAMES: tuple[str, ...] = tuple(c for c, _ in EVENT_COLUMNS)
_names = ", ".join(EVENT_NAMES)
# PostgreSQL: the batch is copied (COPY, binary) into a session-local staging table, then moved
# with one INSERT … ON CONFLICT. asyncpg encodes COPY records in C; bound arrays cost it about
# twice the client CPU per row (a type check per element), and this is the busiest statement of
# the ingest. Created in the batch's transaction (IF NOT EXISTS: once per connection in
# practice) and emptied at every commit, so a rolled-back batch leaves nothing staged.
_STAGING = "usage_events_staged"
_CREATE_STAGING_PG = text(
    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} ("
    + ", ".join(f"{c} {t}" for c, t in EVENT_COLUMNS)
    + ") ON COMMIT DELETE ROWS"
)
# Column names are the constants above; the one value is a bound parameter.
_MOVE_STAGED_PG = text(
    f"INSERT INTO usage_events ({_names}, received_at) "  # noqa: S608
    f"SELECT {_names}, CAST(:received_at AS timestamptz) FROM {_STAGING} "
    "ON CONFLICT DO NOTHING RETURNING event_id"
)


async def insert_events(
    session: AsyncSession, rows: Sequence[Sequence[Any]], received_at: datetime
) -> set[str]:
    """Keep the raw events (each row's values in ``EVENT_COLUMNS`` order); returns the ids that
    were not kept already.

    The inbox has let these through, but it forgets ids sooner than raw events are kept: an
    event replayed after that (a gateway spool days late) is still found here and not counted
    again. On PostgreSQL a COPY and one statement whatever the batch size, in the session's
    transaction like every other write of the batch.
    """
    if not rows:
        return set()
    if is_postgres(session):
        # Through SQLAlchemy first: it opens the transaction the COPY then joins.
        await session.execute(_CREATE_STAGING_PG)
        connection = await (await session.connection()).get_raw_connection()
        driver = connection.driver_connection
        if driver is None:  # only for a connection already returned to the pool
            raise RuntimeError("no driver connection to copy through")
        await driver.copy_records_to_table(_STAGING, records=rows, columns=EVENT_NAMES)
        staged = await session.execute(_MOVE_STAGED_PG, {"received_at": received_at})
        return {row[0] for row in staged}
    statement = (
        _insert(session, usage_events).on_conflict_do_nothing().returning(usage_events.c.event_id)
    )
    kept: set[str] = set()
    for start in range(0, len(rows), 40):  # 22 columns each, under SQLite's parameter limit
        chunk = [
            {**dict(zip(EVENT_NAMES, r, strict=True)), "received_at": received_at}
            for r in rows[start : start + 40]
        ]
        kept.update(row[0] for row in await session.execute(statement.values(chunk)))
    return kept


_MINUTE_KEY = ("minute", "project", "model", "credential_id", "endpoint")
_MINUTE_TYPES = {
    "minute": "timestamptz",
    "ttft_sum_ms": "float8",
    "duration_sum_ms": "float8",
    **{k: "text" for k in _MINUTE_KEY[1:]},
}
_MINUTE_COLUMNS = (*_MINUTE_KEY, *MINUTE_SUMS)
_minute_names = ", ".join(_MINUTE_COLUMNS)
# One statement text whatever the number of rows (columns travel as arrays): prepared once
# per connection, where a multi-row VALUES would be parsed and planned again for every batch.
_ADD_MINUTES_PG = text(
    f"INSERT INTO usage_minutes ({_minute_names}) SELECT * FROM unnest("  # noqa: S608
    + ", ".join(f"CAST(:{c} AS {_MINUTE_TYPES.get(c, 'int8')}[])" for c in _MINUTE_COLUMNS)
    + ") ON CONFLICT (minute, project, model, credential_id, endpoint) DO UPDATE SET "
    + ", ".join(f"{c} = usage_minutes.{c} + EXCLUDED.{c}" for c in MINUTE_SUMS)
)


async def add_minutes(session: AsyncSession, rows: Sequence[Mapping[str, Any]]) -> None:
    """Add per-minute aggregates; rows go in key order so two replicas never deadlock."""
    if not rows:
        return
    ordered = sorted(rows, key=lambda r: tuple(r[k] for k in _MINUTE_KEY))
    if is_postgres(session):
        await session.execute(
            _ADD_MINUTES_PG, {c: [r[c] for r in ordered] for c in _MINUTE_COLUMNS}
        )
        return
    ins = _insert(session, usage_minutes)
    statement = ins.on_conflict_do_update(
        index_elements=list(_MINUTE_KEY),
        set_={c: usage_minutes.c[c] + ins.excluded[c] for c in MINUTE_SUMS},
    )
    await session.execute(statement, ordered)


# A bin's key: (minute, project, model, credential_id, endpoint, metric, bin).
BinKey = tuple[datetime, str, str, str, str, str, int]
_ADD_BINS_PG = text(
    "INSERT INTO usage_latency_bins (minute, project, model, credential_id, endpoint, metric, bin,"
    " count) SELECT * FROM unnest(CAST(:minute AS timestamptz[]), CAST(:project AS text[]),"
    " CAST(:model AS text[]), CAST(:credential_id AS text[]), CAST(:endpoint AS text[]),"
    " CAST(:metric AS text[]), CAST(:bin AS int4[]), CAST(:count AS int8[]))"
    " ON CONFLICT (minute, project, model, credential_id, endpoint, metric, bin) DO UPDATE SET"
    " count = usage_latency_bins.count + EXCLUDED.count"
)
_BIN_COLUMNS = ("minute", "project", "model", "credential_id", "endpoint", "metric", "bin")


async def add_latency_bins(session: AsyncSession, bins: Mapping[BinKey, int]) -> None:
    """Add calls to their latency bins, in key order (two replicas never deadlock)."""
    if not bins:
        return
    ordered = sorted(bins.items())
    if is_postgres(session):
        params: dict[str, list[Any]] = {
            c: [k[i] for k, _ in ordered] for i, c in enumerate(_BIN_COLUMNS)
        }
        params["count"] = [n for _, n in ordered]
        await session.execute(_ADD_BINS_PG, params)
        return
    table = usage_latency_bins
    ins = _insert(session, table)
    statement = ins.on_conflict_do_update(
        index_elements=list(_BIN_COLUMNS), set_={"count": table.c["count"] + ins.excluded["count"]}
    )
    rows = [{**dict(zip(_BIN_COLUMNS, k, strict=True)), "count": n} for k, n in ordered]
    for start in range(0, len(rows), 100):  # 8 parameters each: within SQLite's limit
        await session.execute(statement.values(rows[start : start + 100]))


async def price_book(session: AsyncSession, assets: Sequence[str]) -> PriceBook:
    """The whole price history of ``assets`` (every version of each): a small table."""
    if not assets:
        return PriceBook(())
    return PriceBook(await session.scalars(select(Price).where(Price.asset.in_(assets))))


async def quotas_of_projects(session: AsyncSession, projects: Sequence[str]) -> Sequence[Quota]:
    if not projects:
        return []
    query = select(Quota).where(Quota.project.in_(projects)).order_by(Quota.id)
    return (await session.scalars(query)).all()


def _project_lock_key(project: str) -> int:
    digest = hashlib.blake2b(f"steward.metering.quotas:{project}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


async def hold_projects(session: AsyncSession, projects: Sequence[str], *, exclusive: bool) -> None:
    """Order quota creation (exclusive) against counting a batch (shared) for the same projects,
    until commit: a new quota's backfill sees every batch counted before it, and every batch
    after it sees the quota, so each call counts once. PostgreSQL advisory locks; SQLite has a
    single writer, which orders them already."""
    if not projects or not is_postgres(session):
        return
    keys = sorted({_project_lock_key(p) for p in projects})
    await session.execute(_HOLD_EXCLUSIVE if exclusive else _HOLD_SHARED, {"keys": keys})


_HOLD_EXCLUSIVE = text(
    "SELECT pg_advisory_xact_lock(k) FROM (SELECT unnest(CAST(:keys AS int8[])) AS k ORDER BY 1) s"
)
_HOLD_SHARED = text(
    "SELECT pg_advisory_xact_lock_shared(k)"
    " FROM (SELECT unnest(CAST(:keys AS int8[])) AS k ORDER BY 1) s"
)


async def window_usage(
    session: AsyncSession,
    project: str,
    key_id: str | None,
    model: str | None,
    start: datetime,
    end: datetime,
) -> tuple[int, int, int]:
    """(input, output, requests) of a quota's scope in [start, end), from the minute aggregates
    (windows begin on a minute, and the ingest files each call under its own minute)."""
    m = usage_minutes.c
    query = select(
        func.coalesce(func.sum(m.prompt_tokens), 0),
        func.coalesce(func.sum(m.completion_tokens), 0),
        func.coalesce(func.sum(m.requests), 0),
    ).where(m.project == project, m.minute >= start, m.minute < end)
    if key_id is not None:
        query = query.where(m.credential_id == key_id)
    if model is not None:
        query = query.where(m.model == model)
    tokens_in, tokens_out, requests = (await session.execute(query)).one()
    return int(tokens_in), int(tokens_out), int(requests)


_COUNTER_COLUMNS = (
    "quota_id",
    "window_start",
    "input_tokens",
    "output_tokens",
    "requests",
    "updated_at",
)
_ADD_COUNTERS_PG = text(
    "INSERT INTO quota_counters (quota_id, window_start, input_tokens, output_tokens, requests,"
    " updated_at) SELECT * FROM unnest(CAST(:quota_id AS text[]),"
    " CAST(:window_start AS timestamptz[]), CAST(:input_tokens AS int8[]),"
    " CAST(:output_tokens AS int8[]), CAST(:requests AS int8[]),"
    " CAST(:updated_at AS timestamptz[]))"
    " ON CONFLICT (quota_id, window_start) DO UPDATE SET"
    " input_tokens = quota_counters.input_tokens + EXCLUDED.input_tokens,"
    " output_tokens = quota_counters.output_tokens + EXCLUDED.output_tokens,"
    " requests = quota_counters.requests + EXCLUDED.requests,"
    " updated_at = EXCLUDED.updated_at"
    " RETURNING quota_id, window_start, input_tokens, output_tokens, requests"
)


async def add_to_counters(
    session: AsyncSession,
    amounts: Mapping[tuple[str, datetime], tuple[int, int, int]],
    now: datetime,
) -> dict[tuple[str, datetime], Used]:
    """Add (input, output, requests) to each (quota, window) counter in one statement, in key
    order (two replicas never deadlock); returns the new totals."""
    if not amounts:
        return {}
    table = QuotaCounter.__table__
    values = [
        {
            "quota_id": quota_id,
            "window_start": start,
            "input_tokens": i,
            "output_tokens": o,
            "requests": n,
            "updated_at": now,
        }
        for (quota_id, start), (i, o, n) in sorted(amounts.items())
    ]
    totals: dict[tuple[str, datetime], Used] = {}
    if is_postgres(session):
        params = {c: [v[c] for v in values] for c in _COUNTER_COLUMNS}
        for row in await session.execute(_ADD_COUNTERS_PG, params):
            totals[(row[0], row[1])] = (int(row[2]), int(row[3]), int(row[4]))
        return totals
    ins = _insert(session, table)
    statement = ins.on_conflict_do_update(
        index_elements=["quota_id", "window_start"],
        set_={
            "input_tokens": table.c.input_tokens + ins.excluded.input_tokens,
            "output_tokens": table.c.output_tokens + ins.excluded.output_tokens,
            "requests": table.c.requests + ins.excluded.requests,
            "updated_at": ins.excluded.updated_at,
        },
    ).returning(
        table.c.quota_id,
        table.c.window_start,
        table.c.input_tokens,
        table.c.output_tokens,
        table.c.requests,
    )
    for start in range(0, len(values), 100):  # 6 parameters each: within SQLite's limit
        for row in await session.execute(statement.values(values[start : start + 100])):
            totals[(row[0], row[1])] = (int(row[2]), int(row[3]), int(row[4]))
    return totals


async def claim_alert(
    session: AsyncSession,
    quota_id: str,
    window_start: datetime,
    threshold_pct: int,
    level: str,
    dimensions: list[str],
    now: datetime,
) -> bool:
    """Record that a threshold was reached in a window; False if it already was."""
    table = QuotaAlert.__table__
    statement = (
        _insert(session, table)
        .values(
            quota_id=quota_id,
            window_start=window_start,
            threshold_pct=threshold_pct,
            level=level,
            dimensions=dimensions,
            created_at=now,
        )
        .on_conflict_do_nothing()
        .returning(table.c.quota_id)
    )
    return (await session.execute(statement)).first() is not None


# -- quotas ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counted:
    """A quota window's count, and the part each gateway process's calls make up (one read)."""

    used: Used = (0, 0, 0)
    by_gateway: Mapping[str, Used] = field(default_factory=dict)


async def counters(
    session: AsyncSession, keys: Sequence[tuple[str, datetime]]
) -> dict[tuple[str, datetime], Counted]:
    """What is counted for each (quota id, window start) asked; absent ones are 0. The totals
    and the per-gateway parts come from one statement, so they agree with each other."""
    if not keys:
        return {}
    c, g = QuotaCounter, QuotaGatewayCounter
    totals: dict[tuple[str, datetime], Used] = {}
    parts: dict[tuple[str, datetime], dict[str, Used]] = {}
    for start in range(0, len(keys), 400):
        chunk = keys[start : start + 400]
        ids, starts = {k[0] for k in chunk}, {k[1] for k in chunk}
        query = union_all(
            select(
                c.quota_id,
                c.window_start,
                literal(None, String).label("gateway_id"),
                c.input_tokens,
                c.output_tokens,
                c.requests,
            ).where(c.quota_id.in_(ids), c.window_start.in_(starts)),
            select(
                g.quota_id,
                g.window_start,
                g.gateway_id,
                g.input_tokens,
                g.output_tokens,
                g.requests,
            ).where(g.quota_id.in_(ids), g.window_start.in_(starts)),
        )
        for quota_id, window_start, gateway_id, *amounts in await session.execute(query):
            key = (quota_id, window_start)
            used = (int(amounts[0]), int(amounts[1]), int(amounts[2]))
            if gateway_id is None:
                totals[key] = used
            else:
                parts.setdefault(key, {})[gateway_id] = used
    return {k: Counted(totals.get(k, (0, 0, 0)), parts.get(k, {})) for k in keys}


async def add_to_gateway_counters(
    session: AsyncSession, amounts: Mapping[tuple[str, datetime, str], Used]
) -> None:
    """Add (input, output, requests) to each (quota, window, gateway) part, in key order (no
    deadlock)."""
    if not amounts:
        return
    table = QuotaGatewayCounter.__table__
    values = [
        {
            "quota_id": quota_id,
            "window_start": start,
            "gateway_id": gateway_id,
            "input_tokens": i,
            "output_tokens": o,
            "requests": n,
        }
        for (quota_id, start, gateway_id), (i, o, n) in sorted(amounts.items())
    ]
    ins = _insert(session, table)
    statement = ins.on_conflict_do_update(
        index_elements=["quota_id", "window_start", "gateway_id"],
        set_={
            "input_tokens": table.c.input_tokens + ins.excluded.input_tokens,
            "output_tokens": table.c.output_tokens + ins.excluded.output_tokens,
            "requests": table.c.requests + ins.excluded.requests,
        },
    )
    for start in range(0, len(values), 100):  # 6 parameters each: within SQLite's limit
        await session.execute(statement.values(values[start : start + 100]))


async def visible_quotas(
    session: AsyncSession, principal: Principal, project: str | None
) -> Sequence[Quota]:
    query = (
        select(Quota)
        .where(tenant(Quota.project, principal, project))
        .order_by(Quota.project, Quota.window, Quota.id)
    )
    return (await session.scalars(query)).all()


async def quota_in(session: AsyncSession, project: str, quota_id: str, *, lock: bool) -> Quota:
    query = select(Quota).where(Quota.id == quota_id, Quota.project == project)
    if lock:
        query = query.with_for_update()
    quota = await session.scalar(query)
    if quota is None:
        raise NotFound(f"project {project!r} has no quota {quota_id!r}")
    return quota


async def quota_by_scope(session: AsyncSession, scope: str, *, lock: bool) -> Quota | None:
    query = select(Quota).where(Quota.scope == scope)
    if lock:
        query = query.with_for_update()
    return await session.scalar(query)


async def quotas_by_id(session: AsyncSession, ids: Sequence[str]) -> Sequence[Quota]:
    if not ids:
        return []
    return (await session.scalars(select(Quota).where(Quota.id.in_(ids)))).all()


# -- prices ------------------------------------------------------------------------------------


async def price_history(session: AsyncSession, asset: str, version: str) -> Sequence[Price]:
    """The rows of one asset's (or one version's) price, oldest first."""
    query = (
        select(Price)
        .where(Price.asset == asset, Price.version == version)
        .order_by(Price.effective_from)
    )
    return (await session.scalars(query)).all()


async def all_prices(session: AsyncSession, asset: str | None = None) -> Sequence[Price]:
    """Every price row (of one asset), by asset, version and time."""
    query = select(Price).order_by(Price.asset, Price.version, Price.effective_from)
    if asset is not None:
        query = query.where(Price.asset == asset)
    return (await session.scalars(query)).all()


# -- dedicated endpoints ---------------------------------------------------------------------


async def endpoint_run(session: AsyncSession, endpoint_id: str) -> EndpointRun | None:
    """The endpoint's row, locked on PostgreSQL: its events are applied one at a time."""
    query = select(EndpointRun).where(EndpointRun.endpoint_id == endpoint_id)
    if is_postgres(session):
        query = query.with_for_update()
    return (await session.scalars(query)).one_or_none()


async def open_period(session: AsyncSession, endpoint_id: str) -> GpuPeriod | None:
    query = select(GpuPeriod).where(
        GpuPeriod.endpoint_id == endpoint_id, GpuPeriod.ended_at.is_(None)
    )
    return (await session.scalars(query)).one_or_none()


@dataclass(frozen=True)
class EndpointRows:
    run: EndpointRun
    periods: list[GpuPeriod]
    plan: EndpointPlan | None


async def _with_periods_and_plans(
    session: AsyncSession, runs: Sequence[EndpointRun]
) -> list[EndpointRows]:
    ids = [r.endpoint_id for r in runs]
    periods: dict[str, list[GpuPeriod]] = {i: [] for i in ids}
    if ids:
        found = await session.scalars(
            select(GpuPeriod)
            .where(GpuPeriod.endpoint_id.in_(ids))
            .order_by(GpuPeriod.endpoint_id, GpuPeriod.started_at)
        )
        for period in found:
            periods[period.endpoint_id].append(period)
    request_ids = [r.request_id for r in runs if r.request_id]
    plans: dict[str, EndpointPlan] = {}
    if request_ids:
        found_plans = await session.scalars(
            select(EndpointPlan).where(EndpointPlan.request_id.in_(request_ids))
        )
        plans = {p.request_id: p for p in found_plans}
    return [EndpointRows(r, periods[r.endpoint_id], plans.get(r.request_id or "")) for r in runs]


async def endpoint_costs(
    session: AsyncSession,
    principal: Principal,
    project: str | None,
    status: str | None,
    limit: int,
) -> list[EndpointRows]:
    """The endpoints the caller may see, newest first, with what is needed to cost them."""
    query = (
        select(EndpointRun)
        .where(tenant(EndpointRun.project, principal, project))
        .order_by(EndpointRun.event_time.desc(), EndpointRun.endpoint_id)
        .limit(limit)
    )
    if status is not None:
        query = query.where(EndpointRun.status == status)
    return await _with_periods_and_plans(session, (await session.scalars(query)).all())


async def runs_to_check(
    session: AsyncSession, endpoint_ids: Sequence[str] | None = None
) -> list[EndpointRows]:
    """Endpoints with a plan that have not yet gone over it: all that still hold GPUs, or the
    ones named (just changed by an event)."""
    query = select(EndpointRun).where(
        EndpointRun.over_plan_at.is_(None), EndpointRun.request_id.is_not(None)
    )
    if endpoint_ids is None:
        held = select(GpuPeriod.endpoint_id).where(GpuPeriod.ended_at.is_(None))
        query = query.where(EndpointRun.endpoint_id.in_(held))
    else:
        query = query.where(EndpointRun.endpoint_id.in_(endpoint_ids))
    return await _with_periods_and_plans(session, (await session.scalars(query)).all())


# -- usage reports -----------------------------------------------------------------------------

SUM_COLUMNS: tuple[str, ...] = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cost_nanos",
    "request_bytes",
    "response_bytes",
    "rate_limited",
    "client_errors",
    "server_errors",
    "ttft_count",
    "ttft_sum_ms",
    "duration_sum_ms",
    *TTFT_BUCKETS,
    *DURATION_BUCKETS,
)


def _bucket(session: AsyncSession, interval: str, column: Any) -> Any:
    """The start of the interval holding ``column`` (UTC). ``interval`` is a validated literal:
    inlined so that SELECT and GROUP BY are the same expression."""
    if interval == "minute":
        return column
    if is_postgres(session):
        expression = func.date_trunc(
            literal_column(f"'{interval}'"), column, literal_column("'UTC'")
        )
    else:
        formats = {
            "hour": "%Y-%m-%d %H:00:00.000000",
            "day": "%Y-%m-%d 00:00:00.000000",
            "month": "%Y-%m-01 00:00:00.000000",
        }
        expression = func.strftime(literal_column(f"'{formats[interval]}'"), column)
    return type_coerce(expression, UTCDateTime)


def dimension(m: Any, name: str) -> ColumnElement[Any]:
    """A report's grouping key on an aggregate table: its column, or for ``tool`` the tool of
    an MCP call, whose endpoint is ``<server>/<tool>`` with the server as its model (NULL for a
    model call)."""
    if name != "tool":
        return cast("ColumnElement[Any]", m[DIMENSIONS[name]])
    prefix = func.length(m.model) + 1
    is_tool = func.substr(m.endpoint, 1, prefix) == m.model + "/"
    return case((is_tool, func.substr(m.endpoint, prefix + 1)), else_=null())


def _filters(
    principal: Principal, f: UsageFilter, start: datetime, end: datetime, m: Any = usage_minutes.c
) -> list[ColumnElement[bool]]:
    """The report's filters on an aggregate table's columns (minutes or latency bins)."""
    where = [tenant(m.project, principal, f.project), m.minute >= start, m.minute < end]
    for name, value in (("model", f.model), ("credential", f.credential), ("endpoint", f.endpoint)):
        if value is not None:
            where.append(m[DIMENSIONS[name]] == value)
    return where


async def usage(
    session: AsyncSession,
    principal: Principal,
    f: UsageFilter,
    start: datetime,
    end: datetime,
    group_by: Sequence[str],
    interval: str | None = None,
    limit: int | None = None,
) -> Sequence[Any]:
    """Summed aggregates per group (and per interval for a series), ordered by the keys."""
    m = usage_minutes.c
    keys = [dimension(m, g).label(g) for g in group_by]
    if interval is not None:
        keys.insert(0, _bucket(session, interval, m.minute).label("start"))
    sums = [func.coalesce(func.sum(m[c]), 0).label(c) for c in SUM_COLUMNS]
    query: Select[Any] = select(*keys, *sums).where(*_filters(principal, f, start, end))
    if keys:
        query = query.group_by(*keys).order_by(*keys)
    if limit is not None:
        query = query.limit(limit)
    return list((await session.execute(query)).all())


# Per group (the interval's start first, for a series, then the ``group_by`` values): each
# metric's bins and counts.
Sketches = dict[tuple[Any, ...], dict[str, dict[int, int]]]


async def latency_sketches(
    session: AsyncSession,
    principal: Principal,
    f: UsageFilter,
    start: datetime,
    end: datetime,
    group_by: Sequence[str],
    interval: str | None = None,
) -> Sketches:
    """The latency sketches of the groups ``usage`` reports, summed over their minutes."""
    b = usage_latency_bins.c
    keys = [dimension(b, g).label(g) for g in group_by]
    if interval is not None:
        keys.insert(0, _bucket(session, interval, b.minute).label("start"))
    query = (
        select(*keys, b.metric, b.bin, func.sum(b["count"]))
        .where(*_filters(principal, f, start, end, b))
        .group_by(*keys, b.metric, b.bin)
    )
    found: Sketches = {}
    for row in await session.execute(query):
        *group, metric, bin_, count = row
        found.setdefault(tuple(group), {}).setdefault(metric, {})[int(bin_)] = int(count)
    return found


TOP_METRICS: dict[str, Any] = {
    "total_tokens": usage_minutes.c.prompt_tokens + usage_minutes.c.completion_tokens,
    "prompt_tokens": usage_minutes.c.prompt_tokens,
    "completion_tokens": usage_minutes.c.completion_tokens,
    "requests": usage_minutes.c.requests,
    "errors": usage_minutes.c.errors,
    "cost": usage_minutes.c.cost_nanos,
}


async def top(
    session: AsyncSession,
    principal: Principal,
    f: UsageFilter,
    start: datetime,
    end: datetime,
    by: str,
    metric: str,
    limit: int,
) -> Sequence[Any]:
    m = usage_minutes.c
    key = m[DIMENSIONS[by]]
    value = func.sum(TOP_METRICS[metric])
    query = (
        select(
            key.label("key"),
            func.min(m.project).label("project"),
            value.label("value"),
            func.sum(m.requests).label("requests"),
            func.sum(m.prompt_tokens + m.completion_tokens).label("total_tokens"),
            func.sum(m.cost_nanos).label("cost_nanos"),
        )
        .where(*_filters(principal, f, start, end))
        .group_by(key)
        .order_by(value.desc(), key)
        .limit(limit)
    )
    return list((await session.execute(query)).all())


async def raw_events(
    session: AsyncSession,
    principal: Principal,
    f: UsageEventsQuery,
    start: datetime,
    end: datetime,
) -> Sequence[Any]:
    """Raw events (kept for the retention period), newest first."""
    e = usage_events.c
    where = [tenant(e.project, principal, f.project), e.time >= start, e.time < end]
    for name, value in (("model", f.model), ("credential", f.credential), ("endpoint", f.endpoint)):
        if value is not None:
            where.append(e[DIMENSIONS[name]] == value)
    if f.request_id is not None:
        where.append(e.request_id == f.request_id)
    query = select(usage_events).where(*where).order_by(e.time.desc(), e.event_id).limit(f.limit)
    return list((await session.execute(query)).all())


# -- retention and webhooks --------------------------------------------------------------------


async def delete_older(
    session: AsyncSession,
    table: Any,
    key: str,
    column: str,
    cutoff: datetime,
    *,
    chunk: int,
    where: ColumnElement[bool] | None = None,
) -> int:
    """Delete up to ``chunk`` rows older than ``cutoff`` (small transactions, no long locks)."""
    condition = table.c[column] < cutoff
    if where is not None:
        condition = condition & where
    victims = select(table.c[key]).where(condition).limit(chunk)
    statement = delete(table).where(table.c[key].in_(victims))
    if where is not None:
        statement = statement.where(where)
    result = await session.execute(statement)
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


INBOX = bus_tables.inbox


@dataclass(frozen=True)
class Due:
    id: str
    url: str
    event_type: str
    event_id: str
    body: str
    attempts: int


async def claim_deliveries(
    session: AsyncSession, now: datetime, lease_until: datetime, limit: int
) -> list[Due]:
    """Webhook deliveries due now, leased to this process until ``lease_until``."""
    w = WebhookDelivery
    query = (
        select(w)
        .where(w.delivered_at.is_(None), w.failed_at.is_(None), w.next_attempt_at <= now)
        .order_by(w.next_attempt_at, w.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    due = []
    for d in await session.scalars(query):
        d.attempts += 1
        d.next_attempt_at = lease_until
        due.append(Due(d.id, d.url, d.event_type, d.event_id, d.body, d.attempts))
    await session.flush()
    return due
