"""The gateway keeps working when what it depends on does not: NATS down (usage spooled to disk,
delivered once when it is back, across a gateway restart), authz down (last replica serves)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from libs.common.bus import Bus
from libs.common.errors import ServiceUnavailable
from libs.common.settings import Settings
from tests.gateway.conftest import RunningGateway, running_gateway, tenant
from tests.gateway.support import eventually, usage_events
from tests.helpers import NatsProcess, bearer, ok, serve

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "spool me"}]}


async def call(url: str, key: str) -> int:
    async with httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
        return response.status_code


def spooled_lines(data_dir: Path) -> int:
    path = data_dir / "gateway" / "usage.spool"
    return len(path.read_bytes().splitlines()) if path.exists() else 0


async def test_usage_is_spooled_while_nats_is_down_and_delivered_once_after_restarts(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    gateway_settings: Settings,
    tmp_path: Path,
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    nats = NatsProcess(tmp_path / "nats")
    await nats.start()
    settings = gateway_settings.model_copy(
        update={"nats_url": nats.url, "data_dir": tmp_path / "gw"}
    )
    try:
        async with running_gateway(settings) as first:
            await first.gateway.wait_loaded(10)
            await first.gateway.bus.wait_ready(10)
            assert await call(first.url, t.key) == 200  # published at once
            await eventually(lambda: first.gateway.usage.published == 1)
            await nats.stop()
            await eventually(lambda: not first.gateway.bus.connected)
            for _ in range(3):
                assert await call(first.url, t.key) == 200  # NATS is down: still served
            await eventually(lambda: spooled_lines(settings.data_dir) == 3)
        # The gateway restarts while NATS is still down: the spool survives, and grows.
        async with running_gateway(settings) as second:
            await second.gateway.wait_loaded(10)
            assert await call(second.url, t.key) == 200
            await eventually(lambda: spooled_lines(settings.data_dir) == 4)
            await nats.start()
            await eventually(lambda: second.gateway.usage.status()["spool_bytes"] == 0, within=15)
            assert not (settings.data_dir / "gateway" / "usage.spool").exists()
        events = await usage_events(nats.url, settings.event_namespace, t.project, 5)
        assert len({e["id"] for e in events}) == 5
        assert all(e["id"] == e["data"]["event_id"] for e in events)
    finally:
        await nats.stop()


async def test_a_spool_replayed_twice_is_counted_once(
    gateway_settings: Settings, tmp_path: Path
) -> None:
    """A crash after publishing but before recording the spool offset re-sends the events:
    JetStream drops them by Nats-Msg-Id."""
    from gateway.spool import Spool
    from gateway.usage import UsageRecorder
    from libs.common.db import new_id, utcnow
    from libs.common.events.usage import UsageRecorded

    nats = NatsProcess(tmp_path / "nats")
    await nats.start()
    bus = Bus(nats.url, gateway_settings.event_namespace, name="spool-test")
    try:
        await bus.connect(wait=True)
        spool = Spool(tmp_path / "spool")
        recorder = UsageRecorder(bus, spool)
        project = "replayed"
        payloads = [
            UsageRecorded(
                event_id=new_id(),
                time=utcnow(),
                project=project,
                credential_id="k",
                subject_id="s",
                model="m",
                endpoint="m",
                duration_ms=1.0,
                http_status=200,
                status="ok",
            )
            for _ in range(3)
        ]
        lines = [recorder._wrap(p)[1] for p in payloads]
        spool.append(lines)
        assert await recorder.drain_once() == 3
        spool.append(lines)  # the same events again, as after a crash before the offset write
        assert await recorder.drain_once() == 3
        events = await usage_events(nats.url, gateway_settings.event_namespace, project, 3)
        assert {e["id"] for e in events} == {p.event_id for p in payloads}
    finally:
        await bus.close()
        await nats.stop()


async def test_the_last_replica_keeps_serving_while_authz_is_down(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    authz_app: FastAPI,
    admin_key: str,
    gateway_settings: Settings,
    tmp_path: Path,
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    other = await tenant(authz, admin_key, gw, ["echo"])
    listener = contextlib.AsyncExitStack()
    authz_url = await listener.enter_async_context(serve(authz_app))
    settings = gateway_settings.model_copy(update={"authz_url": authz_url, "data_dir": tmp_path})
    async with running_gateway(settings) as local:
        await local.gateway.wait_loaded(10)
        assert await call(local.url, t.key) == 200
        await listener.aclose()  # authz's HTTP listener is gone
        feed = local.gateway.syncer.feeds[0]
        with pytest.raises(ServiceUnavailable):
            await feed.resync()  # a snapshot cannot be had...
        assert await call(local.url, t.key) == 200  # ...and the last replica still serves
        assert await call(local.url, other.key) == 200
        ready = await httpx.AsyncClient(base_url=local.admin_url).get("/readyz")
        assert ready.status_code == 200
        # Changes still arrive as events while authz's API is unreachable.
        await ok(
            await authz.delete(
                f"/v1/projects/{other.project}/keys/{other.key_id}", headers=bearer(admin_key)
            )
        )
        await eventually(lambda: local.gateway.auth.key(other.key_id) is None, within=1.0)
        assert await call(local.url, other.key) == 401
        assert await call(local.url, t.key) == 200


async def test_a_key_revoked_while_nats_is_down_is_refused_after_the_next_poll(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    gateway_settings: Settings,
    tmp_path: Path,
) -> None:
    """Without the events the gateway asks authz for changes every poll; an unchanged replica is
    a 304, a revocation is installed at the next poll."""
    t = await tenant(authz, admin_key, gw, ["echo"])
    nats = NatsProcess(tmp_path / "nats")
    await nats.start()
    settings = gateway_settings.model_copy(
        update={
            "nats_url": nats.url,
            "data_dir": tmp_path / "gw",
            "gateway_offline_poll_seconds": 0.1,
        }
    )
    try:
        async with running_gateway(settings) as local:
            await local.gateway.wait_loaded(10)
            syncer = local.gateway.syncer
            await eventually(lambda: syncer.subscribed)
            assert await call(local.url, t.key) == 200
            await nats.stop()
            await eventually(lambda: syncer.offline_polls >= 3)
            assert syncer.offline_changes == 0  # nothing changed: 304s only
            assert await call(local.url, t.key) == 200

            await ok(
                await authz.delete(
                    f"/v1/projects/{t.project}/keys/{t.key_id}", headers=bearer(admin_key)
                )
            )
            polls = syncer.offline_polls
            await eventually(lambda: local.gateway.auth.key(t.key_id) is None)
            assert syncer.offline_changes == 1
            assert syncer.offline_polls - polls <= 2  # at the next poll, or the one after
            assert await call(local.url, t.key) == 401
    finally:
        await nats.stop()
