"""GPU-hours and cost of dedicated endpoints, held against the plan the reviewer approved.

Metering follows each endpoint through the inference service's events. While the inference
pool counts an endpoint's GPUs as held (``HOLDS_GPUS``: provisioning, ready) a ``GpuPeriod`` is
open at GPUs per replica times replicas; a scale closes it and opens the next; a stop, a failure
or the start of a deletion closes it (a runtime's cleanup may take long: billing does not wait).
Times are the events' own (when inference committed the change), so a scale, which leaves the
status as it was, is timed as well as a status change.

A period is priced at the GPU-hour price in force when it began for the endpoint's catalog asset
and version (``pricing.PriceBook``, the lookup token usage is priced by too; never by route
name), else at the rate approved in the request's cost & security plan. An endpoint is **over
plan** once its cost passes the approved estimate, or its GPU-hours the planned GPU-hours (a
longer or bigger run than approved); ``metering.endpoint.over_plan`` then announces it once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.events.approval import EndpointPayload, RequestApproved
from libs.common.events.inference import HOLDS_GPUS, EndpointState
from libs.common.events.metering import EndpointOverPlan
from libs.common.settings import Settings
from libs.common.uow import UnitOfWork
from services.metering import pricing
from services.metering import repository as repo
from services.metering.domain import from_nanos, queue_webhooks, to_nanos
from services.metering.models import EndpointPlan, EndpointRun, GpuPeriod

OverPlan = Literal["cost", "gpu_hours"]
# Who the audit log names for what metering finds on its own (an endpoint over its plan).
SYSTEM_ACTOR = "steward-metering"


async def record_plan(session: AsyncSession, approved: RequestApproved) -> None:
    """Keep an approved endpoint request's plan (once: the request id is the key)."""
    if approved.kind != "endpoint":
        return
    if await session.get(EndpointPlan, approved.request_id) is not None:
        return
    asked = EndpointPayload.model_validate(approved.payload)
    plan = asked.plan
    session.add(
        EndpointPlan(
            request_id=approved.request_id,
            project=approved.project,
            model_name=asked.model_name,
            version=asked.version,
            gpus=plan.gpus,
            replicas=plan.replicas,
            hours=plan.hours,
            gpu_hours=plan.gpu_hours,
            gpu_hour_rate_nanos=to_nanos(_decimal(plan.gpu_hour_rate)),
            estimated_cost_nanos=to_nanos(_decimal(plan.estimated_cost)),
            currency=plan.currency,
            approved_at=approved.decided_at,
            approved_by=approved.decided_by,
        )
    )
    await session.flush()


def _decimal(value: float) -> Decimal:
    return Decimal(str(value))


async def apply_endpoint_event(session: AsyncSession, state: EndpointState, at: datetime) -> None:
    """Move an endpoint's GPU periods to what this event says it holds from ``at`` on.

    Events about one endpoint are published in order; one older than the latest applied (a
    late redelivery) is stale and changes nothing.
    """
    run = await repo.endpoint_run(session, state.endpoint_id)
    if run is not None and at < run.event_time:
        return
    # Read before the run is added (a query would flush it half-filled).
    current = await repo.open_period(session, state.endpoint_id)
    held = state.gpus * state.replicas if state.status in HOLDS_GPUS else 0
    closes = current is not None and current.gpus != held
    opens = held > 0 and (current is None or closes)
    rate = None
    if opens:
        # By the catalog asset and version it serves, never its route name (``pricing``).
        book = await repo.price_book(session, [state.asset_name])
        rate = pricing.gpu_hour_nanos(book.at(state.asset_name, state.version, at))
    if run is None:
        run = EndpointRun(endpoint_id=state.endpoint_id, over_plan_at=None)
        session.add(run)
    run.project = state.project
    run.route_name = state.route_name
    run.asset_name = state.asset_name
    run.version = state.version
    run.runtime = state.runtime
    run.gpu_type = state.gpu_type
    run.request_id = state.request_id or run.request_id
    run.status = state.status
    run.event_time = at
    if closes and current is not None:
        current.ended_at = max(at, current.started_at)
    if opens:
        session.add(
            GpuPeriod(endpoint_id=state.endpoint_id, gpus=held, started_at=at, rate_nanos=rate)
        )
    await session.flush()


