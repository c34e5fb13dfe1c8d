"""The limits of the BRC-103 WebSocket server (``trustmesh.io.brc103_ws``), on loopback.

- More initialRequests than the burst (10) at once: the server closes with 1008.
- A client that sends many valid messages and never reads the replies: the server stops
  reading it after about ``MAX_PENDING_SENDS`` unsent replies instead of queueing without
  bound, and resumes once the client reads. The client is a hand-written RFC 6455 client
  on a socket with a small receive buffer, the server's socket gets a small send buffer,
  so that a few kilobytes of unread replies stop the flow.
- The connection ends when the application's handler returns (or fails).
- Each connection's peer keeps at most 4 sessions.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import WSCloseCode, WSMsgType, web

from trustmesh.brc103.errors import SessionNotFoundError
from trustmesh.brc103.messages import AuthMessage, parse_message_bytes
from trustmesh.brc103.peer import GeneralMessageReceived, HandshakeCompleted, Peer
from trustmesh.brc103.wallet import Wallet
from trustmesh.io.brc103 import AsyncPeer
from trustmesh.io.brc103_ws import (
    HANDSHAKE_BURST,
    MAX_PENDING_SENDS,
    SESSIONS_PER_CONNECTION,
    websocket_handler,
)

WAIT = 5.0  # upper bound on any one wait; each takes far less
SERVER = Wallet.from_hex("e1" * 32)
CLIENT = Wallet.from_hex("e2" * 32)
OnPeer = Callable[[AsyncPeer], Coroutine[Any, Any, None]]
SMALL_BUFFER = 4096


@asynccontextmanager
async def ws_server(
    on_peer: OnPeer, *, small_buffers: bool = False
) -> AsyncIterator[tuple[str, list[AsyncPeer]]]:
    """The BRC-103 WebSocket handler at ``/ws`` on 127.0.0.1; yields its URL and the
    server-side peer of each connection, as they open."""
    peers: list[AsyncPeer] = []

    async def tracked(peer: AsyncPeer) -> None:
        peers.append(peer)
        await on_peer(peer)

    inner = websocket_handler(SERVER, tracked)

    async def handler(request: web.Request) -> web.StreamResponse:
        if small_buffers:
            transport = request.transport
            assert transport is not None
            transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER
            )
            transport.set_write_buffer_limits(high=SMALL_BUFFER)
        return await inner(request)

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/ws", peers
    finally:
        await runner.cleanup()


async def echo(peer: AsyncPeer) -> None:
    """Answer every general message with ``echo:`` + its payload, until cancelled."""

    async def answer(event: GeneralMessageReceived) -> None:
        await peer.send_general(b"echo:" + event.payload, identity_key=event.identity_key)

    peer.on_general_message(answer)
    await asyncio.Event().wait()


def text(message: AuthMessage) -> str:
    return message.to_bytes().decode("utf-8")


async def next_message(ws: aiohttp.ClientWebSocketResponse) -> AuthMessage:
    frame = await ws.receive()
    assert frame.type is WSMsgType.TEXT, frame
    return parse_message_bytes(frame.data.encode("utf-8"))


async def close_code(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, int]:
    """Read until the server closes: (close code, text frames read before it)."""
    frames = 0
    while True:
        frame = await ws.receive()
        if frame.type is WSMsgType.TEXT:
            frames += 1
            continue
        assert frame.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING), frame
        return ws.close_code, frames


# --- the handshake rate -------------------------------------------------------------------


async def test_more_initial_requests_than_the_burst_close_the_socket_with_1008() -> None:
    client = Peer(CLIENT)
    async with (
        ws_server(echo) as (url, _),
        aiohttp.ClientSession() as http,
        http.ws_connect(url) as ws,
    ):
        for index in range(HANDSHAKE_BURST + 5):
            await ws.send_str(text(client.initiate(index)))
        async with asyncio.timeout(WAIT):
            code, answered = await close_code(ws)
    assert code == WSCloseCode.POLICY_VIOLATION
    assert answered <= HANDSHAKE_BURST


async def test_a_burst_of_initial_requests_is_served_and_sessions_are_capped() -> None:
    """The burst itself is fine; the server's peer for the connection keeps only the
    newest four sessions, and the newest still works."""
    client = Peer(CLIENT)
    async with (
        ws_server(echo) as (url, peers),
        aiohttp.ClientSession() as http,
        http.ws_connect(url) as ws,
    ):
        requests = [client.initiate(index) for index in range(HANDSHAKE_BURST)]
        for request in requests:
            await ws.send_str(text(request))
        async with asyncio.timeout(WAIT):
            for _ in requests:
                events = client.receive(await next_message(ws), 20)
                assert [type(e) for e in events] == [HandshakeCompleted]
            (server_peer,) = peers
            assert len(server_peer.peer.sessions) == SESSIONS_PER_CONNECTION
            # The oldest session is gone at the server, the newest answers.
            oldest = requests[0].initial_nonce
            stale = client.create_general(b"stale", session_nonce=oldest)
            fresh = client.create_general(b"fresh", identity_key=SERVER.identity_key)
            await ws.send_str(text(stale))
            await ws.send_str(text(fresh))
            (event,) = client.receive(await next_message(ws), 30)
        assert isinstance(event, GeneralMessageReceived)
        assert event.payload == b"echo:fresh"
        assert any(isinstance(e, SessionNotFoundError) for e in server_peer.errors)
        assert len(server_peer.peer.sessions) <= SESSIONS_PER_CONNECTION
        assert not ws.closed


# --- a client that does not read ----------------------------------------------------------


class RawWebSocket:
    """A minimal RFC 6455 client on a socket with a small receive buffer, that reads only
    when told to: the way to be a client that leaves the server's replies unread."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, url: str) -> RawWebSocket:
        target = yarl.URL(url)
        assert target.host is not None and target.port is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (target.host, target.port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=SMALL_BUFFER)
        except BaseException:
            sock.close()
            raise
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {target.raw_path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def send_text(self, data: str) -> None:
        payload = data.encode("utf-8")
        size = len(payload)
        if size < 126:
            header = struct.pack("!BB", 0x81, 0x80 | size)
        elif size < 65536:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, size)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, size)
        self.writer.write(header + b"\0\0\0\0" + payload)  # a zero mask leaves it as is
        await self.writer.drain()

    async def read_text(self) -> str:
        first, second = await self.reader.readexactly(2)
        assert first == 0x81, f"not a whole text frame: {first:#x}"
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return (await self.reader.readexactly(size)).decode("utf-8")

    async def close(self) -> None:
        self.writer.close()
        with suppress(OSError):
            await self.writer.wait_closed()


