"""BRC-103 over WebSocket (aiohttp): one AuthMessage per text frame, as JSON.

The server side keeps one :class:`~trustmesh.io.brc103.AsyncPeer` per connection (as the
reference authsocket server keeps one Peer per socket); the application gets each
connection's peer once the socket is open and talks through it. A binary frame, or text
that is not an AuthMessage, closes the connection with 1003 / 1007: a peer that cannot
frame its messages has nothing more to say. Messages that parse but fail a check are
dropped and reported, as on every transport.

The reference's WebSocket binding is Socket.IO (event ``authMessage``); this is plain
RFC 6455 with the same message JSON, described in ``docs/protocols/brc103.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from trustmesh.brc103.messages import AuthMessage, MessageType, parse_message_bytes
from trustmesh.brc103.peer import Peer, PeerConfig
from trustmesh.brc103.revocation import RevocationChecker
from trustmesh.brc103.wallet import Wallet
from trustmesh.errors import DecodeError
from trustmesh.io.brc103 import MAX_TASKS, AsyncPeer, MessageHandler
from trustmesh.io.https import connection_policy, mark_authenticated
from trustmesh.ratelimit import TokenBucket

log = logging.getLogger(__name__)
MAX_FRAME = 8 * 1024 * 1024
CLOSE_TIMEOUT = 10.0  # seconds to wait for the client's close frame, at most
MAX_PENDING_SENDS = 16  # replies in flight before we stop reading the peer
SESSIONS_PER_CONNECTION = 4
HANDSHAKE_RATE = 2.0  # initialRequests per second per connection, on average
HANDSHAKE_BURST = 10
PeerHandler = Callable[[AsyncPeer], Coroutine[Any, Any, None]]


class WebSocketTransport:
    """A :class:`~trustmesh.io.brc103.MessageTransport` over an open WebSocket."""

    def __init__(
        self,
        ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        *,
        handshake_rate: float = HANDSHAKE_RATE,
        handshake_burst: int = HANDSHAKE_BURST,
    ) -> None:
        self.ws = ws
        self._handler: MessageHandler | None = None
        self._sending = 0
        self._sent = asyncio.Event()
        self._handshakes = TokenBucket(handshake_rate, handshake_burst, time.monotonic())

    def set_handler(self, handler: MessageHandler) -> None:
        self._handler = handler

    async def send(self, message: AuthMessage) -> None:
        self._sending += 1
        try:
            await self.ws.send_str(message.to_bytes().decode("utf-8"))
        finally:
            self._sending -= 1
            self._sent.set()

    async def run(
        self,
        backlog: Callable[[], int] | None = None,
        *,
        room: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Deliver incoming frames until the socket closes.

        A peer that does not read our replies stops being read (at most
        ``MAX_PENDING_SENDS`` replies in flight), and one that opens handshakes faster
        than the rate limit is closed with 1008: neither can make us queue without end.
        ``backlog`` counts the replies waiting to go out (the peer's queued sends); without
        it, only sends already inside this transport count. ``room`` (the peer's
        :meth:`~trustmesh.io.brc103.AsyncPeer.wait_for_room`) returns once the peer may
        take another message: while its tasks are at their cap, the socket is not read,
        so what the client sends waits in its own buffers and nothing it sent is lost."""
        pending = backlog or (lambda: self._sending)
        async for frame in self.ws:
            if frame.type is WSMsgType.TEXT:
                try:
                    message = parse_message_bytes(frame.data.encode("utf-8"))
                except DecodeError as exc:
                    log.info("closing a WebSocket that sent a malformed AuthMessage: %s", exc)
                    await self.ws.close(code=WSCloseCode.INVALID_TEXT, message=b"bad AuthMessage")
                    return
                if message.message_type is MessageType.INITIAL_REQUEST and (
                    self._handshakes.take(time.monotonic()) is not None
                ):
                    await self.ws.close(
                        code=WSCloseCode.POLICY_VIOLATION, message=b"too many handshakes"
                    )
                    return
                if self._handler is not None:
                    self._handler(message)
                await asyncio.sleep(0)  # let the replies this message queued start
                while pending() >= MAX_PENDING_SENDS:
                    self._sent.clear()
                    await self._sent.wait()
                if room is not None:
                    await room()
            elif frame.type is WSMsgType.BINARY:
                await self.ws.close(
                    code=WSCloseCode.UNSUPPORTED_DATA, message=b"AuthMessages are text frames"
                )
                return
            elif frame.type is WSMsgType.ERROR:
                return


