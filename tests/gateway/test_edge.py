"""The gateway's edge, as a hostile client and a hostile upstream see it (a security review's
findings): what the public /api proxy exposes, what upstream responses may carry to a client,
malformed input, and clients that hold connections open. Everything over real sockets, the
proxy served with the listener configuration the gateway itself runs (``server_config``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.app import ProxyApp, _Server, server_config
from gateway.state import Gateway
from libs.common.settings import Settings
from tests.gateway.conftest import RunningGateway, tenant
from tests.helpers import bearer, free_port, serve

BODY_TIMEOUT = 1.0
HEADER_TIMEOUT = 1.0
BOUND = 15.0  # failure bound for "cut off within the timeout": generous for a loaded machine


SECRET = "hunter2"
LEAKY_HEADERS = {
    "set-cookie": f"session={SECRET}; Path=/",
    "server": "vllm/0.0 gpu-17.internal",
    "x-internal-host": "gpu-17.internal",
    "x-request-id": "upstream-request-id",
    "x-ratelimit-remaining-tokens": "12345",
    "openai-organization": "org-upstream-account",
    "openai-processing-ms": "12",
    "cache-control": "no-store",
}
REQUESTS: list[str] = []  # what the hostile upstream was asked (model prompts, MCP methods)


def _answer(model: str) -> dict[str, object]:
    message = {"role": "assistant", "content": "fine"}
    return {
        "id": "cmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


async def _hostile_model(request: Request) -> Response:
    """A model server that tries everything the gateway must not pass on."""
    body = await request.json()
    prompt = str(body["messages"][-1]["content"])
    REQUESTS.append(prompt)
    if prompt == "redirect":
        return Response(
            status_code=307,
            headers={**LEAKY_HEADERS, "location": "http://authz.internal:8101/v1/platform/keys"},
        )
    if prompt == "traceback":
        trace = f'Traceback (most recent call last):\n  File "db.py"\nError: password={SECRET}'
        return PlainTextResponse(trace, status_code=500, headers=LEAKY_HEADERS)
    if prompt == "context":
        error = {
            "message": "maximum context length is 8 tokens",
            "type": "invalid_request_error",
            "code": "context_length_exceeded",
            "param": "messages",
            "internal": f"postgres://steward:{SECRET}@db",
        }
        return JSONResponse({"error": error, "debug": SECRET}, 400, LEAKY_HEADERS)
    if prompt == "raw4xx":
        return PlainTextResponse(f"validation failed near {SECRET}", 422, LEAKY_HEADERS)
    if body.get("stream"):

        async def events() -> AsyncIterator[bytes]:
            chunk = {"choices": [{"index": 0, "delta": {"content": "fine"}}]}
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=LEAKY_HEADERS)
    return JSONResponse(_answer(str(body["model"])), headers=LEAKY_HEADERS)


async def _hostile_mcp(request: Request) -> Response:
    message = await request.json()
    method = str(message.get("method"))
    REQUESTS.append(method)
    if method == "redirect":
        return Response(status_code=302, headers={"location": "http://authz.internal:8101/"})
    if method == "boom":
        return PlainTextResponse(f"Traceback: password={SECRET}", 500, LEAKY_HEADERS)
    if method == "bad":
        error = {"code": -32602, "message": "bad params", "data": {"traceback": SECRET}}
        return JSONResponse({"jsonrpc": "2.0", "id": 7, "error": error}, 400, LEAKY_HEADERS)
    result = {"protocolVersion": "2025-06-18", "capabilities": {}, "serverInfo": {"name": "x"}}
    return JSONResponse(
        {"jsonrpc": "2.0", "id": message.get("id"), "result": result},
        headers={**LEAKY_HEADERS, "mcp-session-id": "session-1"},
    )


HOSTILE = Starlette(
    routes=[
        Route("/v1/chat/completions", _hostile_model, methods=["POST"]),
        Route("/mcp", _hostile_mcp, methods=["POST"]),
    ]
)


@pytest.fixture(scope="module")
async def hostile() -> AsyncIterator[str]:
    async with serve(HOSTILE) as url:
        yield url


@pytest.fixture(scope="module")
async def edge(
    gateway_settings: Settings, hostile: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningGateway]:
    """A gateway of this module's own, with short client timeouts, on its real listener, in
    front of a hostile model server and MCP server."""
    data_dir = tmp_path_factory.mktemp("edge")
    routes = {
        "models": [{"name": "echo", "upstream": f"{hostile}/v1"}],
        "mcp_servers": [{"name": "tools", "upstream": f"{hostile}/mcp"}],
    }
    (data_dir / "routes.yaml").write_text(yaml.safe_dump(routes))
    settings = gateway_settings.model_copy(
        update={
            "data_dir": data_dir,
            "gateway_routes_file": data_dir / "routes.yaml",
            "gateway_body_timeout_seconds": BODY_TIMEOUT,
            "gateway_header_timeout_seconds": HEADER_TIMEOUT,
        }
    )
    gateway = await Gateway.start(settings)
    port = free_port()
    server = _Server(server_config(ProxyApp(gateway), settings, port))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        await gateway.wait_loaded(10)
        yield RunningGateway(gateway, f"http://127.0.0.1:{port}", "", settings)
    finally:
        server.should_exit = True
        await task
        await gateway.stop()


def port_of(running: RunningGateway) -> int:
    return int(running.url.rsplit(":", 1)[1])


# -- 1. the public /api proxy forwards a service's versioned API only


@pytest.mark.parametrize(
    "path",
    [
        "/metrics",  # the gateway's own: on the admin port only (routes name projects)
        "/api/authz/metrics",
        "/api/authz/openapi.json",
        "/api/authz/docs",
        "/api/authz/docs/oauth2-redirect",
        "/api/authz/redoc",
        "/api/authz/healthz",
        "/api/authz/readyz",
        "/api/authz/",
        "/api/authz",
    ],
)
async def test_service_internals_are_not_reachable_through_the_public_proxy(
    edge: RunningGateway, path: str
) -> None:
    async with httpx.AsyncClient(base_url=edge.url) as http:
        response = await http.get(path)
    assert response.status_code == 404, response.text
    assert response.json() == {"message": "no Route matched with those values"}
    assert b"steward_" not in response.content and b"openapi" not in response.content


async def raw_get(running: RunningGateway, target: bytes) -> bytes:
    """A request sent byte for byte as written (an HTTP client would normalise the path)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(running))
    writer.write(b"GET " + target + b" HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n")
    try:
        return await asyncio.wait_for(reader.read(), BOUND)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "target", [b"/api/authz/v1/../metrics", b"/api/authz/v1/%2e%2e/metrics", b"/mcp/tools/../x"]
)
async def test_a_dot_segment_cannot_climb_out_of_a_proxied_prefix(
    edge: RunningGateway, target: bytes
) -> None:
    answer = await raw_get(edge, target)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert b"steward_" not in answer


