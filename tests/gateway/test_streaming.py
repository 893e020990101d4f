"""SSE relaying: chunk by chunk, usage asked for on the client's behalf, broken upstreams,
clients that leave, and the limits the gateway enforces before calling anyone."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from libs.common.settings import Settings
from tests.gateway.conftest import RunningGateway, tenant
from tests.gateway.support import eventually, upstream_json, usage_events
from tests.gateway.test_openai import client
from tests.helpers import bearer


def sse_events(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


async def stream_raw(gw: RunningGateway, key: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        return await http.post("/v1/chat/completions", json=body, headers=bearer(key))


async def test_usage_is_requested_upstream_and_its_chunk_stripped_for_the_client(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, upstream: str, settings: Settings
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "a b c"}]}
    response = await stream_raw(gw, t.key, body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in events[:-1])
    sent = [
        r
        for r in await upstream_json(upstream, "/_log")
        if r["body"].get("messages") == body["messages"]
    ]
    assert sent[-1]["body"]["stream_options"] == {"include_usage": True}
    [event] = await usage_events(settings.nats_url, settings.event_namespace, t.project, 1)
    data = event["data"]
    assert data["usage_source"] == "upstream"
    assert (data["prompt_tokens"], data["completion_tokens"]) == (7, 5)
    assert data["stream"] is True and data["status"] == "ok"
    assert data["ttft_ms"] is not None and data["ttft_ms"] >= 0


async def test_a_client_that_asks_for_usage_gets_the_usage_chunk(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    stream = await client(gw, t.key).chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "x y"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage async for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1 and usage[0].prompt_tokens == 7


async def test_without_upstream_usage_tokens_are_estimated_and_marked(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, settings: Settings
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo-nousage"])
    oai = client(gw, t.key)
    stream = await oai.chat.completions.create(
        model="echo-nousage",
        messages=[{"role": "user", "content": "twelve characters of text here"}],
        stream=True,
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    answer = await oai.chat.completions.create(
        model="echo-nousage", messages=[{"role": "user", "content": "short"}]
    )
    assert answer.usage is None
    events = await usage_events(settings.nats_url, settings.event_namespace, t.project, 2)
    streamed, plain = (e["data"] for e in events)
    assert streamed["usage_source"] == plain["usage_source"] == "estimated"
    assert streamed["completion_tokens"] == -(-len(text) // 4)
    assert streamed["prompt_tokens"] > 4 and plain["completion_tokens"] > 0


async def test_malformed_sse_from_the_upstream_is_relayed_and_counted_as_estimated(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, settings: Settings
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo-malformed"])
    body = {
        "model": "echo-malformed",
        "stream": True,
        "messages": [{"role": "user", "content": "?"}],
    }
    response = await stream_raw(gw, t.key, body)
    assert response.status_code == 200
    assert "{this is not json" in response.text
    assert '"content": "still "' in response.text
    [event] = await usage_events(settings.nats_url, settings.event_namespace, t.project, 1)
    data = event["data"]
    assert data["usage_source"] == "estimated"
    assert data["status"] == "error" and data["error_type"] == "upstream_incomplete"
    assert data["completion_tokens"] == 2  # "still " → 6 characters


async def test_an_upstream_that_drops_the_stream_ends_it_with_an_error_event(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, settings: Settings
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo-cut"])
    stream = await client(gw, t.key).chat.completions.create(
        model="echo-cut",
        messages=[{"role": "user", "content": "one two three four five"}],
        stream=True,
    )
    received: list[str] = []
    with pytest.raises(openai.APIError, match="connection broke"):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "you said: one "  # three chunks, then the cut
    [event] = await usage_events(settings.nats_url, settings.event_namespace, t.project, 1)
    data = event["data"]
    assert data["status"] == "error" and data["error_type"] == "upstream_unavailable"
    assert data["usage_source"] == "estimated" and data["completion_tokens"] > 0


async def test_a_client_disconnect_mid_stream_stops_the_upstream(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, upstream: str, settings: Settings
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo-slow"])
    before = await upstream_json(upstream, "/_stats")
    body = {"model": "echo-slow", "stream": True, "messages": [{"role": "user", "content": "go"}]}
    async with (
        httpx.AsyncClient(base_url=gw.url, timeout=10) as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=bearer(t.key)) as response,
    ):
        chunks = 0
        async for _ in response.aiter_bytes():
            chunks += 1
            if chunks == 3:
                break  # leaving the block closes the connection mid-stream
    await eventually(lambda: _abandoned(upstream, before["abandoned"]), within=3.0, every=0.05)
    [event] = await usage_events(settings.nats_url, settings.event_namespace, t.project, 1)
    data = event["data"]
    assert data["status"] == "cancelled" and data["error_type"] == "client_disconnected"
    assert data["usage_source"] == "estimated"


async def test_a_client_that_hangs_up_after_done_made_a_complete_call(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, settings: Settings
) -> None:
    """The OpenAI SDKs close the connection once they read ``[DONE]``; an upstream may still be
    sending its last bytes. The call is complete, with the upstream's usage."""
    t = await tenant(authz, admin_key, gw, ["echo-linger"])
    body = {
        "model": "echo-linger",
        "stream": True,
        "messages": [{"role": "user", "content": "a b"}],
    }
    async with (
        httpx.AsyncClient(base_url=gw.url, timeout=10) as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=bearer(t.key)) as response,
    ):
        assert response.status_code == 200
        received = b""
        async for chunk in response.aiter_bytes():
            received += chunk
            if b"data: [DONE]" in received:
                break  # hang up, as the SDKs do, while the upstream lingers
    [event] = await usage_events(settings.nats_url, settings.event_namespace, t.project, 1)
    data = event["data"]
    assert data["status"] == "ok" and data["error_type"] is None
    assert data["usage_source"] == "upstream"
    assert (data["prompt_tokens"], data["completion_tokens"]) == (7, 4)  # "you said: a b"


