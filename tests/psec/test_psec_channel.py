"""PSEC end to end in memory: negotiation, /dtls/1.2 with mutual authentication, the
confirm over the transcript, the peer ID bound to the certificate, datagrams."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from meshtools import LivePki

from trustmesh.pki.ca import CertificateAuthority
from trustmesh.psec.channel import ChannelClosed, ChannelData, ChannelUp, PsecChannel
from trustmesh.psec.frames import Propose, decode_frame, is_psec
from trustmesh.psec.identity import dtls_identity
from trustmesh.sansio import Event
from trustmesh.tls import TlsConfig
from trustmesh.wire.peerid import PeerId

DTLS = "/dtls/1.2"
WEAK = "/dtls/1.2-weak"  # the same scheme under a second name: what a downgrade picks


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[LivePki]:
    ca = CertificateAuthority.init(tmp_path / "ca", None, name="psec test CA")
    yield LivePki(ca)
    ca.close()


def node(
    config: TlsConfig, names: tuple[str, ...], *, expected_peer: PeerId | None = None
) -> tuple[PeerId, PsecChannel]:
    identity = dtls_identity(config, names)
    channel = PsecChannel(
        identity.peer_id, identity.factories_for(b""), expected_peer=expected_peer
    )
    return identity.peer_id, channel


class Wire:
    def __init__(self, a: PsecChannel, b: PsecChannel) -> None:
        self.ends = (a, b)
        self.events: dict[int, list[Event]] = {0: [], 1: []}
        self.tamper: Callable[[bytes], bytes] = lambda datagram: datagram
        self.now = 0.0

    def run(self, steps: int = 400) -> None:
        for _ in range(steps):
            moved = False
            for side in (0, 1):
                for datagram in self.ends[side].datagrams_to_send():
                    moved = True
                    datagram = self.tamper(datagram)
                    self.events[1 - side] += self.ends[1 - side].receive(datagram, self.now)
            if not moved:
                self.now += 0.25
                for side in (0, 1):
                    self.events[side] += self.ends[side].handle_timer(self.now)
            if all(e.up is not None or e.closed is not None for e in self.ends) and not moved:
                return

    def of(self, side: int, kind: type) -> list[Event]:
        return [e for e in self.events[side] if isinstance(e, kind)]


def test_a_dtls_channel_comes_up_authenticated_and_carries_datagrams(
    pki: LivePki, tmp_path: Path
) -> None:
    a_id, a = node(pki.config("node-a", tmp_path / "a"), (DTLS,))
    b_id, b = node(pki.config("node-b", tmp_path / "b"), (DTLS,))
    a.connect(0.0)
    wire = Wire(a, b)
    wire.run()
    (up_a,), (up_b,) = wire.of(0, ChannelUp), wire.of(1, ChannelUp)
    assert isinstance(up_a, ChannelUp) and isinstance(up_b, ChannelUp)
    assert up_a.scheme == up_b.scheme == DTLS
    assert up_a.initiator and not up_b.initiator
    assert up_a.peer_id == b_id and up_b.peer_id == a_id
    a.send(b"hello over psec")
    wire.run()
    assert wire.of(1, ChannelData) == [ChannelData(b"hello over psec")]


def test_simultaneous_proposals_come_up_on_one_scheme(pki: LivePki, tmp_path: Path) -> None:
    _, a = node(pki.config("node-a", tmp_path / "a"), (DTLS, WEAK))
    _, b = node(pki.config("node-b", tmp_path / "b"), (WEAK, DTLS))
    a.connect(0.0)
    b.connect(0.0)
    wire = Wire(a, b)
    wire.run()
    (up_a,), (up_b,) = wire.of(0, ChannelUp), wire.of(1, ChannelUp)
    assert isinstance(up_a, ChannelUp) and isinstance(up_b, ChannelUp)
    assert up_a.scheme == up_b.scheme and up_a.initiator != up_b.initiator


def test_a_downgraded_proposal_is_caught_by_the_confirm(pki: LivePki, tmp_path: Path) -> None:
    _, a = node(pki.config("node-a", tmp_path / "a"), (DTLS, WEAK))
    _, b = node(pki.config("node-b", tmp_path / "b"), (DTLS, WEAK))
    a.connect(0.0)
    wire = Wire(a, b)

    def strip_the_strong_scheme(datagram: bytes) -> bytes:
        if is_psec(datagram) and datagram[0] == 0:
            proposal = decode_frame(datagram, max_size=4096)
            assert isinstance(proposal, Propose)
            return Propose(proposal.peer_id, (WEAK,), None).encode()
        return datagram

    wire.tamper = strip_the_strong_scheme
    wire.run()
    assert a.up is None and b.up is None
    closed = wire.of(0, ChannelClosed) + wire.of(1, ChannelClosed)
    assert any("confirm does not match" in e.reason for e in closed)  # type: ignore[attr-defined]


def test_a_certificate_that_is_not_the_expected_peer_is_refused(
    pki: LivePki, tmp_path: Path
) -> None:
    impostor_id, _ = node(pki.config("node-x", tmp_path / "x"), (DTLS,))
    # We meant to reach x; b answers.
    _, a = node(pki.config("node-a", tmp_path / "a"), (DTLS,), expected_peer=impostor_id)
    _, b = node(pki.config("node-b", tmp_path / "b"), (DTLS,))
    a.connect(0.0)
    wire = Wire(a, b)
    wire.run()
    assert a.up is None
    (closed,) = wire.of(0, ChannelClosed)
    assert "is not" in closed.reason  # type: ignore[attr-defined]
