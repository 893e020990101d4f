"""Calls in flight, on disk: a gateway that dies mid-call still meters the call at its next start.

``<data_dir>/gateway/inflight.journal`` holds one line per step, appended without fsync (the page
cache outlives a killed process; only the machine's crash loses the newest lines):

- ``B <usage event JSON>`` when a call is sent upstream: its event as it would read if the call
  ended there (``status: interrupted``, the prompt estimate, no completion);
- ``P <event id> <completion tokens>`` at most every ``PROGRESS_SECONDS`` of a stream: what it has
  relayed so far;
- ``E <event id>`` once the call's own usage event is published or spooled.

At start, every call begun and not ended is recorded with its last progress. Its event id is the
call's own, so if the real event did get out before the crash, metering counts the id once.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from pydantic import ValidationError

from libs.common.events.usage import UsageRecorded

log = logging.getLogger("steward.gateway.journal")

# A stream's progress is written at most this often: one short write per second of streaming.
PROGRESS_SECONDS = 1.0
# Past this size the journal is rewritten with only the calls still in flight.
COMPACT_BYTES = 1 << 20


class Journal:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "inflight.journal"
        self._live: dict[str, bytes] = {}  # event id -> its begin line
        self._progress: dict[str, bytes] = {}  # event id -> its last progress line
        self._fd = -1

    def _write(self, data: bytes) -> None:
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.write(self._fd, data)

    def begin(self, interrupted: UsageRecorded) -> None:
        line = b"B " + interrupted.model_dump_json().encode() + b"\n"
        self._live[interrupted.event_id] = line
        self._write(line)

    def progress(self, event_id: str, completion_tokens: int) -> None:
        if event_id not in self._live:
            return
        line = f"P {event_id} {completion_tokens}\n".encode()
        self._progress[event_id] = line
        self._write(line)

    def end(self, event_ids: Iterable[str]) -> None:
        ended = [i for i in event_ids if self._live.pop(i, None) is not None]
        if not ended:
            return
        for event_id in ended:
            self._progress.pop(event_id, None)
        self._write(b"".join(f"E {i}\n".encode() for i in ended))
        if not self._live:
            self._truncate()
        elif os.fstat(self._fd).st_size > COMPACT_BYTES:
            self._compact()

    def _truncate(self) -> None:
        os.ftruncate(self._fd, 0)

    def _compact(self) -> None:
        """Rewrite the journal with the calls still in flight (a new file, then a rename)."""
        draft = self.path.with_suffix(".tmp")
        data = b"".join(self._live.values()) + b"".join(self._progress.values())
        draft.write_bytes(data)
        os.replace(draft, self.path)
        os.close(self._fd)
        self._fd = -1

    def recover(self) -> list[UsageRecorded]:
        """The calls an earlier process began and never ended, as interrupted usage events
        with the tokens they had streamed. ``forget`` the journal once they are safe."""
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        begun: dict[str, UsageRecorded] = {}
        streamed: dict[str, int] = {}
        for line in lines:
            kind, _, rest = line.partition(b" ")
            try:
                if kind == b"B":
                    event = UsageRecorded.model_validate_json(rest)
                    begun[event.event_id] = event
                elif kind == b"P":
                    event_id, _, tokens = rest.decode().partition(" ")
                    streamed[event_id] = int(tokens)
                elif kind == b"E":
                    begun.pop(rest.decode(), None)
            except (ValidationError, ValueError):
                log.warning("unreadable journal line skipped (a torn last write?)")
        found = []
        for event_id, event in begun.items():
            completion = streamed.get(event_id, 0)
            found.append(
                event.model_copy(
                    update={
                        "completion_tokens": completion,
                        "total_tokens": event.prompt_tokens + completion,
                    }
                )
            )
        return found

    def forget(self) -> None:
        """Start empty (after ``recover``'s events were spooled)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
