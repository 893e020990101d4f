"""Metering rules and state changes: quotas, their alerts, prices.

Every change emits its events and an audit record in the same transaction, through the unit of
work. The arithmetic of windows and thresholds is ``libs.common.quota``, shared with the
gateway, so both sides agree on what "80% of the hour" means.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from libs.common import quota as q
from libs.common.clients import AuthzClient
from libs.common.errors import Conflict, NotFound, ServiceUnavailable, Unprocessable
from libs.common.events import CloudEvent
from libs.common.events.approval import QuotaPayload, RequestApproved
from libs.common.events.metering import (
    QuotaDeleted,
    QuotaExceeded,
    QuotaLimits,
    QuotaState,
    QuotaUpdated,
    QuotaWarning,
    Window,
)
from libs.common.outbox import Outbox
from libs.common.settings import Settings
from libs.common.uow import UnitOfWork
from services.metering import repository as repo
from services.metering.models import Price, Quota, WebhookDelivery
from services.metering.pricing import ANY_VERSION
from services.metering.schemas import PriceSet, QuotaCreate, QuotaUpdate

log = logging.getLogger("steward.metering")

NANOS = Decimal(1_000_000_000)


# -- quota state -------------------------------------------------------------------------------


def limits_of(quota: Quota) -> QuotaLimits:
    return QuotaLimits(
        input_tokens=quota.input_limit,
        output_tokens=quota.output_limit,
        total_tokens=quota.total_limit,
        requests=quota.request_limit,
    )


def scope_of(project: str, key_id: str | None, model: str | None, window: str) -> str:
    return f"{project}/{key_id or '*'}/{model or '*'}/{window}"


def state_of(
    quota: Quota,
    now: datetime,
    used: q.Used,
    counted_through: datetime | None,
    *,
    model: type[QuotaState] = QuotaState,
    by_gateway: Mapping[str, q.Used] | None = None,
    **extra: Any,
) -> QuotaState:
    """The quota and its usage (input, output, requests) in the window containing ``now``;
    ``by_gateway``: the part of it each gateway's calls make up."""
    window: Window = quota.window  # type: ignore[assignment]
    start, end = q.window_bounds(window, now)
    limits = limits_of(quota)
    return model(
        quota_id=quota.id,
        project=quota.project,
        key_id=quota.key_id,
        model=quota.model,
        window=window,
        limits=limits,
        soft_threshold=quota.soft_threshold,
        revision=quota.revision,
        window_start=start,
        window_end=end,
        input_used=used[0],
        output_used=used[1],
        requests_used=used[2],
        status=q.status_of(limits, quota.soft_threshold, used),
        as_of=now,
        counted_through=counted_through,
        by_gateway={g: (u[0], u[1]) for g, u in (by_gateway or {}).items()},
        requests_by_gateway={g: u[2] for g, u in (by_gateway or {}).items() if u[2]},
        **extra,
    )


async def current_states(
    session: AsyncSession,
    quotas: Sequence[Quota],
    now: datetime,
    counted_through: datetime | None,
    *,
    model: type[QuotaState] = QuotaState,
) -> list[QuotaState]:
    keys = [(x.id, q.window_start(x.window, now)) for x in quotas]  # type: ignore[arg-type]
    counted = await repo.counters(session, keys)
    return [
        state_of(
            x,
            now,
            counted[key].used,
            counted_through,
            model=model,
            by_gateway=counted[key].by_gateway,
        )
        for x, key in zip(quotas, keys, strict=True)
    ]


