"""A SIMULATOR of an OpenAI-compatible model server. It is not a model and never claims to be.

It answers ``/v1/chat/completions`` and ``/v1/completions`` (also under ``/openai/v1``, where
KServe serves them) with deterministic tokens chosen from a fixed word list by a hash of the
prompt, after a configurable time to first token and with a configurable delay between tokens,
streaming in OpenAI's exact SSE chunk format (``data: {...}`` blocks, ``data: [DONE]`` last).
Usage comes in the last chunk when the client sets ``stream_options.include_usage`` (or never,
with ``--usage never``, to exercise a gateway that counts tokens itself). ``/v1/models`` lists
the one served name (``owned_by: steward-simulator``); ``/health`` answers 200.

For demos, tests and benchmarks: ``python -m services.inference.simulator --port 9000``.
Failure knobs for supervision tests: ``--fail-to-load`` (exit before serving, as a model that
cannot load), ``--exit-after`` (crash that long after the first answered health check, so a
supervisor has seen it healthy whatever the machine's load; with ``--crash-once-file``, only on
the first start).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

OWNER = "steward-simulator"
# fmt: off
WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "simulated",
    "tokens", "flow", "steadily", "through", "gateways", "quotas", "meters", "and", "routes",
    "so", "that", "nothing", "here", "is", "a", "real", "model", "answer",
)
# fmt: on
DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class SimulatorConfig:
    served_model_name: str = "simulator"
    ttft_ms: float = 50.0
    itl_ms: float = 10.0
    usage: str = "auto"  # auto: when asked for (always in non-streamed answers); never: never


def tokens_for(prompt: str, count: int) -> list[str]:
    """``count`` deterministic tokens for a prompt: the same prompt, the same answer."""
    out: list[str] = []
    seed = hashlib.sha256(prompt.encode()).digest()
    while len(out) < count:
        for byte in seed:
            out.append(WORDS[byte % len(WORDS)] + " ")
            if len(out) == count:
                break
        seed = hashlib.sha256(seed).digest()
    return out


def prompt_tokens(text: str) -> int:
    return max(1, len(text.split()))


def _error(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param}}
    body["error"]["code"] = code
    return JSONResponse(body, status_code=status)


def _prompt_of_chat(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return None
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            return None
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [p.get("text", "") for p in content if isinstance(p, dict)]
    return "\n".join(parts)


def create_app(
    config: SimulatorConfig,
    on_healthy: Callable[[], None] | None = None,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Starlette:
    """``sleep`` makes the time to first token and between tokens pass (a test may record it)."""
    created = int(time.time())

    healthy_once: list[Callable[[], None]] = [on_healthy] if on_healthy is not None else []

    async def health(_request: Request) -> Response:
        # The first answered health check: whoever supervises this server has seen it healthy.
        while healthy_once:
            healthy_once.pop()()
        return JSONResponse({"status": "ok", "simulator": True})

    async def models(_request: Request) -> Response:
        card = {"id": config.served_model_name, "object": "model", "created": created}
        return JSONResponse({"object": "list", "data": [{**card, "owned_by": OWNER}]})

    async def _body(request: Request) -> dict[str, Any] | Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        if body.get("model") != config.served_model_name:
            return _error(
                404,
                f"The model '{body.get('model')}' does not exist",
                "model",
                "model_not_found",
            )
        return body

    def _limits(body: dict[str, Any]) -> tuple[int, str] | Response:
        asked = body.get("max_completion_tokens", body.get("max_tokens"))
        if asked is None:
            return DEFAULT_MAX_TOKENS, "stop"
        if not isinstance(asked, int) or isinstance(asked, bool) or asked < 1:
            return _error(400, "max_tokens must be a positive integer", "max_tokens")
        return asked, "length"

    async def chat(request: Request) -> Response:
        body = await _body(request)
        if isinstance(body, Response):
            return body
        prompt = _prompt_of_chat(body.get("messages"))
        if prompt is None:
            return _error(400, "messages must be a non-empty list of messages", "messages")
        limits = _limits(body)
        if isinstance(limits, Response):
            return limits
        count, finish = limits
        return await _answer(body, prompt, count, finish, chat=True)

    async def completions(request: Request) -> Response:
        body = await _body(request)
        if isinstance(body, Response):
            return body
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = "\n".join(str(p) for p in prompt)
        if not isinstance(prompt, str):
            return _error(400, "prompt must be a string", "prompt")
        limits = _limits(body)
        if isinstance(limits, Response):
            return limits
        count, finish = limits
        return await _answer(body, prompt, count, finish, chat=False)

    async def _answer(
        body: dict[str, Any], prompt: str, count: int, finish: str, *, chat: bool
    ) -> Response:
        tokens = tokens_for(prompt, count)
        usage = {
            "prompt_tokens": prompt_tokens(prompt),
            "completion_tokens": count,
            "total_tokens": prompt_tokens(prompt) + count,
        }
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if not body.get("stream"):
            await sleep((config.ttft_ms + config.itl_ms * (count - 1)) / 1000)
            text = "".join(tokens)
            if chat:
                choice: dict[str, Any] = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            answer: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": config.served_model_name,
                "system_fingerprint": OWNER,
                "choices": [choice],
            }
            if config.usage != "never":
                answer["usage"] = usage
            return JSONResponse(answer)
        options = body.get("stream_options") or {}
        include_usage = config.usage != "never" and bool(
            isinstance(options, dict) and options.get("include_usage")
        )
        return StreamingResponse(
            _stream(ident, tokens, finish, usage, include_usage, chat=chat),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _stream(
        ident: str,
        tokens: list[str],
        finish: str,
        usage: dict[str, int],
        include_usage: bool,
        *,
        chat: bool,
    ) -> AsyncIterator[bytes]:
        created_at = int(time.time())

        def chunk(choices: list[dict[str, Any]], last_usage: dict[str, int] | None = None) -> bytes:
            data: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created_at,
                "model": config.served_model_name,
                "system_fingerprint": OWNER,
                "choices": choices,
            }
            if include_usage:
                data["usage"] = last_usage
            return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

        def delta(content: str | None, finish_reason: str | None, role: bool = False) -> Any:
            if not chat:
                return {
                    "index": 0,
                    "text": content or "",
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            d: dict[str, Any] = {}
            if role:
                d["role"] = "assistant"
            if content is not None:
                d["content"] = content
            return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}

        await sleep(config.ttft_ms / 1000)
        if chat:
            yield chunk([delta("", None, role=True)])
        for i, token in enumerate(tokens):
            if i:
                await sleep(config.itl_ms / 1000)
            yield chunk([delta(token, None)])
        yield chunk([delta(None if chat else "", finish)])
        if include_usage:
            yield chunk([], usage)
        yield b"data: [DONE]\n\n"

    routes = [Route("/health", health)]
    for prefix in ("/v1", "/openai/v1"):
        routes += [
            Route(f"{prefix}/models", models),
            Route(f"{prefix}/chat/completions", chat, methods=["POST"]),
            Route(f"{prefix}/completions", completions, methods=["POST"]),
        ]
    return Starlette(routes=routes)


def _crash_later(seconds: float, once_file: Path | None) -> None:
    if once_file is not None:
        if once_file.exists():
            return
        once_file.write_text("crashed once\n")

    async def crash() -> None:
        await asyncio.sleep(seconds)
        print(f"simulator: crashing on purpose {seconds}s after healthy (--exit-after)", flush=True)
        os._exit(3)

    asyncio.get_running_loop().create_task(crash())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m services.inference.simulator",
        description="An OpenAI-compatible SIMULATOR (not a model): deterministic tokens.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--served-model-name", default="simulator")
    parser.add_argument("--ttft-ms", type=float, default=50.0, help="time to first token")
    parser.add_argument("--itl-ms", type=float, default=10.0, help="delay between tokens")
    parser.add_argument("--usage", choices=["auto", "never"], default="auto")
    parser.add_argument("--fail-to-load", action="store_true", help="exit 1 before serving")
    parser.add_argument(
        "--exit-after",
        type=float,
        default=None,
        help="crash N seconds after the first answered health check",
    )
    parser.add_argument("--crash-once-file", type=Path, default=None)
    args = parser.parse_args(argv)
    print(
        f"steward simulator (NOT a model) serving {args.served_model_name!r} on "
        f"{args.host}:{args.port}: ttft {args.ttft_ms} ms, itl {args.itl_ms} ms",
        flush=True,
    )
    if args.fail_to_load:
        print("simulator: error: failed to load the model weights (--fail-to-load)", flush=True)
        sys.exit(1)

    import uvicorn

    config = SimulatorConfig(args.served_model_name, args.ttft_ms, args.itl_ms, args.usage)
    exit_after, once_file = args.exit_after, args.crash_once_file
    on_healthy = None if exit_after is None else (lambda: _crash_later(exit_after, once_file))
    app = create_app(config, on_healthy)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
