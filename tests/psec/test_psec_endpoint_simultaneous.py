"""Simultaneous negotiation through the UDP driver (psec.md §4.2): two endpoints that
both propose, over real UDP on loopback, including the case every simultaneous open
meets in practice: the first side's proposal is lost because the other side's socket
did not exist yet."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshtools import LivePki

from trustmesh.errors import ProtocolError
from trustmesh.io.psec import Address, PsecEndpoint, open_psec
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.psec.channel import ChannelData, ChannelUp
from trustmesh.psec.frames import FrameType
from trustmesh.psec.identity import PsecIdentity, dtls_identity
from trustmesh.sansio import Event

DTLS = "/dtls/1.2"
WAIT = 10.0
HOST = "127.0.0.1"


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Address, Event]] = []
        self.changed = asyncio.Event()

    def __call__(self, address: Address, event: Event) -> None:
        self.events.append((address, event))
        self.changed.set()

    async def wait_for(self, kind: type) -> tuple[Address, Event]:
        async with asyncio.timeout(WAIT):
            while True:
                for address, event in self.events:
                    if isinstance(event, kind):
                        return address, event
                self.changed.clear()
                await self.changed.wait()

    def of(self, kind: type) -> list[Event]:
        return [e for _, e in self.events if isinstance(e, kind)]


@pytest.fixture
def identities(tmp_path: Path) -> Iterator[tuple[PsecIdentity, PsecIdentity]]:
    """Two identities, the one with the smaller peer ID first."""
    ca = CertificateAuthority.init(tmp_path / "ca", None, name="psec simultaneous CA")
    pki = LivePki(ca)
    pair = [dtls_identity(pki.config(n, tmp_path / n)) for n in ("node-a", "node-b")]
    low, high = sorted(pair, key=lambda i: int(i.peer_id))
    yield low, high
    ca.close()


async def echo_round_trip(
    a: PsecEndpoint, a_events: Recorder, b: PsecEndpoint, b_events: Recorder
) -> None:
    """a sends, b echoes what it got, a gets it back."""
    b_address, _ = await b_events.wait_for(ChannelUp)
    a_address, _ = await a_events.wait_for(ChannelUp)
    a.send(a_address, b"ping")
    _, got = await b_events.wait_for(ChannelData)
    assert got == ChannelData(b"ping")
    b.send(b_address, b"pong")
    _, back = await a_events.wait_for(ChannelData)
    assert back == ChannelData(b"pong")


def up_of(events: Recorder) -> ChannelUp:
    (up,) = events.of(ChannelUp)
    assert isinstance(up, ChannelUp)
    return up


async def test_crossing_proposals_settle_by_the_tie_rule(
    identities: tuple[PsecIdentity, PsecIdentity],
) -> None:
    low, high = identities
    low_events, high_events = Recorder(), Recorder()
    a = await open_psec(low, HOST, 0, on_event=low_events)
    b = await open_psec(high, HOST, 0, on_event=high_events)
    try:
        # Both propose before either socket reads: the proposals cross.
        a.connect((HOST, b.port), simultaneous=True)
        b.connect((HOST, a.port), simultaneous=True)
        await echo_round_trip(a, low_events, b, high_events)
        # The same scheme lists: a tie, and the smaller peer ID initiates.
        assert up_of(low_events).initiator and not up_of(high_events).initiator
        assert up_of(low_events).peer_id == high.peer_id
        assert up_of(high_events).peer_id == low.peer_id
        for endpoint, peer in ((a, b.port), (b, a.port)):
            agreed = endpoint.peers[(HOST, peer)].channel.agreed
            assert agreed is not None and agreed.simultaneous and agreed.scheme == DTLS
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("first", ["lower", "higher"])
async def test_a_proposal_lost_before_the_peer_bound_still_settles_simultaneously(
    identities: tuple[PsecIdentity, PsecIdentity], first: str
) -> None:
    """The first side proposes to a port where no PSEC socket is yet (its proposal, and
    the first flight inside, are lost); the second binds that port and proposes from
    ``on_bound``. Whichever of them has the smaller peer ID, both come up, on the tie
    rule, with one transcript (the confirm checks it)."""
    low, high = identities
    early, late = (low, high) if first == "lower" else (high, low)
    early_events, late_events = Recorder(), Recorder()
    void = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    void.bind((HOST, 0))
    void.setblocking(False)
    port = void.getsockname()[1]
    x = await open_psec(early, HOST, 0, on_event=early_events)
    y: PsecEndpoint | None = None
    try:
        x.connect((HOST, port), simultaneous=True)
        lost = void.recv(65535)  # sendto on loopback delivers at once
        assert lost[0] == FrameType.PROPOSE
        void.close()  # the proposal dies with the socket nobody read
        y = await open_psec(
            late,
            HOST,
            port,
            on_event=late_events,
            on_bound=lambda e: e.connect((HOST, x.port), simultaneous=True),
        )
        await echo_round_trip(x, early_events, y, late_events)
        assert up_of(early_events).initiator == (early is low)
        assert up_of(late_events).initiator == (late is low)
        for endpoint, peer in ((x, port), (y, x.port)):
            agreed = endpoint.peers[(HOST, peer)].channel.agreed
            assert agreed is not None and agreed.simultaneous
    finally:
        void.close()
        x.close()
        if y is not None:
            y.close()


async def test_a_proposal_that_came_before_connect_keeps_its_channel(
    identities: tuple[PsecIdentity, PsecIdentity],
) -> None:
    """The peer's proposal arrives before our simultaneous connect: the channel it
    opened (we answered it) is the one connect keeps; no second proposal goes out."""
    low, high = identities
    a_events, b_events = Recorder(), Recorder()
    a = await open_psec(low, HOST, 0, on_event=a_events)
    b = await open_psec(high, HOST, 0, on_event=b_events)
    admitted = asyncio.Event()
    received = b.datagram_received

    def watch(data: bytes, addr: tuple[str | object, ...]) -> None:
        received(data, addr)
        if (HOST, a.port) in b.peers:
            admitted.set()

    b.datagram_received = watch  # type: ignore[method-assign]
    try:
        a.connect((HOST, b.port), simultaneous=True)
        async with asyncio.timeout(WAIT):
            await admitted.wait()
        opened = b.peers[(HOST, a.port)]
        assert not opened.validated  # a proposal alone proves nothing about the address
        b.connect((HOST, a.port), simultaneous=True)
        assert b.peers[(HOST, a.port)] is opened and opened.validated
        with pytest.raises(ProtocolError):
            b.connect((HOST, a.port), simultaneous=True)  # now it is ours: not twice
        await echo_round_trip(a, a_events, b, b_events)
        # A standard negotiation: the proposer initiates, whatever the peer IDs.
        assert up_of(a_events).initiator and not up_of(b_events).initiator
        agreed = opened.channel.agreed
        assert agreed is not None and not agreed.simultaneous
    finally:
        a.close()
        b.close()


async def test_without_simultaneous_an_existing_channel_is_an_error(
    identities: tuple[PsecIdentity, PsecIdentity],
) -> None:
    low, high = identities
    a_events, b_events = Recorder(), Recorder()
    a = await open_psec(low, HOST, 0, on_event=a_events)
    b = await open_psec(high, HOST, 0, on_event=b_events)
    try:
        a.connect((HOST, b.port))
        source, _ = await b_events.wait_for(ChannelUp)
        with pytest.raises(ProtocolError, match="exists already"):
            b.connect(source)
    finally:
        a.close()
        b.close()


async def test_what_on_bound_raises_open_psec_raises(
    identities: tuple[PsecIdentity, PsecIdentity],
) -> None:
    def fail(endpoint: PsecEndpoint) -> None:
        raise ProtocolError("no")

    with pytest.raises(ProtocolError, match="no"):
        await open_psec(identities[0], HOST, 0, on_event=Recorder(), on_bound=fail)
