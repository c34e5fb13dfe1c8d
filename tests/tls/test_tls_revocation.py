"""Revocation at the TLS handshake (mesh-link.md section 2.3): a certificate that the live
revocation view (``TlsConfig.is_revoked``) names is refused by OpenSSL's verification
itself, with the ``certificate_revoked`` alert, in both roles; both sides say why."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.tls import TlsConfig, TlsContext, TlsStream

sys.path.insert(0, str(Path(__file__).parent))
from test_tls_stream import LineCore, handshake


class Certs:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.serials: dict[str, int] = {}
        for name in ("alpha.example", "beta.example"):
            leaf = self.ca.issue_cert(name)
            leaf.cert_chain_pems[0].write_to_path(str(directory / f"{name}.pem"))
            leaf.private_key_pem.write_to_path(str(directory / f"{name}.key"))
            cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
            self.serials[name] = cert.serial_number

    def context(self, name: str, *, server: bool, is_revoked: Callable[[int], bool]) -> TlsContext:
        d = self.directory
        config = TlsConfig(
            d / f"{name}.pem", d / f"{name}.key", self.ca_file, is_revoked=is_revoked
        )
        return TlsContext(config, server=server)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("tls-revocation"))


def started(stream: TlsStream) -> bool:
    """Whether the stream started its inner core (it was connected)."""
    assert isinstance(stream.inner, LineCore)
    return stream.inner.started


def closed(events: list[Event]) -> ConnectionClosed:
    found = [e for e in events if isinstance(e, ConnectionClosed)]
    assert len(found) == 1, events
    return found[0]


@pytest.mark.parametrize("revoked_role", ["client", "server"])
def test_a_revoked_peer_gets_the_certificate_revoked_alert(certs: Certs, revoked_role: str) -> None:
    revoked: set[int] = set()
    client_name, server_name = "alpha.example", "beta.example"
    victim = client_name if revoked_role == "client" else server_name
    client_ctx = certs.context(client_name, server=False, is_revoked=revoked.__contains__)
    server_ctx = certs.context(server_name, server=True, is_revoked=revoked.__contains__)

    # Before the revocation: a session.
    client, server = TlsStream(client_ctx, LineCore()), TlsStream(server_ctx, LineCore())
    handshake(client, server)
    assert client.connected and server.connected

    # The same contexts read the view on every handshake.
    revoked.add(certs.serials[victim])
    client, server = TlsStream(client_ctx, LineCore()), TlsStream(server_ctx, LineCore())
    client_events, server_events = handshake(client, server)
    refuser, refused = (
        (server_events, client_events)
        if revoked_role == "client"
        else (client_events, server_events)
    )
    # The side that refused names the check; the revoked side got the revoked alert,
    # not internal_error (which a plain pyOpenSSL verify callback gives).
    assert "certificate verify failed (certificate revoked)" in closed(refuser).reason
    assert closed(refused).reason == "TLS failed: tls alert certificate revoked"
    assert not client.connected and not server.connected
    assert not started(client) and not started(server)


def test_a_failing_revocation_view_refuses_rather_than_admits(certs: Certs) -> None:
    def broken(serial: int) -> bool:
        raise RuntimeError("view unavailable")

    client = TlsStream(
        certs.context("alpha.example", server=False, is_revoked=lambda s: False), LineCore()
    )
    server = TlsStream(certs.context("beta.example", server=True, is_revoked=broken), LineCore())
    _, server_events = handshake(client, server)
    assert "certificate verify failed" in closed(server_events).reason
    assert not started(server) and not client.connected
