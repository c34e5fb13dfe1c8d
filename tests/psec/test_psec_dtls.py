"""The /dtls/1.2 scheme over memory BIOs: mutual authentication with mesh
certificates, records within the datagram limit, exporters that agree, retransmission
on its timer, and refusal of certificates from elsewhere."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshtools import LivePki

from trustmesh.pki.ca import CertificateAuthority
from trustmesh.psec.dtls import DtlsContext, DtlsScheme
from trustmesh.psec.scheme import PayloadTooLarge, SchemeClosed, SchemeData, SchemeUp
from trustmesh.sansio import Event


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[LivePki]:
    ca = CertificateAuthority.init(tmp_path / "ca", None, name="psec test CA")
    yield LivePki(ca)
    ca.close()


def pump(
    a: DtlsScheme, b: DtlsScheme, now: float = 0.0, rounds: int = 20
) -> dict[int, list[Event]]:
    events: dict[int, list[Event]] = {0: [], 1: []}
    for _ in range(rounds):
        moved = False
        for side, (src, dst) in enumerate(((a, b), (b, a))):
            for datagram in src.datagrams_to_send():
                assert len(datagram) <= src.max_datagram
                moved = True
                events[1 - side] += dst.receive(datagram, now)
        if not moved:
            break
    return events


def pair(
    pki: LivePki, tmp_path: Path, *, server_pki: LivePki | None = None
) -> tuple[DtlsScheme, DtlsScheme]:
    client = DtlsContext(pki.config("node-a", tmp_path / "a"), server=False)
    issuer = server_pki or pki
    server = DtlsContext(issuer.config("node-b", tmp_path / "b", trust=pki), server=True)
    return DtlsScheme(client, initiator=True), DtlsScheme(server, initiator=False)


def test_a_mutually_authenticated_channel_carries_datagrams_and_exports_one_secret(
    pki: LivePki, tmp_path: Path
) -> None:
    client, server = pair(pki, tmp_path)
    client.start(0.0)
    flight = client.first_flight()
    assert flight is not None and flight[0] == 22  # a handshake record
    events = pump(client, server)
    ups = {side: [e for e in evs if isinstance(e, SchemeUp)] for side, evs in events.items()}
    assert ups[0] and ups[1]
    assert ups[1][0].peer_chain[0].subject.rfc4514_string() == "CN=node-a"
    assert ups[0][0].peer_chain[0].subject.rfc4514_string() == "CN=node-b"
    assert client.export() == server.export() and len(client.export()) == 32
    client.send(b"x" * 1000)
    assert [e for e in pump(client, server)[1] if isinstance(e, SchemeData)] == [
        SchemeData(b"x" * 1000)
    ]
    with pytest.raises(PayloadTooLarge):
        client.send(b"y" * (client.payload_limit + 1))


def test_the_handshake_arms_a_retransmission_timer_until_it_is_done(
    pki: LivePki, tmp_path: Path
) -> None:
    client, server = pair(pki, tmp_path)
    client.start(10.0)
    timer = client.get_timer()
    assert timer is not None and 10.0 < timer <= 11.0  # OpenSSL's first wait: 1 s
    assert client.handle_timer(timer - 0.5) == []  # not due
    pump(client, server, now=10.0)
    assert client.up and client.get_timer() is None


def test_a_certificate_from_another_ca_is_refused(pki: LivePki, tmp_path: Path) -> None:
    other = LivePki(CertificateAuthority.init(tmp_path / "other-ca", None, name="another CA"))
    try:
        client, server = pair(pki, tmp_path, server_pki=other)
        client.start(0.0)
        events = pump(client, server)
        closed = [e for e in events[0] if isinstance(e, SchemeClosed)]
        assert closed and "certificate verify failed" in closed[0].reason
        assert not client.up and not server.up
    finally:
        other.ca.close()


def test_a_revoked_client_is_refused_with_the_certificate_revoked_alert(
    pki: LivePki, tmp_path: Path
) -> None:
    client = DtlsContext(pki.config("node-a", tmp_path / "a"), server=False)
    revoked = dataclasses.replace(pki.config("node-b", tmp_path / "b"), is_revoked=lambda _: True)
    server = DtlsContext(revoked, server=True)
    a, b = DtlsScheme(client, initiator=True), DtlsScheme(server, initiator=False)
    a.start(0.0)
    events = pump(a, b)
    refused = [e for e in events[1] if isinstance(e, SchemeClosed)]
    told = [e for e in events[0] if isinstance(e, SchemeClosed)]
    assert refused and "certificate revoked" in refused[0].reason
    assert told and "revoked" in told[0].reason
    assert not a.up and not b.up


def test_the_server_validates_the_address_with_a_cookie_before_its_big_flight(
    pki: LivePki, tmp_path: Path
) -> None:
    client = DtlsContext(pki.config("node-a", tmp_path / "a"), server=False)
    server = DtlsContext(pki.config("node-b", tmp_path / "b"), server=True)
    a = DtlsScheme(client, initiator=True, peer_address=b"127.0.0.1:5000")
    b = DtlsScheme(server, initiator=False, peer_address=b"127.0.0.2:4000")
    a.start(0.0)
    (hello,) = a.datagrams_to_send()
    assert b.receive(hello, 0.0) == []
    (verify,) = b.datagrams_to_send()
    assert verify[0] == 22 and verify[13] == 3  # handshake: hello_verify_request
    assert len(verify) < 3 * len(hello)  # within the anti-amplification bound
    assert a.receive(verify, 0.0) == []  # the ClientHello again, with the cookie
    pump(a, b)
    assert a.up and b.up


def test_a_cookie_from_another_address_is_not_accepted(pki: LivePki, tmp_path: Path) -> None:
    client = DtlsContext(pki.config("node-a", tmp_path / "a"), server=False)
    server = DtlsContext(pki.config("node-b", tmp_path / "b"), server=True)
    a = DtlsScheme(client, initiator=True)
    b = DtlsScheme(server, initiator=False, peer_address=b"10.0.0.1:1")
    a.start(0.0)
    b.receive(a.datagrams_to_send()[0], 0.0)
    a.receive(b.datagrams_to_send()[0], 0.0)  # the cookie for 10.0.0.1:1
    (hello_with_cookie,) = a.datagrams_to_send()
    other = DtlsScheme(server, initiator=False, peer_address=b"10.0.0.2:2")
    assert other.receive(hello_with_cookie, 0.0) == []
    # No certificate flight to an address the cookie was not made for.
    sent = other.datagrams_to_send()
    assert all(len(d) < 3 * len(hello_with_cookie) for d in sent) and not other.up


def test_a_server_knows_the_address_validated_once_its_cookie_came_back(
    pki: LivePki, tmp_path: Path
) -> None:
    client, server = pair(pki, tmp_path)
    assert client.address_validated and not server.address_validated
    client.start(0.0)
    for datagram in client.datagrams_to_send():
        server.receive(datagram, 0.0)  # a ClientHello without a cookie
    assert not server.address_validated  # answered with a cookie only
    pump(client, server)
    assert server.up and server.address_validated


def test_a_cookie_is_good_for_its_period_and_the_next_only(
    pki: LivePki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cookie seen once must not validate its address for ever (it lifts the 3x
    limit): it holds in the minute it was made and the next."""
    from trustmesh.psec import dtls

    context = dtls.DtlsContext(pki.config("node-b", tmp_path / "b"), server=True)
    scheme = DtlsScheme(context, initiator=False, peer_address=b"10.0.0.1:1")
    made = context._cookie(scheme.conn, 1000)
    monkeypatch.setattr(dtls, "_cookie_period", lambda: 1001)
    assert context._cookie_came_back(scheme.conn, made) and scheme.address_validated
    scheme.address_validated = False
    monkeypatch.setattr(dtls, "_cookie_period", lambda: 1002)
    assert not context._cookie_came_back(scheme.conn, made) and not scheme.address_validated
    other = DtlsScheme(context, initiator=False, peer_address=b"10.0.0.2:1")
    assert not context._cookie_came_back(other.conn, context._cookie(scheme.conn, 1002))
