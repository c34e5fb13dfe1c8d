"""Revocation for the life of a PSEC channel, through the UDP driver: a peer whose
certificate is revoked while its channel is up is closed by ``revalidate()``, nothing it
sends after is delivered, and a new channel of the same certificate never comes up."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
from cryptography import x509
from meshtools import LivePki

from trustmesh.io.psec import REVOKED, Address, PsecEndpoint, open_psec
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.psec.channel import ChannelClosed, ChannelData, ChannelUp
from trustmesh.psec.identity import PsecIdentity, dtls_identity
from trustmesh.sansio import Event
from trustmesh.tls import TlsConfig

WAIT = 10.0
HOST = "127.0.0.1"


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Address, Event]] = []
        self.changed = asyncio.Event()

    def __call__(self, address: Address, event: Event) -> None:
        self.events.append((address, event))
        self.changed.set()

    async def wait_for(self, kind: type, address: Address | None = None) -> Event:
        async with asyncio.timeout(WAIT):
            while True:
                for at, event in self.events:
                    if isinstance(event, kind) and address in (None, at):
                        return event
                self.changed.clear()
                await self.changed.wait()

    def of(self, kind: type, address: Address | None = None) -> list[Event]:
        return [e for at, e in self.events if isinstance(e, kind) and address in (None, at)]


class Relay(asyncio.DatagramProtocol):
    """A UDP relay on loopback between ``a`` (who sends to the relay) and ``b``;
    ``drop(direction, datagram)`` says which datagrams it loses ("ab" or "ba")."""

    def __init__(self, a: Address, b: Address, drop: Callable[[str, bytes], bool]) -> None:
        self.a, self.b, self.drop = a, b, drop
        self.dropped = {"ab": 0, "ba": 0}
        self.lost = asyncio.Event()  # set at each datagram dropped
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        source = (str(addr[0]), int(str(addr[1])))
        direction, target = ("ab", self.b) if source == self.a else ("ba", self.a)
        if source not in (self.a, self.b):
            return
        if self.drop(direction, data):
            self.dropped[direction] += 1
            self.lost.set()
        elif self.transport is not None:
            self.transport.sendto(data, target)

    @property
    def address(self) -> Address:
        assert self.transport is not None
        return (HOST, int(self.transport.get_extra_info("sockname")[1]))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_relay(a: Address, b: Address, drop: Callable[[str, bytes], bool]) -> Relay:
    loop = asyncio.get_running_loop()
    _, relay = await loop.create_datagram_endpoint(lambda: Relay(a, b, drop), local_addr=(HOST, 0))
    return relay


def serial_of(config: TlsConfig) -> int:
    return x509.load_pem_x509_certificates(config.cert_file.read_bytes())[0].serial_number


@pytest.fixture
def configs(tmp_path: Path) -> Iterator[tuple[TlsConfig, TlsConfig]]:
    ca = CertificateAuthority.init(tmp_path / "ca", None, name="psec revocation CA")
    pki = LivePki(ca)
    yield pki.config("node-a", tmp_path / "a"), pki.config("node-b", tmp_path / "b")
    ca.close()


async def test_revalidate_closes_a_revoked_peers_channel_and_drops_what_it_sends_after(
    configs: tuple[TlsConfig, TlsConfig],
) -> None:
    a_config, b_config = configs
    a_identity: PsecIdentity = dtls_identity(a_config)
    revoked: set[int] = set()
    a_events, b_events, later_events = Recorder(), Recorder(), Recorder()
    a = await open_psec(a_identity, HOST, 0, on_event=a_events)
    b = await open_psec(
        dtls_identity(b_config), HOST, 0, on_event=b_events, is_revoked=revoked.__contains__
    )
    cut = {"ba": False}  # B's datagrams to A: lost once set, so A never hears B's close
    relay = await open_relay((HOST, a.port), (HOST, b.port), lambda way, _: cut.get(way, False))
    later: PsecEndpoint | None = None
    from_relay = asyncio.Event()
    received = b.datagram_received

    def watch(data: bytes, addr: tuple[str | object, ...]) -> None:
        received(data, addr)
        if (str(addr[0]), int(str(addr[1]))) == relay.address:
            from_relay.set()

    b.datagram_received = watch  # type: ignore[method-assign]
    try:
        a.connect(relay.address)
        await a_events.wait_for(ChannelUp)
        await b_events.wait_for(ChannelUp, relay.address)
        assert b.revalidate() == []  # nothing revoked yet
        a.send(relay.address, b"before")
        assert await b_events.wait_for(ChannelData) == ChannelData(b"before")

        revoked.add(serial_of(a_config))
        cut["ba"] = True
        assert b.revalidate() == [relay.address]
        assert b_events.events[-1] == (relay.address, ChannelClosed(REVOKED))
        assert relay.address not in b.peers
        async with asyncio.timeout(WAIT):
            await relay.lost.wait()  # the scheme sent its close (lost here)
        assert b.revalidate() == []  # once

        # A still holds an up channel and sends on it: B delivers none of it.
        from_relay.clear()
        a.send(relay.address, b"after")
        async with asyncio.timeout(WAIT):
            await from_relay.wait()  # B has taken the datagram, and dropped it
        assert b_events.of(ChannelData) == [ChannelData(b"before")]
        assert relay.address not in b.peers  # not a proposal: no state either

        # The same certificate's next channel is closed as it comes up, never delivered.
        later = await open_psec(a_identity, HOST, 0, on_event=later_events)
        later.connect((HOST, b.port))
        assert await b_events.wait_for(ChannelClosed, (HOST, later.port)) == ChannelClosed(REVOKED)
        assert b_events.of(ChannelUp, (HOST, later.port)) == []
        assert (HOST, later.port) not in b.peers
        assert await later_events.wait_for(ChannelClosed) == ChannelClosed(
            "peer closed the channel"
        )
    finally:
        relay.close()
        a.close()
        b.close()
        if later is not None:
            later.close()


async def test_a_failing_revocation_check_fails_closed(
    configs: tuple[TlsConfig, TlsConfig],
) -> None:
    a_config, b_config = configs
    broken = {"now": False}

    def is_revoked(serial: int) -> bool:
        if broken["now"]:
            raise RuntimeError("the revocation view is unreachable")
        return False

    a_events, b_events = Recorder(), Recorder()
    a = await open_psec(dtls_identity(a_config), HOST, 0, on_event=a_events)
    b = await open_psec(dtls_identity(b_config), HOST, 0, on_event=b_events, is_revoked=is_revoked)
    try:
        a.connect((HOST, b.port))
        await a_events.wait_for(ChannelUp)
        await b_events.wait_for(ChannelUp)
        broken["now"] = True
        assert b.revalidate() == [(HOST, a.port)]
        assert await a_events.wait_for(ChannelClosed) == ChannelClosed("peer closed the channel")
    finally:
        a.close()
        b.close()


async def test_without_a_revocation_check_revalidate_closes_nothing(
    configs: tuple[TlsConfig, TlsConfig],
) -> None:
    a_config, b_config = configs
    a_events, b_events = Recorder(), Recorder()
    a = await open_psec(dtls_identity(a_config), HOST, 0, on_event=a_events)
    b = await open_psec(dtls_identity(b_config), HOST, 0, on_event=b_events)
    try:
        a.connect((HOST, b.port))
        await b_events.wait_for(ChannelUp)
        assert b.revalidate() == []
        assert (HOST, a.port) in b.peers
    finally:
        a.close()
        b.close()
