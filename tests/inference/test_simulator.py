"""The built-in simulator against the official ``openai`` client: OpenAI's exact streaming format,
usage in the last chunk only when asked (or never), deterministic tokens, time to first token,
and OpenAI error objects. It is a simulator and says so."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from services.inference.simulator import SimulatorConfig, create_app, tokens_for
from tests.helpers import serve


@pytest.fixture(scope="module")
async def sim() -> AsyncIterator[str]:
    async with serve(create_app(SimulatorConfig("sim-model", ttft_ms=150, itl_ms=5))) as url:
        yield url


@pytest.fixture(scope="module")
async def sim_without_usage() -> AsyncIterator[str]:
    config = SimulatorConfig("sim-model", ttft_ms=1, itl_ms=1, usage="never")
    async with serve(create_app(config)) as url:
        yield url


async def test_streams_openai_chunks_with_usage_last_and_a_measurable_ttft() -> None:
    waits: list[float] = []  # what the simulator let pass, in order: its clock, not the wall's

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    config = SimulatorConfig("sim-model", ttft_ms=150, itl_ms=5)
    async with serve(create_app(config, sleep=sleep)) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")
        stream = await client.chat.completions.create(
            model="sim-model",
            messages=[{"role": "user", "content": "one two three"}],
            stream=True,
            max_tokens=4,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        await client.close()
    first_content = next(
        i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.content
    )
    assert first_content == 1  # the role chunk comes first, as OpenAI sends it
    assert chunks[0].choices[0].delta.role == "assistant"
    # The configured time to first token before the first chunk, then one gap between tokens.
    assert waits == pytest.approx([0.15, 0.005, 0.005, 0.005])
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 4)
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(tokens_for("one two three", 4))  # deterministic


async def test_the_wire_format_is_exactly_openais(sim: str) -> None:
    async with (
        httpx.AsyncClient() as http,
        http.stream(
            "POST",
            sim + "/v1/chat/completions",
            json={
                "model": "sim-model",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "max_tokens": 2,
            },
        ) as response,
    ):
        body = (await response.aread()).decode()
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = body.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
    assert all(b.startswith("data: {") for b in blocks[:-2])
    assert '"usage"' not in body  # not asked for: no usage key at all
    assert '"object":"chat.completion.chunk"' in blocks[0]


async def test_usage_can_be_withheld_and_answers_are_deterministic(
    sim_without_usage: str,
) -> None:
    client = openai.AsyncOpenAI(base_url=sim_without_usage + "/v1", api_key="unused")
    answers = []
    for _ in range(2):
        answer = await client.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "same prompt"}]
        )
        answers.append(answer.choices[0].message.content)
        assert answer.usage is None
        assert answer.choices[0].finish_reason == "stop"
    stream = await client.chat.completions.create(
        model="sim-model",
        messages=[{"role": "user", "content": "same prompt"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    assert all([c.usage is None async for c in stream])
    await client.close()
    assert answers[0] == answers[1]
    assert len((answers[0] or "").split()) == 16


async def test_models_health_and_openai_errors(sim: str) -> None:
    client = openai.AsyncOpenAI(base_url=sim + "/openai/v1", api_key="unused")  # KServe's path
    models = await client.models.list()
    assert [(m.id, m.owned_by) for m in models.data] == [("sim-model", "steward-simulator")]
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}]
        )
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="sim-model", messages=[])
    completion = await client.completions.create(model="sim-model", prompt="abc", max_tokens=3)
    assert completion.choices[0].text == "".join(tokens_for("abc", 3))
    await client.close()
    async with httpx.AsyncClient() as http:
        health = await http.get(sim + "/health")
    assert health.json() == {"status": "ok", "simulator": True}
