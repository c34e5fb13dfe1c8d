"""TLS 1.3 mutual authentication through :class:`TlsStream`: full sessions over loopback TCP
through the asyncio driver, refusals (TLS 1.2, missing or foreign certificates, revoked
certificates), resumption, the handshake timer and hostile input (sans-IO), and interop
with the ``openssl`` command line in both roles.

The inner protocol is :class:`LineCore`, a newline-framed core defined here, so that the
``openssl`` tools (which send and print raw lines) can talk to it.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from trustmesh.io import StreamDriver, StreamServer, open_stream, serve_stream
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.tls import (
    TlsConfig,
    TlsContext,
    TlsEstablished,
    TlsStream,
    hybrid_group_available,
)

WAIT = 5.0  # upper bound on any single wait; tests finish far sooner
ALPN = "catalyst/1"
EXPECTED_GROUP = "X25519MLKEM768" if hybrid_group_available() else "X25519"
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.usefixtures("require_openssl")  # fails, never skips, without it


# --- the inner protocol -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Line(Event):
    data: bytes


class LineCore:
    """Newline-framed lines; ``echo`` sends every line back. EOF closes it (by the peer);
    :meth:`close` closes it without a goodbye of its own, so TLS's close_notify is the only
    goodbye on the wire."""

    def __init__(self, *, echo: bool = False) -> None:
        self.echo = echo
        self.started = False
        self.saw_eof = False
        self._buffer = b""
        self._out = bytearray()
        self._closed = False

    def start(self, now: float) -> list[Event]:
        self.started = True
        return []

    def send(self, data: bytes) -> list[Event]:
        self._out += data + b"\n"
        return []

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        if self._closed:
            return []
        if not data:
            self.saw_eof = True
            self._closed = True
            return [ConnectionClosed("peer sent EOF", by_peer=True)]
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        events: list[Event] = []
        for line in lines:
            events.append(Line(line))
            if self.echo:
                self._out += line + b"\n"
        return events

    def handle_timer(self, now: float) -> list[Event]:
        return []

    def get_timer(self) -> float | None:
        return None

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def close(self, reason: str, now: float) -> list[Event]:
        if self._closed:
            return []
        self._closed = True
        return [ConnectionClosed(reason)]


# --- certificates -------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path
    san: str


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA bundle every test side trusts
    other_ca: Path
    server: Identity
    client: Identity
    revoked: Identity  # issued by the CA, revoked by ``crl``
    foreign_server: Identity  # issued by another CA
    foreign_client: Identity
    crl: Path

    def context(
        self,
        who: Identity,
        *,
        server: bool,
        alpn: tuple[str, ...] = (ALPN,),
        crl: bool = False,
        post_quantum: bool = True,
    ) -> TlsContext:
        config = TlsConfig(
            who.cert,
            who.key,
            self.ca,
            crl_file=self.crl if crl else None,
            alpn=alpn,
            post_quantum=post_quantum,
        )
        return TlsContext(config, server=server)


def _issue(ca: trustme.CA, san: str, directory: Path) -> Identity:
    leaf = ca.issue_cert(san)
    cert, key = directory / f"{san}.pem", directory / f"{san}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return Identity(cert, key, san)


def _write_crl(ca: trustme.CA, revoked: Identity, path: Path) -> None:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    serial = x509.load_pem_x509_certificate(revoked.cert.read_bytes()).serial_number
    now = datetime.datetime.now(datetime.UTC)
    entry = (
        x509.RevokedCertificateBuilder()
        .serial_number(serial)
        .revocation_date(now - datetime.timedelta(minutes=5))
        .build()
    )
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=1))
        .add_revoked_certificate(entry)
        .sign(ca_key, hashes.SHA256())
    )
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    other.cert_pem.write_to_path(str(directory / "other-ca.pem"))
    revoked = _issue(ca, "revoked.example", directory)
    _write_crl(ca, revoked, directory / "crl.pem")
    return Pki(
        ca=directory / "ca.pem",
        other_ca=directory / "other-ca.pem",
        server=_issue(ca, "server.example", directory),
        client=_issue(ca, "client.example", directory),
        revoked=revoked,
        foreign_server=_issue(other, "foreign-server.example", directory),
        foreign_client=_issue(other, "foreign-client.example", directory),
        crl=directory / "crl.pem",
    )


def san_of(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return ext.value.get_values_for_type(x509.DNSName)


# --- the server side over TCP ---------------------------------------------------------------


@dataclass
class ServerConn:
    """One accepted connection as the server's handler saw it."""

    driver: StreamDriver[TlsStream]
    inner: LineCore
    events: list[Event] = field(default_factory=list)

    @property
    def stream(self) -> TlsStream:
        return self.driver.core

    @property
    def established(self) -> TlsEstablished:
        found = [e for e in self.events if isinstance(e, TlsEstablished)]
        assert len(found) == 1, self.events
        return found[0]

    @property
    def closed(self) -> ConnectionClosed:
        assert self.events, "no events"
        last = self.events[-1]
        assert isinstance(last, ConnectionClosed), self.events
        return last


