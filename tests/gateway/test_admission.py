"""One admission path, and a quota hold no exit can leak: whichever way a call ends after its
quota was reserved (an upstream failure, a timeout, a cut stream, the client gone) or before it
could be (the upstream credential unusable), the ledger holds nothing for it afterwards and has
settled exactly what its usage event says."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from libs.common.settings import Settings
from tests.gateway.conftest import RunningGateway, tenant
from tests.gateway.support import quota, usage_events
from tests.helpers import bearer

LIMIT = 12_000  # and each call asks for a quarter of it (the gateway caps max_tokens at 4096)


def _quota(gw: RunningGateway, project: str) -> str:
    """A month's token budget for the project, straight into this gateway's ledger."""
    state = quota(project, LIMIT, gw.gateway.quota.clock(), window="month")
    gw.gateway.quota.apply(state)
    return state.quota_id


async def _stream_then_leave(http: httpx.AsyncClient, body: dict[str, Any], key: str) -> int:
    async with http.stream(
        "POST", "/v1/chat/completions", json=body, headers=bearer(key)
    ) as response:
        async for _ in response.aiter_bytes():
            break  # the first bytes, then gone
        return response.status_code


# name → (model, stream, what the client sees, whether the hold was taken)
EXITS = {
    "credential-unusable": ("sealed-broken", False, 502, False),
    "connect-refused": ("unreachable", False, 502, True),
    "upstream-500": ("echo-error", False, 500, True),
    "upstream-timeout": ("echo-hang", False, 504, True),
    "stream-cut": ("echo-cut", True, 200, True),
    "client-left": ("echo-slow", True, 200, True),
    "max-tokens-refused": ("echo", False, 400, False),
}


@pytest.mark.parametrize("case", list(EXITS))
async def test_no_exit_leaves_a_quota_hold_behind(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    settings: Settings,
    case: str,
) -> None:
    model, stream, status, held = EXITS[case]
    t = await tenant(authz, admin_key, gw, [model])
    quota_id = _quota(gw, t.project)
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "hold nothing back"}],
        "max_tokens": 10**6 if case == "max-tokens-refused" else 64,
        "stream": stream,
    }
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        if case == "client-left":
            assert await _stream_then_leave(http, body, t.key) == status
        else:
            answer = await http.post("/v1/chat/completions", json=body, headers=bearer(t.key))
            assert answer.status_code == status, answer.text
            # The RateLimit headers are the reservation's: proof the hold was taken (or not).
            assert ("ratelimit-limit" in answer.headers) is held
    [event] = await usage_events(settings.nats_url, settings.event_namespace, t.project, 1)
    data = event["data"]
    assert data["status"] != "ok"
    ledger = gw.gateway.quota
    used = ledger.usage(quota_id, ledger.clock())
    # As metering will count it: its tokens, and one call if it was admitted.
    assert used == (data["prompt_tokens"], data["completion_tokens"], int(data["admitted"]))
    if case == "credential-unusable":
        assert data["error_type"] == "upstream_credential"
        assert used == (0, 0, 0)


async def test_a_refused_credential_never_builds_up_into_429s(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    """Before, each unusable-credential 502 kept its hold: a monthly quota filled with calls
    that never ran and refused the project for the rest of the month."""
    t = await tenant(authz, admin_key, gw, ["sealed-broken"])
    quota_id = _quota(gw, t.project)
    body = {"model": "sealed-broken", "prompt": "x", "max_tokens": LIMIT // 4}
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        for _ in range(6):  # 6 x 25% of the budget
            answer = await http.post("/v1/completions", json=body, headers=bearer(t.key))
            assert answer.status_code == 502, answer.text
            assert answer.json()["error"]["code"] == "upstream_credential"
    ledger = gw.gateway.quota
    assert ledger.usage(quota_id, ledger.clock()) == (0, 0, 0)  # no tokens, no call admitted
