"""Resumed TLS sessions are checked like full handshakes (zero-trust-mesh.md section 2.3,
issue 16 item 6): on both sides a resumed session's peer certificate is checked against
the live revocation view and its validity at the stream's own (fake) clock, and a ticket
lives less than both certificates."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.tls import TlsConfig, TlsContext, TlsStream
from trustmesh.tls.context import SESSION_TIMEOUT

sys.path.insert(0, str(Path(__file__).parent))
from test_tls_stream import LineCore, handshake

SHORT = timedelta(minutes=30)  # the short-lived certificate's remaining validity


class Certs:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.certs: dict[str, x509.Certificate] = {}
        # Fixed at creation: the tests' fake clocks are placed relative to it.
        self.issued = datetime.now(UTC).replace(microsecond=0)
        self._issue("client.example")
        self._issue("server.example")
        self._issue("short.example", not_after=self.issued + SHORT)

    def _issue(self, name: str, *, not_after: datetime | None = None) -> None:
        leaf = self.ca.issue_cert(name, not_after=not_after)
        leaf.cert_chain_pems[0].write_to_path(str(self.directory / f"{name}.pem"))
        leaf.private_key_pem.write_to_path(str(self.directory / f"{name}.key"))
        self.certs[name] = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())

    def context(self, name: str, *, server: bool, revoked: set[int]) -> TlsContext:
        d = self.directory
        config = TlsConfig(
            d / f"{name}.pem", d / f"{name}.key", self.ca_file, is_revoked=revoked.__contains__
        )
        return TlsContext(config, server=server)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("tls-resumption"))


def started(stream: TlsStream) -> bool:
    """Whether the stream started its inner core (it was connected)."""
    assert isinstance(stream.inner, LineCore)
    return stream.inner.started


def closed(events: list[Event]) -> list[ConnectionClosed]:
    return [e for e in events if isinstance(e, ConnectionClosed)]


def first_session(
    client_ctx: TlsContext, server_ctx: TlsContext, offset: float
) -> tuple[TlsStream, TlsStream]:
    client = TlsStream(client_ctx, LineCore(), unix_offset=offset)
    server = TlsStream(server_ctx, LineCore(), unix_offset=offset)
    handshake(client, server)
    assert client.connected and server.connected
    assert client.established is not None and not client.established.resumed
    return client, server


def resume(
    client_ctx: TlsContext, server_ctx: TlsContext, session: object, *, offset: float, now: float
) -> tuple[TlsStream, TlsStream, list[Event], list[Event]]:
    client = TlsStream(client_ctx, LineCore(), session=session, unix_offset=offset)  # type: ignore[arg-type]
    server = TlsStream(server_ctx, LineCore(), unix_offset=offset)
    client_events, server_events = handshake(client, server, now=now)
    return client, server, client_events, server_events


def test_resumption_works_while_both_certificates_are_good(certs: Certs) -> None:
    revoked: set[int] = set()
    client_ctx = certs.context("client.example", server=False, revoked=revoked)
    server_ctx = certs.context("server.example", server=True, revoked=revoked)
    offset = certs.issued.timestamp()
    first, _ = first_session(client_ctx, server_ctx, offset)
    client, server, _, _ = resume(client_ctx, server_ctx, first.session(), offset=offset, now=60)
    assert client.connected and server.connected
    assert client.established is not None and client.established.resumed
    assert server.established is not None and server.established.resumed


def test_a_server_refuses_a_revoked_client_that_resumes(certs: Certs) -> None:
    revoked: set[int] = set()
    client_ctx = certs.context("client.example", server=False, revoked=revoked)
    server_ctx = certs.context("server.example", server=True, revoked=revoked)
    offset = certs.issued.timestamp()
    first, _ = first_session(client_ctx, server_ctx, offset)
    revoked.add(certs.certs["client.example"].serial_number)
    client, server, client_events, server_events = resume(
        client_ctx, server_ctx, first.session(), offset=offset, now=60
    )
    [refusal] = closed(server_events)
    assert refusal.reason == (
        "TLS failed: resumed session: certificate verify failed (certificate revoked)"
    )
    assert not started(server)
    # The client never counts itself connected: no ticket or record reached it.
    assert not client.connected and not started(client)
    assert closed(client_events) == []


def test_a_client_refuses_a_revoked_server_it_resumes_with(certs: Certs) -> None:
    revoked: set[int] = set()
    client_ctx = certs.context("client.example", server=False, revoked=revoked)
    server_ctx = certs.context("server.example", server=True, revoked=revoked)
    offset = certs.issued.timestamp()
    first, _ = first_session(client_ctx, server_ctx, offset)
    session = first.session()
    revoked.add(certs.certs["server.example"].serial_number)
    client, _, client_events, _ = resume(client_ctx, server_ctx, session, offset=offset, now=60)
    [refusal] = closed(client_events)
    assert refusal.reason == (
        "TLS failed: resumed session: certificate verify failed (certificate revoked)"
    )
    assert not client.connected and not started(client)


@pytest.mark.parametrize("expired_role", ["client", "server"])
def test_an_expired_certificate_is_refused_on_resumption(certs: Certs, expired_role: str) -> None:
    revoked: set[int] = set()
    client_name = "short.example" if expired_role == "client" else "client.example"
    server_name = "short.example" if expired_role == "server" else "server.example"
    client_ctx = certs.context(client_name, server=False, revoked=revoked)
    server_ctx = certs.context(server_name, server=True, revoked=revoked)
    offset = certs.issued.timestamp()
    first, _ = first_session(client_ctx, server_ctx, offset)
    # On the streams' fake clock the short certificate has expired by now; the ticket
    # itself (OpenSSL's real clock) has not.
    later = SHORT.total_seconds() + 60
    client, server, client_events, server_events = resume(
        client_ctx, server_ctx, first.session(), offset=offset, now=later
    )
    refuser = server_events if expired_role == "client" else client_events
    [refusal] = closed(refuser)
    assert refusal.reason == (
        "TLS failed: resumed session: certificate verify failed (certificate has expired)"
    )
    assert not client.connected and not started(client)
    if expired_role == "client":
        assert not started(server)


def test_ticket_lifetime_is_below_both_certificates(certs: Certs) -> None:
    revoked: set[int] = set()
    offset = certs.issued.timestamp()
    short_server = certs.context("short.example", server=True, revoked=revoked)
    client_ctx = certs.context("client.example", server=False, revoked=revoked)
    remaining = SHORT.total_seconds() - 100
    # The server issues tickets that live less than its own certificate...
    client = TlsStream(client_ctx, LineCore(), unix_offset=offset)
    server = TlsStream(short_server, LineCore(), unix_offset=offset)
    handshake(client, server, now=100)
    assert client.connected
    assert 0 < short_server.ssl.get_timeout() < remaining
    # ...and a client keeps a ticket no longer than the server's certificate lives.
    assert client.ticket_expiry(offset + 100) < offset + SHORT.total_seconds()
    # With long-lived certificates the ticket's own limit holds.
    server_ctx = certs.context("server.example", server=True, revoked=revoked)
    client, server = first_session(client_ctx, server_ctx, offset)
    assert server_ctx.ssl.get_timeout() == SESSION_TIMEOUT
    assert client.ticket_expiry(offset) == offset + SESSION_TIMEOUT


def test_expires_at_is_the_earlier_certificate_expiry_on_the_stream_clock(certs: Certs) -> None:
    revoked: set[int] = set()
    client_ctx = certs.context("client.example", server=False, revoked=revoked)
    server_ctx = certs.context("short.example", server=True, revoked=revoked)
    offset = certs.issued.timestamp() - 1000.0  # the stream's clock reads 1000 at issue
    client, server = first_session(client_ctx, server_ctx, offset)
    expected = 1000.0 + SHORT.total_seconds()
    assert client.established is not None and server.established is not None
    assert client.established.expires_at == pytest.approx(expected)
    assert server.established.expires_at == pytest.approx(expected)
