"""What a BOTD #2 peer that sends faster than the application reads costs the server.

Issue 15: the server held up to (64 + 1,024) messages of 1 MiB per connection, 599 MiB
after 600 sends, because the channel's inbox counted messages and the driver's queue
counted events. Both now count bytes too, and a peer that outruns the application
only fills the kernel's socket buffers.
"""

from __future__ import annotations

import asyncio

import pytest

from trustmesh.botd.config import DEFAULT_MAX_MESSAGE
from trustmesh.botd.core import RECORD_OVERHEAD, BotdConnection
from trustmesh.botd.framing import MAX_READ, MIN_READ
from trustmesh.crypto.keys import KeyKind, PrivateKey, Secp256k1PrivateKey
from trustmesh.io import botd
from trustmesh.io import stream as stream_module
from trustmesh.io.limits import ResourcePolicy
from trustmesh.io.stream import BufferedStreamDriver, StreamDriver

WAIT = 10.0  # bound on any single wait; the whole test takes well under a second
HOST = "127.0.0.1"
SERVER_KEY = Secp256k1PrivateKey.from_secret(b"\x02" * 32)
MESSAGES = 24  # 24 MiB: far more than the server may hold
QUEUED_BYTES = 256 * 1024  # the policy's max_queued_bytes: under one message


def message(i: int) -> bytes:
    return bytes([i]) * DEFAULT_MAX_MESSAGE


def held(driver: StreamDriver[BotdConnection], channel: botd.Channel | None) -> int:
    """Received bytes the server holds for this connection: the driver's event queue,
    the channel's inbox, and a frame the core has begun to receive."""
    inbox = channel.buffered if channel is not None else 0
    return driver._queued_bytes + inbox + driver.core._decoder.buffered


async def test_a_peer_that_outsends_the_application_costs_a_bounded_amount() -> None:
    policy = ResourcePolicy(max_queued_bytes=QUEUED_BYTES)
    frame = DEFAULT_MAX_MESSAGE + RECORD_OVERHEAD + 8  # a whole data frame on the wire
    # Each of the driver's queue and the channel's inbox takes one message past its byte
    # limit at most (a 256 KiB read completes one frame at most), and the core holds
    # the part of the next frame that has arrived.
    bound = policy.max_queued_bytes + QUEUED_BYTES + 3 * frame
    channels: list[botd.Channel] = []
    release = asyncio.Event()
    received: list[bytes] = []
    all_received = asyncio.Event()
    peak = 0
    stalled = asyncio.Event()  # the server stopped reading, and its reader taking events

    def watch(driver: StreamDriver[BotdConnection]) -> None:
        # BOTD's driver reads into the core's buffer (buffer_updated), others get bytes.
        assert isinstance(driver, BufferedStreamDriver)
        original = driver.buffer_updated

        def buffer_updated(nbytes: int) -> None:
            nonlocal peak
            original(nbytes)
            # The kept read buffer is bounded too: a read's room plus a partial frame.
            assert driver.core.buffer_capacity <= MAX_READ + frame
            channel = channels[0] if channels else None
            peak = max(peak, held(driver, channel))
            # The inbox is full (its byte limit is max_queued_bytes): the channel's reader
            # takes no more events, so the driver stays paused until the handler reads.
            if driver.reading_paused and channel is not None and channel.buffered >= QUEUED_BYTES:
                stalled.set()

        driver.buffer_updated = buffer_updated  # type: ignore[method-assign]

    async def handler(channel: botd.Channel) -> None:
        channels.append(channel)
        await release.wait()  # the application does not read until told to
        received.extend([await channel.recv() for _ in range(MESSAGES)])
        all_received.set()

    server = await botd.serve(SERVER_KEY, handler, HOST, 0, on_accept=watch, policy=policy)
    async with server:
        key = PrivateKey.generate(KeyKind.SECP256K1)
        async with asyncio.timeout(WAIT):
            client = await botd.connect(HOST, server.port, key, SERVER_KEY.public_key())

        async def send_all() -> None:
            for i in range(MESSAGES):
                await client.send(message(i))

        sender = asyncio.create_task(send_all())
        try:
            async with asyncio.timeout(WAIT):
                # Either the server stops reading, or (before the fix) it took it all in.
                stall = asyncio.create_task(stalled.wait())
                await asyncio.wait({sender, stall}, return_when=asyncio.FIRST_COMPLETED)
                stall.cancel()
            assert peak <= bound, f"the server held {peak:,} bytes for one peer"
            release.set()  # now the application reads: everything arrives, in order
            async with asyncio.timeout(WAIT):
                await sender
                await all_received.wait()
        finally:
            release.set()
            sender.cancel()
            await client.close()
        assert peak <= bound, f"the server held {peak:,} bytes for one peer"
        assert received == [message(i) for i in range(MESSAGES)]


async def test_a_quiet_connection_gives_its_read_buffer_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bulk grows the read buffer the peer's bytes land in (up to MAX_READ plus a partial
    frame); once the connection goes quiet it is released, and a half-open one keeps
    none either: idle connections hold no large buffers."""
    monkeypatch.setattr(stream_module, "TRIM_AFTER", 0.05)
    drivers: list[StreamDriver[BotdConnection]] = []
    idle_capacity: list[int] = []
    got = asyncio.Event()
    count = 0

    async def handler(channel: botd.Channel) -> None:
        nonlocal count
        # Just authenticated: the handshake's small reads left no buffer behind, so an
        # idle session costs no read buffer at all.
        idle_capacity.append(drivers[0].core.buffer_capacity)
        async for _ in channel:
            count += 1
            if count == 16:
                got.set()

    server = await botd.serve(SERVER_KEY, handler, HOST, 0, on_accept=drivers.append)
    async with server:
        key = PrivateKey.generate(KeyKind.SECP256K1)
        async with asyncio.timeout(WAIT):
            client = await botd.connect(HOST, server.port, key, SERVER_KEY.public_key())
            for _ in range(16):
                await client.send(bytes(200_000))
            await got.wait()
        (driver,) = drivers
        assert isinstance(driver, BufferedStreamDriver)
        assert idle_capacity == [0]
        core = driver.core
        assert MIN_READ < core.buffer_capacity <= MAX_READ + 200_000 + RECORD_OVERHEAD + 8
        # Quiet from now on: the trim check finds no read since its last look (at most
        # two TRIM_AFTER periods, both timers due before this sleep ends).
        await asyncio.sleep(0.3)
        assert core.buffer_capacity == 0
        await client.close()
    assert core.buffer_capacity == 0
