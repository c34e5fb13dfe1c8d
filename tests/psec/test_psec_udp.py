"""PSEC over real UDP on loopback: a /dtls/1.2 channel between two endpoints, and the
endpoint's bounds against spoofed proposals (state per source, 3x amplification)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from meshtools import LivePki

from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.io.limits import ResourcePolicy
from trustmesh.io.psec import Address, PsecEndpoint, open_psec
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.psec.channel import ChannelClosed, ChannelData, ChannelUp
from trustmesh.psec.frames import Propose
from trustmesh.psec.identity import PsecIdentity, dtls_identity
from trustmesh.sansio import Event
from trustmesh.wire.peerid import PeerId

DTLS = "/dtls/1.2"
WAIT = 10.0


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[LivePki]:
    ca = CertificateAuthority.init(tmp_path / "ca", None, name="psec test CA")
    yield LivePki(ca)
    ca.close()


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


async def test_a_dtls_channel_over_udp_carries_an_echo(pki: LivePki, tmp_path: Path) -> None:
    a_identity = dtls_identity(pki.config("node-a", tmp_path / "a"))
    b_identity = dtls_identity(pki.config("node-b", tmp_path / "b"))
    a_id, b_id = a_identity.peer_id, b_identity.peer_id
    a_events, b_events = Recorder(), Recorder()
    a = await open_psec(a_identity, "127.0.0.1", 0, on_event=a_events)
    b = await open_psec(b_identity, "127.0.0.1", 0, on_event=b_events)
    try:
        a.connect(("127.0.0.1", b.port), expected_peer=b_id)
        _, up = await a_events.wait_for(ChannelUp)
        source, their_up = await b_events.wait_for(ChannelUp)
        assert isinstance(up, ChannelUp) and up.peer_id == b_id and up.scheme == DTLS
        assert isinstance(their_up, ChannelUp) and their_up.peer_id == a_id
        a.send(("127.0.0.1", b.port), b"ping")
        _, data = await b_events.wait_for(ChannelData)
        assert data == ChannelData(b"ping")
        b.send(source, b"pong")
        _, echoed = await a_events.wait_for(ChannelData)
        assert echoed == ChannelData(b"pong")
        b.close()  # its scheme says so to the peer: no channel left behind on a
        _, closed = await a_events.wait_for(ChannelClosed)
        assert closed == ChannelClosed("peer closed the channel")
        assert not a.peers
    finally:
        a.close()
        b.close()


class FakeTransport(asyncio.DatagramTransport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: dict[Address, int] = {}

    def sendto(self, data: Any, address: Any = None) -> None:
        self.sent[address] = self.sent.get(address, 0) + len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 9)

    def close(self) -> None:
        pass


async def test_spoofed_proposals_get_bounded_state_and_at_most_3x_the_bytes(
    pki: LivePki, tmp_path: Path
) -> None:
    b_identity = dtls_identity(pki.config("node-b", tmp_path / "b"))
    a_identity = dtls_identity(pki.config("node-a", tmp_path / "a"))
    policy = ResourcePolicy(max_unauthenticated_per_source=4)
    endpoint = PsecEndpoint(b_identity, on_event=lambda *_: None, policy=policy)
    transport = FakeTransport()
    endpoint.connection_made(transport)
    # A real first flight, sent as if from many spoofed ports of one address: each gets
    # a cookie at most, never the certificate flight; and only 4 get state at all.
    client = a_identity.factories_for(b"x")[DTLS](True)
    client.start(0.0)
    proposal = Propose(a_identity.peer_id, (DTLS,), client.first_flight()).encode()
    for port in range(1000, 1100):
        endpoint.datagram_received(proposal, ("127.0.0.9", port))
    assert len(endpoint.peers) == 4
    assert endpoint.stats.snapshot().get("max_unauthenticated_per_source") == 96
    for address, sent in transport.sent.items():
        assert sent <= 3 * len(proposal), address
    # Noise that is not a proposal opens nothing.
    endpoint.datagram_received(b"\x16\xfe\xfd" + b"\x00" * 40, ("127.0.0.10", 1))
    assert len(endpoint.peers) == 4
    endpoint.close()
    assert not endpoint._per_source and not endpoint._unproven  # no key left per source


class LoudScheme:
    """A scheme that answers a first flight with 4,800 bytes (as DTLS without cookies
    would with a certificate flight)."""

    up = False
    payload_limit = 1200
    address_validated = False

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.answered = False

    def start(self, now: float) -> list[Event]:
        return []

    def first_flight(self) -> bytes | None:
        return b"\x16hello"

    def receive(self, datagram: bytes, now: float) -> list[Event]:
        if not self.answered:  # its first flight, once
            self.answered = True
            self.out += [b"\x16" + b"x" * 1199] * 4
        return []

    def send(self, payload: bytes) -> None:
        raise AssertionError("never up")

    def datagrams_to_send(self) -> list[bytes]:
        out, self.out = self.out, []
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> list[Event]:
        return []

    def export(self) -> bytes:
        return b"\x00" * 32

    def close(self) -> list[Event]:
        return []


async def test_an_unvalidated_address_gets_at_most_3x_what_it_sent() -> None:
    me = PeerId.from_public_key(*_key())
    loud = PsecIdentity(me, lambda _: {DTLS: lambda _i: LoudScheme()})
    endpoint = PsecEndpoint(loud, on_event=lambda *_: None)
    transport = FakeTransport()
    endpoint.connection_made(transport)
    them = PeerId.from_public_key(*_key())
    proposal = Propose(them, (DTLS,), b"\x16hello").encode()
    victim = ("127.0.0.9", 4444)
    endpoint.datagram_received(proposal, victim)
    assert 0 < transport.sent[victim] <= 3 * len(proposal)
    held = endpoint.peers[victim].held_bytes
    assert held > 0  # the rest waits for more bytes from the address
    endpoint.datagram_received(b"\x16" + b"r" * 1000, victim)  # a retransmission, say
    assert transport.sent[victim] <= 3 * (len(proposal) + 1001)
    assert endpoint.peers[victim].held_bytes < held
    endpoint.close()


async def test_an_address_the_scheme_validated_gets_its_flight_whole() -> None:
    """A cookie or a Retry token that came back proves the address: a retransmitted
    certificate flight is no longer held to 3x (it would stall a handshake under loss)."""
    me = PeerId.from_public_key(*_key())
    validated = LoudScheme()
    validated.address_validated = True
    loud = PsecIdentity(me, lambda _: {DTLS: lambda _i: validated})
    endpoint = PsecEndpoint(loud, on_event=lambda *_: None)
    transport = FakeTransport()
    endpoint.connection_made(transport)
    them = PeerId.from_public_key(*_key())
    proposal = Propose(them, (DTLS,), b"\x16hello").encode()
    peer = ("127.0.0.9", 4444)
    endpoint.datagram_received(proposal, peer)
    assert transport.sent[peer] > 4 * 1200 and endpoint.peers[peer].held_bytes == 0
    endpoint.close()


def _key() -> tuple[Any, bytes]:
    public = PrivateKey.generate(KeyKind.ED25519).public_key()
    return public.libp2p_type, public.libp2p_data()
