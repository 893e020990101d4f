"""``/console/``: the web console's static files, with the headers that keep it unframed."""

from __future__ import annotations

import asyncio
import mimetypes
from pathlib import Path

from starlette.types import Scope, Send

from gateway.http import Headers, send_bytes

# The console's page carries its own script/style policy in a <meta>; framing and sniffing can
# only be forbidden by headers (clickjacking, MIME confusion), and the key must not leak in a
# Referer.
CONSOLE_HEADERS: Headers = [
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]


async def console(directory: Path | None, scope: Scope, send: Send) -> None:
    """Static files of the web console, if one is installed (``STEWARD_GATEWAY_CONSOLE_DIR``)."""
    rel = scope["path"][len("/console") :].lstrip("/") or "index.html"
    found = await asyncio.to_thread(_static, directory, rel) if directory is not None else None
    if found is None:
        await send_bytes(send, 404, b'{"message":"Not found"}', b"application/json")
        return
    body, kind = found
    await send_bytes(send, 200, body, kind.encode(), CONSOLE_HEADERS)


def _static(directory: Path, rel: str) -> tuple[bytes, str] | None:
    root = directory.resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        return None  # outside the console directory, or nothing there
    return target.read_bytes(), mimetypes.guess_type(target.name)[0] or "application/octet-stream"
