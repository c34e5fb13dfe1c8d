"""The /dtls/1.2 scheme's fast paths keep its behaviour: OpenSSL is called through the
binding directly (no exception for "nothing more to read"), a datagram holding one
record of data is read once, the exporter is computed once, the peer's chain is read
straight from OpenSSL (its leaf once) and parsed certificates are shared."""

from __future__ import annotations

import time
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
    ca = CertificateAuthority.init(tmp_path / "ca", None, name="psec speed CA")
    yield LivePki(ca)
    ca.close()


@pytest.fixture
def contexts(pki: LivePki, tmp_path: Path) -> tuple[DtlsContext, DtlsContext]:
    client = DtlsContext(pki.config("node-a", tmp_path / "a"), server=False)
    server = DtlsContext(pki.config("node-b", tmp_path / "b"), server=True)
    return client, server


def pump(a: DtlsScheme, b: DtlsScheme) -> dict[int, list[Event]]:
    events: dict[int, list[Event]] = {0: [], 1: []}
    for _ in range(20):
        moved = False
        for side, (src, dst) in enumerate(((a, b), (b, a))):
            for datagram in src.datagrams_to_send():
                moved = True
                events[1 - side] += dst.receive(datagram, 0.0)
        if not moved:
            break
    return events


def up_pair(
    contexts: tuple[DtlsContext, DtlsContext],
) -> tuple[DtlsScheme, DtlsScheme, dict[int, list[Event]]]:
    client, server = (
        DtlsScheme(contexts[0], initiator=True),
        DtlsScheme(contexts[1], initiator=False),
    )
    client.start(0.0)
    events = pump(client, server)
    assert client.up and server.up
    return client, server, events


def sealed(scheme: DtlsScheme, payload: bytes) -> bytes:
    scheme.send(payload)
    (datagram,) = scheme.datagrams_to_send()
    return datagram


def test_each_side_sees_the_peer_leaf_once_then_its_ca(
    contexts: tuple[DtlsContext, DtlsContext],
) -> None:
    _, _, events = up_pair(contexts)
    for side, peer in ((0, "CN=node-b"), (1, "CN=node-a")):
        (up,) = [e for e in events[side] if isinstance(e, SchemeUp)]
        subjects = [c.subject.rfc4514_string() for c in up.peer_chain]
        assert subjects[0] == peer
        assert len(up.peer_chain) == 2  # the leaf, then the issuing CA: never the leaf twice
        assert up.peer_chain[1].subject == up.peer_chain[0].issuer


def test_a_second_handshake_with_the_same_peer_gives_equal_certificates(
    contexts: tuple[DtlsContext, DtlsContext],
) -> None:
    first = next(e for e in up_pair(contexts)[2][0] if isinstance(e, SchemeUp))
    second = next(e for e in up_pair(contexts)[2][0] if isinstance(e, SchemeUp))
    assert first.peer_chain == second.peer_chain


def test_the_exporter_is_stable_agrees_and_depends_on_the_label(
    contexts: tuple[DtlsContext, DtlsContext],
) -> None:
    client, server, _ = up_pair(contexts)
    assert client.export() == client.export() == server.export()
    assert client.export(b"another label") == server.export(b"another label")
    assert client.export(b"another label") != client.export()
    assert len(client.export(b"another label", 48)) == 48
    other, _, _ = up_pair(contexts)
    assert other.export() != client.export()  # one session, one secret


def test_an_empty_datagram_is_dropped_before_and_after_the_handshake(
    contexts: tuple[DtlsContext, DtlsContext],
) -> None:
    client, server = (
        DtlsScheme(contexts[0], initiator=True),
        DtlsScheme(contexts[1], initiator=False),
    )
    client.start(0.0)
    assert server.receive(b"", 0.0) == [] and not server.closed
    pump(client, server)
    assert client.up and server.up
    assert client.receive(b"", 0.0) == [] and client.closed is None
    assert server.receive(sealed(client, b"still up"), 0.0) == [SchemeData(b"still up")]


def test_records_of_one_datagram_each_come_out_in_order(
    contexts: tuple[DtlsContext, DtlsContext],
) -> None:
    client, server, _ = up_pair(contexts)
    one, two, three = (sealed(client, bytes([n]) * (100 + n)) for n in range(3))
    assert server.receive(one + two + three, 0.0) == [
        SchemeData(bytes([n]) * (100 + n)) for n in range(3)
    ]
    assert server.receive(sealed(client, b"alone"), 0.0) == [SchemeData(b"alone")]
    assert server.datagrams_to_send() == []