async def test_the_versioned_api_is_still_proxied(edge: RunningGateway, admin_key: str) -> None:
    async with httpx.AsyncClient(base_url=edge.url) as http:
        whoami = await http.get("/api/authz/v1/whoami", headers=bearer(admin_key))
        anonymous = await http.get("/api/authz/v1/whoami")
    assert whoami.status_code == 200, whoami.text
    assert anonymous.status_code == 401


# -- 3. malformed input: a clear 400, nothing forwarded, nothing changed


@pytest.mark.parametrize(
    "path",
    [
        "/api/authz/v1/snapshot%00",
        "/api/authz/v1/projects%0d%0aX-Injected:%201",
        "/api/authz/v1/projects%3Fscope=all",
        "/mcp/tools/%00",
        "/v1/chat/completions%00",
        "/anything/%00",
    ],
)
async def test_a_control_character_or_encoded_query_in_the_path_is_a_400(
    edge: RunningGateway, admin_key: str, path: str
) -> None:
    async with httpx.AsyncClient(base_url=edge.url) as http:
        response = await http.get(path, headers=bearer(admin_key))
    assert response.status_code == 400, response.text
    body = response.json()
    assert "request path" in json.dumps(body)


DEEP = b"[" * 20_000 + b"]" * 20_000  # far past the recursion limit, within the size limit


