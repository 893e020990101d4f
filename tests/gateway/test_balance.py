"""Balancing a route's replicas (gateway/balance.py): least outstanding calls, ties in turn,
ejection on a refused connection or a run of server errors, back after the ejection time (an
injected clock), and through the real gateway: a dead replica costs no call."""

from __future__ import annotations

import httpx

from gateway.balance import EJECT_AFTER, Balancer
from libs.common.bus import Bus
from libs.common.events.inference import EndpointReady
from libs.common.settings import Settings
from tests.gateway.conftest import RunningGateway, tenant
from tests.gateway.support import eventually, publish, upstream_json, usage_events
from tests.gateway.test_endpoints import endpoint
from tests.gateway.test_openai import client
from tests.helpers import free_port, unique

A, B, C = "http://a/v1", "http://b/v1", "http://c/v1"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_replica_with_fewest_calls_in_flight_gets_the_next_and_ties_take_turns() -> None:
    balancer = Balancer()
    picks = [balancer.pick([A, B, C]) for _ in range(6)]
    assert sorted(str(p) for p in picks) == sorted([A, B, C] * 2)  # idle replicas in turn
    balancer.begin(A)
    balancer.begin(A)
    balancer.begin(B)
    assert balancer.pick([A, B, C]) == C
    balancer.begin(C)
    assert balancer.pick([A, B, C]) in (B, C)
    balancer.end(A, status=200)
    balancer.end(A, status=200)
    assert balancer.pick([A, B, C]) == A
    assert balancer.pick([A, B, C], tried=[A, B]) == C
    assert balancer.pick([A, B, C], tried=[A, B, C]) is None


def test_a_refused_connection_ejects_at_once_and_server_errors_after_a_run() -> None:
    clock = Clock()
    balancer = Balancer(eject_seconds=10, clock=clock)
    balancer.begin(A)
    balancer.end(A, connect_failed=True)
    assert balancer.ejected(A)
    assert {balancer.pick([A, B]) for _ in range(4)} == {B}
    for _ in range(EJECT_AFTER - 1):
        balancer.begin(B)
        balancer.end(B, status=503)
    balancer.begin(B)
    balancer.end(B, status=200)  # an answer clears the run
    for _ in range(EJECT_AFTER - 1):
        balancer.begin(B)
        balancer.end(B, status=500)
    assert not balancer.ejected(B)
    balancer.begin(B)
    balancer.end(B, status=500)
    assert balancer.ejected(B)
    # Both ejected: the one ejected first is tried rather than refusing the call.
    assert balancer.pick([A, B]) == A
    clock.now += 10
    assert not balancer.ejected(A) and not balancer.ejected(B)


async def test_a_dead_replica_costs_no_call(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    bus: Bus,
    upstream: str,
    settings: Settings,
) -> None:
    owner = await tenant(authz, admin_key, gw, ["echo"])
    name = unique("replicas")
    dead = f"http://127.0.0.1:{free_port()}/v1"  # a replica whose process is gone
    state = endpoint(
        owner.project,
        upstream,
        name,
        runtime="local",
        replicas=2,
        upstream_urls=[dead, f"{upstream}/v1"],
    )
    await publish(bus, EndpointReady(**state), source="inference")
    await eventually(lambda: name in gw.gateway.routes.models)
    assert gw.gateway.routes.models[name].targets == (dead, f"{upstream}/v1")

    openai_client = client(gw, owner.key)
    for i in range(6):
        answer = await openai_client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": f"replica call {i}"}]
        )
        assert answer.choices[0].message.content
    served = [
        r
        for r in await upstream_json(upstream, "/_log")
        if str(r["body"].get("messages", [{}])[0].get("content", "")).startswith("replica call")
    ]
    assert len(served) == 6  # each call answered once, by the live replica
    events = await usage_events(settings.nats_url, settings.event_namespace, owner.project, 6)
    assert {e["data"]["status"] for e in events} == {"ok"}