def test_buffers_of_any_kind_go_in_and_come_out_as_bytes(
    contexts: tuple[DtlsContext, DtlsContext],
) -> None:
    client, server, _ = up_pair(contexts)
    client.send(memoryview(b"from a view"))  # type: ignore[arg-type]
    client.send(bytearray(b"from an array"))  # type: ignore[arg-type]
    datagrams = client.datagrams_to_send()
    events = [e for d in datagrams for e in server.receive(memoryview(d), 0.0)]  # type: ignore[arg-type]
    assert events == [SchemeData(b"from a view"), SchemeData(b"from an array")]
    assert all(type(e.data) is bytes for e in events if isinstance(e, SchemeData))


def test_a_full_size_datagram_goes_through_and_one_byte_more_is_refused(
    contexts: tuple[DtlsContext, DtlsContext],
) -> None:
    client, server = (
        DtlsScheme(contexts[0], initiator=True),
        DtlsScheme(contexts[1], initiator=False),
    )
    assert client.payload_limit == 0  # nothing before the handshake
    client.start(0.0)
    pump(client, server)
    limit = client.payload_limit
    assert 0 < limit < client.max_datagram
    datagram = sealed(client, b"z" * limit)
    assert len(datagram) <= client.max_datagram
    assert server.receive(datagram, 0.0) == [SchemeData(b"z" * limit)]
    with pytest.raises(PayloadTooLarge):
        client.send(b"z" * (limit + 1))
    assert client.datagrams_to_send() == []


def test_a_tampered_or_replayed_record_is_dropped_and_the_channel_stays_up(
    contexts: tuple[DtlsContext, DtlsContext],
) -> None:
    client, server, _ = up_pair(contexts)
    datagram = sealed(client, b"genuine")
    tampered = datagram[:-1] + bytes([datagram[-1] ^ 1])
    assert server.receive(tampered, 0.0) == []  # DTLS drops a record that fails its check
    assert server.receive(datagram, 0.0) == [SchemeData(b"genuine")]
    assert server.receive(datagram, 0.0) == []  # a replay
    assert server.closed is None and server.up
    assert server.receive(sealed(client, b"next"), 0.0) == [SchemeData(b"next")]


def test_a_close_from_the_peer_is_an_orderly_close(
    contexts: tuple[DtlsContext, DtlsContext],
) -> None:
    client, server, _ = up_pair(contexts)
    assert client.close() == [SchemeClosed("closed", error=False)]
    (alert,) = client.datagrams_to_send()
    assert server.receive(alert, 0.0) == [SchemeClosed("peer closed the channel", error=False)]
    assert server.receive(alert, 0.0) == []  # closed: nothing more


def test_a_server_up_answers_a_flight_sent_again_with_its_last_flight(
    contexts: tuple[DtlsContext, DtlsContext],
) -> None:
    """The server's last flight lost: the client sends its flight again on its timer
    (OpenSSL's, of the real clock: about a second), and the server, up already, reads it
    as handshake records (not as data) and answers with its last flight once more."""
    client, server = (
        DtlsScheme(contexts[0], initiator=True),
        DtlsScheme(contexts[1], initiator=False),
    )
    client.start(0.0)
    flight: list[bytes] = []
    for _ in range(20):
        flight = client.datagrams_to_send()
        for datagram in flight:
            server.receive(datagram, 0.0)
        out = server.datagrams_to_send()
        if server.up:
            break  # its last flight (out) is lost
        for datagram in out:
            client.receive(datagram, 0.0)
    assert server.up and not client.up and flight
    assert [e for d in flight for e in server.receive(d, 0.0)] == []  # a replay: dropped
    assert server.datagrams_to_send() == []
    wait = client.conn.DTLSv1_get_timeout()
    assert wait is not None
    time.sleep(wait + 0.05)
    timer = client.get_timer()
    assert timer is not None
    client.handle_timer(timer)
    again = client.datagrams_to_send()
    assert again
    assert [e for d in again for e in server.receive(d, 0.0)] == []
    answer = server.datagrams_to_send()
    assert answer  # the last flight, once more
    ups = [e for d in answer for e in client.receive(d, 0.0) if isinstance(e, SchemeUp)]
    assert ups and client.up
    assert server.receive(sealed(client, b"after"), 0.0) == [SchemeData(b"after")]
