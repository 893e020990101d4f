"""Token counts when an upstream reports none: an estimate from the text, marked as such.

No tokenizer is bundled (they are model-specific and download their vocabularies); OpenAI's rule
of thumb of about four characters per token for English is used, never less than the number of
words. Every such count travels with ``usage_source="estimated"``, or ``"corrected"`` when it
replaces counts the upstream reported but no call could have used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

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