async def raise_alerts(
    session: AsyncSession,
    outbox: Outbox,
    settings: Settings,
    quota: Quota,
    now: datetime,
    window_start: datetime,
    used: q.Used,
    before: q.Used | None,
) -> None:
    """Warn (soft threshold) and flag (hard limit) once per (quota, window, threshold).

    ``before`` is the usage before this transaction added to it: a threshold is checked only
    when it is crossed now (or, with None, whenever reached: after the quota itself changed).
    The alert row's primary key makes the event happen once even if two checks race.
    """
    limits = limits_of(quota)
    window: Window = quota.window  # type: ignore[assignment]
    start, end = q.window_bounds(window, window_start)
    if end <= now:
        return  # late usage of a window that is over: nothing left to warn about
    for threshold, event_type in ((quota.soft_threshold, QuotaWarning), (1.0, QuotaExceeded)):
        reached = q.dimensions_reached(limits, used, threshold)
        if not reached:
            continue
        if before is not None and q.dimensions_reached(limits, before, threshold):
            continue
        pct = round(threshold * 100)
        level = "exceeded" if threshold >= 1.0 else "warning"
        if not await repo.claim_alert(session, quota.id, start, pct, level, list(reached), now):
            continue
        # The per-gateway split of these counts, as this transaction left them (the counter
        # rows it changed are its own until commit): every state a gateway merges carries it.
        counted = (await repo.counters(session, [(quota.id, start)]))[(quota.id, start)]
        state = state_of(quota, window_start, used, None, by_gateway=counted.by_gateway)
        payload = event_type(
            **state.model_dump(exclude={"as_of"}),
            as_of=now,
            threshold=threshold,
            dimensions=reached,
        )
        event = await outbox.add(session, payload, entity=quota.id)
        queue_webhooks(session, (quota.webhook_url, *settings.metering_quota_webhooks), event, now)
        log.info(
            "quota threshold reached",
            extra={"quota_id": quota.id, "project": quota.project, "level": level},
        )
    await session.flush()


def queue_webhooks(
    session: AsyncSession, urls: Sequence[str | None], event: CloudEvent, now: datetime
) -> None:
    """One delivery per distinct URL, written with the event it announces (sent and retried
    by ``WebhookSender``)."""
    for url in dict.fromkeys(u for u in urls if u):
        session.add(
            WebhookDelivery(
                url=url,
                event_id=event.id,
                event_type=event.relative_subject,
                body=event.model_dump_json(),
                next_attempt_at=now,
            )
        )


async def verify_target(
    authz: AuthzClient, credential: str | None, project: str, key_id: str | None
) -> None:
    """Refuse a quota for a project (or key) authz does not know, before anything is written.

    Asked with the caller's own credential; if it may not read projects or keys, the check is
    skipped rather than refused (a quota for an unknown project only ever counts nothing).
    """
    response = await authz.request("GET", f"/v1/projects/{project}", credential=credential)
    if response.status_code == 404:
        raise NotFound(f"project {project!r} does not exist")
    if response.status_code == 403:
        return
    if response.status_code != 200:
        raise ServiceUnavailable(f"authz answered {response.status_code}; nothing changed")
    if key_id is None:
        return
    response = await authz.request("GET", f"/v1/projects/{project}/keys", credential=credential)
    if response.status_code == 200 and key_id not in {k["id"] for k in response.json()}:
        raise Unprocessable(f"key_id: {key_id!r} is not a key of project {project!r}")


# -- quota changes -----------------------------------------------------------------------------


def _snapshot(quota: Quota) -> dict[str, Any]:
    """What the audit log records of a quota."""
    return {
        "window": quota.window,
        "key_id": quota.key_id,
        "model": quota.model,
        "limits": limits_of(quota).model_dump(),
        "soft_threshold": quota.soft_threshold,
        "webhook_url": quota.webhook_url,
        "revision": quota.revision,
        "source": quota.source,
    }


async def _announce(
    uow: UnitOfWork,
    settings: Settings,
    quota: Quota,
    now: datetime,
    action: str,
    before: dict[str, Any] | None,
) -> QuotaState:
    """After a create or change: publish the new state, audit it, alert if already reached."""
    await uow.session.flush()
    [state] = await current_states(uow.session, [quota], now, None, model=QuotaUpdated)
    await uow.emit(state, entity=quota.id)
    await uow.audit(
        action,
        f"project/{quota.project}/quota/{quota.id}",
        project=quota.project,
        before=before,
        after=_snapshot(quota),
    )
    await raise_alerts(
        uow.session,
        uow.outbox,
        settings,
        quota,
        now,
        state.window_start,
        q.used_in(state),
        None,
    )
    return state


async def _open(uow: UnitOfWork, settings: Settings, quota: Quota, now: datetime) -> None:
    """Add a new quota already holding the usage its scope has in the current window (a quota
    made mid-window does not start at 0), then announce it."""
    await repo.hold_projects(uow.session, [quota.project], exclusive=True)
    uow.session.add(quota)
    await uow.session.flush()
    start, end = q.window_bounds(quota.window, now)  # type: ignore[arg-type]
    used = await repo.window_usage(
        uow.session, quota.project, quota.key_id, quota.model, start, end
    )
    if any(used):
        await repo.add_to_counters(uow.session, {(quota.id, start): used}, now)
    await _announce(uow, settings, quota, now, "quota.create", None)