async def test_deeply_nested_json_is_a_400_on_every_area(
    edge: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    model = await tenant(authz, admin_key, edge, ["echo"])
    tools = await tenant(authz, admin_key, edge, ["tools"], kind="mcp_server")
    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
        REQUESTS.clear()
        nested = b'{"model": "echo", "messages": ' + DEEP + b"}"
        v1 = await http.post("/v1/chat/completions", content=nested, headers=bearer(model.key))
        mcp = await http.post(
            "/mcp/tools/",
            content=DEEP,
            headers={**bearer(tools.key), "content-type": "application/json"},
        )
        api = await http.post(
            "/api/authz/v1/projects",
            content=b'{"name": ' + DEEP + b"}",
            headers={**bearer(admin_key), "content-type": "application/json"},
        )
    assert v1.status_code == 400 and "nested too deeply" in v1.json()["error"]["message"]
    assert mcp.status_code == 400 and mcp.json()["error"]["code"] == -32600
    assert api.status_code == 400, api.text
    assert REQUESTS == []


async def _trickle(writer: asyncio.StreamWriter, every: float) -> None:
    """One body byte every ``every`` seconds, until the server hangs up."""
    try:
        while True:
            await asyncio.sleep(every)
            writer.write(b"x")
            await writer.drain()
    except (ConnectionError, OSError):
        return


async def _response_and_close(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    return await reader.read()


@pytest.mark.parametrize("path", ["/api/authz/v1/projects", "/v1/chat/completions"])
async def test_a_body_trickling_in_is_cut_off_with_408(
    edge: RunningGateway, authz: httpx.AsyncClient, admin_key: str, path: str
) -> None:
    t = await tenant(authz, admin_key, edge, ["echo"])
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(edge))
    head = (
        f"POST {path} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {t.key}\r\n"
        "content-type: application/json\r\ncontent-length: 1000\r\n\r\n"
    )
    writer.write(head.encode())
    await writer.drain()
    started = time.monotonic()
    trickle = asyncio.create_task(_trickle(writer, 0.1))
    try:
        answer = await asyncio.wait_for(_response_and_close(reader), BOUND)
    finally:
        trickle.cancel()
        writer.close()
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"connection: close" in answer.lower()
    assert BODY_TIMEOUT * 0.9 <= elapsed < BOUND


async def test_a_declared_oversized_body_is_refused_and_the_connection_closed(
    edge: RunningGateway,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(edge))
    writer.write(
        b"POST /api/authz/v1/projects HTTP/1.1\r\nhost: gw\r\ncontent-length: 9999999\r\n\r\n"
    )
    trickle = asyncio.create_task(_trickle(writer, 0.1))
    try:
        answer = await asyncio.wait_for(_response_and_close(reader), BOUND)
    finally:
        trickle.cancel()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]


async def test_a_request_head_trickling_in_is_closed(edge: RunningGateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(edge))
    writer.write(b"GET /healthz HTTP/1.1\r\nx-slow: ")
    await writer.drain()
    started = time.monotonic()
    trickle = asyncio.create_task(_trickle(writer, 0.1))
    try:
        answer = await asyncio.wait_for(_response_and_close(reader), BOUND)
    finally:
        trickle.cancel()
        writer.close()
    assert answer == b""  # closed, never answered
    assert HEADER_TIMEOUT * 0.9 <= time.monotonic() - started < BOUND


async def test_a_silent_connection_is_closed_and_a_kept_alive_one_still_works(
    edge: RunningGateway,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(edge))
    started = time.monotonic()
    try:
        assert await asyncio.wait_for(reader.read(), BOUND) == b""
    finally:
        writer.close()
    assert HEADER_TIMEOUT * 0.9 <= time.monotonic() - started < BOUND
    # A client that asks promptly is served, and its connection is reused.
    async with httpx.AsyncClient(base_url=edge.url) as http:
        for _ in range(3):
            assert (await http.get("/healthz")).status_code == 200


# -- 2. upstream responses reach the client through an allow-list


