"""Mesh links over real TLS 1.3 on loopback, against a peer that stops reading (issue 15).

The server side runs as a node does: a :class:`~trustmesh.node.links.Link` over a
stream driver, pushing gossip without waiting for the peer. The attacker is an honest
core on a driver that never takes its events, so that it stops reading from its socket
once TLS is up and its HELLO is out: whatever the server sends piles up on its side.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from trustmesh.errors import ConnectionClosedError
from trustmesh.io.limits import ResourcePolicy
from trustmesh.io.stream import StreamDriver, StreamServer, serve_stream
from trustmesh.mesh.link import ALPN, CloseCode, LinkClosed, LinkConfig, MeshLink
from trustmesh.node.links import Link, LinkFailed
from trustmesh.tls import TlsConfig, TlsContext, TlsStream
from trustmesh.tls.stream import certificate_names

WAIT = 10.0  # bound on any single wait; everything here takes milliseconds
HOST = "127.0.0.1"
MAX_WRITE_BUFFER = 128 * 1024
GOSSIP = b"g" * 16 * 1024
TLS_OVERHEAD = 1024  # record headers and tags around one gossip frame, generously


@dataclass(frozen=True)
class Certs:
    directory: Path
    ca: Path

    def context(self, name: str, *, server: bool) -> TlsContext:
        config = TlsConfig(
            self.directory / f"{name}.pem", self.directory / f"{name}.key", self.ca, alpn=(ALPN,)
        )
        return TlsContext(config, server=server)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("mesh-link-pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    for name in ("node-a", "node-b"):
        leaf = ca.issue_cert(name)
        leaf.cert_chain_pems[0].write_to_path(str(directory / f"{name}.pem"))
        leaf.private_key_pem.write_to_path(str(directory / f"{name}.key"))
    return Certs(directory, directory / "ca.pem")


def authorize(chain: Sequence[x509.Certificate]) -> str:
    """The peer's node id: the ``node-*`` name its (verified) certificate carries."""
    return min(n for n in certificate_names(chain[0]) if n.startswith("node-"))


@dataclass
class Server:
    """node-b's link listener: each connection becomes a :class:`Link`."""

    server: StreamServer[TlsStream]
    links: list[Link] = field(default_factory=list)
    accepted: asyncio.Event = field(default_factory=asyncio.Event)

    async def first_link(self) -> Link:
        async with asyncio.timeout(WAIT):
            await self.accepted.wait()
        return self.links[0]


@pytest.fixture
async def server(certs: Certs) -> AsyncIterator[Server]:
    context = certs.context("node-b", server=True)
    holder: list[Server] = []

    def new_core() -> TlsStream:
        core = MeshLink(LinkConfig("node-b"), initiator=False, authorize=authorize)
        stream = TlsStream(context, core)
        core.bind(stream)
        return stream

    def accepted(driver: StreamDriver[TlsStream]) -> None:
        core = driver.core.inner
        assert isinstance(core, MeshLink)
        holder[0].links.append(Link(driver, core, address=None, on_event=lambda *_: None))
        holder[0].accepted.set()

    async def run(driver: StreamDriver[TlsStream]) -> None:
        await driver.wait_closed()

    policy = ResourcePolicy(max_write_buffer=MAX_WRITE_BUFFER)
    stream_server = await serve_stream(
        new_core, run, HOST, 0, on_accept=accepted, policy=policy, name="mesh links"
    )
    holder.append(Server(stream_server))
    async with stream_server:
        yield holder[0]


async def deaf_peer(certs: Certs, port: int, hold_time: int) -> StreamDriver[TlsStream]:
    """node-a, dialling with an honest HELLO offering ``hold_time``, then reading nothing:
    its driver holds one event at most and nobody takes it."""
    core = MeshLink(LinkConfig("node-a", hold_time=hold_time), initiator=True, authorize=authorize)
    stream = TlsStream(certs.context("node-a", server=False), core)
    core.bind(stream)
    loop = asyncio.get_running_loop()
    _, driver = await loop.create_connection(
        lambda: StreamDriver(stream, max_pending_events=1), HOST, port
    )
    return driver


def write_buffer(link: Link) -> int:
    transport = link.driver._transport  # what the driver has not handed to the kernel
    return transport.get_write_buffer_size() if transport is not None else 0


@pytest.mark.parametrize("hold_time", [30, 0])
async def test_a_peer_that_stops_reading_after_hello_is_cut_off(
    certs: Certs, server: Server, hold_time: int
) -> None:
    """Without the limits, node-b's unsent bytes grew without bound (6.9 MB in 10 s).

    A peer offering hold time 0 is refused at its HELLO; any other is cut off once
    what it leaves unread passes max_write_buffer, however fast we push.
    """
    peer = await deaf_peer(certs, server.server.port, hold_time)
    try:
        link = await server.first_link()
        if hold_time == 0:
            with pytest.raises(LinkFailed, match="hold_time 0") as refused:
                async with asyncio.timeout(WAIT):
                    await link.wait_up()
            assert refused.value.code == CloseCode.REFUSED
        else:
            async with asyncio.timeout(WAIT):
                await link.wait_up()
        bound = MAX_WRITE_BUFFER + len(GOSSIP) + TLS_OVERHEAD  # one write past the limit
        async with asyncio.timeout(WAIT):
            while not link.driver.closed:  # push gossip the way a node does: no drain()
                link.send_gossip(GOSSIP)
                assert write_buffer(link) <= bound
                await asyncio.sleep(0)  # let the transport write what the kernel takes
            closed = await link.wait_closed()
        if hold_time == 0:
            assert isinstance(closed, LinkClosed) and closed.code == CloseCode.REFUSED
        else:
            assert closed.error and "max_write_buffer" in closed.reason
        assert server.server.listener.stats.counts["max_write_buffer"] == (1 if hold_time else 0)
    finally:
        peer.abort("test over")
        await peer.wait_closed()
    with pytest.raises(ConnectionClosedError):
        link.driver.act(lambda tls: [])
