"""Quota webhooks: POST each warning/exceeded event to its URLs until they take it.

Deliveries are rows written in the transaction that raised the alert, so a crash loses none. A
sender leases due rows (other replicas skip them), POSTs the CloudEvent (structured JSON mode,
signed when ``metering_webhook_secret`` is set), and records the outcome: any 2xx is delivered;
anything else is retried with exponential backoff up to ``metering_webhook_max_attempts``.
Receivers may see an event twice (at-least-once); ``X-Steward-Event-Id`` lets them drop repeats.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from datetime import timedelta

import httpx
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.db import Clock
from libs.common.settings import Settings
from services.metering import metrics
from services.metering import repository as repo
from services.metering.background import stop_if_cancelled
from services.metering.models import WebhookDelivery

log = logging.getLogger("steward.metering.webhooks")

MAX_BACKOFF_SECONDS = 300.0


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookSender:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        http: httpx.AsyncClient,
        settings: Settings,
        clock: Clock,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.http = http
        self.settings = settings
        self.clock = clock
        secret = settings.metering_webhook_secret
        self.secret = secret.get_secret_value().encode() if secret else None

    async def deliver_due(self, limit: int = 20) -> int:
        """Attempt every due delivery once; returns how many were attempted."""
        now = self.clock()
        lease = timedelta(seconds=self.settings.metering_webhook_timeout_seconds + 30)
        async with self.sessionmaker() as session, session.begin():
            due = await repo.claim_deliveries(session, now, now + lease, limit)
        if due:
            await asyncio.gather(*(self._attempt(d) for d in due))
        return len(due)

    async def _attempt(self, d: repo.Due) -> None:
        body = d.body.encode()
        headers = {
            "Content-Type": "application/cloudevents+json",
            "User-Agent": "steward-metering",
            "X-Steward-Event": d.event_type,
            "X-Steward-Event-Id": d.event_id,
            "X-Steward-Delivery": d.id,
        }
        if self.secret is not None:
            headers["X-Steward-Signature"] = signature(self.secret, body)
        error: str | None = None
        try:
            response = await self.http.post(
                d.url,
                content=body,
                headers=headers,
                timeout=self.settings.metering_webhook_timeout_seconds,
            )
            if not 200 <= response.status_code < 300:
                error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        now = self.clock()
        values: dict[str, object]
        if error is None:
            values = {"delivered_at": now, "last_error": None}
            metrics.WEBHOOKS.labels("delivered").inc()
        elif d.attempts >= self.settings.metering_webhook_max_attempts:
            values = {"failed_at": now, "last_error": error}
            metrics.WEBHOOKS.labels("failed").inc()
            log.error("webhook given up", extra={"url": d.url, "error": error})
        else:
            backoff = min(
                self.settings.metering_webhook_retry_seconds * 2 ** (d.attempts - 1),
                MAX_BACKOFF_SECONDS,
            )
            values = {"next_attempt_at": now + timedelta(seconds=backoff), "last_error": error}
            metrics.WEBHOOKS.labels("retry").inc()
            log.warning("webhook failed; will retry", extra={"url": d.url, "error": error})
        async with self.sessionmaker() as session, session.begin():
            await session.execute(
                update(WebhookDelivery).where(WebhookDelivery.id == d.id).values(**values)
            )

    async def run(self, poll_seconds: float = 0.25) -> None:
        while True:
            stop_if_cancelled()
            try:
                while await self.deliver_due():
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook delivery failed; retrying")
            await asyncio.sleep(poll_seconds)
