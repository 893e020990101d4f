"""``STEWARD_GATEWAY_WORKERS=2``: two gateway processes accept on one port, each a replica of its
own (gateway id, journal, admin port); a worker killed with SIGKILL is started again by the
supervisor; SIGTERM stops them all cleanly."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx

from libs.common.settings import Settings
from tests.gateway.conftest import RunningGateway, tenant
from tests.gateway.support import eventually, gateway_process, usage_events
from tests.helpers import alive, bearer, children

CALLS = 24


async def test_two_workers_share_the_port_and_a_killed_one_is_started_again(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    gateway_settings: Settings,
    tmp_path: Path,
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    body = {"model": "echo", "messages": [{"role": "user", "content": "hello"}]}
    async with gateway_process(gateway_settings, tmp_path, workers=2) as (proxy, admin, process):
        url = f"http://127.0.0.1:{proxy}"

        async def call() -> int:
            # A connection of its own: the kernel picks a worker per connection.
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                answer = await client.post("/v1/chat/completions", json=body, headers=bearer(t.key))
                return answer.status_code

        async def both_ready() -> bool:
            async with httpx.AsyncClient(timeout=2) as client:
                for port in (admin, admin + 1):
                    try:
                        ready = await client.get(f"http://127.0.0.1:{port}/readyz")
                    except httpx.TransportError:  # a worker starting again
                        return False
                    if ready.status_code != 200:
                        return False
            return True

        await eventually(both_ready, within=30, every=0.1)
        assert [await call() for _ in range(CALLS)] == [200] * CALLS
        events = await usage_events(
            gateway_settings.nats_url, gateway_settings.event_namespace, t.project, CALLS
        )
        # Two replicas served them: two gateway ids, so two ledgers that metering tells apart.
        assert len({e["data"]["gateway_id"] for e in events}) == 2
        assert {p.name for p in (tmp_path / "gateway").iterdir()} >= {"worker-0", "worker-1"}

        workers = children(process.pid)
        assert len(workers) == 2
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> bool:
            now = children(process.pid)
            return len(now) == 2 and victim not in now and await both_ready()

        await eventually(replaced, within=30, every=0.1)
        assert [await call() for _ in range(4)] == [200] * 4

        running = children(process.pid)
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
        assert not any(alive(pid) for pid in running)