class TlsServer:
    """A TLS server over loopback: every connection runs ``TlsStream(context, LineCore)``
    (echoing lines back), and the handler records each connection's events."""

    def __init__(self, context: TlsContext) -> None:
        self.context = context
        self.established: asyncio.Queue[ServerConn] = asyncio.Queue()
        self.finished: asyncio.Queue[ServerConn] = asyncio.Queue()
        self._server: StreamServer[TlsStream] | None = None

    async def listen(self) -> None:
        self._server = await serve_stream(self._new_core, self._handle, "127.0.0.1", 0)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def server(self) -> StreamServer[TlsStream]:
        assert self._server is not None
        return self._server

    @property
    def port(self) -> int:
        return self.server.port

    def _new_core(self) -> TlsStream:
        return TlsStream(self.context, LineCore(echo=True))

    async def _handle(self, driver: StreamDriver[TlsStream]) -> None:
        inner = driver.core.inner
        assert isinstance(inner, LineCore)
        conn = ServerConn(driver, inner)
        try:
            async for event in driver:
                conn.events.append(event)
                if isinstance(event, TlsEstablished):
                    self.established.put_nowait(conn)
        finally:
            self.finished.put_nowait(conn)

    async def next_established(self) -> ServerConn:
        async with asyncio.timeout(WAIT):
            return await self.established.get()

    async def next_finished(self) -> ServerConn:
        async with asyncio.timeout(WAIT):
            return await self.finished.get()


@pytest.fixture
async def servers() -> AsyncIterator[list[TlsServer]]:
    """Servers the test started with :func:`serve`; closed after the test."""
    started: list[TlsServer] = []
    yield started
    for server in started:
        await server.aclose()


async def serve(servers: list[TlsServer], context: TlsContext) -> TlsServer:
    server = TlsServer(context)
    await server.listen()
    servers.append(server)
    return server


# --- the client side over TCP ---------------------------------------------------------------


@dataclass
class Client:
    driver: StreamDriver[TlsStream]
    inner: LineCore

    @property
    def stream(self) -> TlsStream:
        return self.driver.core

    async def next_event(self) -> Event:
        async with asyncio.timeout(WAIT):
            return await self.driver.next_event()

    async def established(self) -> TlsEstablished:
        event = await self.next_event()
        assert isinstance(event, TlsEstablished), event
        return event

    async def next_line(self) -> bytes:
        event = await self.next_event()
        assert isinstance(event, Line), event
        return event.data

    async def rest(self) -> list[Event]:
        """Every event up to and including the ConnectionClosed."""
        events: list[Event] = []
        async with asyncio.timeout(WAIT):
            async for event in self.driver:
                events.append(event)
        return events

    async def close(self) -> ConnectionClosed:
        self.driver.close("client done")
        async with asyncio.timeout(WAIT):
            return await self.driver.wait_closed()


async def connect(port: int, context: TlsContext, session: SSL.Session | None = None) -> Client:
    inner = LineCore()
    stream = TlsStream(context, inner, session=session, server_name="server.example")
    async with asyncio.timeout(WAIT):
        driver = await open_stream(stream, "127.0.0.1", port)
    return Client(driver, inner)