def assert_clean(response: httpx.Response) -> None:
    """Nothing of the upstream's that the gateway does not allow."""
    for name in ("set-cookie", "server", "x-internal-host", "location", "openai-organization"):
        assert name not in response.headers, name
    assert "x-ratelimit-remaining-tokens" not in response.headers
    assert response.headers["x-request-id"] != "upstream-request-id"
    everything = str(response.headers) + response.text
    assert SECRET not in everything and "internal" not in everything


def chat(prompt: str, stream: bool = False) -> dict[str, object]:
    return {"model": "echo", "messages": [{"role": "user", "content": prompt}], "stream": stream}


async def test_a_model_answer_carries_only_allowed_headers(
    edge: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, edge, ["echo"])
    async with httpx.AsyncClient(base_url=edge.url, headers=bearer(t.key)) as http:
        answer = await http.post("/v1/chat/completions", json=chat("hello"))
        async with http.stream(
            "POST", "/v1/chat/completions", json=chat("hello", stream=True)
        ) as stream:
            await stream.aread()
    for response in (answer, stream):
        assert response.status_code == 200
        assert_clean(response)
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["openai-processing-ms"] == "12"
    assert answer.json()["choices"][0]["message"]["content"] == "fine"
    assert b"[DONE]" in stream.content


async def test_a_model_redirect_is_a_502_and_never_followed(
    edge: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, edge, ["echo"])
    REQUESTS.clear()
    async with httpx.AsyncClient(base_url=edge.url, headers=bearer(t.key)) as http:
        response = await http.post("/v1/chat/completions", json=chat("redirect"))
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "upstream_error"
    assert_clean(response)
    assert REQUESTS == ["redirect"]  # asked once, not followed


async def test_a_model_5xx_body_stays_in_the_log(
    edge: RunningGateway, authz: httpx.AsyncClient, admin_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    t = await tenant(authz, admin_key, edge, ["echo"])
    async with httpx.AsyncClient(base_url=edge.url, headers=bearer(t.key)) as http:
        response = await http.post("/v1/chat/completions", json=chat("traceback"))
    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "message": "the upstream server failed to answer",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert_clean(response)
    assert SECRET in caplog.text  # for the operator, not the client


async def test_a_model_4xx_keeps_only_the_openai_error_fields(
    edge: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, edge, ["echo"])
    async with httpx.AsyncClient(base_url=edge.url, headers=bearer(t.key)) as http:
        context = await http.post("/v1/chat/completions", json=chat("context"))
        raw = await http.post("/v1/chat/completions", json=chat("raw4xx"))
    assert context.status_code == 400
    assert context.json() == {
        "error": {
            "message": "maximum context length is 8 tokens",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    assert raw.status_code == 422
    assert raw.json()["error"]["message"] == "the upstream refused the request (422)"
    for response in (context, raw):
        assert_clean(response)
        assert response.headers["content-type"] == "application/json"


MCP_ACCEPT = {"accept": "application/json, text/event-stream"}


def rpc(method: str) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": 7, "method": method, "params": {}}


async def test_mcp_answers_go_through_the_same_allow_list(
    edge: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, edge, ["tools"], kind="mcp_server")
    REQUESTS.clear()
    headers = {**bearer(t.key), **MCP_ACCEPT}
    async with httpx.AsyncClient(base_url=edge.url, headers=headers) as http:
        init = await http.post("/mcp/tools/", json=rpc("initialize"))
        redirect = await http.post("/mcp/tools/", json=rpc("redirect"))
        boom = await http.post("/mcp/tools/", json=rpc("boom"))
        bad = await http.post("/mcp/tools/", json=rpc("bad"))
    assert init.status_code == 200 and init.json()["result"]["serverInfo"] == {"name": "x"}
    assert init.headers["mcp-session-id"] == "session-1"  # the protocol's own header passes
    assert redirect.status_code == 502 and redirect.json()["error"]["code"] == -32603
    assert boom.status_code == 500 and boom.json()["error"]["code"] == -32603
    assert bad.status_code == 400
    assert bad.json() == {
        "jsonrpc": "2.0",
        "id": 7,
        "error": {"code": -32602, "message": "bad params"},
    }
    for response in (init, redirect, boom, bad):
        assert_clean(response)
    assert REQUESTS == ["initialize", "redirect", "boom", "bad"]
