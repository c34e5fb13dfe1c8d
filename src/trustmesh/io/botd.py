"""BOTD #2 over asyncio TCP: a client, a server, and the :class:`Channel` both hand out.

    from trustmesh.io import botd

    async with botd.connect("127.0.0.1", 9945, key, peer_key) as ch:
        await ch.send(b"hello")
        reply = await ch.recv()

    server = await botd.serve(key, handler, "127.0.0.1", 9945)

``key`` is any :class:`~trustmesh.keystore.signer.Signer` holding a secp256k1 key. The
protocol itself lives in :mod:`trustmesh.botd`; this module only moves its bytes.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any

from trustmesh.botd.config import DEFAULT_PORT, BotdConfig
from trustmesh.botd.core import (
    BotdConnection,
    HandshakeComplete,
    MessageReceived,
    PeerClosed,
    PongReceived,
)
from trustmesh.botd.errors import HandshakeFailed
from trustmesh.botd.replay import ReplayCache
from trustmesh.crypto.keys import PublicKey
from trustmesh.errors import ConnectionClosedError
from trustmesh.io.dial import dial
from trustmesh.io.handle import Handle
from trustmesh.io.stream import ServerHandle, StreamDriver, make_driver, serve_stream
from trustmesh.keystore.signer import Signer
from trustmesh.sansio import ConnectionClosed, Event

__all__ = [
    "DEFAULT_PORT",
    "BotdServer",
    "Channel",
    "connect",
    "serve",
]

DEFAULT_INBOX = 64  # messages held for the application before reading from the socket stops


class Channel(Handle[BotdConnection, HandshakeComplete]):
    """One BOTD #2 connection, seen from the application.

    A reader task takes the core's events: messages queue for :meth:`recv`, pongs
    answer :meth:`ping`. Once ``inbox`` messages or ``inbox_bytes`` bytes of them
    (default: the driver's ``max_queued_bytes``) wait, the reader takes nothing more
    from the driver, whose own queue then fills and stops it reading the socket. A peer
    that sends faster than the application reads therefore costs at most about the two
    byte limits, plus a message for each and the one being received.
    """

    def __init__(
        self,
        driver: StreamDriver[BotdConnection],
        *,
        inbox: int = DEFAULT_INBOX,
        inbox_bytes: int | None = None,
    ):
        if inbox_bytes is None:
            inbox_bytes = driver.policy.max_queued_bytes
        if inbox < 1 or inbox_bytes < 1:
            raise ValueError("the inbox limits must be positive")
        self._driver = driver
        self._loop = asyncio.get_running_loop()
        self._inbox: collections.deque[bytes] = collections.deque()
        self._inbox_limit = inbox
        self._inbox_byte_limit = inbox_bytes
        self._inbox_bytes = 0
        self._message_ready = asyncio.Event()
        self._space = asyncio.Event()
        self._pong: asyncio.Future[float] | None = None
        self._peer_done: str | None = None  # the peer's Close: no more messages will come
        super().__init__(
            driver,
            up=HandshakeComplete,
            failure=lambda closed: HandshakeFailed(closed.reason, by_peer=closed.by_peer),
            on_event=self._on_event,
            on_done=self._on_done,
            name="channel",
        )

    @property
    def peer_key(self) -> PublicKey:
        """The peer's identity key, proven by the handshake."""
        key = self._driver.core.peer_key
        if key is None or not self._up.done():
            raise ConnectionClosedError("the handshake has not completed")
        return key

    @property
    def transcript_hash(self) -> bytes | None:
        """SHA-256 of the handshake transcript: a channel binding for higher layers."""
        return self._driver.core.transcript_hash

    @property
    def remote_address(self) -> object:
        return self._driver.get_extra_info("peername")

    @property
    def closed(self) -> ConnectionClosed | None:
        """Why the channel closed, once it has."""
        return self.closed_event

    @property
    def buffered(self) -> int:
        """Bytes of the messages that arrived and wait for :meth:`recv`."""
        return self._inbox_bytes

    async def wait_established(self) -> PublicKey:
        """Wait for the handshake; raise :class:`HandshakeFailed` if it does not finish."""
        return (await self.wait_up()).peer_key

    async def send(self, data: bytes) -> None:
        """Send one message; waits while the socket's send buffer is full."""
        driver = self._driver
        driver.act(lambda core: core.send(data))
        if driver.writing_paused:  # else drain() would return at once
            await driver.drain()

    async def recv(self) -> bytes:
        """The next message. Raises :class:`ConnectionClosedError` once the peer has
        closed (or the channel has) and every message that arrived before has been
        taken. After the peer's Close, :meth:`send` still works until :meth:`close`."""
        while not self._inbox:
            if self.closed_event is not None:
                raise ConnectionClosedError(self.closed_event.reason)
            if self._peer_done is not None:
                raise ConnectionClosedError(self._peer_done)
            self._message_ready.clear()
            await self._message_ready.wait()
        data = self._inbox.popleft()
        self._inbox_bytes -= len(data)
        if not self._inbox_full():
            self._space.set()
        return data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[bytes]:
        while True:
            try:
                yield await self.recv()
            except ConnectionClosedError:
                return

    async def ping(self) -> float:
        """Send a protocol Ping and return the round-trip time in seconds.

        Raises :class:`~trustmesh.botd.errors.PingTooSoonError` within ``ping_interval``
        of the last ping, and :class:`ConnectionClosedError` if the channel closes first
        (a pong later than ``pong_timeout`` closes it)."""
        pong: asyncio.Future[float] = self._loop.create_future()
        self._driver.act(lambda core: core.ping(self._loop.time()))
        self._pong = pong
        return await pong

    async def close(self, reason: str = "closed by application") -> ConnectionClosed:
        """Close as the protocol says (Close, then the peer's Close) and wait until done."""
        self._driver.close(reason)
        return await self.wait_closed()

    async def wait_closed(self) -> ConnectionClosed:
        await self._driver.wait_closed()
        self._space.set()  # the reader stops holding back: the rest is bounded and final
        return await super().wait_closed()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _on_event(self, event: Event) -> Awaitable[None] | None:
        if isinstance(event, MessageReceived):
            self._inbox.append(event.data)
            self._inbox_bytes += len(event.data)
            self._message_ready.set()
            if self._inbox_full():
                return self._wait_for_space()
        elif isinstance(event, PongReceived):
            if self._pong is not None and not self._pong.done():
                self._pong.set_result(event.rtt)
        elif isinstance(event, PeerClosed):
            self._peer_done = f"peer closed: {event.reason}"
            self._message_ready.set()
        return None

    async def _wait_for_space(self) -> None:
        # Full: take nothing more (no message waits in our hands meanwhile), so that the
        # driver's queue fills and it stops reading the socket.
        while self._inbox_full() and not self._driver.closed:
            self._space.clear()
            await self._space.wait()

    def _inbox_full(self) -> bool:
        return len(self._inbox) >= self._inbox_limit or self._inbox_bytes >= self._inbox_byte_limit

    def _on_done(self) -> None:
        assert self.closed_event is not None
        if self._pong is not None and not self._pong.done():
            self._pong.set_exception(ConnectionClosedError(self.closed_event.reason))
        self._message_ready.set()


class _Connecting:
    """What :func:`connect` returns: await it, or use it with ``async with``."""

    def __init__(self, opener: Callable[[], Awaitable[Channel]]) -> None:
        self._opener = opener
        self._channel: Channel | None = None

    def __await__(self) -> Generator[Any, None, Channel]:
        return self._opener().__await__()

    async def __aenter__(self) -> Channel:
        self._channel = await self._opener()
        return self._channel

    async def __aexit__(self, *exc_info: object) -> None:
        if self._channel is not None:
            await self._channel.close()


def connect(
    host: str,
    port: int,
    key: Signer,
    peer_key: PublicKey,
    *,
    config: BotdConfig | None = None,
    local_addr: tuple[str, int] | None = None,
    **driver_options: Any,
) -> _Connecting:
    """Open a channel to the node whose identity key is ``peer_key``.

    Returns once the handshake is complete; raises :class:`HandshakeFailed` with the
    reason when it is not (within ``config.handshake_timeout``), and ``OSError`` when
    the TCP connection fails. ``local_addr=(address, 0)`` picks the source address;
    ``driver_options`` go to the :class:`StreamDriver`.
    """

    options = {"coalesce_writes": True, **driver_options}

    async def open_channel() -> Channel:
        core = BotdConnection(key, peer_key=peer_key, config=config)
        return await dial(
            lambda: Channel(make_driver(core, **options)),
            host,
            port,
            local_addr=local_addr,
            timeout=None,  # the core's handshake timer bounds the wait
            cancel_reason="handshake failed",
        )

    return _Connecting(open_channel)


class BotdServer(ServerHandle[BotdConnection]):
    """A listening BOTD #2 node. Each peer that completes the handshake gets its own
    handler task with an established :class:`Channel`."""


async def serve(
    key: Signer,
    handler: Callable[[Channel], Awaitable[None]],
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    config: BotdConfig | None = None,
    replay_cache: ReplayCache | None = None,
    on_reject: Callable[[object, str], None] | None = None,
    **driver_options: Any,
) -> BotdServer:
    """Listen for BOTD #2 peers.

    ``handler(channel)`` runs once the peer has completed the handshake (and passed the
    allow-list in ``config``); the channel closes when it returns. A connection that
    fails the handshake never reaches it: ``on_reject(remote_address, reason)`` hears
    about it instead. One replay cache is shared by all connections.
    """
    settings = config or BotdConfig()
    replays = replay_cache if replay_cache is not None else ReplayCache()

    def new_core() -> BotdConnection:
        return BotdConnection(key, config=settings, replay_cache=replays)

    async def run(driver: StreamDriver[BotdConnection]) -> None:
        channel = Channel(driver)
        try:
            await channel.wait_established()
        except HandshakeFailed as exc:
            if on_reject is not None:
                on_reject(channel.remote_address, exc.reason)
            return
        try:
            await handler(channel)
        finally:
            await channel.close("handler finished")

    options = {"coalesce_writes": True, **driver_options}
    server = await serve_stream(new_core, run, host, port, **options)
    return BotdServer(server)