async def test_a_client_that_never_reads_stops_being_read() -> None:
    sent_count = 120
    bound = MAX_PENDING_SENDS + HANDSHAKE_BURST + 24  # plus a few replies in socket buffers
    processed = 0
    over_bound = asyncio.Event()
    all_processed = asyncio.Event()

    async def big_replies(peer: AsyncPeer) -> None:
        def on_message(event: GeneralMessageReceived) -> Coroutine[Any, Any, None]:
            nonlocal processed
            processed += 1
            if processed > bound:
                over_bound.set()
            if processed == sent_count:
                all_processed.set()
            return reply(event)

        async def reply(event: GeneralMessageReceived) -> None:
            await peer.send_general(bytes(16384), identity_key=event.identity_key)

        peer.on_general_message(on_message)
        await asyncio.Event().wait()

    client = Peer(CLIENT)
    async with ws_server(big_replies, small_buffers=True) as (url, _):
        raw = await RawWebSocket.connect(url)
        tasks: list[asyncio.Task[None]] = []
        try:
            async with asyncio.timeout(WAIT):
                await raw.send_text(text(client.initiate(0)))
                client.receive(parse_message_bytes((await raw.read_text()).encode()), 0)
            messages = [
                text(client.create_general(b"%d" % i, identity_key=SERVER.identity_key))
                for i in range(sent_count)
            ]

            async def send_all() -> None:
                for message in messages:
                    await raw.send_text(message)

            tasks.append(asyncio.create_task(send_all()))
            # The server must stop well short of reading everything while nobody reads.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.0):
                    await over_bound.wait()
            assert 0 < processed <= bound
            # Once the client reads, the server goes on to the end: every reply comes.
            replies = 0

            async def drain() -> None:
                nonlocal replies
                while replies < sent_count:
                    await raw.read_text()
                    replies += 1

            tasks.append(asyncio.create_task(drain()))
            async with asyncio.timeout(WAIT):
                await all_processed.wait()
                await tasks[-1]
            assert (processed, replies) == (sent_count, sent_count)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await raw.close()


# --- the application's handler ends the connection ----------------------------------------


async def returns_at_once(_peer: AsyncPeer) -> None:
    return None


async def fails_at_once(_peer: AsyncPeer) -> None:
    raise RuntimeError("the application gave up")


@pytest.mark.parametrize("on_peer", [returns_at_once, fails_at_once])
async def test_the_connection_ends_when_the_handler_is_done(on_peer: OnPeer) -> None:
    async with (
        ws_server(on_peer) as (url, _),
        aiohttp.ClientSession() as http,
        http.ws_connect(url) as ws,
        asyncio.timeout(WAIT),
    ):
        code, frames = await close_code(ws)
    assert (code, frames) == (WSCloseCode.OK, 0)


async def test_the_connection_ends_after_the_handler_has_had_its_message() -> None:
    async def one_message(peer: AsyncPeer) -> None:
        event = await peer.receive()
        await peer.send_general(b"bye:" + event.payload, identity_key=event.identity_key)

    client = Peer(CLIENT)
    async with (
        ws_server(one_message) as (url, _),
        aiohttp.ClientSession() as http,
        http.ws_connect(url) as ws,
        asyncio.timeout(WAIT),
    ):
        await ws.send_str(text(client.initiate(0)))
        client.receive(await next_message(ws), 0)
        await ws.send_str(text(client.create_general(b"hi", identity_key=SERVER.identity_key)))
        (event,) = client.receive(await next_message(ws), 1)
        assert isinstance(event, GeneralMessageReceived) and event.payload == b"bye:hi"
        code, frames = await close_code(ws)
    assert (code, frames) == (WSCloseCode.OK, 0)
