"""What the gateway holds while it runs, and how it starts and stops.

Built once by ``Gateway.start`` (the replicas and their feeds, the usage recorder and its
journal, the upstream pools, admission); gateway/app.py hands each proxy the parts it uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import httpx
from opentelemetry import trace

from gateway.admission import Admission
from gateway.authn import Authenticator
from gateway.journal import Journal
from gateway.kong.config import load_file, load_state
from gateway.kong.runtime import KongRuntime
from gateway.quota import QuotaLedger
from gateway.replica import AuthReplica, CatalogReplica
from gateway.routes import RouteTable
from gateway.spool import Spool
from gateway.sync import Syncer, authz_feed, catalog_feed, inference_feed, metering_feed
from gateway.tracing import configured_tracer, inject_httpx
from gateway.upstream import UpstreamPool
from gateway.usage import UsageRecorder
from gateway.vocab import Tokenizers
from libs.common.bus import Bus, BusUnavailable
from libs.common.clients import AuthzClient, CatalogClient, ServiceClient
from libs.common.db import Clock, new_id, utcnow
from libs.common.events import CloudEvent
from libs.common.events.usage import KeysUsed
from libs.common.netpolicy import policy_from_settings
from libs.common.oidc import verifier_from_settings
from libs.common.settings import Settings

log = logging.getLogger("steward.gateway")


class InferenceClient(ServiceClient):
    """Only the routes snapshot is read from inference; endpoint changes arrive as events."""

    service = "inference"


class MeteringClient(ServiceClient):
    """Only the quota snapshot is read from metering; quota changes arrive as events."""

    service = "metering"


@dataclass
class Gateway:
    """Everything the request path reads; built once, shared by both listeners."""

    settings: Settings
    bus: Bus
    auth: AuthReplica
    catalog: CatalogReplica
    routes: RouteTable
    authn: Authenticator
    usage: UsageRecorder
    syncer: Syncer
    http: httpx.AsyncClient
    # For upstreams a tenant or publisher named (MCP remotes from the catalog): every new
    # connection passes the address policy.
    guarded_http: httpx.AsyncClient
    tokenizers: Tokenizers
    upstream: UpstreamPool
    quota: QuotaLedger
    admission: Admission
    clients: list[ServiceClient]
    oidc_http: httpx.AsyncClient
    # The Kong declarative config in force (None: no Kong routes); replaced whole by POST /config.
    kong: KongRuntime | None = None
    # None unless a tracer provider was installed before start (see gateway/tracing.py).
    tracer: trace.Tracer | None = None
    _reporting: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, settings: Settings, *, clock: Clock = utcnow) -> Gateway:
        """``clock`` is the gateway's "now" for key expiry and quota windows: the wall clock,
        or one a test moves instead of waiting."""
        bus = Bus.from_settings(settings, name="steward-gateway")
        await bus.connect()
        tracer = configured_tracer()
        # Every httpx request made while serving a request (``/api``, ``/mcp``, Kong routes)
        # carries the request's trace context; the service clients (authz's whoami for a new
        # token) inject it themselves.
        hooks: dict[str, list[Any]] = {"request": [inject_httpx]} if tracer is not None else {}
        auth = AuthReplica(settings.pepper, clock)
        catalog = CatalogReplica()
        key = settings.gateway_api_key.get_secret_value() if settings.gateway_api_key else None
        if key is None:
            log.warning("STEWARD_GATEWAY_API_KEY is unset: the replicas cannot be loaded")
        authz_client = AuthzClient(settings.authz_url, timeout=10.0)
        catalog_client = CatalogClient(settings.catalog_url, timeout=10.0)
        inference_client = InferenceClient(settings.inference_url, timeout=10.0)
        routes = RouteTable.from_file(settings.gateway_routes_file)
        metering_client = MeteringClient(settings.metering_url, timeout=10.0)
        # This process's usage events carry its id; its ledger counts its own calls itself.
        quota = QuotaLedger(clock=clock, gateway_id=new_id())
        oidc_http = httpx.AsyncClient(timeout=5.0)
        authn = Authenticator(
            auth, verifier_from_settings(settings, oidc_http), whoami=authz_client.whoami
        )
        syncer = Syncer(
            bus,
            [
                authz_feed(auth, authz_client, key, forget=authn.forget),
                catalog_feed(catalog, routes, catalog_client, key),
                inference_feed(routes, inference_client, key),
                metering_feed(quota, metering_client, key),
            ],
            resync_seconds=settings.gateway_resync_seconds,
            offline_poll_seconds=settings.gateway_offline_poll_seconds,
        )
        limits = httpx.Limits(
            max_connections=settings.gateway_upstream_max_connections,
            max_keepalive_connections=settings.gateway_upstream_max_connections,
            keepalive_expiry=30.0,
        )
        timeout = httpx.Timeout(
            connect=settings.gateway_upstream_connect_timeout_seconds,
            read=settings.gateway_upstream_read_timeout_seconds,
            write=30.0,
            pool=settings.gateway_upstream_connect_timeout_seconds,
        )
        policy = await policy_from_settings(settings)
        journal = Journal(settings.gateway_state_dir)
        usage = UsageRecorder(bus, Spool(settings.gateway_state_dir), journal=journal)
        # Calls an earlier process was serving when it stopped: metered as interrupted, safe on
        # disk before the journal that remembered them is dropped.
        interrupted = journal.recover()
        if interrupted:
            usage.spool_now(interrupted)
            log.warning(
                "calls interrupted by the last stop metered", extra={"calls": len(interrupted)}
            )
        journal.forget()
        gateway = cls(
            settings=settings,
            bus=bus,
            auth=auth,
            catalog=catalog,
            routes=routes,
            authn=authn,
            usage=usage,
            syncer=syncer,
            http=httpx.AsyncClient(
                limits=limits, timeout=timeout, follow_redirects=False, event_hooks=hooks
            ),
            guarded_http=httpx.AsyncClient(
                transport=policy.transport(limits=limits),
                timeout=timeout,
                follow_redirects=False,
                event_hooks=hooks,
            ),
            upstream=UpstreamPool(
                connect_timeout=settings.gateway_upstream_connect_timeout_seconds,
                read_timeout=settings.gateway_upstream_read_timeout_seconds,
                max_idle_per_origin=settings.gateway_upstream_max_connections,
                max_active_per_origin=settings.gateway_upstream_max_connections,
                tracer=tracer,
                policy=policy,
            ),
            tokenizers=Tokenizers(settings.tokenizer_roots),
            clients=[authz_client, catalog_client, inference_client, metering_client],
            quota=quota,
            admission=Admission(authn, auth, catalog, quota),
            oidc_http=oidc_http,
            tracer=tracer,
        )
        kong = (
            load_file(settings.gateway_kong_config)
            if settings.gateway_kong_config is not None
            else load_state(settings.data_dir / "gateway")
        )
        gateway.kong = KongRuntime(kong) if kong is not None else None
        await usage.start()
        await syncer.start()
        gateway._reporting = asyncio.create_task(gateway._report_keys_forever())
        return gateway

    async def report_key_usage(self) -> int:
        """Tell authz which keys were let through since the last report (``KeysUsed``); kept
        for the next one while NATS is away. Returns how many keys were reported."""
        used = self.auth.take_used()
        if not used:
            return 0
        report = KeysUsed(gateway_id=str(self.quota.gateway_id), at=utcnow(), key_ids=sorted(used))
        event = CloudEvent.wrap(report, source="gateway")
        try:
            await self.bus.publish(report.subject, event.model_dump_json().encode(), event.id)
        except BusUnavailable:
            self.auth.used |= used
            return 0
        return len(used)

    async def _report_keys_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.gateway_key_usage_seconds)
            try:
                await self.report_key_usage()
            except Exception:
                log.exception("reporting key usage failed; will retry")

    async def stop(self) -> None:
        if self._reporting is not None:
            self._reporting.cancel()
            await asyncio.gather(self._reporting, return_exceptions=True)
            with contextlib.suppress(Exception):  # a last report, if NATS is there
                await self.report_key_usage()
        await self.syncer.stop()
        await self.usage.stop()
        if self.usage.journal is not None:
            self.usage.journal.close()
        await self.bus.close()
        await self.http.aclose()
        await self.guarded_http.aclose()
        self.upstream.close()
        for client in self.clients:
            await client.aclose()
        await self.oidc_http.aclose()

    async def wait_loaded(self, seconds: float) -> None:
        """For tests and start-up scripts: until the authz replica (and catalog's) is loaded."""
        async with asyncio.timeout(seconds):
            while not (self.auth.loaded and self.catalog.loaded):  # noqa: ASYNC110 - rare, polled
                await asyncio.sleep(0.02)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        checks = {
            "authz_replica": "ok" if self.auth.loaded else "not loaded",
            "catalog_replica": "ok" if self.catalog.loaded else "not loaded",
            "nats": "ok" if self.bus.connected else "unreachable (usage is spooled)",
        }
        # NATS down is degraded, not unready: keys still verify and usage goes to disk.
        ready = self.auth.loaded
        return ready, {
            "status": "ready" if ready else "not ready",
            "checks": checks,
            "replicas": self.syncer.status(),
            "usage": self.usage.status(),
            "keys": self.auth.key_count,
            "entitlements": self.auth.entitlement_count,
        }
