"""The tools/list filter on its own: JSON answers and SSE streams cut at any byte, batches, and
answers it must leave alone."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.mcp_tools import REDACTED, ToolsFilter, audited_arguments, list_ids, redacted

TOOLS = [{"name": "echo"}, {"name": "delete_everything"}, {"name": "search"}]


def _answer(id_: Any, tools: list[dict[str, str]] = TOOLS) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "result": {"tools": tools}}


def _run(f: ToolsFilter, body: bytes, cut: int) -> bytes:
    out = b"".join(f.feed(body[i : i + cut]) for i in range(0, len(body), cut))
    return out + f.flush()


@pytest.mark.parametrize("cut", [1, 7, 10_000])
def test_json_answers_keep_only_catalogued_tools(cut: int) -> None:
    f = ToolsFilter({1}, {"echo", "search"}, sse=False)
    out = json.loads(_run(f, json.dumps(_answer(1)).encode(), cut))
    assert [t["name"] for t in out["result"]["tools"]] == ["echo", "search"]
    assert f.removed == 1


@pytest.mark.parametrize("cut", [1, 5, 10_000])
def test_sse_events_are_filtered_one_by_one(cut: int) -> None:
    events = [
        b"event: message\r\nid: 7\r\ndata: " + json.dumps(_answer("a")).encode() + b"\r\n\r\n",
        b'data: {"jsonrpc":"2.0","method":"notifications/progress"}\n\n',
        b"data: " + json.dumps(_answer("other")).encode() + b"\n\n",  # not a tools/list id
    ]
    f = ToolsFilter({"a"}, {"echo"}, sse=True)
    out = _run(f, b"".join(events), cut)
    blocks = [b for b in out.replace(b"\r\n", b"\n").split(b"\n\n") if b]
    first = blocks[0].split(b"\n")
    assert first[:2] == [b"event: message", b"id: 7"]  # the event's other fields stay
    assert json.loads(first[2].removeprefix(b"data: "))["result"]["tools"] == [{"name": "echo"}]
    assert blocks[1] == events[1].strip()
    assert json.loads(blocks[2].removeprefix(b"data: "))["result"]["tools"] == TOOLS


def test_batches_and_fail_closed() -> None:
    batch = [_answer(1), {"jsonrpc": "2.0", "id": 2, "result": {"content": []}}]
    f = ToolsFilter({1}, set(), sse=False)  # the catalog lists no tools: none are shown
    out = json.loads(_run(f, json.dumps(batch).encode(), 3))
    assert out[0]["result"]["tools"] == []
    assert out[1] == batch[1]


def test_unhashable_ids_and_non_json_pass_untouched() -> None:
    f = ToolsFilter({1}, {"echo"}, sse=False)
    body = json.dumps({"jsonrpc": "2.0", "id": [1], "result": {"tools": TOOLS}}).encode()
    assert _run(f, body, 4) == body
    assert _run(ToolsFilter({1}, {"echo"}, sse=False), b"not json", 2) == b"not json"


def test_only_tools_list_requests_are_watched() -> None:
    messages: list[dict[str, Any]] = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call"},
        {"jsonrpc": "2.0", "id": [3], "method": "tools/list"},
        {"jsonrpc": "2.0", "method": "tools/list"},
    ]
    assert list_ids(messages) == {1}


def test_audited_arguments_keep_no_secret_and_no_bulk() -> None:
    fragments = {"token", "password", "key"}
    arguments = {
        "text": "hello",
        "API_Token": "stw_secret",
        "nested": [{"password": "p", "keep": 1, "keys": ["a"]}],
        "deep": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": "x"}}}}}}}}},
    }
    kept = audited_arguments(arguments, fragments)["arguments"]
    assert kept["text"] == "hello"
    assert kept["API_Token"] == REDACTED
    assert kept["nested"] == [{"password": REDACTED, "keep": 1, "keys": REDACTED}]
    assert "stw_secret" not in json.dumps(kept)
    assert redacted(arguments["deep"], fragments, depth=8) == {"a": REDACTED}
    bulky = audited_arguments({"text": "x" * 10_000}, fragments)
    assert bulky == {"arguments_bytes": len(json.dumps({"text": "x" * 10_000}))}