async def _abandoned(upstream: str, before: int) -> bool:
    stats = await upstream_json(upstream, "/_stats")
    return bool(stats["abandoned"] > before)


async def test_a_slow_upstream_times_out_with_a_504(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, settings: Settings
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo-hang"])
    with pytest.raises(openai.APIStatusError) as timed_out:
        await client(gw, t.key).chat.completions.create(
            model="echo-hang", messages=[{"role": "user", "content": "?"}]
        )
    assert timed_out.value.status_code == 504
    [event] = await usage_events(settings.nats_url, settings.event_namespace, t.project, 1)
    assert event["data"]["error_type"] == "timeout"


async def test_upstream_errors_are_relayed_with_their_status_and_a_generic_body(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, settings: Settings
) -> None:
    """The upstream's 5xx body stays in the log (gateway/egress.py); usage still records the
    error type it named."""
    t = await tenant(authz, admin_key, gw, ["echo-error"])
    with pytest.raises(openai.InternalServerError, match="the upstream server failed to answer"):
        await client(gw, t.key).chat.completions.create(
            model="echo-error", messages=[{"role": "user", "content": "?"}]
        )
    [event] = await usage_events(settings.nats_url, settings.event_namespace, t.project, 1)
    assert event["data"]["http_status"] == 500 and event["data"]["error_type"] == "server_error"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "echo", "max_tokens": 4097, "messages": []}, 400, "max_tokens"),
        (
            {"model": "echo", "max_completion_tokens": "lots", "messages": []},
            400,
            "max_completion_tokens",
        ),
        ({"messages": []}, 400, "model"),
    ],
)
async def test_requests_beyond_the_caps_are_refused_before_any_upstream_call(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    body: dict[str, Any],
    status: int,
    param: str,
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    response = await stream_raw(gw, t.key, body)
    assert response.status_code == status
    assert response.json()["error"]["param"] == param


async def test_bodies_over_the_size_cap_and_invalid_json_are_refused(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    big = {"model": "echo", "messages": [{"role": "user", "content": "x" * 70_000}]}
    async with httpx.AsyncClient(base_url=gw.url) as http:
        too_large = await http.post("/v1/chat/completions", json=big, headers=bearer(t.key))
        assert too_large.status_code == 413
        assert too_large.json()["error"]["code"] == "request_too_large"

        async def chunks() -> Any:  # no content-length: the cap counts bytes as they arrive
            for _ in range(20):
                yield b"x" * 4096
                await asyncio.sleep(0)

        streamed = await http.post("/v1/chat/completions", content=chunks(), headers=bearer(t.key))
        assert streamed.status_code == 413
        broken = await http.post(
            "/v1/chat/completions", content=b"{not json", headers=bearer(t.key)
        )
        assert broken.status_code == 400


async def test_text_completions_and_embeddings_pass_through(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, settings: Settings
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    oai = client(gw, t.key)
    completion = await oai.completions.create(model="echo", prompt="complete me")
    assert completion.choices[0].text == "you said: complete me "
    stream = await oai.completions.create(model="echo", prompt="stream me", stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == "you said: stream me "
    embedding = await oai.embeddings.create(model="echo", input=["a", "b"])
    assert len(embedding.data) == 2
    events = await usage_events(settings.nats_url, settings.event_namespace, t.project, 3)
    kinds = sorted(e["data"]["kind"] for e in events)
    assert kinds == ["completion", "completion", "embedding"]
    assert all(e["data"]["usage_source"] == "upstream" for e in events)
