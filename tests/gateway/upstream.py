"""A TEST UPSTREAM: a small OpenAI-compatible server the gateway tests (and bench/) proxy to.

Run as its own process: ``python -m tests.gateway.upstream PORT``. The model name picks a
behaviour, so one process serves every case:

- ``echo…``: answers "you said: <last message>" word by word (streamed or not), with usage.
- ``…nousage…``: never reports usage.
- ``…malformed…``: streams a chunk that is not JSON and ends without ``[DONE]``.
- ``…slow…``: streams 400 chunks 20 ms apart (to disconnect from mid-stream).
- ``…cut…``: streams three chunks then drops the connection.
- ``…hang…``: waits 5 s before answering (for timeouts).
- ``…error…``: answers 500 with an OpenAI error object.
- ``…linger…``: keeps a stream open for 2 s after ``[DONE]`` (a client may hang up first).

A request carrying ``x_test_usage`` gets that object back as its usage, verbatim (an upstream
that lies about usage).

``/anything/…`` echoes the request back (for Kong routes).

``GET /_log`` returns the requests received (headers and bodies); ``GET /_stats`` how many streams
completed and how many were abandoned by their client; ``POST /_reset`` clears both.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

LOG: list[dict[str, Any]] = []
STATS = {"completed": 0, "abandoned": 0}
PAYLOAD_FILL = "x"


def _words(body: dict[str, Any]) -> list[str]:
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        text = str(messages[-1].get("content", ""))
    else:
        text = str(body.get("prompt", ""))
    size = body.get("x_reply_bytes")
    if isinstance(size, int):  # bench: a reply of a given size
        return [PAYLOAD_FILL * 63 + " "] * max(size // 64, 1)
    return ["you ", "said: ", *[w + " " for w in text.split()]]


def _chunk(model: str, kind: str, text: str | None, finish: str | None = None) -> bytes:
    if kind == "chat":
        delta: dict[str, Any] = {"content": text} if text is not None else {}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
        obj = "text_completion"
    event = {"id": "cmpl-test", "object": obj, "created": 0, "model": model, "choices": [choice]}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def _usage(model: str, prompt: int, completion: int) -> bytes:
    event = {
        "id": "cmpl-test",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


async def _stream(
    model: str, kind: str, words: list[str], body: dict[str, Any]
) -> AsyncIterator[bytes]:
    finished = False
    try:
        if "malformed" in model:
            yield b"data: {this is not json\n\n"
            yield _chunk(model, kind, "still ")
            yield b'data: {"partial": tr'
            finished = True
            return
        count = 400 if "slow" in model else len(words)
        for i in range(count):
            if "slow" in model:
                await asyncio.sleep(0.02)
            if "cut" in model and i == 3:
                raise ConnectionResetError("test upstream drops the connection")
            yield _chunk(model, kind, words[i % len(words)])
        yield _chunk(model, kind, None, "stop")
        options = body.get("stream_options") or {}
        if "x_test_usage" in body:
            event = {"id": "cmpl-test", "object": "chat.completion.chunk", "created": 0}
            event.update(model=model, choices=[], usage=body["x_test_usage"])
            yield b"data: " + json.dumps(event).encode() + b"\n\n"
        elif options.get("include_usage") and "nousage" not in model:
            yield _usage(model, 7, count)
        yield b"data: [DONE]\n\n"
        if "linger" in model:
            await asyncio.sleep(2)
        finished = True
    finally:
        STATS["completed" if finished else "abandoned"] += 1


async def completions(request: Request) -> Response:
    kind = "chat" if request.url.path.endswith("chat/completions") else "completion"
    raw = await request.body()
    body = json.loads(raw)
    LOG.append({"path": request.url.path, "headers": dict(request.headers), "body": body})
    model = str(body.get("model", ""))
    if "error" in model:
        error = {"error": {"message": "the test upstream failed", "type": "server_error"}}
        return JSONResponse(error, status_code=500)
    if "busy" in model:
        error = {"error": {"message": "the test upstream is busy", "type": "rate_limit_error"}}
        return JSONResponse(error, status_code=429, headers={"retry-after": "1"})
    if "hang" in model:
        await asyncio.sleep(5)
    words = _words(body)
    if body.get("stream"):
        return StreamingResponse(_stream(model, kind, words, body), media_type="text/event-stream")
    text = "".join(words)
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }
    else:
        choice = {"index": 0, "text": text, "finish_reason": "stop"}
    answer: dict[str, Any] = {
        "id": "cmpl-test",
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if "nousage" not in model:
        answer["usage"] = {
            "prompt_tokens": 7,
            "completion_tokens": len(words),
            "total_tokens": 7 + len(words),
        }
    if "x_test_usage" in body:
        answer["usage"] = body["x_test_usage"]
    STATS["completed"] += 1
    return JSONResponse(answer)


async def embeddings(request: Request) -> Response:
    body = await request.json()
    LOG.append({"path": request.url.path, "headers": dict(request.headers), "body": body})
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    data = [
        {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(items))
    ]
    answer = {"object": "list", "data": data, "model": body.get("model")}
    if "nousage" not in str(body.get("model")):
        answer["usage"] = {"prompt_tokens": 3 * len(items), "total_tokens": 3 * len(items)}
    return JSONResponse(answer)


async def anything(request: Request) -> Response:
    """Echo what arrived (for Kong routes): method, path, query, headers, body."""
    body = await request.body()
    return JSONResponse(
        {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "headers": dict(request.headers),
            "body": body.decode(errors="replace"),
        }
    )


async def log(request: Request) -> Response:
    return JSONResponse(LOG)


async def stats(request: Request) -> Response:
    return JSONResponse(STATS)


async def reset(request: Request) -> Response:
    LOG.clear()
    STATS.update(completed=0, abandoned=0)
    return Response(status_code=204)


app = Starlette(
    routes=[
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/anything/{rest:path}", anything, methods=["GET", "POST", "PUT", "DELETE"]),
        Route("/_log", log),
        Route("/_stats", stats),
        Route("/_reset", reset, methods=["POST"]),
    ]
)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )
