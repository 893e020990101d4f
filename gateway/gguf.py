"""A model's tokenizer from its GGUF file, so llama.cpp models are counted exactly.

A GGUF file carries its vocabulary in its metadata (``tokenizer.ggml.*``) and its chat template
(``tokenizer.chat_template``). Only the metadata is read (the tensors, megabytes to gigabytes,
are never touched): a header, then typed key/value pairs (GGUF v2/v3, little-endian). A
byte-level BPE vocabulary (``tokenizer.ggml.model = gpt2``, the one Llama 3, Qwen, SmolLM and
most recent models use) with a pre-tokenizer llama.cpp names is rebuilt as a Hugging Face
``tokenizers`` BPE; others are refused (their calls are then estimated, and the log says so).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
# llama.cpp's token types: control and user-defined tokens are matched whole in text.
_SPECIAL_TYPES = {3, 4}
# GPT-2's split, which llama.cpp's byte-level pre-tokenizers build on.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) → the splits before BPE, in order.
_PRE: dict[str, list[pre_tokenizers.PreTokenizer]] = {
    "default": [],
    "gpt2": [],
    "smollm": [pre_tokenizers.Digits(individual_digits=True)],
}
MAX_METADATA_ITEMS = 10_000_000


class NotSupported(ValueError):
    pass


@dataclass(frozen=True)
class GgufTokenizer:
    tokenizer: Tokenizer
    chat_template: str | None
    bos: str | None  # prepended to every prompt (tokenizer.ggml.add_bos_token)


def metadata(path: Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file."""
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise NotSupported("not a GGUF file")
        (version,) = struct.unpack("<I", f.read(4))
        if version not in (2, 3):
            raise NotSupported(f"GGUF version {version}")
        _tensors, count = struct.unpack("<QQ", f.read(16))
        found: dict[str, Any] = {}
        for _ in range(min(count, MAX_METADATA_ITEMS)):
            key = _string(f)
            (kind,) = struct.unpack("<I", f.read(4))
            found[key] = _value(f, kind)
        return found


def _string(f: BinaryIO) -> str:
    (size,) = struct.unpack("<Q", f.read(8))
    return f.read(size).decode("utf-8", "replace")


def _value(f: BinaryIO, kind: int) -> Any:
    fmt = _SCALARS.get(kind)
    if fmt is not None:
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        (item, count) = struct.unpack("<IQ", f.read(12))
        if count > MAX_METADATA_ITEMS:
            raise NotSupported("a metadata array too large to be a vocabulary")
        return [_value(f, item) for _ in range(count)]
    raise NotSupported(f"metadata value type {kind}")


def tokenizer(path: Path) -> GgufTokenizer:
    meta = metadata(path)
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if model != "gpt2" or pre not in _PRE:
        raise NotSupported(f"vocabulary {model!r} with pre-tokenizer {pre!r}")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    bpe = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=[(a, b) for a, b in merges],
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            *_PRE[pre],
            pre_tokenizers.Split(Regex(_GPT2), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    specials = [t for t, kind in zip(tokens, types, strict=False) if kind in _SPECIAL_TYPES]
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    adds_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    bos = tokens[bos_id] if adds_bos and isinstance(bos_id, int) else None
    return GgufTokenizer(bpe, meta.get("tokenizer.chat_template"), bos)