# --- full session -------------------------------------------------------------------------


async def test_mutual_tls_session(pki: Pki, servers: list[TlsServer]) -> None:
    server = await serve(servers, pki.context(pki.server, server=True))
    client = await connect(server.port, pki.context(pki.client, server=False))

    mine = await client.established()
    theirs = await server.next_established()
    assert san_of(mine.peer_chain[0]) == ["server.example"]
    assert san_of(theirs.established.peer_chain[0]) == ["client.example"]
    for event in (mine, theirs.established):
        assert event.alpn == ALPN
        assert event.group == EXPECTED_GROUP
        assert not event.resumed
    assert client.inner.started and theirs.inner.started
    assert "server.example" in client.stream.peer_names()
    assert "client.example" in theirs.stream.peer_names()

    # messages both ways: the server's inner core echoes, and sends one of its own
    client.driver.act(lambda _: client.inner.send(b"hello over tls"))
    assert await client.next_line() == b"hello over tls"
    big = bytes(range(33, 127)) * 1000  # several TLS records
    client.driver.act(lambda _: client.inner.send(big))
    assert await client.next_line() == big
    assert [e.data for e in theirs.events if isinstance(e, Line)] == [b"hello over tls", big]
    theirs.driver.act(lambda _: theirs.inner.send(b"from the server"))
    assert await client.next_line() == b"from the server"

    # the RFC 8446 exporter agrees across the connection
    label, other_label, context = b"EXPORTER-trustmesh-test", b"EXPORTER-other", b"ctx"
    ours = client.stream.export_keying_material(label, 32, context)
    assert len(ours) == 32
    assert ours == theirs.stream.export_keying_material(label, 32, context)
    assert ours != client.stream.export_keying_material(other_label, 32, context)
    assert ours != client.stream.export_keying_material(label, 32, b"another context")
    assert client.stream.exporter(label, context) == ours
    assert client.stream.export_keying_material(other_label, 48, None) == (
        theirs.stream.export_keying_material(other_label, 48, None)
    )

    # orderly close: our close_notify reaches the server, whose inner core sees EOF
    closed = await client.close()
    assert closed == ConnectionClosed("client done")
    done = await server.next_finished()
    assert done is theirs
    assert done.inner.saw_eof
    assert not done.closed.error and done.closed.by_peer
    assert "EOF" in done.closed.reason


async def test_server_closes_orderly_too(pki: Pki, servers: list[TlsServer]) -> None:
    server = await serve(servers, pki.context(pki.server, server=True))
    client = await connect(server.port, pki.context(pki.client, server=False))
    await client.established()
    conn = await server.next_established()
    conn.driver.close("server done")
    events = await client.rest()
    assert client.inner.saw_eof
    last = events[-1]
    assert isinstance(last, ConnectionClosed)
    assert not last.error and last.by_peer
    assert (await server.next_finished()) is conn
    assert conn.closed == ConnectionClosed("server done")


def test_close_notify_alone_ends_the_inner_stream(pki: Pki) -> None:
    """Sans-IO: the peer's close_notify, with no TCP EOF, is an EOF for the inner core."""
    client_inner, server_inner = LineCore(), LineCore()
    client = TlsStream(pki.context(pki.client, server=False), client_inner)
    server = TlsStream(pki.context(pki.server, server=True), server_inner)
    client_events, server_events = handshake(client, server)
    assert any(isinstance(e, TlsEstablished) for e in client_events)
    assert any(isinstance(e, TlsEstablished) for e in server_events)
    assert client.close("bye", 1.0) == [ConnectionClosed("bye")]
    goodbye = client.data_to_send()
    assert goodbye  # the close_notify alert
    assert server.receive_data(goodbye, 1.0) == [ConnectionClosed("peer sent EOF", by_peer=True)]
    assert server_inner.saw_eof
    assert server.data_to_send()  # its own close_notify in return
    assert server.receive_data(b"more", 2.0) == []


