"""The gateway's upstream HTTP client against raw servers misbehaving as real ones do."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from gateway.upstream import UpstreamError, UpstreamPool, UpstreamTimeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


def pool(read_timeout: float = 2.0) -> UpstreamPool:
    return UpstreamPool(connect_timeout=1.0, read_timeout=read_timeout)


async def test_connections_are_kept_alive_and_reused() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with pytest.raises(asyncio.IncompleteReadError):
            while True:
                request = await read_request(reader)
                assert b"\r\nhost: 127.0.0.1:" in request
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()

    async with raw_server(handler) as url:
        upstream = pool()
        for _ in range(5):
            response = await upstream.request("POST", url + "/v1/x", [], b"{}")
            assert (response.status, await response.read()) == (200, b"ok")
            response.close()
        upstream.close()
    assert connections == 1


async def test_chunked_and_connection_delimited_bodies_arrive_whole() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        if b"/chunked" in request:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for part in (b"data: a\n\n", b"data: b\n\n"):
                writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    async with raw_server(handler) as url:
        upstream = pool()
        response = await upstream.request("POST", url + "/chunked", [], b"")
        chunks = [c async for c in response.iter_body()]
        assert b"".join(chunks) == b"data: a\n\ndata: b\n\n" and len(chunks) == 2
        response.close()
        response = await upstream.request("POST", url + "/closed", [], b"")
        assert await response.read() == b"until the end"
        response.close()
        upstream.close()


async def test_broken_silent_and_absent_upstreams_raise_upstream_errors() -> None:
    answer = asyncio.Event()  # the silent upstream says nothing until the client has given up

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        if b"/garbage" in request:
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        elif b"/cut" in request:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort")
        elif b"/silent" in request:
            await answer.wait()
        await writer.drain()
        writer.close()

    async with raw_server(handler) as url:
        upstream = pool(read_timeout=0.2)
        with pytest.raises(UpstreamError, match="malformed"):
            await upstream.request("POST", url + "/garbage", [], b"")
        response = await upstream.request("POST", url + "/cut", [], b"")
        with pytest.raises(UpstreamError, match="closed"):
            await response.read()
        response.close()
        try:
            with pytest.raises(UpstreamTimeout):
                await upstream.request("POST", url + "/silent", [], b"")
        finally:
            answer.set()
        upstream.close()
    with pytest.raises(UpstreamError, match="cannot connect"):
        await pool().request("POST", url + "/gone", [], b"")


async def test_connections_per_origin_are_capped_and_callers_wait_for_a_free_one() -> None:
    open_now = peak = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)
        try:
            while True:
                await read_request(reader)
                await asyncio.sleep(0.02)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            open_now -= 1
            writer.close()

    async with raw_server(handler) as url:
        upstream = UpstreamPool(connect_timeout=5.0, read_timeout=5.0, max_active_per_origin=2)

        async def call() -> bytes:
            response = await upstream.request("POST", url + "/x", [], b"")
            try:
                return await response.read()
            finally:
                response.close()

        assert await asyncio.gather(*(call() for _ in range(8))) == [b"ok"] * 8
        upstream.close()
    assert peak <= 2
