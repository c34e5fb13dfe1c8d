"""What a BOTD #2 peer that sends faster than the application reads costs the server.

Issue 15: the server held up to (64 + 1,024) messages of 1 MiB per connection, 599 MiB
after 600 sends, because the channel's inbox counted messages and the driver's queue
counted events. Both now count bytes too, and a peer that outruns the application
only fills the kernel's socket buffers.
"""

from __future__ import annotations

import asyncio

from trustmesh.botd.config import DEFAULT_MAX_MESSAGE
from trustmesh.botd.core import RECORD_OVERHEAD, BotdConnection
from trustmesh.crypto.keys import KeyKind, PrivateKey, Secp256k1PrivateKey
from trustmesh.io import botd
from trustmesh.io.limits import ResourcePolicy
from trustmesh.io.stream import StreamDriver

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
        original = driver.data_received

        def data_received(data: bytes) -> None:
            nonlocal peak
            original(data)
            channel = channels[0] if channels else None
            peak = max(peak, held(driver, channel))
            # The inbox is full (its byte limit is max_queued_bytes): the channel's reader
            # takes no more events, so the driver stays paused until the handler reads.
            if driver.reading_paused and channel is not None and channel.buffered >= QUEUED_BYTES:
                stalled.set()

        driver.data_received = data_received  # type: ignore[method-assign]

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
