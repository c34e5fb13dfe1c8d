"""Certificates are enforced for the life of a Catalyst session (issue 16 item 7), over
real TLS 1.3 on 127.0.0.1: a CRL that arrives while a session lives (applied directly,
reloaded from a changed file, or fetched from a URL) ends the session with NOTIFICATION
6/241 and makes the next handshake fail with ``certificate_revoked``; a session ceases
with 6/240 when a certificate expires."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from trustmesh.catalyst import messages as m
from trustmesh.catalyst.errors import PeeringFailed
from trustmesh.catalyst.session import (
    CEASE_CERTIFICATE_EXPIRED,
    CEASE_CERTIFICATE_REVOKED,
    CatalystConfig,
    SessionEstablished,
)
from trustmesh.io.catalyst import CatalystNode, CrlFile, CrlUrl, Session
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.tls import TlsConfig, TlsConfigError
from trustmesh.tls.context import parse_crl

WAIT = 10.0  # bound on any single wait; tests finish far sooner
A = CatalystConfig(my_asn=65001, bgp_identifier="node-a")
B = CatalystConfig(my_asn=65002, bgp_identifier="node-b")
REVOKED = (m.CEASE, CEASE_CERTIFICATE_REVOKED)
T0 = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: trustme.CA
    other: trustme.CA

    def tls(self, name: str, crl: Path | None = None) -> TlsConfig:
        d = self.directory
        return TlsConfig(d / f"{name}.pem", d / f"{name}.key", d / "ca.pem", crl_file=crl)

    def cert(self, name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.directory / f"{name}.pem").read_bytes())

    def crl(
        self, *revoked: str, minutes: int = 0, ca: trustme.CA | None = None
    ) -> x509.CertificateRevocationList:
        """A CRL revoking ``revoked``, issued ``minutes`` after T0."""
        issuer = ca if ca is not None else self.ca
        issuer_cert = x509.load_pem_x509_certificate(issuer.cert_pem.bytes())
        key = serialization.load_pem_private_key(issuer.private_key_pem.bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
        issued = T0 + datetime.timedelta(minutes=minutes)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer_cert.subject)
            .last_update(issued)
            .next_update(issued + datetime.timedelta(days=1))
        )
        for name in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(self.cert(name).serial_number)
                .revocation_date(issued)
                .build()
            )
        return builder.sign(key, hashes.SHA256())


def write_crl(path: Path, crl: x509.CertificateRevocationList) -> None:
    """Replace the file atomically, as a CRL publisher should."""
    fresh = path.with_suffix(".new")
    fresh.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    fresh.replace(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("catalyst-crl")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    for name in ("node-a", "node-b"):
        leaf = ca.issue_cert(name)
        leaf.cert_chain_pems[0].write_to_path(str(directory / f"{name}.pem"))
        leaf.private_key_pem.write_to_path(str(directory / f"{name}.key"))
    return Pki(directory, ca, other)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Session, Event]] = []
        self._changed = asyncio.Event()

    def __call__(self, session: Session, event: Event) -> None:
        self.events.append((session, event))
        self._changed.set()

    def of(self, kind: type[Event]) -> list[Any]:
        return [e for _, e in self.events if isinstance(e, kind)]

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


@dataclass
class Listening:
    node: CatalystNode
    port: int
    recorder: Recorder


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[CatalystNode], Any]]:
    servers = []

    async def start(node: CatalystNode) -> Listening:
        recorder = Recorder()
        server = await node.serve(host="127.0.0.1", port=0, listener=recorder)
        servers.append(server)
        return Listening(node, server.port, recorder)

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def refused_at_tls(node: CatalystNode, port: int) -> PeeringFailed:
    with pytest.raises(PeeringFailed) as info:
        async with asyncio.timeout(WAIT):
            await node.connect("127.0.0.1", port)
    failure = info.value
    assert failure.notification is None  # no OPEN was ever read
    return failure


async def server_session(b: Listening) -> Session:
    await b.recorder.until(lambda: bool(b.recorder.of(SessionEstablished)))
    [session] = b.node.sessions
    return session


def notes(session: Session) -> list[tuple[int, int, str]]:
    return [(n.code, n.subcode, n.direction) for n in session.notifications]


# --- a CRL applied while the session lives ----------------------------------------------


async def test_a_new_crl_ends_the_live_session_and_refuses_the_next_handshake(
    pki: Pki, tmp_path: Path, serve: Callable[[CatalystNode], Any]
) -> None:
    crl_file = tmp_path / "crl.pem"
    write_crl(crl_file, pki.crl())  # nothing revoked yet
    b = await serve(CatalystNode(B, pki.tls("node-b", crl_file)))
    a = CatalystNode(A, pki.tls("node-a"))
    async with asyncio.timeout(WAIT):
        session = await a.connect("127.0.0.1", b.port)
        theirs = await server_session(b)
        write_crl(crl_file, pki.crl("node-a", minutes=1))
        ended = b.node.apply_crl(parse_crl(crl_file.read_bytes()))
        assert ended == [theirs]
        closed = await session.wait_closed()
        await theirs.wait_closed()
    assert closed.by_peer and closed.error
    assert notes(session) == [(*REVOKED, "received")]
    assert notes(theirs) == [(*REVOKED, "sent")]
    assert b.node.counters.notifications_sent[REVOKED] == 1
    # A full handshake: the listener's OpenSSL refuses the certificate itself.
    a.forget_tickets()
    failure = await refused_at_tls(a, b.port)
    assert failure.reason == "TLS failed: tls alert certificate revoked"
    await b.recorder.until(
        lambda: any("certificate revoked" in c.reason for c in b.recorder.of(ConnectionClosed))
    )
    assert len(b.recorder.of(SessionEstablished)) == 1


async def test_a_resumed_session_is_refused_after_the_crl_changes(
    pki: Pki, serve: Callable[[CatalystNode], Any]
) -> None:
    b = await serve(CatalystNode(B, pki.tls("node-b")))
    a = CatalystNode(A, pki.tls("node-a"))
    async with asyncio.timeout(WAIT):
        session = await a.connect("127.0.0.1", b.port)
        await session.close()  # a ticket kept for the next dial
        assert b.node.apply_crl(pki.crl("node-a")) == []  # no CRL before: one now
    failure = await refused_at_tls(a, b.port)
    assert "resumed session" in failure.reason


async def test_the_dialer_ends_the_session_when_its_crl_revokes_the_listener(
    pki: Pki, serve: Callable[[CatalystNode], Any]
) -> None:
    b = await serve(CatalystNode(B, pki.tls("node-b")))
    a = CatalystNode(A, pki.tls("node-a"))
    async with asyncio.timeout(WAIT):
        session = await a.connect("127.0.0.1", b.port)
        theirs = await server_session(b)
        assert a.apply_crl(pki.crl("node-b")) == [session]
        await session.wait_closed()
        await theirs.wait_closed()
    assert notes(session) == [(*REVOKED, "sent")]
    assert notes(theirs) == [(*REVOKED, "received")]
    a.forget_tickets()
    failure = await refused_at_tls(a, b.port)
    assert "certificate revoked" in failure.reason


async def test_a_crl_that_revokes_someone_else_leaves_the_session(
    pki: Pki, serve: Callable[[CatalystNode], Any]
) -> None:
    b = await serve(CatalystNode(B, pki.tls("node-b")))
    a = CatalystNode(A, pki.tls("node-a"))
    async with asyncio.timeout(WAIT):
        session = await a.connect("127.0.0.1", b.port)
        assert b.node.apply_crl(pki.crl("node-b")) == []  # its own: not a peer's
        assert a.apply_crl(pki.crl()) == []
        assert session.closed is None
        await session.close()


async def test_a_crl_from_outside_the_bundle_or_older_is_refused(
    pki: Pki, serve: Callable[[CatalystNode], Any]
) -> None:
    b = await serve(CatalystNode(B, pki.tls("node-b")))
    a = CatalystNode(A, pki.tls("node-a"))
    async with asyncio.timeout(WAIT):
        session = await a.connect("127.0.0.1", b.port)
        with pytest.raises(TlsConfigError, match="not in the CA bundle"):
            b.node.apply_crl(pki.crl("node-a", ca=pki.other))
        assert b.node.apply_crl(pki.crl(minutes=10)) == []
        with pytest.raises(TlsConfigError, match="before the one in use"):
            b.node.apply_crl(pki.crl("node-a", minutes=5))  # replayed: older
        assert session.closed is None
        await session.close()
    again = await a.connect("127.0.0.1", b.port)  # the refused CRLs changed nothing
    await again.close()


# --- the poller ---------------------------------------------------------------------------


async def test_the_poller_reloads_the_crl_file_when_it_changes(
    pki: Pki, tmp_path: Path, serve: Callable[[CatalystNode], Any]
) -> None:
    crl_file = tmp_path / "crl.pem"
    write_crl(crl_file, pki.crl())
    node = CatalystNode(B, pki.tls("node-b", crl_file))
    b = await serve(node)
    updates: list[tuple[x509.CertificateRevocationList, list[Session]]] = []
    poller = asyncio.create_task(
        node.keep_crl_current(
            CrlFile(crl_file), 0.01, on_update=lambda crl, ended: updates.append((crl, ended))
        )
    )
    try:
        a = CatalystNode(A, pki.tls("node-a"))
        async with asyncio.timeout(WAIT):
            session = await a.connect("127.0.0.1", b.port)
            theirs = await server_session(b)
            write_crl(crl_file, pki.crl("node-a", minutes=1))
            await session.wait_closed()
    finally:
        poller.cancel()
    assert notes(session) == [(*REVOKED, "received")]
    assert updates[-1][1] == [theirs]
    a.forget_tickets()
    assert "certificate revoked" in (await refused_at_tls(a, b.port)).reason


async def test_the_poller_fetches_the_crl_from_a_url(
    pki: Pki, serve: Callable[[CatalystNode], Any]
) -> None:
    published = {"crl": pki.crl().public_bytes(serialization.Encoding.DER)}

    async def crl(request: web.Request) -> web.Response:
        return web.Response(body=published["crl"], content_type="application/pkix-crl")

    app = web.Application()
    app.router.add_get("/ca.crl", crl)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    node = CatalystNode(B, pki.tls("node-b"))
    b = await serve(node)
    errors: list[BaseException] = []
    poller = asyncio.create_task(
        node.keep_crl_current(
            CrlUrl(f"http://127.0.0.1:{port}/ca.crl"), 0.01, on_error=errors.append
        )
    )
    try:
        a = CatalystNode(A, pki.tls("node-a"))
        async with asyncio.timeout(WAIT):
            session = await a.connect("127.0.0.1", b.port)
            published["crl"] = pki.crl("node-a", minutes=1).public_bytes(serialization.Encoding.DER)
            await session.wait_closed()
    finally:
        poller.cancel()
        await runner.cleanup()
    assert notes(session) == [(*REVOKED, "received")]
    assert errors == []
    a.forget_tickets()
    assert "certificate revoked" in (await refused_at_tls(a, b.port)).reason


# --- expiry -------------------------------------------------------------------------------


async def test_the_session_ceases_when_a_certificate_expires(
    pki: Pki, serve: Callable[[CatalystNode], Any]
) -> None:
    b = await serve(CatalystNode(B, pki.tls("node-b")))
    # node-a's clock says its certificates expire in two seconds: ample for a loopback
    # handshake (a few ms) even on a loaded machine, then the expiry ends the session.
    ends = min(pki.cert(n).not_valid_after_utc.timestamp() for n in ("node-a", "node-b"))
    a = CatalystNode(A, pki.tls("node-a"), clock=lambda: ends - 2.0)
    async with asyncio.timeout(WAIT):
        session = await a.connect("127.0.0.1", b.port)
        assert session.tls is not None and session.tls.expires_at is not None
        assert session.core.expires_at == session.tls.expires_at
        theirs = await server_session(b)
        closed = await session.wait_closed()
        await theirs.wait_closed()
    assert closed.error and not closed.by_peer
    assert notes(session) == [(m.CEASE, CEASE_CERTIFICATE_EXPIRED, "sent")]
    assert notes(theirs) == [(m.CEASE, CEASE_CERTIFICATE_EXPIRED, "received")]
