"""Where an engine reports no usage, a model whose catalog version names its tokenizer is counted
with it (``usage_source: tokenizer``), not estimated; the tokenizer is a published
``tokenizer.json`` (tests/fixtures/tokenizers), checked here against its known tokens."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from tokenizers import Tokenizer

from gateway.tokens import ESTIMATE, ModelTokenizer, estimate_prompt, estimate_text
from gateway.vocab import Tokenizers
from libs.common.settings import Settings
from tests.gateway.conftest import TOKENIZER, TOKENIZERS, RunningGateway, tenant
from tests.gateway.support import usage_events
from tests.helpers import bearer

# Subwords and escapes: an estimate and a naive count of the JSON-escaped stream both miss.
TEXT = 'Tokenization is unbelievably heterogeneous: naïve "quoted" café'


@pytest.fixture(scope="module")
def reference() -> Tokenizer:
    """The same file read directly by the library, without the padding it is published with."""
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    tokenizer.no_padding()
    return tokenizer


def test_the_published_tokenizer_splits_as_its_model_does(reference: Tokenizer) -> None:
    counter = ModelTokenizer(Tokenizer.from_file(str(TOKENIZER)))
    assert reference.encode("Tokenization is unbelievably").tokens == [
        "[CLS]", "token", "##ization", "is", "un", "##bel", "##ie", "##va", "##bly", "[SEP]",
    ]  # fmt: skip
    # As published, the file pads every input to 128: the gateway's counter must not.
    assert len(Tokenizer.from_file(str(TOKENIZER)).encode("hello world").ids) == 128
    assert counter.prompt({"input": "hello world"}) == 4  # [CLS] hello world [SEP]
    assert counter.text("hello world") == 2
    assert counter.prompt({"messages": [{"role": "user", "content": "hello world"}]}) == 4 + 2


async def _post(gw: RunningGateway, key: str, path: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        return await http.post(path, json=body, headers=bearer(key))


def _tokens(reference: Tokenizer, text: str, special: bool = False) -> int:
    return len(reference.encode(text, add_special_tokens=special).ids)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_a_chat_without_usage_is_counted_with_the_models_tokenizer(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    settings: Settings,
    reference: Tokenizer,
    stream: bool,
) -> None:
    t = await tenant(authz, admin_key, gw, ["tokenized-nousage"])
    messages = [{"role": "user", "content": TEXT}]
    body = {"model": "tokenized-nousage", "messages": messages, "stream": stream}
    answer = await _post(gw, t.key, "/v1/chat/completions", body)
    assert answer.status_code == 200, answer.text
    if stream:
        deltas = [
            line for line in answer.text.splitlines() if line.startswith("data: {")
        ]  # the client got the text the gateway counted
        assert len(deltas) > 3
    [event] = await usage_events(settings.nats_url, settings.event_namespace, t.project, 1)
    data = event["data"]
    reply = "you said: " + " ".join(TEXT.split()) + " "  # what the test upstream answers
    assert data["usage_source"] == "tokenizer"
    assert data["completion_tokens"] == _tokens(reference, reply)
    assert data["prompt_tokens"] == 4 + _tokens(reference, TEXT)
    # ...which is not what the estimate would have said.
    assert data["completion_tokens"] != estimate_text(reply)
    assert data["prompt_tokens"] != estimate_prompt({"messages": messages})


async def test_embeddings_without_usage_count_each_input_as_the_model_reads_it(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    settings: Settings,
    reference: Tokenizer,
) -> None:
    t = await tenant(authz, admin_key, gw, ["tokenized-nousage"])
    inputs = [TEXT, "hello world"]
    body = {"model": "tokenized-nousage", "input": inputs}
    answer = await _post(gw, t.key, "/v1/embeddings", body)
    assert answer.status_code == 200, answer.text
    assert "usage" not in answer.json()
    [event] = await usage_events(settings.nats_url, settings.event_namespace, t.project, 1)
    data = event["data"]
    assert data["usage_source"] == "tokenizer"
    assert data["prompt_tokens"] == sum(_tokens(reference, i, special=True) for i in inputs)
    assert data["completion_tokens"] == 0


async def test_a_model_without_a_tokenizer_is_still_estimated(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    settings: Settings,
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo-nousage"])
    body = {"model": "echo-nousage", "messages": [{"role": "user", "content": TEXT}]}
    answer = await _post(gw, t.key, "/v1/chat/completions", body)
    assert answer.status_code == 200, answer.text
    [event] = await usage_events(settings.nats_url, settings.event_namespace, t.project, 1)
    assert event["data"]["usage_source"] == "estimated"
    assert event["data"]["prompt_tokens"] == estimate_prompt({"messages": body["messages"]})


async def test_a_tokenizer_is_read_only_from_the_operators_roots_or_packages(
    tmp_path: Path,
) -> None:
    """A catalog author names the file; the gateway host's other files stay out of reach."""
    outside = tmp_path / "tokenizer.json"
    outside.write_bytes(TOKENIZER.read_bytes())
    tokenizers = Tokenizers([TOKENIZERS])
    assert await tokenizers.counter(outside.as_uri()) is ESTIMATE
    sneaky = f"file://{TOKENIZERS}/../../../../{outside.relative_to('/')}"
    assert await tokenizers.counter(sneaky) is ESTIMATE
    assert await tokenizers.counter("pkg://tokenizers/../../etc/passwd.json") is ESTIMATE
    assert await tokenizers.counter("pkg://no_such_package/tokenizer.json") is ESTIMATE
    assert await tokenizers.counter(f"file://{TOKENIZERS}/missing.json") is ESTIMATE
    assert await tokenizers.counter(None) is ESTIMATE
    mine = Tokenizers([tmp_path])
    broken = tmp_path / "broken.json"  # inside the root, but not a tokenizer
    broken.write_text("{}")
    assert await mine.counter(broken.as_uri()) is ESTIMATE
    assert isinstance(await mine.counter(outside.as_uri()), ModelTokenizer)


async def test_concurrent_first_calls_load_a_tokenizer_once() -> None:
    tokenizers = Tokenizers([TOKENIZERS])
    counters = await asyncio.gather(*(tokenizers.counter(TOKENIZER.as_uri()) for _ in range(8)))
    assert isinstance(counters[0], ModelTokenizer)
    assert all(c is counters[0] for c in counters)