@dataclass(frozen=True)
class EndpointCost:
    """An endpoint's GPU-time and cost so far, beside its plan (if it came from a request)."""

    run: EndpointRun
    plan: EndpointPlan | None
    gpus_held: int
    first_held_at: datetime | None
    gpu_hours: float
    cost_nanos: int
    currency: str

    @property
    def comparable(self) -> bool:
        """Whether cost and estimate are in one currency (the plan may name another)."""
        return self.plan is not None and self.plan.currency == self.currency

    @property
    def planned_until(self) -> datetime | None:
        """When the planned duration runs out, counted from the first GPU-hour."""
        if self.plan is None or self.first_held_at is None:
            return None
        return self.first_held_at + timedelta(hours=self.plan.hours)

    @property
    def plan_used(self) -> float | None:
        """Cost as a fraction of the estimate (of GPU-hours when costs cannot be compared)."""
        if self.plan is None:
            return None
        if self.comparable and self.plan.estimated_cost_nanos > 0:
            return self.cost_nanos / self.plan.estimated_cost_nanos
        if self.plan.gpu_hours > 0:
            return self.gpu_hours / self.plan.gpu_hours
        return None

    @property
    def over_plan(self) -> OverPlan | None:
        if self.plan is None:
            return None
        if self.comparable and self.cost_nanos > self.plan.estimated_cost_nanos:
            return "cost"
        if self.gpu_hours > self.plan.gpu_hours:
            return "gpu_hours"
        return None


def cost_of(
    run: EndpointRun,
    periods: Sequence[GpuPeriod],
    plan: EndpointPlan | None,
    currency: str,
    now: datetime,
) -> EndpointCost:
    """Sum the periods up to ``now`` (an open one counts to ``now``)."""
    plan_rate = plan.gpu_hour_rate_nanos if plan is not None and plan.currency == currency else 0
    gpu_hours = 0.0
    cost = 0
    for period in periods:
        seconds = max(0.0, ((period.ended_at or now) - period.started_at).total_seconds())
        hours = period.gpus * seconds / 3600
        gpu_hours += hours
        cost += round(hours * (period.rate_nanos if period.rate_nanos is not None else plan_rate))
    return EndpointCost(
        run=run,
        plan=plan,
        gpus_held=next((p.gpus for p in periods if p.ended_at is None), 0),
        first_held_at=min((p.started_at for p in periods), default=None),
        gpu_hours=gpu_hours,
        cost_nanos=cost,
        currency=currency,
    )


def costs(rows: Sequence[repo.EndpointRows], currency: str, now: datetime) -> list[EndpointCost]:
    return [cost_of(r.run, r.periods, r.plan, currency, now) for r in rows]


async def check_over_plan(
    uow: UnitOfWork, settings: Settings, now: datetime, endpoint_ids: Sequence[str] | None = None
) -> int:
    """Announce the endpoints that have just gone over their plan (all that hold GPUs, or the
    ones named); returns how many did. The event goes to the configured alert webhooks too."""
    rows = await repo.runs_to_check(uow.session, endpoint_ids)
    announced = 0
    for c in costs(rows, settings.metering_currency, now):
        reason = c.over_plan
        if reason is None or c.plan is None:
            continue
        c.run.over_plan_at = now
        payload = EndpointOverPlan(
            endpoint_id=c.run.endpoint_id,
            project=c.run.project,
            request_id=c.plan.request_id,
            reason=reason,
            gpu_hours=round(c.gpu_hours, 4),
            planned_gpu_hours=c.plan.gpu_hours,
            cost=str(from_nanos(c.cost_nanos)),
            estimated_cost=str(from_nanos(c.plan.estimated_cost_nanos)),
            currency=c.currency,
            at=now,
        )
        event = await uow.emit(payload, entity=c.run.endpoint_id)
        queue_webhooks(uow.session, settings.metering_quota_webhooks, event, now)
        await uow.audit(
            "endpoint.over_plan",
            f"project/{c.run.project}/endpoint/{c.run.endpoint_id}",
            project=c.run.project,
            after=payload.model_dump(mode="json", exclude={"at"}),
        )
        announced += 1
    await uow.session.flush()
    return announced
