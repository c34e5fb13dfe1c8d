"""PSEC through the UDP driver in real time, over a loopback relay that loses 30 % of
the datagrams each way: the negotiation, the DTLS handshake and the confirm all
retransmit on their own timers (real ones here: 0.5 s for a proposal, 1 s for DTLS),
and the channel still comes up on both sides and carries a datagram both ways.

The losses are seeded (one ``random.Random`` per direction, so each direction loses
the same datagrams by position whatever the other side does). With this seed the first
proposal, the server's HelloVerifyRequest (twice) and a confirm are lost: the
negotiation's, the DTLS and the confirm's retransmissions are each needed. A side sends
its datagrams in an order set by what it received and by its own timers (0.5 s apart
at least), so the same datagrams are lost on every run."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from meshtools import LivePki

from trustmesh.io.limits import ResourcePolicy
from trustmesh.io.psec import Address, open_psec
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.psec.channel import ChannelData, ChannelUp
from trustmesh.psec.identity import dtls_identity
from trustmesh.sansio import Event

HOST = "127.0.0.1"
LOSS = 0.3
SEED = 10
BOUND = 40.0  # seconds for the whole exchange; typically a few
RETRY = 0.5  # seconds between two tries of the application datagram
TRIES = 20


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Address, Event]] = []
        self.changed = asyncio.Event()

    def __call__(self, address: Address, event: Event) -> None:
        self.events.append((address, event))
        self.changed.set()

    async def wait_for(self, kind: type) -> tuple[Address, Event]:
        while True:
            for address, event in self.events:
                if isinstance(event, kind):
                    return address, event
            self.changed.clear()
            await self.changed.wait()

    def of(self, kind: type) -> list[Event]:
        return [e for _, e in self.events if isinstance(e, kind)]


class LossyRelay(asyncio.DatagramProtocol):
    """Forwards between ``a`` (who sends to the relay) and ``b``, losing ``loss`` of
    the datagrams in each direction (direction "ab" and "ba", each its own seeded
    random sequence)."""

    def __init__(self, a: Address, b: Address, *, loss: float, seed: int) -> None:
        self.a, self.b, self.loss = a, b, loss
        self.rng = {"ab": random.Random(f"{seed}ab"), "ba": random.Random(f"{seed}ba")}
        self.forwarded = {"ab": 0, "ba": 0}
        self.dropped = {"ab": 0, "ba": 0}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        source = (str(addr[0]), int(str(addr[1])))
        if source not in (self.a, self.b):
            return
        direction, target = ("ab", self.b) if source == self.a else ("ba", self.a)
        if self.rng[direction].random() < self.loss:
            self.dropped[direction] += 1
            return
        self.forwarded[direction] += 1
        if self.transport is not None:
            self.transport.sendto(data, target)

    @property
    def address(self) -> Address:
        assert self.transport is not None
        return (HOST, int(self.transport.get_extra_info("sockname")[1]))


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[LivePki]:
    ca = CertificateAuthority.init(tmp_path / "ca", None, name="psec loss CA")
    yield LivePki(ca)
    ca.close()


@pytest.mark.timeout(60)
async def test_a_channel_comes_up_and_carries_a_round_trip_through_30_percent_loss(
    pki: LivePki, tmp_path: Path
) -> None:
    a_identity = dtls_identity(pki.config("node-a", tmp_path / "a"))
    b_identity = dtls_identity(pki.config("node-b", tmp_path / "b"))
    # The default 10 s to come up is tight when a DTLS flight is lost twice (1 s, then
    # 2 s, then 4 s); the negotiation's own give-up (30 s) is the bound here.
    policy = ResourcePolicy(handshake_timeout=30.0)
    a_events, b_events = Recorder(), Recorder()
    loop = asyncio.get_running_loop()
    a = await open_psec(a_identity, HOST, 0, on_event=a_events, policy=policy)

    def echo(address: Address, event: Event) -> None:
        b_events(address, event)
        if isinstance(event, ChannelData):
            b.send(address, b"echo:" + event.data)  # each copy that arrives, once

    b = await open_psec(b_identity, HOST, 0, on_event=echo, policy=policy)
    transport, relay = await loop.create_datagram_endpoint(
        lambda: LossyRelay((HOST, a.port), (HOST, b.port), loss=LOSS, seed=SEED),
        local_addr=(HOST, 0),
    )
    started = loop.time()
    try:
        async with asyncio.timeout(BOUND):
            a.connect(relay.address, expected_peer=b_identity.peer_id)
            _, up = await a_events.wait_for(ChannelUp)
            _, their_up = await b_events.wait_for(ChannelUp)
            assert isinstance(up, ChannelUp) and up.peer_id == b_identity.peer_id
            assert isinstance(their_up, ChannelUp) and their_up.peer_id == a_identity.peer_id
            assert up.scheme == their_up.scheme == "/dtls/1.2"
            assert up.initiator and not their_up.initiator
            handshake_lost = dict(relay.dropped)

            # The application's datagram is lost like any other: try again until the
            # echo comes back, a bounded number of times.
            for _ in range(TRIES):
                a.send(relay.address, b"ping")
                try:
                    async with asyncio.timeout(RETRY):
                        _, back = await a_events.wait_for(ChannelData)
                    break
                except TimeoutError:
                    continue
            else:
                pytest.fail(f"no echo in {TRIES} tries: {relay.dropped}")
        assert back == ChannelData(b"echo:ping")
        assert ChannelData(b"ping") in b_events.of(ChannelData)
        # The loss was real: datagrams of the handshake were lost each way.
        assert handshake_lost["ab"] >= 1 and handshake_lost["ba"] >= 1, handshake_lost
        assert loop.time() - started < BOUND
    finally:
        transport.close()
        a.close()
        b.close()
