"""BOTD #2 over real loopback TCP: ``trustmesh.io.botd.connect`` and ``serve``.

Good peers go through the public API. Attackers are raw sockets writing hand-built
bytes (valid Inits come from a real initiator core, then get tampered with), or real
cores driven by hand so that they can misbehave after an honest handshake. Every
attack must close only its own connection: a bystander connected before it keeps
echoing, and a new peer still gets in afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from trustmesh.botd import (
    BotdConfig,
    BotdConnection,
    HandshakeComplete,
    HandshakeFailed,
    MessageReceived,
    PeerClosed,
    PingTooSoonError,
    PongReceived,
    ReplayCache,
)
from trustmesh.botd.config import DEFAULT_MAX_MESSAGE
from trustmesh.botd.core import RECORD_OVERHEAD
from trustmesh.botd.messages import MAX_CONTROL_RECORD, MAX_HANDSHAKE_FRAME
from trustmesh.crypto.keys import KeyKind, PrivateKey, PublicKey, Secp256k1PrivateKey
from trustmesh.errors import ConnectionClosedError
from trustmesh.io import botd
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.wire.pb import botd_pb2
from trustmesh.wire.varint import decode_uvarint, encode_uvarint

WAIT = 5.0  # upper bound on any single wait; everything here happens in milliseconds
HOST = "127.0.0.1"

EventT = TypeVar("EventT", bound=Event)


def new_key() -> PrivateKey:
    return PrivateKey.generate(KeyKind.SECP256K1)


SERVER_KEY = Secp256k1PrivateKey.from_secret(b"\x01" * 32)
SERVER_PUB = SERVER_KEY.public_key()


# --- the server under test --------------------------------------------------------------------


@dataclass
class Node:
    """A running ``botd.serve`` echo node and what it has seen."""

    server: botd.BotdServer
    rejects: list[tuple[object, str]] = field(default_factory=list)
    rejected: asyncio.Event = field(default_factory=asyncio.Event)
    handled: list[botd.Channel] = field(default_factory=list)
    ended: list[tuple[PublicKey, ConnectionClosed]] = field(default_factory=list)
    ended_event: asyncio.Event = field(default_factory=asyncio.Event)
    clients: list[botd.Channel] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port

    async def rejection(self, n: int = 1) -> tuple[object, str]:
        """The ``n``-th (remote, reason) that on_reject heard, waiting for it."""
        async with asyncio.timeout(WAIT):
            while len(self.rejects) < n:
                self.rejected.clear()
                await self.rejected.wait()
        return self.rejects[n - 1]

    async def ending(self, n: int = 1) -> tuple[PublicKey, ConnectionClosed]:
        """How the ``n``-th established connection ended, as the server's handler saw it."""
        async with asyncio.timeout(WAIT):
            while len(self.ended) < n:
                self.ended_event.clear()
                await self.ended_event.wait()
        return self.ended[n - 1]

    async def connect(self, key: PrivateKey | None = None) -> botd.Channel:
        """A good client; closed at teardown if the test leaves it open."""
        async with asyncio.timeout(WAIT):
            channel = await botd.connect(HOST, self.port, key or new_key(), SERVER_PUB)
        self.clients.append(channel)
        return channel

    async def raw(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A plain TCP connection to the node, for hand-built bytes."""
        async with asyncio.timeout(WAIT):
            reader, writer = await asyncio.open_connection(HOST, self.port)
        self.writers.append(writer)
        return reader, writer

    async def still_serving(self, bystander: botd.Channel) -> None:
        """The bystander still echoes, and a new client still gets in and echoes."""
        assert bystander.closed is None
        await echo(bystander, b"still here")
        fresh = await self.connect()
        await echo(fresh, b"after the attack")
        closed = await asyncio.wait_for(fresh.close("done"), WAIT)
        assert closed == ConnectionClosed("done")
        await echo(bystander, b"and still here")


NodeFactory = Callable[..., Awaitable[Node]]


@pytest.fixture
async def start_node() -> AsyncIterator[NodeFactory]:
    nodes: list[Node] = []

    async def start(
        config: BotdConfig | None = None, replay_cache: ReplayCache | None = None
    ) -> Node:
        node: Node

        async def echo_handler(channel: botd.Channel) -> None:
            node.handled.append(channel)
            peer = channel.peer_key
            async for data in channel:
                with contextlib.suppress(ConnectionClosedError):  # the loop then ends
                    await channel.send(data)
            node.ended.append((peer, await channel.close("echo done")))
            node.ended_event.set()

        def on_reject(remote: object, reason: str) -> None:
            node.rejects.append((remote, reason))
            node.rejected.set()

        server = await botd.serve(
            SERVER_KEY,
            echo_handler,
            HOST,
            0,
            config=config,
            replay_cache=replay_cache,
            on_reject=on_reject,
        )
        node = Node(server)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        for writer in node.writers:
            writer.close()
        for channel in node.clients:
            with contextlib.suppress(ConnectionClosedError, TimeoutError):
                await asyncio.wait_for(channel.close("test over"), WAIT)
        node.server.close()
        await asyncio.wait_for(node.server.wait_closed(), WAIT)
        for writer in node.writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@pytest.fixture
async def node(start_node: NodeFactory) -> Node:
    return await start_node()


@pytest.fixture
async def bystander(node: Node) -> botd.Channel:
    """A good client connected before the attack."""
    channel = await node.connect()
    await echo(channel, b"before the attack")
    return channel


# --- helpers ----------------------------------------------------------------------------------


async def echo(channel: botd.Channel, data: bytes) -> None:
    async with asyncio.timeout(WAIT):
        await channel.send(data)
        assert await channel.recv() == data


def split_frame(data: bytes) -> bytes:
    """The payload of the one length-prefixed frame that fills ``data``."""
    size, start = decode_uvarint(data)
    assert len(data) == start + size
    return data[start:]


def framed(payload: bytes) -> bytes:
    return encode_uvarint(len(payload)) + payload


def valid_init(key: PrivateKey | None = None, recipient: PublicKey = SERVER_PUB) -> bytes:
    """A real initiator's Init, as it goes on the wire."""
    core = BotdConnection(key or new_key(), peer_key=recipient)
    assert core.start(0.0) == []
    return core.data_to_send()


def tampered_init(mutate: Callable[[botd_pb2.Init], None]) -> bytes:
    frame = botd_pb2.Frame.FromString(split_frame(valid_init()))
    assert frame.WhichOneof("body") == "init"
    mutate(frame.init)
    return framed(frame.SerializeToString())


def flip_signature_bit(message: botd_pb2.Init | botd_pb2.Ack) -> None:
    signature = bytearray(message.signature)
    assert len(signature) == 64
    signature[-1] ^= 0x01  # the low bit of s: still a well-formed compact signature
    message.signature = bytes(signature)


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Read until the other side ends the connection (EOF or reset); return what came."""
    received = bytearray()
    async with asyncio.timeout(WAIT):
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                received += chunk
    return bytes(received)


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """One whole length-prefixed frame, prefix included."""
    prefix = bytearray()
    async with asyncio.timeout(WAIT):
        while True:
            prefix += await reader.readexactly(1)
            if not prefix[-1] & 0x80:
                break
        size, _ = decode_uvarint(bytes(prefix))
        return bytes(prefix) + await reader.readexactly(size)


def same_endpoint(remote: object, writer: asyncio.StreamWriter) -> bool:
    """``remote`` (the server's view of a peer) is this client socket."""
    sockname = writer.get_extra_info("sockname")
    return isinstance(remote, tuple) and tuple(remote[:2]) == tuple(sockname[:2])


class HandDriven:
    """A real initiator core driven by hand over a raw socket, so a test can make it
    misbehave after an honest handshake."""

    def __init__(
        self, core: BotdConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.core = core
        self.reader = reader
        self.writer = writer
        self.init = b""  # the Init this core sent, as it went on the wire

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    async def flush(self) -> None:
        data = self.core.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def write_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_events(self) -> list[Event]:
        async with asyncio.timeout(WAIT):
            try:
                data = await self.reader.read(65536)
            except ConnectionResetError:
                data = b""
        return self.core.receive_data(data, self.now())

    async def until(self, kind: type[EventT]) -> EventT:
        """Feed the core what the server sends until it yields a ``kind`` event."""
        while True:
            events = await self.read_events()
            await self.flush()
            for event in events:
                if isinstance(event, kind):
                    return event
                assert not isinstance(event, ConnectionClosed), event

    async def handshake(self) -> None:
        assert self.core.start(self.now()) == []
        self.init = self.core.data_to_send()
        await self.write_raw(self.init)
        complete = await self.until(HandshakeComplete)  # until() sends Finished
        assert complete.peer_key == SERVER_PUB

    async def send(self, data: bytes) -> None:
        assert self.core.send(data) == []
        await self.flush()

    async def echo(self, data: bytes) -> None:
        await self.send(data)
        message = await self.until(MessageReceived)
        assert message.data == data

    async def until_closed(self) -> list[Event]:
        """Everything the core makes of the server's last words, up to the close."""
        events: list[Event] = []
        async with asyncio.timeout(WAIT):
            while not events or not isinstance(events[-1], ConnectionClosed):
                events += await self.read_events()
        return events


async def hand_driven(
    node: Node, key: PrivateKey | None = None, config: BotdConfig | None = None
) -> HandDriven:
    reader, writer = await node.raw()
    peer = HandDriven(
        BotdConnection(key or new_key(), peer_key=SERVER_PUB, config=config), reader, writer
    )
    await peer.handshake()
    return peer


def peer_closed_reason(events: list[Event]) -> str:
    closes = [e for e in events if isinstance(e, PeerClosed)]
    assert len(closes) == 1, events
    return closes[0].reason


# --- good peers -------------------------------------------------------------------------------


async def test_handshake_messages_ping_and_orderly_close(node: Node) -> None:
    client_key = new_key()
    channel = await node.connect(client_key)
    assert channel.peer_key == SERVER_PUB

    messages = [b"one", b"two", bytes(range(256)) * 4096, b"", b"x" * DEFAULT_MAX_MESSAGE, b"end"]
    assert len(messages[2]) == DEFAULT_MAX_MESSAGE
    async with asyncio.timeout(WAIT):
        for message in messages:
            await channel.send(message)
        for message in messages:
            assert await channel.recv() == message

        rtt = await channel.ping()
    assert rtt > 0
    # What the application may not do is refused, and the channel stays up.
    with pytest.raises(PingTooSoonError):
        await channel.ping()
    with pytest.raises(ValueError, match="exceeds"):
        await channel.send(b"x" * (DEFAULT_MAX_MESSAGE + 1))
    await echo(channel, b"still up")

    # The server's handler saw the client's proven identity and the same transcript.
    assert len(node.handled) == 1
    server_side = node.handled[0]
    assert server_side.peer_key == client_key.public_key()
    assert server_side.transcript_hash is not None
    assert server_side.transcript_hash == channel.transcript_hash

    closed = await asyncio.wait_for(channel.close("bye"), WAIT)
    assert closed == ConnectionClosed("bye", error=False, by_peer=False)
    assert channel.closed == closed
    peer, server_closed = await node.ending()
    assert peer == client_key.public_key()
    assert server_closed == ConnectionClosed("peer closed: bye", error=False, by_peer=True)
    with pytest.raises(ConnectionClosedError):
        await channel.recv()
    assert node.rejects == []


async def test_connect_as_context_manager(node: Node) -> None:
    async with asyncio.timeout(WAIT):
        async with botd.connect(HOST, node.port, new_key(), SERVER_PUB) as channel:
            assert channel.peer_key == SERVER_PUB
            await channel.send(b"in a with block")
            assert await channel.recv() == b"in a with block"
            assert channel.closed is None
    assert channel.closed == ConnectionClosed("closed by application")
    _, server_closed = await node.ending()
    assert server_closed.reason == "peer closed: closed by application"
    assert not server_closed.error


# --- attacks before the handshake -------------------------------------------------------------


PRE_HANDSHAKE_ATTACKS: dict[str, tuple[Callable[[], bytes], str]] = {
    "tampered-init-signature": (
        lambda: tampered_init(flip_signature_bit),
        "Init signature does not verify",
    ),
    "wrong-recipient": (
        lambda: valid_init(recipient=new_key().public_key()),
        "Init is addressed to another recipient key",
    ),
    "garbage-varint": (lambda: b"\xff" * 16, "varint is longer than 9 bytes"),
    "garbage-frame": (lambda: framed(b"\xff" * 8), "malformed frame"),
    "empty-frame": (lambda: b"\x00", "frame carries no body"),
    "http-request": (
        lambda: framed(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"),
        "malformed frame",
    ),
    "oversized-frame": (
        lambda: encode_uvarint(MAX_HANDSHAKE_FRAME + 1),
        f"frame of {MAX_HANDSHAKE_FRAME + 1} bytes exceeds the {MAX_HANDSHAKE_FRAME}-byte limit",
    ),
    "huge-length-prefix": (
        lambda: encode_uvarint(2**62) + b"\x00" * 32,
        "exceeds the 512-byte limit",
    ),
}


@pytest.mark.parametrize("attack", sorted(PRE_HANDSHAKE_ATTACKS))
async def test_bad_handshake_bytes_close_only_that_connection(
    node: Node, bystander: botd.Channel, attack: str
) -> None:
    build, reason = PRE_HANDSHAKE_ATTACKS[attack]
    reader, writer = await node.raw()
    writer.write(build())
    await writer.drain()

    # The server says nothing to an unproven peer: it just closes.
    assert await read_until_closed(reader) == b""
    remote, rejected = await node.rejection()
    assert reason in rejected
    assert same_endpoint(remote, writer)
    assert node.rejects == [(remote, rejected)]
    assert len(node.handled) == 1  # only the bystander ever reached the handler
    await node.still_serving(bystander)


async def test_replayed_init_is_refused_by_the_shared_cache(
    node: Node, bystander: botd.Channel
) -> None:
    original = await hand_driven(node)
    await original.echo(b"the real session")
    captured = botd_pb2.Frame.FromString(split_frame(original.init))  # as it went on the wire
    assert captured.WhichOneof("body") == "init"

    reader, writer = await node.raw()
    writer.write(original.init)
    await writer.drain()
    assert await read_until_closed(reader) == b""  # no Ack for a replay
    remote, reason = await node.rejection()
    assert "replayed Init" in reason
    assert same_endpoint(remote, writer)

    await original.echo(b"the original is unharmed")
    await node.still_serving(bystander)


async def test_replay_is_refused_across_servers_sharing_a_cache(start_node: NodeFactory) -> None:
    shared = ReplayCache()
    first = await start_node(replay_cache=shared)
    second = await start_node(replay_cache=shared)
    init = valid_init()
    for target in (first, second):
        reader, writer = await target.raw()
        writer.write(init)
        await writer.drain()
        if target is first:  # the first sight of it gets a real Ack and Finished record
            ack = botd_pb2.Frame.FromString(split_frame(await read_frame(reader)))
            assert ack.WhichOneof("body") == "ack"
            finished = split_frame(await read_frame(reader))  # encrypted: opaque here
            assert len(finished) == 4 + 64 + 16  # Frame{finished{64-byte sig}} + GCM tag
            writer.write_eof()
        assert await read_until_closed(reader) == b""
    assert "peer closed during the handshake" in (await first.rejection())[1]
    assert "replayed Init" in (await second.rejection())[1]


async def test_truncated_init_then_eof_closes(node: Node, bystander: botd.Channel) -> None:
    init = valid_init()
    reader, writer = await node.raw()
    writer.write(init[: len(init) // 2])
    await writer.drain()
    writer.write_eof()
    assert await read_until_closed(reader) == b""
    remote, reason = await node.rejection()
    assert reason == "peer closed during the handshake"
    assert same_endpoint(remote, writer)
    await node.still_serving(bystander)


async def test_truncated_init_then_silence_closes_at_the_handshake_timeout(
    start_node: NodeFactory,
) -> None:
    node = await start_node(BotdConfig(handshake_timeout=0.3))
    bystander = await node.connect()  # finishes its handshake long before 0.3 s
    init = valid_init()
    reader, writer = await node.raw()
    loop = asyncio.get_running_loop()
    began = loop.time()
    writer.write(init[: len(init) - 1])
    await writer.drain()
    assert await read_until_closed(reader) == b""  # waits on the server's own timer
    assert loop.time() - began >= 0.25
    remote, reason = await node.rejection()
    assert reason == "handshake timed out"
    assert same_endpoint(remote, writer)
    await node.still_serving(bystander)


# --- attacks after an honest handshake --------------------------------------------------------


async def test_bit_flipped_record_closes(node: Node, bystander: botd.Channel) -> None:
    attacker_key = new_key()
    peer = await hand_driven(node, attacker_key)
    await peer.echo(b"honest so far")

    assert peer.core.send(b"now tampered") == []
    record = bytearray(peer.core.data_to_send())
    _, start = decode_uvarint(bytes(record))
    record[start + 3] ^= 0x10  # one bit of the ciphertext
    await peer.write_raw(bytes(record))

    # The server tells the (now proven) peer why, encrypted, then closes.
    events = await peer.until_closed()
    assert "failed authentication" in peer_closed_reason(events)
    assert not [e for e in events if isinstance(e, MessageReceived)]
    who, closed = await node.ending()
    assert who == attacker_key.public_key()
    assert closed.error
    assert "failed authentication" in closed.reason
    assert node.rejects == []
    await node.still_serving(bystander)


async def test_oversized_record_after_the_handshake_closes(
    node: Node, bystander: botd.Channel
) -> None:
    limit = max(DEFAULT_MAX_MESSAGE + RECORD_OVERHEAD, MAX_CONTROL_RECORD)
    assert limit == DEFAULT_MAX_MESSAGE + RECORD_OVERHEAD
    peer = await hand_driven(node)
    await peer.echo(b"x" * 1000)
    await peer.write_raw(encode_uvarint(limit + 1))  # the prefix alone is refused
    events = await peer.until_closed()
    reason = f"frame of {limit + 1} bytes exceeds the {limit}-byte limit"
    assert reason in peer_closed_reason(events)
    _, closed = await node.ending()
    assert closed.error
    assert reason in closed.reason
    await node.still_serving(bystander)


async def test_ping_flood_closes(node: Node, bystander: botd.Channel) -> None:
    # ping_interval=0 lets this core ping as often as it likes; the server's window is 30 s.
    peer = await hand_driven(node, config=BotdConfig(ping_interval=0))
    assert peer.core.ping(peer.now()) == []
    await peer.flush()
    pong = await peer.until(PongReceived)
    assert pong.rtt >= 0

    assert peer.core.ping(peer.now()) == []  # a second ping well inside 30 s
    await peer.flush()
    events = await peer.until_closed()
    assert not [e for e in events if isinstance(e, PongReceived)]
    assert "ping flood" in peer_closed_reason(events)
    _, closed = await node.ending()
    assert closed.error
    assert "ping flood" in closed.reason
    await node.still_serving(bystander)


# --- a malicious server -----------------------------------------------------------------------


@dataclass
class Heard:
    """What a malicious server heard from its client."""

    inits: list[bytes] = field(default_factory=list)
    after_init: list[bytes] = field(default_factory=list)  # everything after the Init
    done: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.asynccontextmanager
async def malicious_server(
    key: PrivateKey, tamper: Callable[[botd_pb2.Ack], None]
) -> AsyncIterator[tuple[int, Heard]]:
    """Answers each Init with a real responder core's Ack, tampered with, followed by
    that core's genuine Finished record (as a real responder sends them together)."""
    heard = Heard()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            init = await read_frame(reader)
            heard.inits.append(init)
            core = BotdConnection(key)
            now = asyncio.get_running_loop().time()
            core.start(now)
            if core.receive_data(init, now) == []:
                answer = core.data_to_send()
                ack_size, start = decode_uvarint(answer)
                ack, finished = answer[: start + ack_size], answer[start + ack_size :]
                frame = botd_pb2.Frame.FromString(split_frame(ack))
                tamper(frame.ack)
                writer.write(framed(frame.SerializeToString()) + finished)
                await writer.drain()
            heard.after_init.append(await read_until_closed(reader))  # until the client quits
        finally:
            writer.close()
            heard.done.set()

    server = await asyncio.start_server(answer, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1], heard
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), WAIT)


def wrong_init_id(ack: botd_pb2.Ack) -> None:
    ack.init_id = "f" * 32


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (flip_signature_bit, "Ack signature does not verify"),
        (wrong_init_id, "Ack answers another Init"),
    ],
    ids=["tampered-ack-signature", "wrong-init-id"],
)
async def test_tampered_ack_fails_the_handshake(
    tamper: Callable[[botd_pb2.Ack], None], reason: str
) -> None:
    evil_key = new_key()
    async with malicious_server(evil_key, tamper) as (port, heard):
        with pytest.raises(HandshakeFailed) as info:
            async with asyncio.timeout(WAIT):
                await botd.connect(HOST, port, new_key(), evil_key.public_key())
        # The client closed on the Ack itself, not on the Finished behind it.
        assert reason in info.value.reason
        await asyncio.wait_for(heard.done.wait(), WAIT)
        assert len(heard.inits) == 1  # the client did reach it and got the tampered Ack
        assert heard.after_init == [b""], "the client sent nothing after its Init"


async def test_silent_server_fails_the_handshake_at_the_timeout() -> None:
    heard: list[bytes] = []
    hung_up = asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            heard.append(await read_until_closed(reader))
        finally:
            writer.close()
            hung_up.set()

    server = await asyncio.start_server(never_answer, HOST, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        config = BotdConfig(handshake_timeout=0.3)
        with pytest.raises(HandshakeFailed, match="handshake timed out"):
            async with asyncio.timeout(WAIT):
                await botd.connect(HOST, port, new_key(), SERVER_PUB, config=config)
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), WAIT)
    # The server heard exactly one Init, then the client hung up.
    await asyncio.wait_for(hung_up.wait(), WAIT)
    assert len(heard) == 1
    frame = botd_pb2.Frame.FromString(split_frame(heard[0]))
    assert frame.WhichOneof("body") == "init"


# --- policy and shutdown ----------------------------------------------------------------------


async def test_allow_list_rejects_other_keys_before_the_handler(start_node: NodeFactory) -> None:
    good, other = new_key(), new_key()
    node = await start_node(BotdConfig(allow=frozenset({good.public_key()})))
    channel = await node.connect(good)
    await echo(channel, b"allowed")

    with pytest.raises(HandshakeFailed):
        async with asyncio.timeout(WAIT):
            await botd.connect(HOST, node.port, other, SERVER_PUB)
    _, reason = await node.rejection()
    assert "not on the allow-list" in reason
    assert other.public_key().hex() in reason
    assert [c.peer_key for c in node.handled] == [good.public_key()]

    await echo(channel, b"still allowed")
    assert [c.peer_key for c in node.handled] == [good.public_key()]


async def test_server_close_closes_live_channels_the_protocol_way(node: Node) -> None:
    first, second = await node.connect(), await node.connect()
    await echo(first, b"one")
    await echo(second, b"two")

    node.server.close()
    for channel in (first, second):
        with pytest.raises(ConnectionClosedError) as info:
            async with asyncio.timeout(WAIT):
                await channel.recv()
        assert info.value.reason == "peer closed: server shutting down"
        closed = await asyncio.wait_for(channel.close("bye"), WAIT)
        assert closed == ConnectionClosed(
            "peer closed: server shutting down", error=False, by_peer=True
        )
    await asyncio.wait_for(node.server.wait_closed(), WAIT)
    endings = [closed for _, closed in node.ended]
    assert endings == [ConnectionClosed("server shutting down")] * 2
    with pytest.raises(OSError):
        await botd.connect(HOST, node.port, new_key(), SERVER_PUB)


async def test_server_async_with_closes_live_channels(node: Node) -> None:
    channel = await node.connect()
    await echo(channel, b"hello")

    async def client_side() -> tuple[str, ConnectionClosed]:
        with pytest.raises(ConnectionClosedError) as info:
            await channel.recv()
        return info.value.reason, await channel.close("client done")

    watcher = asyncio.create_task(client_side())
    async with asyncio.timeout(WAIT):
        async with node.server:
            pass
        reason, closed = await watcher
    assert reason == "peer closed: server shutting down"
    assert closed.by_peer
    assert not closed.error
    assert node.ended[0][1] == ConnectionClosed("server shutting down")
