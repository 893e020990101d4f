"""NATS JetStream: the connection, the streams, and publishing CloudEvents with de-duplication."""

from __future__ import annotations

import asyncio
import logging

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from libs.common.events import STREAMS, stream_for
from libs.common.settings import Settings, nats_servers

log = logging.getLogger("steward.bus")

DUPLICATE_WINDOW_SECONDS = 120.0


class BusUnavailable(Exception):
    """NATS cannot be reached now; the outbox keeps the event until it can."""


class Bus:
    """One NATS connection per process. Subjects passed in are relative to the namespace.

    ``replicas`` is how many servers of a cluster keep each stream and bucket (JetStream's R1 or
    R3): with 3, a stream loses nothing and stays writable while one server is down.
    """

    def __init__(self, url: str, namespace: str, *, name: str, replicas: int = 1) -> None:
        self.url = url
        # A cluster's servers: the client connects to any, and moves on when its server goes.
        self.servers = nats_servers(url)
        self.namespace = namespace
        self.name = name
        self.replicas = replicas
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._ready = asyncio.Event()
        self._connector: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, name: str) -> Bus:
        return cls(
            settings.nats_url, settings.event_namespace, name=name, replicas=settings.nats_replicas
        )

    def subject(self, relative: str) -> str:
        return f"{self.namespace}.{relative}"

    def stream(self, name: str) -> str:
        return f"{self.namespace}_{name}".upper().replace(".", "_").replace("-", "_")

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected and self._ready.is_set()

    @property
    def js(self) -> JetStreamContext:
        if self._js is None or not self.connected:
            raise BusUnavailable("not connected to NATS")
        return self._js

    async def connect(self, *, wait: bool = False) -> None:
        """Connect in the background, retrying for ever: a service starts without NATS."""
        if self._connector is None:
            self._connector = asyncio.create_task(self._connect_loop(), name="bus-connect")
        if wait:
            await self._ready.wait()

    async def wait_ready(self, seconds: float | None = None) -> None:
        await asyncio.wait_for(self._ready.wait(), seconds)

    async def _connect_loop(self) -> None:
        delay = 0.2
        while True:
            try:
                self._nc = await nats.connect(
                    self.servers,
                    name=self.name,
                    connect_timeout=2,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    allow_reconnect=True,
                    error_cb=self._on_error,
                )
                self._js = self._nc.jetstream(timeout=5)
                await self.ensure_streams()
                self._ready.set()
                log.info("connected to NATS", extra={"url": self.url})
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("NATS not reachable, retrying", extra={"error": str(exc)})
                if self._nc is not None:
                    await self._close_quietly()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS client error", extra={"error": str(exc)})

    async def ensure_streams(self) -> None:
        """Create the streams, or bring their subjects up to date; safe to call repeatedly."""
        assert self._js is not None
        for name, subjects in STREAMS.items():
            config = StreamConfig(
                name=self.stream(name),
                subjects=[self.subject(s) for s in subjects],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                duplicate_window=DUPLICATE_WINDOW_SECONDS,
                max_age=7 * 24 * 3600.0,
                num_replicas=self.replicas,
            )
            try:
                await self._js.add_stream(config)
            except BadRequestError:
                await self._js.update_stream(config)

    async def publish(self, subject: str, body: bytes, event_id: str) -> None:
        """Publish and wait for the stream's ack; ``Nats-Msg-Id`` makes a re-send harmless."""
        try:
            ack = await self.js.publish(
                self.subject(subject),
                body,
                stream=self.stream(stream_for(subject)),
                headers={"Nats-Msg-Id": event_id},
            )
        except BusUnavailable:
            raise
        except Exception as exc:
            raise BusUnavailable(str(exc)) from exc
        if ack.duplicate:
            log.debug("duplicate publish ignored by JetStream", extra={"event_id": event_id})

    async def _close_quietly(self) -> None:
        try:
            if self._nc is not None:
                await self._nc.close()
        except Exception as exc:  # closing a broken connection may fail; nothing to do
            log.debug("NATS close failed", extra={"error": str(exc)})
        self._nc = None
        self._js = None

    async def close(self) -> None:
        if self._connector is not None:
            self._connector.cancel()
            await asyncio.gather(self._connector, return_exceptions=True)
        self._ready.clear()
        # Publishes are acknowledged synchronously, so nothing waits in the client: close
        # (drain would wait out the ack window of any pull subscription still registered).
        await self._close_quietly()

    def client(self) -> NATS:
        if self._nc is None:
            raise BusUnavailable("not connected to NATS")
        return self._nc
