"""The gateway's HTTP/1.1 server protocol: uvicorn's httptools protocol with a deadline for the
request head.

uvicorn closes a kept-alive connection that stays idle (``timeout_keep_alive``) but has no limit
on how long a request's head may take: a client that connects and sends nothing, or a header
byte now and then, holds a socket and a file descriptor for as long as it likes (slowloris).
Here every request head — the first on a connection and each next one — must be complete
within ``header_timeout`` seconds of the connection opening or the request beginning, else the
connection is closed. The body has its own deadline, enforced where it is read
(``gateway.http.read_body``: 408).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class GuardedHttpProtocol(HttpToolsProtocol):
    header_timeout = 10.0  # set per server by ``guarded_protocol``

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_overdue)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(header_timeout: float) -> type[GuardedHttpProtocol]:
    """The protocol class for one server (uvicorn instantiates the class it is given)."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"header_timeout": header_timeout})
