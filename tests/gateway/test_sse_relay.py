"""The SSE relay on its own: events split anywhere across chunks, CRLF framing, the usage chunk."""

from __future__ import annotations

import json

from gateway.sse import StreamRelay


def chunk(text: str | None = None, **extra: object) -> bytes:
    choices = [{"index": 0, "delta": {"content": text}}] if text is not None else []
    return b"data: " + json.dumps({"choices": choices, **extra}).encode() + b"\n\n"


USAGE = chunk(usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
STREAM = chunk("Hello") + chunk(" world") + USAGE + b"data: [DONE]\n\n"


def test_events_split_at_every_byte_come_out_whole_and_in_order() -> None:
    relay = StreamRelay(strip_usage=False)
    out = b"".join(relay.feed(STREAM[i : i + 1]) for i in range(len(STREAM))) + relay.flush()
    assert out == STREAM
    assert relay.done and relay.first_content and relay.chars == len("Hello world")
    assert relay.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_the_usage_chunk_asked_for_on_the_clients_behalf_is_dropped() -> None:
    relay = StreamRelay(strip_usage=True)
    out = relay.feed(STREAM)
    assert USAGE not in out and out == chunk("Hello") + chunk(" world") + b"data: [DONE]\n\n"
    assert relay.usage is not None


def test_crlf_framing_comments_and_multiline_data_pass_through() -> None:
    raw = b': keep-alive\r\n\r\ndata: {"choices": [{"delta":\r\ndata: {"content": "hi"}}]}\r\n\r\n'
    relay = StreamRelay(strip_usage=True)
    assert relay.feed(raw) == raw
    assert relay.first_content and relay.chars == 2


def test_error_events_and_garbage_are_noted_not_swallowed() -> None:
    relay = StreamRelay(strip_usage=True)
    error = b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'
    garbage = b"data: {not json\n\n"
    assert relay.feed(garbage + error) == garbage + error
    assert relay.malformed == 1 and relay.upstream_error == {
        "message": "overloaded",
        "type": "server_error",
    }
    assert not relay.done