async def create_quota(
    uow: UnitOfWork, settings: Settings, project: str, body: QuotaCreate, now: datetime
) -> Quota:
    scope = scope_of(project, body.key_id, body.model, body.window)
    if await repo.quota_by_scope(uow.session, scope, lock=False) is not None:
        raise Conflict(
            f"project {project!r} already has a {body.window} quota for this key and model;"
            " change that one"
        )
    quota = Quota(
        scope=scope,
        project=project,
        key_id=body.key_id,
        model=body.model,
        window=body.window,
        input_limit=body.limits.input_tokens,
        output_limit=body.limits.output_tokens,
        total_limit=body.limits.total_tokens,
        request_limit=body.limits.requests,
        soft_threshold=body.soft_threshold or settings.metering_soft_threshold,
        webhook_url=str(body.webhook_url) if body.webhook_url else None,
        revision=1,
        source="api",
        created_at=now,
        created_by=uow.actor,
        updated_at=now,
        updated_by=uow.actor,
    )
    await _open(uow, settings, quota, now)
    return quota


async def update_quota(
    uow: UnitOfWork, settings: Settings, quota: Quota, body: QuotaUpdate, now: datetime
) -> Quota:
    before = _snapshot(quota)
    if body.limits is not None:
        given = body.limits.model_fields_set
        limits = {
            "input_limit": body.limits.input_tokens
            if "input_tokens" in given
            else quota.input_limit,
            "output_limit": body.limits.output_tokens
            if "output_tokens" in given
            else quota.output_limit,
            "total_limit": body.limits.total_tokens
            if "total_tokens" in given
            else quota.total_limit,
            "request_limit": body.limits.requests if "requests" in given else quota.request_limit,
        }
        if not any(limits.values()):
            raise Unprocessable("limits: a quota keeps at least one limit; delete it instead")
        for name, value in limits.items():
            setattr(quota, name, value)
    if "soft_threshold" in body.model_fields_set and body.soft_threshold is not None:
        quota.soft_threshold = body.soft_threshold
    if "webhook_url" in body.model_fields_set:
        quota.webhook_url = str(body.webhook_url) if body.webhook_url else None
    if _snapshot(quota) == before:
        return quota  # nothing changed: no new revision, no event
    quota.revision += 1
    quota.source = "api"
    quota.updated_at = now
    quota.updated_by = uow.actor
    await _announce(uow, settings, quota, now, "quota.update", before)
    return quota


async def delete_quota(uow: UnitOfWork, quota: Quota) -> None:
    before = _snapshot(quota)
    await uow.session.delete(quota)
    await uow.session.flush()
    await uow.emit(QuotaDeleted(quota_id=quota.id, project=quota.project), entity=quota.id)
    await uow.audit(
        "quota.delete",
        f"project/{quota.project}/quota/{quota.id}",
        project=quota.project,
        before=before,
    )


async def apply_approved_quota(
    uow: UnitOfWork, settings: Settings, approved: RequestApproved, now: datetime
) -> Quota:
    """An approved ``quota`` request sets the total token limit of the project's (or the key's)
    quota for that window to the approved figure, creating the quota if there is none."""
    asked = QuotaPayload.model_validate(approved.payload)
    scope = scope_of(approved.project, asked.key_id, None, asked.window)
    quota = await repo.quota_by_scope(uow.session, scope, lock=True)
    if quota is None:
        quota = Quota(
            scope=scope,
            project=approved.project,
            key_id=asked.key_id,
            model=None,
            window=asked.window,
            total_limit=asked.token_limit,
            soft_threshold=settings.metering_soft_threshold,
            revision=1,
            source=f"approval:{approved.request_id}",
            created_at=now,
            created_by=uow.actor,
            updated_at=now,
            updated_by=uow.actor,
        )
        await _open(uow, settings, quota, now)
        return quota
    before = _snapshot(quota)
    quota.total_limit = asked.token_limit
    quota.revision += 1
    quota.source = f"approval:{approved.request_id}"
    quota.updated_at = now
    quota.updated_by = uow.actor
    await _announce(uow, settings, quota, now, "quota.update", before)
    return quota


