"""Model tokenizers named by catalog versions (``serving.tokenizer``), loaded once per URI.

An engine that reports no usage (many do not while streaming) is counted with the model's own
tokenizer when its catalog version names one, else estimated. A catalog author must not make
the gateway read any file it can reach, so a ``file://`` tokenizer must lie under one of the
operator's roots (``STEWARD_GATEWAY_TOKENIZER_ROOTS``, default ``<data_dir>/tokenizers``);
``pkg://<package>/<path>`` resolves inside a package installed beside the gateway. A tokenizer
that cannot be loaded is logged once and the model's calls are estimated, as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from gateway import gguf
from gateway.tokens import ESTIMATE, ModelTokenizer, TokenCounter
from libs.common.artifacts import NotLocal, local_path

log = logging.getLogger("steward.gateway.vocab")

MAX_TOKENIZER_BYTES = 64 * 1024 * 1024


class TokenizerUnusable(Exception):
    pass


class Tokenizers:
    def __init__(self, roots: Sequence[Path]) -> None:
        self.roots = [root.resolve() for root in roots]
        self._counters: dict[str, TokenCounter] = {}
        self._loading: dict[str, asyncio.Future[TokenCounter]] = {}

    async def counter(self, uri: str | None) -> TokenCounter:
        """The counter for a model's calls: its tokenizer once loaded (off the event loop, one
        load however many calls wait for it), the estimate when it names none or it fails."""
        if uri is None:
            return ESTIMATE
        found = self._counters.get(uri)
        if found is not None:
            return found
        loading = self._loading.get(uri)
        if loading is None:
            loading = asyncio.ensure_future(asyncio.to_thread(self._load, uri))
            self._loading[uri] = loading
        counter = await asyncio.shield(loading)
        self._counters[uri] = counter
        self._loading.pop(uri, None)
        return counter

    def _load(self, uri: str) -> TokenCounter:
        try:
            path = self.resolve(uri)
            if path.suffix != ".gguf" and path.stat().st_size > MAX_TOKENIZER_BYTES:
                raise TokenizerUnusable(f"larger than {MAX_TOKENIZER_BYTES} bytes")
            if path.suffix == ".gguf":  # a llama.cpp model: its vocabulary and chat template
                found = gguf.tokenizer(path)
                log.info("tokenizer loaded from a GGUF model", extra={"tokenizer": uri})
                return ModelTokenizer(found.tokenizer, found.chat_template, found.bos)
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # ours, OSError, and the library's plain Exception
            log.warning(
                "tokenizer unusable; its model's calls are estimated",
                extra={"tokenizer": uri, "error": str(exc)[:200]},
            )
            return ESTIMATE
        size = tokenizer.get_vocab_size()
        log.info("tokenizer loaded", extra={"tokenizer": uri, "vocabulary": size})
        return ModelTokenizer(tokenizer)

    def resolve(self, uri: str) -> Path:
        try:
            path = local_path(uri)
        except NotLocal as exc:
            raise TokenizerUnusable(str(exc)) from None
        if uri.startswith("file:") and not any(path.is_relative_to(r) for r in self.roots):
            raise TokenizerUnusable("not under STEWARD_GATEWAY_TOKENIZER_ROOTS")
        return path
