"""A call in flight when the gateway dies is metered at its next start: ``status: interrupted``,
with the tokens it had streamed, once."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from gateway.journal import COMPACT_BYTES, Journal
from gateway.tokens import estimate_chars
from libs.common.db import new_id, utcnow
from libs.common.events.usage import UsageRecorded
from libs.common.settings import Settings
from tests.gateway.conftest import RunningGateway, tenant
from tests.gateway.support import eventually, gateway_process, usage_events
from tests.helpers import bearer


def call_event(**extra: object) -> UsageRecorded:
    values: dict[str, object] = {
        "event_id": new_id(),
        "time": utcnow(),
        "project": "p",
        "credential_id": "k",
        "subject_id": "s",
        "model": "m",
        "endpoint": "m",
        "prompt_tokens": 12,
        "total_tokens": 12,
        "duration_ms": 0.0,
        "http_status": 0,
        "status": "interrupted",
        **extra,
    }
    return UsageRecorded.model_validate(values)


def test_the_journal_gives_back_the_calls_begun_and_not_ended(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    done, cut, quiet = call_event(), call_event(), call_event()
    for event in (done, cut, quiet):
        journal.begin(event)
    journal.progress(cut.event_id, 40)
    journal.progress(cut.event_id, 95)
    journal.end([done.event_id])
    with journal.path.open("ab") as f:
        f.write(b'B {"torn": ')  # a write cut by the crash
    journal.close()

    found = {e.event_id: e for e in Journal(tmp_path).recover()}
    assert set(found) == {cut.event_id, quiet.event_id}
    assert (found[cut.event_id].completion_tokens, found[cut.event_id].total_tokens) == (95, 107)
    assert found[quiet.event_id].completion_tokens == 0


def test_the_journal_stays_small(tmp_path: Path) -> None:
    """Empty whenever nothing is in flight; rewritten with the live calls past its limit."""
    journal = Journal(tmp_path)
    live = call_event()
    journal.begin(live)
    journal.progress(live.event_id, 7)
    for _ in range(COMPACT_BYTES // 300 + 10):
        other = call_event()
        journal.begin(other)
        journal.end([other.event_id])
    assert journal.path.stat().st_size < COMPACT_BYTES
    assert [e.event_id for e in journal.recover()] == [live.event_id]
    assert journal.recover()[0].completion_tokens == 7
    journal.end([live.event_id])
    assert journal.path.stat().st_size == 0
    journal.close()


async def test_a_stream_cut_by_a_killed_gateway_is_metered_at_its_next_start(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    gateway_settings: Settings,
    tmp_path: Path,
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo-slow"])
    body = {
        "model": "echo-slow",
        "stream": True,
        "messages": [{"role": "user", "content": "one two three"}],
    }
    received = 0
    async with (
        gateway_process(gateway_settings, tmp_path) as (proxy, _, process),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy}", timeout=30) as client,
    ):

        async def admitted() -> bool:
            ready = await client.get("/v1/models", headers=bearer(t.key))
            return ready.status_code == 200 and bool(ready.json()["data"])

        await eventually(admitted, within=20, every=0.1)
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers=bearer(t.key)
        ) as response:
            assert response.status_code == 200
            chunks = 0
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                    for choice in json.loads(line[6:])["choices"]:
                        received += len(choice["delta"].get("content") or "")
                if chunks == 80:  # 20 ms apart: past the first progress checkpoint
                    process.kill()
                    await process.wait()
                    break
    # The next start finds the call in its journal, spools it and delivers it.
    async with gateway_process(gateway_settings, tmp_path):
        [event] = await usage_events(
            gateway_settings.nats_url, gateway_settings.event_namespace, t.project, 1, within=20
        )
    data = event["data"]
    assert (data["status"], data["error_type"]) == ("interrupted", "gateway_stopped")
    assert data["usage_source"] == "estimated"
    assert data["prompt_tokens"] > 0
    # What it had streamed by its last checkpoint (about a second in): some, never more than
    # the client got.
    assert 0 < data["completion_tokens"] <= estimate_chars(received)
    assert not (tmp_path / "gateway" / "inflight.journal").exists()