# -- prices ------------------------------------------------------------------------------------


def to_nanos(value: Decimal) -> int:
    return int(value * NANOS)


def from_nanos(value: int) -> Decimal:
    """Nano-units as a decimal without trailing zeros, and without an exponent (100, not 1E+2)."""
    amount = (Decimal(value) / NANOS).normalize()
    return amount.quantize(Decimal(1)) if amount == amount.to_integral_value() else amount


def _price_dict(p: Price) -> dict[str, Any]:
    return {
        "version": p.version or None,
        "effective_from": p.effective_from.isoformat(),
        "input_per_1k": str(from_nanos(p.input_per_1k_nanos)),
        "output_per_1k": str(from_nanos(p.output_per_1k_nanos)),
        "gpu_hour": None if p.gpu_hour_nanos is None else str(from_nanos(p.gpu_hour_nanos)),
        "withdrawn": p.withdrawn,
    }


def _price_target(asset: str, version: str | None) -> str:
    return f"price/{asset}" + (f"@{version}" if version else "")


def _in_force(history: Sequence[Price], now: datetime) -> Price | None:
    """The row of ``history`` (oldest first) in force at ``now``, withdrawn or not."""
    return next((r for r in reversed(history) if r.effective_from <= now), None)


async def set_price(
    uow: UnitOfWork, asset: str, version: str | None, body: PriceSet, now: datetime
) -> Price:
    """Price a catalog asset (or one version of it) from ``body.effective_from`` (default now).

    A new row, never an edit of one in force: usage counted before keeps the price it was
    counted at. A time in the past is refused, since usage up to now is priced already and
    reports never re-price it; a price scheduled for the same instant is replaced.
    """
    at = body.effective_from or now
    if at < now:
        raise Conflict(
            f"effective_from {at.isoformat()} is in the past: usage up to now is priced already"
            " and is never re-priced; give a time from now on, or none for now"
        )
    key = version or ANY_VERSION
    history = await repo.price_history(uow.session, asset, key)
    current = _in_force(history, now)
    before = _price_dict(current) if current is not None and not current.withdrawn else None
    price = next((r for r in history if r.effective_from == at), None)
    if price is None:
        price = Price(asset=asset, version=key, effective_from=at)
        uow.session.add(price)
    price.input_per_1k_nanos = to_nanos(body.input_per_1k)
    price.output_per_1k_nanos = to_nanos(body.output_per_1k)
    price.gpu_hour_nanos = None if body.gpu_hour is None else to_nanos(body.gpu_hour)
    price.withdrawn = False
    price.created_at = now
    price.created_by = uow.actor
    await uow.session.flush()
    await uow.audit(
        "price.set", _price_target(asset, version), before=before, after=_price_dict(price)
    )
    return price


async def withdraw_price(uow: UnitOfWork, asset: str, version: str | None, now: datetime) -> None:
    """No price for the asset (or version) from now on: scheduled prices are dropped (they
    never applied) and the one in force ends now; the past keeps its price."""
    key = version or ANY_VERSION
    history = await repo.price_history(uow.session, asset, key)
    current = _in_force(history, now)
    scheduled = [r for r in history if r.effective_from > now]
    active = current is not None and not current.withdrawn
    if not active and not scheduled:
        what = f"version {version!r} of {asset!r}" if version else f"model {asset!r}"
        raise NotFound(f"{what} has no price")
    before = _price_dict(current) if current is not None and active else None
    for row in scheduled:
        await uow.session.delete(row)
    if current is not None and active:
        if current.effective_from == now:
            current.withdrawn = True
        else:
            uow.session.add(
                Price(
                    asset=asset,
                    version=key,
                    effective_from=now,
                    input_per_1k_nanos=0,
                    output_per_1k_nanos=0,
                    gpu_hour_nanos=None,
                    withdrawn=True,
                    created_at=now,
                    created_by=uow.actor,
                )
            )
    await uow.session.flush()
    await uow.audit(
        "price.delete",
        _price_target(asset, version),
        before=before,
        after={"withdrawn_at": now.isoformat(), "scheduled_dropped": len(scheduled)},
    )
