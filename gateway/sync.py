"""Keeping the replicas current: a snapshot at start, events after, a fresh snapshot now and then.

Order matters. A feed subscribes to its events *before* asking for the snapshot, and events that
arrive while the snapshot is in flight are re-applied on top of it: the snapshot was read after
they were committed or it was not, and either way re-applying them in order converges, because
every change is an idempotent upsert or delete. When NATS comes back after an outage, the feed
resubscribes and takes a new snapshot, so no event lost during the outage leaves a stale key.
While NATS is down, the feeds that guard access (keys, entitlements, members) poll their
service every ``offline_poll_seconds`` with ``If-None-Match``: an unchanged replica costs a 304,
a revoked key is refused within a poll. While authz is down too the replicas keep serving what
they last knew.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from pydantic import BaseModel, ValidationError

from gateway.replica import AuthReplica, CatalogReplica
from gateway.routes import RouteTable
from libs.common.bus import Bus
from libs.common.clients import ServiceClient
from libs.common.events import CloudEvent, EventPayload
from libs.common.events.authz import (
    EntitlementGranted,
    EntitlementRevoked,
    EntitlementState,
    KeyCreated,
    KeyRevoked,
    KeyState,
    KeyUpdated,
    MemberChanged,
)
from libs.common.events.catalog import (
    VersionApproved,
    VersionDeprecated,
    VersionRevoked,
    VersionState,
    VersionSubmitted,
)
from libs.common.events.inference import EVENTS_BY_STATUS, EndpointState
from libs.common.events.metering import (
    QuotaConsumed,
    QuotaDeleted,
    QuotaExceeded,
    QuotaState,
    QuotaUpdated,
    QuotaWarning,
)
from libs.common.quota import QuotaLedger

log = logging.getLogger("steward.gateway.sync")

Apply = Callable[[EventPayload], None]


class SnapshotUnavailable(Exception):
    """The owning service could not give a snapshot now; the replica keeps what it has."""


class AuthzSnapshot(BaseModel):
    revision: int = 0
    keys: list[KeyState]
    entitlements: list[EntitlementState]


class CatalogSnapshot(BaseModel):
    versions: list[VersionState]


class RoutesSnapshot(BaseModel):
    routes: list[EndpointState]


class QuotaSnapshot(BaseModel):
    quotas: list[QuotaState]


async def _get_snapshot(
    client: ServiceClient, credential: str | None, path: str = "/v1/snapshot"
) -> Any:
    response = await client.request("GET", path, credential=credential)
    if response.status_code != 200:
        raise SnapshotUnavailable(f"{client.service} answered {response.status_code}")
    return response.json()


# What a feed's ``load`` gives: how to install the snapshot, or None when it is unchanged.
Install = Callable[[], None]


@dataclass
class Feed:
    """One replica's source: which subjects change it, and how to load it whole."""

    name: str
    handlers: Mapping[str, Apply]
    # ``load(unless_unchanged)``: with True, may return None for "nothing changed since the
    # last load" (a conditional request); with False, always the whole snapshot.
    load: Callable[[bool], Awaitable[Install | None]]
    # Polled while the events cannot arrive: it guards access, and can answer "unchanged" cheaply.
    poll_offline: bool = False
    loaded_at: float | None = None
    last_error: str | None = None
    events_applied: int = 0
    _recording: list[tuple[str, EventPayload]] | None = field(default=None, repr=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def on_event(self, subject: str, payload: EventPayload) -> None:
        self.handlers[subject](payload)
        self.events_applied += 1
        if self._recording is not None:
            self._recording.append((subject, payload))

    async def resync(self, *, unless_unchanged: bool = False) -> bool:
        """Fetch the snapshot, install it, and re-apply what arrived while it was in flight.
        With ``unless_unchanged``, a snapshot the service says is unchanged is not fetched
        whole; returns whether one was installed."""
        async with self._lock:
            self._recording = []
            try:
                install = await self.load(unless_unchanged)
                if install is not None:
                    install()
                    for subject, payload in self._recording:
                        self.handlers[subject](payload)
            finally:
                self._recording = None
            self.loaded_at = time.time()
            self.last_error = None
            return install is not None


def authz_feed(
    replica: AuthReplica,
    client: ServiceClient,
    credential: str | None,
    *,
    forget: Callable[[str | None], None] = lambda subject: None,
) -> Feed:
    """Keys and entitlements into ``replica``; ``forget(subject)`` drops what the gateway
    cached about a subject's memberships (its OIDC principals), ``forget(None)`` all of it."""
    etag: str | None = None

    async def load(unless_unchanged: bool) -> Install | None:
        nonlocal etag
        headers = {"If-None-Match": etag} if unless_unchanged and etag else {}
        response = await client.request(
            "GET", "/v1/snapshot", credential=credential, headers=headers
        )
        if response.status_code == 304:
            return None
        if response.status_code != 200:
            raise SnapshotUnavailable(f"{client.service} answered {response.status_code}")
        snap = AuthzSnapshot.model_validate(response.json())

        def install() -> None:
            nonlocal etag
            replica.replace(snap.keys, snap.entitlements)
            etag = response.headers.get("ETag")
            forget(None)  # memberships may have changed with the rest

        return install

    def upsert(p: EventPayload) -> None:
        assert isinstance(p, KeyState)
        replica.upsert_key(p)

    def revoke_key(p: EventPayload) -> None:
        assert isinstance(p, KeyRevoked)
        replica.remove_key(p.key_id)

    def grant(p: EventPayload) -> None:
        assert isinstance(p, EntitlementState)
        replica.grant(p)

    def revoke(p: EventPayload) -> None:
        assert isinstance(p, EntitlementState)
        replica.revoke(p)

    def member(p: EventPayload) -> None:
        assert isinstance(p, MemberChanged)
        forget(p.member)

    return Feed(
        name="authz",
        handlers={
            KeyCreated.subject: upsert,
            KeyUpdated.subject: upsert,
            KeyRevoked.subject: revoke_key,
            EntitlementGranted.subject: grant,
            EntitlementRevoked.subject: revoke,
            MemberChanged.subject: member,
        },
        load=load,
        poll_offline=True,
    )


def catalog_feed(
    replica: CatalogReplica, routes: RouteTable, client: ServiceClient, credential: str | None
) -> Feed:
    """Catalog versions; an approved MCP server version with a remote is also a route."""

    async def load(_: bool) -> Install | None:
        snap = CatalogSnapshot.model_validate(await _get_snapshot(client, credential))

        def install() -> None:
            replica.replace(snap.versions)
            routes.catalog_servers(replica.versions())

        return install

    def upsert(p: EventPayload) -> None:
        assert isinstance(p, VersionState)
        replica.upsert(p)
        if p.asset_kind == "mcp_server":
            routes.catalog_servers(replica.versions())

    subjects = (VersionSubmitted, VersionApproved, VersionDeprecated, VersionRevoked)
    return Feed(name="catalog", handlers={s.subject: upsert for s in subjects}, load=load)


def inference_feed(routes: RouteTable, client: ServiceClient, credential: str | None) -> Feed:
    async def load(_: bool) -> Install | None:
        snap = RoutesSnapshot.model_validate(await _get_snapshot(client, credential, "/v1/routes"))
        return lambda: routes.replace_endpoints(snap.routes)

    def apply(p: EventPayload) -> None:
        assert isinstance(p, EndpointState)
        routes.apply_endpoint(p)

    return Feed(
        name="inference",
        handlers={model.subject: apply for model in EVENTS_BY_STATUS.values()},
        load=load,
    )


def metering_feed(ledger: QuotaLedger, client: ServiceClient, credential: str | None) -> Feed:
    """Quotas and their window usage: the ledger the gateway reserves and settles against."""

    async def load(_: bool) -> Install | None:
        raw = await _get_snapshot(client, credential, "/v1/quotas/snapshot")
        snap = QuotaSnapshot.model_validate(raw)
        return lambda: ledger.replace(snap.quotas)

    def apply(p: EventPayload) -> None:
        assert isinstance(p, QuotaState)
        ledger.apply(p)

    def remove(p: EventPayload) -> None:
        assert isinstance(p, QuotaDeleted)
        ledger.remove(p.quota_id)

    states = (QuotaUpdated, QuotaConsumed, QuotaWarning, QuotaExceeded)
    return Feed(
        name="metering",
        handlers={**{s.subject: apply for s in states}, QuotaDeleted.subject: remove},
        load=load,
    )


class Syncer:
    """Runs the feeds: subscriptions on the bus, snapshots with retries, periodic resyncs."""

    def __init__(
        self,
        bus: Bus,
        feeds: Sequence[Feed],
        *,
        resync_seconds: float,
        offline_poll_seconds: float = 1.0,
    ) -> None:
        self.bus = bus
        self.feeds = list(feeds)
        self.resync_seconds = resync_seconds
        self.offline_poll_seconds = offline_poll_seconds
        self._routes: dict[str, Feed] = {s: f for f in self.feeds for s in f.handlers}
        self._subs: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.subscribed = False
        # Conditional polls made while the events could not arrive (and how many found changes).
        self.offline_polls = 0
        self.offline_changes = 0

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._watch_bus(), name="gateway-sync-bus"))
        for feed in self.feeds:
            self._tasks.append(asyncio.create_task(self._keep(feed), name=f"sync-{feed.name}"))
            if feed.poll_offline:
                self._tasks.append(
                    asyncio.create_task(self._poll_offline(feed), name=f"poll-{feed.name}")
                )

    async def stop(self) -> None:
        # A library that swallows a CancelledError leaves a task running with its cancel spent
        # (seen: the bus watcher back in its 0.25 s loop, and shutdown waiting forever); so the
        # loops also check a flag, and a task still running is cancelled again.
        self._stopping = True
        pending = set(self._tasks)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        self._tasks.clear()
        await self._unsubscribe()

    async def _keep(self, feed: Feed) -> None:
        """Load the snapshot until it works, then again every ``resync_seconds``."""
        delay = 0.2
        while not self._stopping:
            try:
                await feed.resync()
                log.info("replica loaded", extra={"feed": feed.name})
                delay = 0.2
                await asyncio.sleep(self.resync_seconds)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                feed.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("snapshot unavailable; retrying", extra={"feed": feed.name})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _poll_offline(self, feed: Feed) -> None:
        """While not subscribed to the events, ask for changes every ``offline_poll_seconds``
        (a 304 when there are none), so a revocation still lands within a poll or two."""
        while not self._stopping:
            await asyncio.sleep(self.offline_poll_seconds)
            if (self.subscribed and self.bus.connected) or feed.loaded_at is None:
                continue
            try:
                self.offline_polls += 1
                if await feed.resync(unless_unchanged=True):
                    self.offline_changes += 1
                    log.info("replica changed while NATS is down", extra={"feed": feed.name})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                feed.last_error = f"{type(exc).__name__}: {exc}"

    async def _watch_bus(self) -> None:
        """Subscribe whenever NATS (re)connects, then take fresh snapshots to cover the gap."""
        self.subscribed = False
        while not self._stopping:
            connected = self.bus.connected
            if connected and not self.subscribed:
                try:
                    await self._subscribe()
                    self.subscribed = True
                    # A snapshot asked for before the subscription existed may miss events
                    # published in between: take one now (the lock orders it after any other).
                    for feed in self.feeds:
                        await self._safe_resync(feed)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("event subscription failed; retrying", extra={"error": str(exc)})
                    await self._unsubscribe()
            elif not connected and self.subscribed:
                log.warning("NATS lost; serving from the last replica")
                await self._unsubscribe()
                self.subscribed = False
            await asyncio.sleep(0.25)

    async def _safe_resync(self, feed: Feed) -> None:
        try:
            await feed.resync()
        except Exception as exc:
            feed.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("resync after reconnect failed", extra={"feed": feed.name})

    async def _subscribe(self) -> None:
        js = self.bus.js
        stream = self.bus.stream("EVENTS")
        # One ordered consumer per subject tree (``authz.key.>``…), not per event type.
        trees = sorted({".".join(s.split(".")[:2]) + ".>" for s in self._routes})
        for subject in trees:
            sub = await js.subscribe(
                self.bus.subject(subject),
                cb=self._on_msg,
                stream=stream,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW,
            )
            self._subs.append(sub)

    async def _unsubscribe(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        try:
            event = CloudEvent.model_validate_json(msg.data)
            subject = event.relative_subject
            feed = self._routes.get(subject)
            if feed is None:
                return
            payload = event.payload()
        except (ValidationError, KeyError, ValueError) as exc:
            log.error("unreadable event ignored", extra={"error": str(exc)})
            return
        feed.on_event(subject, payload)

    def status(self) -> dict[str, Any]:
        return {
            f.name: {
                "loaded": f.loaded_at is not None,
                "loaded_at": f.loaded_at,
                "events_applied": f.events_applied,
                "last_error": f.last_error,
            }
            for f in self.feeds
        }
