"""Token counts when an upstream reports none: the model's own tokenizer, else an estimate.

A catalog version may name its model's tokenizer (``serving.tokenizer``, loaded by
gateway/vocab.py); its counts travel with ``usage_source="tokenizer"``. Completions and text
prompts are then exact, and so is a chat prompt when the tokenizer comes with its chat template
(a GGUF's, rendered in a sandbox as the engine renders it); else a chat prompt is its messages'
tokens plus OpenAI's 4 per message for the framing. Without one, OpenAI's
rule of thumb of about four characters per token for English is used, never less than the number
of words (``"estimated"``). Either replaces counts the upstream reported but no call could have
used as ``"corrected"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from libs.common.events.usage import UsageSource

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from gateway.sse import StreamRelay

# The OpenAI cookbook's per-message framing overhead for chat prompts.
MESSAGE_OVERHEAD = 4
# Room for chat templates and images (a short image URL can cost a thousand tokens or more).
PROMPT_SLACK = 4096


@dataclass(frozen=True, slots=True)
class UsageLimits:
    """The most tokens a call can have used. An upstream claiming more is not believed: its
    count would bill (and exhaust quotas) for tokens that were never there."""

    prompt: int
    completion: int

    @classmethod
    def of(cls, request: dict[str, Any], body_bytes: int, cap: int) -> UsageLimits:
        """A token is at least one byte of text in every tokenizer in use, so the prompt cannot
        hold more tokens than the request has bytes, beyond a template and images (x4 + slack);
        the completion is capped by ``max_tokens`` (else the route's cap) per choice."""
        n = request.get("n")
        choices = n if type(n) is int and n > 0 else 1
        most = request.get("max_tokens") or request.get("max_completion_tokens") or cap
        per_choice = most if type(most) is int and most > 0 else cap
        return cls(prompt=4 * body_bytes + PROMPT_SLACK, completion=per_choice * choices)


def reported_usage(
    usage: Any, limits: UsageLimits
) -> tuple[int, int] | Literal["absent", "implausible"]:
    """The upstream's ``(prompt, completion)`` tokens when it reported believable ones."""
    if not isinstance(usage, dict) or "prompt_tokens" not in usage:
        return "absent"
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if type(prompt) is not int or type(completion) is not int:  # bool, float, str, None
        return "implausible"
    if not (0 <= prompt <= limits.prompt and 0 <= completion <= limits.completion):
        return "implausible"
    return prompt, completion


def estimate_text(text: str) -> int:
    if not text:
        return 0
    return max(len(text.split()), -(-len(text) // 4))


def estimate_chars(chars: int) -> int:
    return -(-chars // 4)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict)
        ).strip()
    return ""


def estimate_prompt(body: dict[str, Any]) -> int:
    """Prompt tokens of a chat, completion or embedding request."""
    messages = body.get("messages")
    if isinstance(messages, list):
        total = 0
        for message in messages:
            if isinstance(message, dict):
                total += MESSAGE_OVERHEAD + estimate_text(_content_text(message.get("content")))
        return total
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, str):
        return estimate_text(prompt)
    if isinstance(prompt, list):
        return sum(estimate_text(p) for p in prompt if isinstance(p, str))
    return 0


def completion_text(response: dict[str, Any]) -> str:
    """The generated text of a non-streamed chat or completion response."""
    parts: list[str] = []
    for choice in response.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if isinstance(message, dict):
            parts.append(_content_text(message.get("content")))
        elif isinstance(choice.get("text"), str):
            parts.append(choice["text"])
    return "".join(parts)


class TokenCounter(Protocol):
    """How a model's calls are counted when its upstream's usage cannot be used."""

    source: UsageSource

    def prompt(self, request: dict[str, Any]) -> int: ...

    def text(self, text: str) -> int: ...

    def streamed(self, relay: StreamRelay) -> int: ...


class Estimator:
    source: UsageSource = "estimated"

    def prompt(self, request: dict[str, Any]) -> int:
        return estimate_prompt(request)

    def text(self, text: str) -> int:
        return estimate_text(text)

    def streamed(self, relay: StreamRelay) -> int:
        return estimate_chars(relay.chars)


ESTIMATE = Estimator()


class ModelTokenizer:
    """Counts with the model's tokenizer. Inputs are encoded as the model receives them (with
    its special tokens, e.g. BOS or [CLS]/[SEP]); generated text without them."""

    source: UsageSource = "tokenizer"

    def __init__(
        self, tokenizer: Tokenizer, chat_template: str | None = None, bos: str | None = None
    ) -> None:
        # Published files often pad and truncate (to batch a model's inputs): a count is of
        # exactly what was sent or generated.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer
        self._template = _compiled(chat_template) if chat_template else None
        self._bos = bos

    def _count(self, texts: list[str], special: bool) -> int:
        if not texts:
            return 0
        encoded = self._tokenizer.encode_batch(texts, add_special_tokens=special)
        return sum(len(e.ids) for e in encoded)

    def prompt(self, request: dict[str, Any]) -> int:
        messages = request.get("messages")
        if isinstance(messages, list):
            chat = [
                {"role": str(m.get("role", "user")), "content": _content_text(m.get("content"))}
                for m in messages
                if isinstance(m, dict)
            ]
            rendered = self._render(chat)
            if rendered is not None:  # exactly the text the engine tokenizes
                return self._count([rendered], special=False) + (self._bos is not None)
            contents = [m["content"] for m in chat]
            return MESSAGE_OVERHEAD * len(contents) + self._count(contents, special=False)
        prompt = request.get("prompt", request.get("input"))
        if isinstance(prompt, str):
            return self._count([prompt], special=True)
        if isinstance(prompt, list):
            return self._count([p for p in prompt if isinstance(p, str)], special=True)
        return 0

    def text(self, text: str) -> int:
        return self._count([text], special=False) if text else 0

    def _render(self, messages: list[dict[str, str]]) -> str | None:
        """The model's chat template applied as its engine applies it (None: no template, or
        one this request breaks)."""
        if self._template is None:
            return None
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self._bos or "",
                eos_token="",
            )
        except Exception:  # a template may raise on purpose (raise_exception) or fail
            return None

    def streamed(self, relay: StreamRelay) -> int:
        return self.text(relay.text())


def _raise(message: str) -> None:
    raise ValueError(message)


def _compiled(source: str) -> Template | None:
    """A chat template in a sandbox (it comes with the model), with the flags chat templates
    are written for (Hugging Face's and llama.cpp's)."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise
    try:
        return environment.from_string(source)
    except TemplateError:
        return None