def websocket_handler(
    wallet: Wallet,
    on_peer: PeerHandler,
    config: PeerConfig | None = None,
    *,
    revocation: RevocationChecker | None = None,
    max_tasks: int = MAX_TASKS,
) -> Callable[[web.Request], Awaitable[web.WebSocketResponse]]:
    """An aiohttp handler that runs BRC-103 on each WebSocket and hands its peer to
    ``on_peer``; the connection ends when the client closes or ``on_peer`` returns.
    Each connection's peer keeps at most ``SESSIONS_PER_CONNECTION`` sessions and runs at
    most ``max_tasks`` tasks (replies, async listeners); at that cap its socket is not
    read until one finishes."""

    # One client per connection: a few sessions are plenty (a re-handshake or two).
    per_connection = dataclasses.replace(
        config or PeerConfig(),
        max_sessions=SESSIONS_PER_CONNECTION,
        max_unproven_sessions=SESSIONS_PER_CONNECTION,
    )

    async def handler(request: web.Request) -> web.WebSocketResponse:
        # A client that ignores our close frame is not waited for longer than a stalled
        # reader would be (aiohttp's own default is 10 s).
        policy = connection_policy(request)
        ws = web.WebSocketResponse(
            max_msg_size=MAX_FRAME,
            heartbeat=30.0,
            timeout=min(CLOSE_TIMEOUT, policy.write_stall_timeout),
        )
        await ws.prepare(request)
        transport = WebSocketTransport(ws)
        peer = AsyncPeer(
            Peer(wallet, per_connection, revocation=revocation), transport, max_tasks=max_tasks
        )
        # The upgrade (or an unsigned initialRequest) proves nothing: the connection stays
        # under the listener's handshake deadline, and may be evicted, until the client
        # signs something.
        peer.on_proven(lambda _event: mark_authenticated(request))
        loop = asyncio.get_running_loop()
        reader = loop.create_task(
            transport.run(lambda: peer.pending_sends, room=peer.wait_for_room)
        )
        app_task = loop.create_task(on_peer(peer))
        try:
            # The connection ends when the client goes or the application is done.
            await asyncio.wait({reader, app_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, app_task):
                task.cancel()
            results = await asyncio.gather(reader, app_task, return_exceptions=True)
            await peer.close()
            await ws.close()
        for result in results:
            if isinstance(result, Exception):
                log.warning("a BRC-103 WebSocket connection ended with an error: %r", result)
        return ws

    return handler


@contextlib.asynccontextmanager
async def connect(
    url: str,
    wallet: Wallet,
    config: PeerConfig | None = None,
    *,
    revocation: RevocationChecker | None = None,
    session: aiohttp.ClientSession | None = None,
    max_tasks: int = MAX_TASKS,
) -> AsyncIterator[AsyncPeer]:
    """Open a WebSocket to ``url`` and yield a peer on it (not yet handshaken: the first
    ``send_general`` or ``handshake`` does that)."""
    own = session is None
    http = session or aiohttp.ClientSession()
    try:
        async with http.ws_connect(url, max_msg_size=MAX_FRAME, heartbeat=30.0) as ws:
            transport = WebSocketTransport(ws)
            peer = AsyncPeer(
                Peer(wallet, config, revocation=revocation), transport, max_tasks=max_tasks
            )
            reader = asyncio.get_running_loop().create_task(
                transport.run(lambda: peer.pending_sends, room=peer.wait_for_room)
            )
            try:
                yield peer
            finally:
                await peer.close()
                await ws.close()
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
    finally:
        if own:
            await http.close()
