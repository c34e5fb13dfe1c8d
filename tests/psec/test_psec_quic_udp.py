"""The /quic-datagram/1 scheme through the UDP driver on loopback: negotiated, mutually
authenticated, and carrying datagrams both ways (the driver re-arms the scheme's timer
after a send, which QUIC's pacing needs)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshtools import LivePki
from test_psec_udp import Recorder

from trustmesh.io.psec import open_psec
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.psec.channel import ChannelData, ChannelUp
from trustmesh.psec.identity import psec_identity
from trustmesh.psec.quic import NAME

DTLS = "/dtls/1.2"


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[LivePki]:
    ca = CertificateAuthority.init(tmp_path / "ca", None, name="psec test CA")
    yield LivePki(ca)
    ca.close()


async def test_a_quic_channel_over_udp_carries_datagrams_both_ways(
    pki: LivePki, tmp_path: Path
) -> None:
    a_identity = psec_identity(pki.config("node-a", tmp_path / "a"), (NAME, DTLS))
    b_identity = psec_identity(pki.config("node-b", tmp_path / "b"), (NAME, DTLS))
    a_events, b_events = Recorder(), Recorder()
    a = await open_psec(a_identity, "127.0.0.1", 0, on_event=a_events)
    b = await open_psec(b_identity, "127.0.0.1", 0, on_event=b_events)
    try:
        a.connect(("127.0.0.1", b.port), expected_peer=b_identity.peer_id)
        _, up = await a_events.wait_for(ChannelUp)
        source, their_up = await b_events.wait_for(ChannelUp)
        assert isinstance(up, ChannelUp) and up.scheme == NAME and up.initiator
        assert up.peer_id == b_identity.peer_id
        assert isinstance(their_up, ChannelUp) and their_up.peer_id == a_identity.peer_id
        sent = [f"ping {n}".encode() for n in range(40)]  # more than one pacing burst
        for data in sent:
            a.send(("127.0.0.1", b.port), data)
        async with asyncio.timeout(10):
            while (
                len(received := [e for _, e in b_events.events if isinstance(e, ChannelData)]) < 40
            ):
                b_events.changed.clear()
                await b_events.changed.wait()
        assert sorted(e.data for e in received) == sorted(sent)
        b.send(source, b"pong")
        _, echoed = await a_events.wait_for(ChannelData)
        assert echoed == ChannelData(b"pong")
    finally:
        a.close()
        b.close()
