"""An upstream's usage is believed only when a call could have used it: negative, non-integer or
absurd counts are replaced by the gateway's own count (``usage_source: corrected``), so a call is
never unmetered and never bills, or exhausts a quota with, tokens that were never there."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gateway.tokens import PROMPT_SLACK, estimate_prompt
from libs.common.settings import Settings
from tests.gateway.conftest import RunningGateway, tenant
from tests.gateway.support import usage_events
from tests.helpers import bearer

MESSAGES = [{"role": "user", "content": "count these five words"}]
MAX_TOKENS = 16


async def _call(gw: RunningGateway, key: str, usage: Any, *, stream: bool) -> httpx.Response:
    body = {
        "model": "echo",
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "stream": stream,
        "x_test_usage": usage,
    }
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        return await http.post("/v1/chat/completions", json=body, headers=bearer(key))


LIES = [
    {"prompt_tokens": -1, "completion_tokens": 5},
    {"prompt_tokens": 7, "completion_tokens": -3},
    {"prompt_tokens": 10**15, "completion_tokens": 5},
    {"prompt_tokens": 7, "completion_tokens": MAX_TOKENS + 1},  # more than max_tokens allows
    {"prompt_tokens": "7", "completion_tokens": 5},
    {"prompt_tokens": 7.5, "completion_tokens": 5},
    {"prompt_tokens": True, "completion_tokens": 5},
    {"prompt_tokens": 7, "completion_tokens": None},
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("usage", LIES, ids=[str(i) for i in range(len(LIES))])
async def test_implausible_usage_is_replaced_by_the_gateways_count(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    settings: Settings,
    usage: dict[str, Any],
    stream: bool,
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    answer = await _call(gw, t.key, usage, stream=stream)
    assert answer.status_code == 200, answer.text
    [event] = await usage_events(settings.nats_url, settings.event_namespace, t.project, 1)
    data = event["data"]
    assert data["usage_source"] == "corrected"
    assert data["status"] == "ok"
    assert data["prompt_tokens"] == estimate_prompt({"messages": MESSAGES})
    assert 0 < data["completion_tokens"] <= MAX_TOKENS
    assert data["total_tokens"] == data["prompt_tokens"] + data["completion_tokens"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_believable_usage_is_kept_up_to_the_limits(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    settings: Settings,
    stream: bool,
) -> None:
    """At the limits exactly: a completion of max_tokens, a prompt as long as the request can
    hold (its bytes x4 plus room for a template and images)."""
    t = await tenant(authz, admin_key, gw, ["echo"])
    honest = {"prompt_tokens": PROMPT_SLACK, "completion_tokens": MAX_TOKENS}
    answer = await _call(gw, t.key, honest, stream=stream)
    assert answer.status_code == 200, answer.text
    [event] = await usage_events(settings.nats_url, settings.event_namespace, t.project, 1)
    data = event["data"]
    assert data["usage_source"] == "upstream"
    assert (data["prompt_tokens"], data["completion_tokens"]) == (PROMPT_SLACK, MAX_TOKENS)
