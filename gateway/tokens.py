"""Token counts when an upstream reports none: an estimate from the text, marked as such.

No tokenizer is bundled (they are model-specific and download their vocabularies); OpenAI's rule
of thumb of about four characters per token for English is used, never less than the number of
words. Every such count travels with ``usage_source="estimated"``.
"""

from __future__ import annotations

from typing import Any

# The OpenAI cookbook's per-message framing overhead for chat prompts.
MESSAGE_OVERHEAD = 4


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