@pytest.mark.parametrize("server_alpn", [(), ("other/1",)], ids=["none", "no-overlap"])
async def test_alpn_none_without_a_common_protocol(
    pki: Pki, servers: list[TlsServer], server_alpn: tuple[str, ...]
) -> None:
    server = await serve(servers, pki.context(pki.server, server=True, alpn=server_alpn))
    client = await connect(server.port, pki.context(pki.client, server=False))
    assert (await client.established()).alpn is None
    assert (await server.next_established()).established.alpn is None
    await client.close()


# --- refusals -----------------------------------------------------------------------------


def stdlib_client(port: int, context: ssl.SSLContext) -> None:
    """A blocking stdlib TLS client: handshake, then read (TLS 1.3 refusals come after the
    client's handshake completes)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock,
        context.wrap_socket(sock, server_hostname="server.example") as tls,
    ):
        tls.sendall(b"hello\n")
        tls.recv(100)


def stdlib_context(pki: Pki, *, tls12: bool, cert: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(pki.ca))
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert:
        context.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    return context


async def test_tls12_client_is_refused(pki: Pki, servers: list[TlsServer]) -> None:
    server = await serve(servers, pki.context(pki.server, server=True))
    context = stdlib_context(pki, tls12=True, cert=True)
    with pytest.raises(ssl.SSLError):
        async with asyncio.timeout(WAIT):
            await asyncio.to_thread(stdlib_client, server.port, context)
    conn = await server.next_finished()
    assert not any(isinstance(e, TlsEstablished) for e in conn.events)
    assert not conn.inner.started
    assert conn.closed.error
    assert "TLS" in conn.closed.reason
    assert "protocol" in conn.closed.reason


async def test_client_without_certificate_is_refused(pki: Pki, servers: list[TlsServer]) -> None:
    server = await serve(servers, pki.context(pki.server, server=True))
    context = stdlib_context(pki, tls12=False, cert=False)
    with pytest.raises(ssl.SSLError, match="certificate"):
        async with asyncio.timeout(WAIT):
            await asyncio.to_thread(stdlib_client, server.port, context)
    conn = await server.next_finished()
    assert conn.events == [conn.closed]
    assert conn.closed.error and "certificate" in conn.closed.reason
    assert not conn.inner.started


async def test_client_from_another_ca_is_refused(pki: Pki, servers: list[TlsServer]) -> None:
    server = await serve(servers, pki.context(pki.server, server=True))
    client = await connect(server.port, pki.context(pki.foreign_client, server=False))
    events = await client.rest()
    # our client finished its side of the handshake but never claims the session
    assert len(events) == 1, events
    closed = events[0]
    assert isinstance(closed, ConnectionClosed) and closed.error
    assert "unknown ca" in closed.reason or "certificate" in closed.reason
    assert not client.inner.started
    conn = await server.next_finished()
    assert conn.events == [conn.closed]
    assert conn.closed.error and "certificate" in conn.closed.reason


async def test_server_from_another_ca_is_refused(pki: Pki, servers: list[TlsServer]) -> None:
    server = await serve(servers, pki.context(pki.foreign_server, server=True))
    client = await connect(server.port, pki.context(pki.client, server=False))
    events = await client.rest()
    assert len(events) == 1, events
    closed = events[0]
    assert isinstance(closed, ConnectionClosed) and closed.error
    assert "certificate verify failed" in closed.reason
    assert not client.inner.started
    conn = await server.next_finished()
    assert conn.events == [conn.closed]
    assert conn.closed.error and "unknown ca" in conn.closed.reason


async def test_revoked_client_is_refused(pki: Pki, servers: list[TlsServer]) -> None:
    server = await serve(servers, pki.context(pki.server, server=True, crl=True))
    revoked = await connect(server.port, pki.context(pki.revoked, server=False))
    events = await revoked.rest()
    assert len(events) == 1 and isinstance(events[0], ConnectionClosed), events
    assert events[0].error and "revoked" in events[0].reason  # the server's alert says why
    conn = await server.next_finished()
    # the server names the failed check too (test_server_says_why_it_refused_a_revoked_client)
    assert conn.closed.error and "certificate" in conn.closed.reason
    assert not conn.inner.started

    good = await connect(server.port, pki.context(pki.client, server=False))
    assert san_of((await good.established()).peer_chain[0]) == ["server.example"]
    accepted = await server.next_established()
    assert san_of(accepted.established.peer_chain[0]) == ["client.example"]
    good.driver.act(lambda _: good.inner.send(b"still welcome"))
    assert await good.next_line() == b"still welcome"
    await good.close()


async def test_eof_during_handshake(pki: Pki, servers: list[TlsServer]) -> None:
    server = await serve(servers, pki.context(pki.server, server=True))
    hello = TlsStream(pki.context(pki.client, server=False), LineCore())
    hello.start(0.0)
    client_hello = hello.data_to_send()
    async with asyncio.timeout(WAIT):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(client_hello[: len(client_hello) // 2])
        writer.write_eof()
        conn = await server.next_finished()
        writer.close()
        await writer.wait_closed()
    assert conn.events == [conn.closed]
    assert conn.closed.error and conn.closed.by_peer
    assert "during the TLS handshake" in conn.closed.reason


# --- resumption ---------------------------------------------------------------------------


async def test_resumption(pki: Pki, servers: list[TlsServer]) -> None:
    server = await serve(servers, pki.context(pki.server, server=True))
    client_context = pki.context(pki.client, server=False)
    first = await connect(server.port, client_context)
    assert not (await first.established()).resumed
    assert not (await server.next_established()).established.resumed
    session = first.stream.session()
    assert session is not None
    await first.close()

    again = await connect(server.port, client_context, session=session)
    resumed = await again.established()
    assert resumed.resumed
    resumed_conn = await server.next_established()
    assert resumed_conn.established.resumed
    # the names survive resumption as well as the chain
    assert "server.example" in again.stream.peer_names()
    assert "client.example" in resumed_conn.stream.peer_names()
    again.driver.act(lambda _: again.inner.send(b"resumed"))
    assert await again.next_line() == b"resumed"
    await again.close()

    fresh = await connect(server.port, client_context)
    assert not (await fresh.established()).resumed
    assert not (await server.next_established()).established.resumed
    await fresh.close()


# --- sans-IO: handshake helper, timer, hostile input -----------------------------------------


def handshake(
    client: TlsStream, server: TlsStream, *, now: float = 0.0
) -> tuple[list[Event], list[Event]]:
    """Run both cores against each other in memory until neither has anything to send."""
    client_events = client.start(now)
    server_events = server.start(now)
    for _ in range(10):
        to_server, to_client = client.data_to_send(), server.data_to_send()
        if not to_server and not to_client:
            break
        if to_server:
            server_events += server.receive_data(to_server, now)
        if to_client:
            client_events += client.receive_data(to_client, now)
    return client_events, server_events


@pytest.mark.parametrize("role", ["client", "server"])
def test_handshake_timeout(pki: Pki, role: str) -> None:
    who = pki.client if role == "client" else pki.server
    stream = TlsStream(pki.context(who, server=role == "server"), LineCore())
    assert stream.get_timer() is None
    stream.start(0.0)
    assert stream.get_timer() == 10.0
    assert stream.handle_timer(9.999) == []
    events = stream.handle_timer(10.0)
    assert len(events) == 1 and isinstance(events[0], ConnectionClosed), events
    assert events[0].error and "timed out" in events[0].reason
    assert stream.get_timer() is None
    assert stream.handle_timer(20.0) == []
    assert stream.receive_data(b"\x16\x03\x01", 20.0) == []


def test_handshake_timeout_is_configurable(pki: Pki) -> None:
    stream = TlsStream(pki.context(pki.server, server=True), LineCore(), handshake_timeout=2.5)
    stream.start(100.0)
    assert stream.get_timer() == 102.5


def test_no_timer_once_established(pki: Pki) -> None:
    client = TlsStream(pki.context(pki.client, server=False), LineCore())
    server = TlsStream(pki.context(pki.server, server=True), LineCore())
    handshake(client, server)
    assert client.connected and server.connected
    assert client.get_timer() is None and server.get_timer() is None  # LineCore has none
    assert client.handle_timer(1000.0) == []


@pytest.fixture(scope="module")
def client_hello(pki: Pki) -> bytes:
    stream = TlsStream(pki.context(pki.client, server=False), LineCore())
    stream.start(0.0)
    return stream.data_to_send()


def chunked(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(points):
        if end > start:
            yield data[start:end]


@st.composite
def hostile_input(draw: st.DrawFn, hello: bytes) -> tuple[bytes, list[int], bool]:
    """Garbage for a server: random bytes, record-shaped garbage (either of them maybe after
    a genuine ClientHello, so the garbage reaches the encrypted part of the handshake), or
    a mutated ClientHello; plus where to cut it into chunks and whether EOF follows."""
    kind = draw(st.sampled_from(["random", "record", "mutated-hello"]))
    data: bytes
    if kind == "random":
        data = draw(st.binary(min_size=1, max_size=2000))
    elif kind == "record":  # plausible record headers with garbage bodies
        content_type = draw(st.sampled_from([20, 21, 22, 23, 24, 0, 255]))
        body = draw(st.binary(max_size=600))
        length = draw(st.one_of(st.just(len(body)), st.integers(0, 0xFFFF)))
        data = bytes([content_type, 3, draw(st.integers(0, 4))]) + length.to_bytes(2, "big")
        data += body + draw(st.binary(max_size=50))
    else:
        mutated = bytearray(hello)
        for _ in range(draw(st.integers(1, 8))):
            mutated[draw(st.integers(0, len(mutated) - 1))] = draw(st.integers(0, 255))
        data = bytes(mutated[: draw(st.integers(1, len(mutated)))])
        data += draw(st.binary(max_size=100))
    if kind != "mutated-hello" and draw(st.booleans()):
        data = hello + data
    cuts = draw(st.lists(st.integers(0, 4000), max_size=10))
    return data, cuts, draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_hostile_input_to_server(pki: Pki, client_hello: bytes, data: st.DataObject) -> None:
    payload, cuts, eof = data.draw(hostile_input(client_hello))
    inner = LineCore()
    server = TlsStream(pki.context(pki.server, server=True), inner)
    events = server.start(0.0)
    now = 0.0
    for chunk in chunked(payload, cuts):
        now += 0.01
        events += server.receive_data(chunk, now)
        server.data_to_send()
        server.get_timer()
    if eof:
        events += server.receive_data(b"", now)
    events += server.handle_timer(now + 10.0)  # the handshake never completes
    assert not any(isinstance(e, TlsEstablished) for e in events)
    assert not inner.started
    closes = [e for e in events if isinstance(e, ConnectionClosed)]
    assert len(closes) == 1, events
    assert events[-1] is closes[0] and closes[0].error
    # after the close, nothing more comes out
    assert server.receive_data(client_hello, now + 11) == []
    assert server.receive_data(b"", now + 11) == []
    assert server.handle_timer(now + 20) == []
    assert server.close("again", now + 20) == []
    assert server.get_timer() is None
    server.data_to_send()


@settings(max_examples=60, deadline=None)
@given(payload=st.binary(min_size=1, max_size=1500), cuts=st.lists(st.integers(0, 2000)))
def test_hostile_input_to_client(pki: Pki, payload: bytes, cuts: list[int]) -> None:
    inner = LineCore()
    client = TlsStream(pki.context(pki.client, server=False), inner)
    events = client.start(0.0)
    client.data_to_send()
    for chunk in chunked(payload, cuts):
        events += client.receive_data(chunk, 0.5)
        client.data_to_send()
    events += client.handle_timer(10.0)
    assert not any(isinstance(e, TlsEstablished) for e in events)
    assert not inner.started
    closes = [e for e in events if isinstance(e, ConnectionClosed)]
    assert len(closes) == 1 and events[-1] is closes[0] and closes[0].error
    assert client.receive_data(b"\x17\x03\x03\x00\x01x", 11.0) == []


# --- regressions: bugs found and fixed ----------------------------------------------------------


def test_client_needs_a_whole_record_before_trusting_the_server(pki: Pki) -> None:
    inner = LineCore()
    client = TlsStream(pki.context(pki.foreign_client, server=False), inner)
    server = TlsStream(pki.context(pki.server, server=True), LineCore())
    events = client.start(0.0)
    server.start(0.0)
    for _ in range(5):
        to_server, to_client = client.data_to_send(), server.data_to_send()
        if not to_server and not to_client:
            break
        if to_server:
            server.receive_data(to_server, 0.0)
        for i in range(len(to_client)):  # TCP may split the server's alert anywhere
            events += client.receive_data(to_client[i : i + 1], 0.0)
    assert any(isinstance(e, ConnectionClosed) and e.error for e in events), events
    assert not any(isinstance(e, TlsEstablished) for e in events), events
    assert not inner.started


def test_resumed_session_still_names_the_peer(pki: Pki) -> None:
    client_context = pki.context(pki.client, server=False)
    server_context = pki.context(pki.server, server=True)
    first = TlsStream(client_context, LineCore())
    handshake(first, TlsStream(server_context, LineCore()))
    session = first.session()
    assert session is not None
    client_events, server_events = handshake(
        TlsStream(client_context, LineCore(), session=session),
        TlsStream(server_context, LineCore()),
    )
    for events, peer in ((client_events, "server.example"), (server_events, "client.example")):
        (established,) = [e for e in events if isinstance(e, TlsEstablished)]
        assert established.resumed
        assert established.peer_chain, f"a resumed session does not name {peer}"
        assert san_of(established.peer_chain[0]) == [peer]


def test_classic_group_is_named_like_the_configuration(pki: Pki) -> None:
    client = TlsStream(pki.context(pki.client, server=False, post_quantum=False), LineCore())
    server = TlsStream(pki.context(pki.server, server=True, post_quantum=False), LineCore())
    client_events, server_events = handshake(client, server)
    groups = [e.group for e in client_events + server_events if isinstance(e, TlsEstablished)]
    assert groups == ["X25519", "X25519"]


def test_server_says_why_it_refused_a_revoked_client(pki: Pki) -> None:
    client = TlsStream(pki.context(pki.revoked, server=False), LineCore())
    server = TlsStream(pki.context(pki.server, server=True, crl=True), LineCore())
    _, server_events = handshake(client, server)
    (closed,) = server_events
    assert isinstance(closed, ConnectionClosed) and closed.error
    assert "revoked" in closed.reason


class Greeter(LineCore):
    """An inner core that speaks first: it queues a line when it starts."""

    def start(self, now: float) -> list[Event]:
        super().start(now)
        self.send(b"welcome")
        return []


def test_data_to_send_after_a_fatal_record_does_not_raise(pki: Pki) -> None:
    client = TlsStream(pki.context(pki.client, server=False), LineCore())
    server = TlsStream(pki.context(pki.server, server=True), Greeter())
    server.start(0.0)
    client.start(0.0)
    server.receive_data(client.data_to_send(), 0.0)  # ClientHello
    client.receive_data(server.data_to_send(), 0.0)  # the client's handshake completes
    forged = b"\x17\x03\x03\x00\x20" + bytes(32)  # an application record that fails to decrypt
    events = server.receive_data(client.data_to_send() + forged, 0.0)
    assert isinstance(events[-1], ConnectionClosed) and events[-1].error
    server.data_to_send()  # must not raise: the driver would log "internal error" and abort


# --- interop with the openssl command line --------------------------------------------------


def openssl_version() -> tuple[int, int]:
    assert OPENSSL is not None
    out = subprocess.run(
        [OPENSSL, "version"], capture_output=True, text=True, check=True, timeout=WAIT
    ).stdout
    match = re.search(r"OpenSSL (\d+)\.(\d+)", out)
    assert match, out
    return int(match[1]), int(match[2])


def expected_openssl_groups() -> set[str]:
    """The group (casefolded) we agree on with the openssl tool: OpenSSL 3.5+ offers the
    hybrid group; older builds (Debian's 3.0) only the classic one."""
    if openssl_version() >= (3, 5) and hybrid_group_available():
        return {"x25519mlkem768"}
    return {"x25519"}


async def read_until(
    stream: asyncio.StreamReader, wanted: bytes, seen: bytearray | None = None
) -> bytes:
    """Lines from ``stream`` until one contains ``wanted``; returns everything read."""
    out = seen if seen is not None else bytearray()
    async with asyncio.timeout(WAIT):
        while True:
            line = await stream.readline()
            out += line
            if wanted in line:
                return bytes(out)
            if not line:
                raise AssertionError(
                    f"{wanted!r} never came; output:\n{out.decode(errors='replace')}"
                )


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    async with asyncio.timeout(WAIT):
        await proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@needs_openssl
async def test_openssl_s_client_against_our_server(pki: Pki, servers: list[TlsServer]) -> None:
    assert OPENSSL is not None
    server = await serve(servers, pki.context(pki.server, server=True))
    proc = await asyncio.create_subprocess_exec(
        OPENSSL, "s_client", "-connect", f"127.0.0.1:{server.port}", "-tls1_3",
        "-cert", str(pki.client.cert), "-key", str(pki.client.key), "-CAfile", str(pki.ca),
        "-verify_return_error", "-alpn", ALPN, "-servername", "server.example",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdin is not None and proc.stdout is not None
        conn = await server.next_established()
        assert san_of(conn.established.peer_chain[0]) == ["client.example"]
        assert conn.established.alpn == ALPN
        assert conn.established.group is not None
        assert conn.established.group.casefold() in expected_openssl_groups()
        proc.stdin.write(b"ping from openssl\n")
        await proc.stdin.drain()
        output = await read_until(proc.stdout, b"ping from openssl")
        assert b"TLSv1.3" in output
        assert [e for e in conn.events if isinstance(e, Line)] == [Line(b"ping from openssl")]
        proc.stdin.close()  # s_client says goodbye with close_notify
        done = await server.next_finished()
        assert done is conn and not done.closed.error
        assert done.inner.saw_eof
    finally:
        await stop(proc)


@needs_openssl
async def test_our_client_against_openssl_s_server(pki: Pki) -> None:
    assert OPENSSL is not None
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        OPENSSL, "s_server", "-accept", str(port), "-naccept", "1", "-tls1_3",
        "-cert", str(pki.server.cert), "-key", str(pki.server.key), "-CAfile", str(pki.ca),
        "-Verify", "1", "-verify_return_error", "-alpn", ALPN,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        output = bytearray()
        await read_until(proc.stdout, b"ACCEPT", output)
        client = await connect(port, pki.context(pki.client, server=False))
        established = await client.established()  # s_server's session tickets prove it
        assert san_of(established.peer_chain[0]) == ["server.example"]
        assert established.alpn == ALPN
        # casefold: openssl may name the group in either case
        assert established.group is not None
        assert established.group.casefold() in expected_openssl_groups()
        client.driver.act(lambda _: client.inner.send(b"hello from trustmesh"))
        await read_until(proc.stdout, b"hello from trustmesh", output)
        await client.close()
        async with asyncio.timeout(WAIT):
            await proc.wait()  # -naccept 1: it exits once our connection ends
    finally:
        await stop(proc)


@needs_openssl
async def test_openssl_s_client_without_certificate_is_refused(
    pki: Pki, servers: list[TlsServer]
) -> None:
    assert OPENSSL is not None
    server = await serve(servers, pki.context(pki.server, server=True))
    proc = await asyncio.create_subprocess_exec(
        OPENSSL, "s_client", "-connect", f"127.0.0.1:{server.port}", "-tls1_3",
        "-CAfile", str(pki.ca),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        conn = await server.next_finished()
        assert conn.events == [conn.closed]
        assert conn.closed.error and "certificate" in conn.closed.reason
        assert not conn.inner.started
    finally:
        await stop(proc)
