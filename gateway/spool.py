"""A disk spool for usage events while NATS is unreachable: append-only, fsync'd, replayed in order.

Layout under ``<data_dir>/gateway/``: ``usage.spool`` holds one CloudEvent JSON per line;
``usage.spool.offset`` holds how many bytes of it were delivered (written by atomic rename).
A crash between publishing and recording the offset re-sends a few events; their ids are their
``Nats-Msg-Id`` and metering's inbox key, so none is counted twice. When everything is delivered
both files are removed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path


class Spool:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "usage.spool"
        self.offset_path = directory / "usage.spool.offset"
        self._repair()

    def _repair(self) -> None:
        """Cut a torn last line (a crash mid-append) so the next append starts a clean line."""
        try:
            with self.path.open("rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        except FileNotFoundError:
            return

    def append(self, lines: Iterable[bytes]) -> int:
        """Append events durably (one fsync per batch); returns how many were written."""
        data = b"".join(line.rstrip(b"\n") + b"\n" for line in lines)
        if not data:
            return 0
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return data.count(b"\n")

    def _offset(self) -> int:
        try:
            return int(self.offset_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _save_offset(self, offset: int) -> None:
        tmp = self.offset_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, str(offset).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.offset_path)

    def pending(self, limit: int = 500) -> tuple[list[bytes], int]:
        """Up to ``limit`` undelivered lines and the offset just past them."""
        offset = self._offset()
        try:
            with self.path.open("rb") as f:
                f.seek(offset)
                lines: list[bytes] = []
                end = offset
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # a torn last write (crash mid-append): not an event yet
                    end += len(line)
                    if line.strip():
                        lines.append(line.rstrip(b"\n"))
                    if len(lines) >= limit:
                        break
        except FileNotFoundError:
            return [], 0
        return lines, end

    def delivered(self, offset: int) -> None:
        """Record delivery up to ``offset``; drop the files once all of it is delivered."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if offset >= size:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            with contextlib.suppress(FileNotFoundError):
                self.offset_path.unlink()
        else:
            self._save_offset(offset)

    def size(self) -> int:
        try:
            return max(self.path.stat().st_size - self._offset(), 0)
        except FileNotFoundError:
            return 0
