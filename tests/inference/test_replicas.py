"""Replicas that are real: an endpoint with 2 replicas on the local runtime is 2 supervised server
processes, both routed at the gateway; killing one (SIGKILL) costs no call while the supervisor
brings it back; scaling changes the set of processes and routes without dropping calls."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import httpx
import openai
from fastapi import FastAPI

from services.inference.runtimes.local import LocalRuntime
from tests.approval.support import eventually
from tests.helpers import bearer, ok
from tests.inference.support import (
    approved_model,
    endpoint_of_request,
    entitled_key,
    request_endpoint,
    team,
)


def local_runtime(app: FastAPI) -> LocalRuntime:
    runtime = app.state.plane.reconciler.runtimes["local"]
    assert isinstance(runtime, LocalRuntime)
    return runtime


class Caller:
    """Calls the route one after another until told to stop; counts what came back."""

    def __init__(self, client: openai.AsyncOpenAI, route: str) -> None:
        self.client = client
        self.route = route
        self.ok = 0
        self.failed: list[str] = []
        self.stop = asyncio.Event()
        self.progress = asyncio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            try:
                answer = await self.client.chat.completions.create(
                    model=self.route,
                    messages=[{"role": "user", "content": "are you there"}],
                    max_tokens=4,
                )
                assert answer.choices[0].message.content
                self.ok += 1
            except openai.APIError as exc:
                self.failed.append(repr(exc))
            self.progress.set()

    async def calls(self, n: int) -> None:
        """Wait until ``n`` more calls have come back."""
        target = self.ok + len(self.failed) + n
        while self.ok + len(self.failed) < target:
            self.progress.clear()
            await self.progress.wait()


async def test_two_replicas_keep_answering_when_one_is_killed_and_scale_without_loss(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    inference_app: FastAPI,
    admin_key: str,
    gateway_url: str,
) -> None:
    who = await team(authz, admin_key)
    name = await approved_model(authz, catalog, approval, admin_key, who)
    key = await entitled_key(authz, approval, admin_key, who, name)
    decided = await request_endpoint(approval, admin_key, who, name, "local", gpus=0, replicas=2)
    found = await endpoint_of_request(inference, who.dev, who.project, decided["id"])
    base = f"/v1/projects/{who.project}/endpoints/{found['id']}"

    async def serving(n: int) -> dict[str, Any] | None:
        now: dict[str, Any] = await ok(await inference.get(base, headers=bearer(who.dev)))
        return now if now["status"] == "ready" and len(now["upstream_urls"]) == n else None

    ready = await eventually(lambda: serving(2), within=20, what="two serving replicas")
    replicas = local_runtime(inference_app).replicas(found["id"])
    assert [r.upstream_url for r in replicas] == ready["upstream_urls"]
    pids = [r.process.pid for r in replicas if r.process is not None]
    assert len(set(pids)) == 2

    client = openai.AsyncOpenAI(base_url=gateway_url + "/v1", api_key=key, max_retries=0)

    async def routed() -> bool:
        try:
            await client.chat.completions.create(
                model=ready["route_name"], messages=[{"role": "user", "content": "hi"}]
            )
        except openai.NotFoundError:
            return False
        return True

    await eventually(routed, what="the route at the gateway")
    caller = Caller(client, ready["route_name"])
    running = asyncio.create_task(caller.run())
    try:
        await caller.calls(5)
        victim = replicas[0]
        assert victim.process is not None
        os.kill(victim.process.pid, signal.SIGKILL)
        # The supervisor restarts it on the same port; both serve again.
        await eventually(
            lambda: _restarted(victim, pids[0]), within=20, what="the killed replica back"
        )
        await eventually(lambda: serving(2), within=20, what="both replicas serving again")
        await caller.calls(5)

        scaled = await inference.post(
            f"{base}/scale", json={"replicas": 3}, headers=bearer(who.admin)
        )
        assert scaled.status_code == 200, scaled.text
        await eventually(lambda: serving(3), within=20, what="three serving replicas")
        await caller.calls(5)
        down = await inference.post(
            f"{base}/scale", json={"replicas": 1}, headers=bearer(who.admin)
        )
        assert down.status_code == 200, down.text
        await eventually(lambda: serving(1), within=20, what="one serving replica")
        await caller.calls(5)
        assert len(local_runtime(inference_app).replicas(found["id"])) == 1
    finally:
        caller.stop.set()
        await running
    print(f"\nkilled and scaled under load: {caller.ok} answered, {len(caller.failed)} failed")
    assert caller.failed == []
    assert caller.ok >= 20


async def _restarted(victim: Any, old_pid: int) -> bool:
    process = victim.process
    return process is not None and process.pid != old_pid and process.returncode is None
