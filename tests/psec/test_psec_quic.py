"""The /quic-datagram/1 scheme in memory: mutual authentication with mesh certificates
(the server checks the client's chain itself), the client up only once the server
accepted it, an RFC 8446 exporter both ends agree on, DATAGRAM frames within the limit,
and each aioquic hook this scheme relies on."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import aioquic
import pytest
from aioquic.quic.packet import QuicErrorCode
from aioquic.tls import AlertDescription
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from meshtools import LivePki
from OpenSSL import SSL

from trustmesh.pki.ca import CertificateAuthority
from trustmesh.psec.channel import (
    IDLE_TIMEOUT,
    ChannelClosed,
    ChannelData,
    ChannelUp,
    PsecChannel,
)
from trustmesh.psec.frames import Propose, decode_frame, is_psec
from trustmesh.psec.identity import psec_identity
from trustmesh.psec.quic import (
    MAX_PENDING,
    NAME,
    QuicContext,
    QuicScheme,
    QuicSchemeError,
    tls_exporter,
)
from trustmesh.psec.scheme import PayloadTooLarge, SchemeClosed, SchemeData, SchemeUp
from trustmesh.sansio import Event
from trustmesh.tls import TlsConfig

DTLS = "/dtls/1.2"


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[LivePki]:
    ca = CertificateAuthority.init(tmp_path / "ca", None, name="psec test CA")
    yield LivePki(ca)
    ca.close()


class Ends(Protocol):
    @property
    def up(self) -> object: ...
    @property
    def closed(self) -> object: ...
    def datagrams_to_send(self) -> list[bytes]: ...
    def receive(self, datagram: bytes, now: float) -> list[Event]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> list[Event]: ...


class Pump:
    """Two schemes or channels on a fake clock: datagrams both ways (some lost, or
    tampered with), then timers when nothing moves."""

    def __init__(self, a: Ends, b: Ends, *, loss: float = 0.0) -> None:
        self.ends = (a, b)
        self.events: dict[int, list[Event]] = {0: [], 1: []}
        self.now = 1.0
        self.random = random.Random(18)
        self.loss = loss
        self.tamper: Callable[[bytes], bytes] = lambda datagram: datagram

    def run(self, steps: int = 2000, until: Callable[[], bool] | None = None) -> None:
        """Until ``until()`` (by default: both ends up or closed) holds when nothing
        moves; timers run in between (QUIC always has one: the idle timeout)."""
        done = until or (lambda: all(e.up or e.closed is not None for e in self.ends))
        for _ in range(steps):
            moved = False
            for side in (0, 1):
                for datagram in self.ends[side].datagrams_to_send():
                    moved = True
                    if self.random.random() < self.loss:
                        continue
                    datagram = self.tamper(datagram)
                    self.events[1 - side] += self.ends[1 - side].receive(datagram, self.now)
            if not moved:
                timers = [t for e in self.ends if (t := e.get_timer()) is not None]
                if done() or not timers:
                    return
                self.now = max(self.now, min(timers))
                for side in (0, 1):
                    self.events[side] += self.ends[side].handle_timer(self.now)

    def of(self, side: int, kind: type) -> list[Event]:
        return [e for e in self.events[side] if isinstance(e, kind)]


def contexts(
    pki: LivePki, tmp_path: Path, *, server_pki: LivePki | None = None
) -> tuple[QuicContext, QuicContext]:
    client = QuicContext(pki.config("node-a", tmp_path / "a"))
    issuer = server_pki or pki
    server = QuicContext(issuer.config("node-b", tmp_path / "b", trust=pki))
    return client, server


def connected(client: QuicContext, server: QuicContext) -> tuple[Pump, QuicScheme, QuicScheme]:
    a, b = QuicScheme(client, initiator=True), QuicScheme(server, initiator=False)
    pump = Pump(a, b)
    a.start(pump.now)
    pump.run()
    return pump, a, b


def closed_reason(pump: Pump, side: int) -> str:
    closes = pump.of(side, SchemeClosed)
    assert closes, f"side {side} did not close"
    return closes[0].reason  # type: ignore[attr-defined, no-any-return]


def test_a_mutually_authenticated_connection_carries_datagrams_and_exports_one_secret(
    pki: LivePki, tmp_path: Path
) -> None:
    pump, a, b = connected(*contexts(pki, tmp_path))
    (up_a,), (up_b,) = pump.of(0, SchemeUp), pump.of(1, SchemeUp)
    assert up_a.peer_chain[0].subject.rfc4514_string() == "CN=node-b"  # type: ignore[attr-defined]
    assert up_b.peer_chain[0].subject.rfc4514_string() == "CN=node-a"  # type: ignore[attr-defined]
    assert a.export() == b.export() and len(a.export()) == 32
    assert a.export(b"another label") != a.export()
    a.send(b"over quic")
    b.send(b"and back")
    pump.run(until=lambda: bool(pump.of(0, SchemeData) and pump.of(1, SchemeData)))
    assert pump.of(1, SchemeData) == [SchemeData(b"over quic")]
    assert pump.of(0, SchemeData) == [SchemeData(b"and back")]


def test_the_payload_limit_is_exact_and_an_oversized_datagram_is_refused_not_queued(
    pki: LivePki, tmp_path: Path
) -> None:
    pump, a, _ = connected(*contexts(pki, tmp_path))
    limit = a.payload_limit
    assert 1100 < limit < 1200
    a.send(bytes(limit))
    with pytest.raises(PayloadTooLarge):
        a.send(bytes(limit + 1))
    a.send(b"after")
    pump.run(until=lambda: len(pump.of(1, SchemeData)) == 2)
    assert [len(e.data) for e in pump.of(1, SchemeData)] == [limit, 5]  # type: ignore[attr-defined]
    assert all(len(d) <= 1200 for d in a.datagrams_to_send())


def test_datagrams_beyond_the_congestion_window_are_dropped_not_queued_without_bound(
    pki: LivePki, tmp_path: Path
) -> None:
    _pump, a, _ = connected(*contexts(pki, tmp_path))
    for _ in range(MAX_PENDING * 4):  # the peer never acknowledges: the window fills
        a.send(bytes(1000))
    assert a.dropped > 0
    assert a._conn is not None and a._conn.pending_datagrams <= MAX_PENDING


def test_nothing_is_sent_before_the_handshake(pki: LivePki, tmp_path: Path) -> None:
    client, _ = contexts(pki, tmp_path)
    scheme = QuicScheme(client, initiator=True)
    with pytest.raises(QuicSchemeError):
        scheme.send(b"early")
    with pytest.raises(QuicSchemeError):
        scheme.export()
    assert scheme.first_flight() is None  # an Initial never fits in a proposal


@pytest.mark.parametrize("ca_name", ["psec test CA", "x"])
def test_the_client_is_up_only_once_the_server_accepted_it(ca_name: str, tmp_path: Path) -> None:
    """The client's channel waits for the server's confirm, which the server sends only
    once it accepted the client's chain (with HANDSHAKE_DONE). With a CA named "x" the
    client's Finished ends a few bytes short of a full datagram: aioquic then ends its
    call before the 1-RTT packet, and the client's confirm must still go with it."""
    ca = CertificateAuthority.init(tmp_path / "ca", None, name=ca_name)
    pki = LivePki(ca)
    a = channel(pki.config("node-a", tmp_path / "a"), (NAME,))
    b = channel(pki.config("node-b", tmp_path / "b"), (NAME,))
    a.connect(1.0)

    def deliver(src: PsecChannel, dst: PsecChannel) -> list[Event]:
        return [e for d in src.datagrams_to_send() for e in dst.receive(d, 1.0)]

    deliver(a, b)  # the proposal
    deliver(b, a)  # the Accept: the client's Initial goes
    deliver(a, b)  # the Initial: answered with a Retry, nothing kept
    deliver(b, a)  # the Retry: the Initial again, with the token
    deliver(a, b)  # the server validated the address: its flight
    deliver(b, a)  # the client's TLS is done, its Finished out
    assert a.scheme is not None and a.scheme.up and a.up is None  # keys, not acceptance
    assert isinstance(a.scheme, QuicScheme) and a.scheme._conn is not None
    assert not a.scheme._conn._handshake_confirmed
    assert any(isinstance(e, ChannelUp) for e in deliver(a, b))  # accepted, with its confirm
    assert any(isinstance(e, ChannelUp) for e in deliver(b, a))  # HANDSHAKE_DONE, confirm
    assert a.scheme._conn._handshake_confirmed
    ca.close()


def test_a_refused_client_never_comes_up(pki: LivePki, tmp_path: Path) -> None:
    a_config = pki.config("node-a", tmp_path / "a")
    serial = x509.load_pem_x509_certificate(a_config.cert_file.read_bytes()).serial_number
    b_config = dataclasses.replace(
        pki.config("node-b", tmp_path / "b"), is_revoked=lambda s: s == serial
    )
    a, b = channel(a_config, (NAME,)), channel(b_config, (NAME,))
    a.connect(0.0)
    pump = Pump(a, b)
    pump.run()
    assert a.up is None and b.up is None
    assert a.closed is not None and "revoked" in a.closed.reason
    assert not pump.of(0, ChannelUp)


def test_a_client_without_a_certificate_is_refused(pki: LivePki, tmp_path: Path) -> None:
    client, server = contexts(pki, tmp_path)
    client.client = dataclasses.replace(client.client, certificate=None, private_key=None)
    pump, a, b = connected(client, server)
    assert not b.up and a.closed is not None  # refused: the client hears it
    assert "no certificate" in closed_reason(pump, 1)
    code = QuicErrorCode.CRYPTO_ERROR + AlertDescription.certificate_required
    assert f"0x{code:x}" in closed_reason(pump, 0) or "no certificate" in closed_reason(pump, 0)


def test_a_client_from_another_ca_is_refused_by_the_server(pki: LivePki, tmp_path: Path) -> None:
    other = CertificateAuthority.init(tmp_path / "other", None, name="another CA")
    try:
        stranger = QuicContext(LivePki(other).config("node-x", tmp_path / "x", trust=pki))
        _, server = contexts(pki, tmp_path)
        pump, _, _ = connected(stranger, server)
        assert not pump.ends[1].up and pump.ends[0].closed is not None
        assert "certificate verify failed" in closed_reason(pump, 1)
        assert pump.of(0, SchemeClosed)  # the client hears the refusal
    finally:
        other.close()


def test_a_server_from_another_ca_is_refused_by_the_client(pki: LivePki, tmp_path: Path) -> None:
    other = CertificateAuthority.init(tmp_path / "other", None, name="another CA")
    try:
        client, server = contexts(pki, tmp_path, server_pki=LivePki(other))
        pump, _, _ = connected(client, server)
        assert not any(end.up for end in pump.ends)
        assert pump.of(0, SchemeClosed)
    finally:
        other.close()


@pytest.mark.parametrize("revoked_side", ["client", "server"])
@pytest.mark.parametrize("how", ["live view", "crl file"])
def test_a_revoked_peer_is_refused(
    pki: LivePki, tmp_path: Path, revoked_side: str, how: str
) -> None:
    a = pki.config("node-a", tmp_path / "a")
    b = pki.config("node-b", tmp_path / "b")
    doomed = (a if revoked_side == "client" else b).cert_file.read_bytes()
    serial = x509.load_pem_x509_certificate(doomed).serial_number
    if how == "crl file":
        pki.ca.revoke(serial=serial)
        crl = tmp_path / "crl.pem"
        crl.write_bytes(pki.ca.crl().public_bytes(serialization.Encoding.PEM))

    def checking(config: TlsConfig) -> TlsConfig:
        if how == "crl file":
            return dataclasses.replace(config, crl_file=crl)
        return dataclasses.replace(config, is_revoked=lambda s: s == serial)

    pump, a_scheme, b_scheme = connected(QuicContext(checking(a)), QuicContext(checking(b)))
    refusing = b_scheme if revoked_side == "client" else a_scheme
    assert not refusing.up and a_scheme.closed is not None and b_scheme.closed is not None
    checker = 1 if revoked_side == "client" else 0
    assert "revoked" in closed_reason(pump, checker)
    assert pump.of(1 - checker, SchemeClosed)


def test_a_server_drops_anything_but_a_full_initial_without_state(
    pki: LivePki, tmp_path: Path
) -> None:
    _, server = contexts(pki, tmp_path)
    scheme = QuicScheme(server, initiator=False)
    for junk in (b"", b"\xc0" * 50, b"\x40" + bytes(1300), b"\xc0" + bytes(1300)):
        assert scheme.receive(junk, 1.0) == []
        assert scheme._conn is None and scheme.datagrams_to_send() == []


def first_initial(client: QuicContext) -> bytes:
    scheme = QuicScheme(client, initiator=True)
    scheme.start(1.0)
    (initial,) = scheme.datagrams_to_send()
    return initial


def test_a_server_answers_a_first_initial_with_a_retry_and_keeps_nothing(
    pki: LivePki, tmp_path: Path
) -> None:
    """No handshake work for an address that has not shown it receives (RFC 9000
    §8.1.2): a spoofed Initial costs a Retry of under 100 bytes, and no connection."""
    client, server = contexts(pki, tmp_path)
    scheme = QuicScheme(server, initiator=False, peer_address=b"192.0.2.1:4433")
    assert scheme.receive(first_initial(client), 1.0) == []
    (retry,) = scheme.datagrams_to_send()
    assert retry[0] & 0xF0 == 0xF0 and len(retry) < 100  # a Retry packet
    assert scheme._conn is None


def test_a_retry_token_is_bound_to_the_address_the_cid_and_its_lifetime(
    pki: LivePki, tmp_path: Path
) -> None:
    tokens = QuicContext(pki.config("node-b", tmp_path / "b")).retry
    token = tokens.make(b"addr-1", b"odcid-12", b"scid-123", 100.0)
    assert tokens.check(b"addr-1", token, b"scid-123", 105.0) == b"odcid-12"
    assert tokens.check(b"addr-2", token, b"scid-123", 105.0) is None  # another address
    assert tokens.check(b"addr-1", token, b"scid-999", 105.0) is None  # another Retry
    assert tokens.check(b"addr-1", token, b"scid-123", 111.0) is None  # too old
    assert tokens.check(b"addr-1", token, b"scid-123", 99.0) is None  # from the future
    forged = token[:-1] + bytes([token[-1] ^ 1])
    assert tokens.check(b"addr-1", forged, b"scid-123", 105.0) is None
    for cut in range(len(token)):
        assert tokens.check(b"addr-1", token[:cut], b"scid-123", 105.0) is None


def test_a_token_from_another_address_starts_no_handshake(pki: LivePki, tmp_path: Path) -> None:
    client, server = contexts(pki, tmp_path)
    a = QuicScheme(client, initiator=True)
    honest = QuicScheme(server, initiator=False, peer_address=b"10.0.0.1:1")
    a.start(1.0)
    for datagram in a.datagrams_to_send():
        honest.receive(datagram, 1.0)
    for datagram in honest.datagrams_to_send():
        a.receive(datagram, 1.0)  # the Retry
    (with_token,) = [d for d in a.datagrams_to_send() if len(d) >= 1200]
    replayed = QuicScheme(server, initiator=False, peer_address=b"10.0.0.2:1")
    assert replayed.receive(with_token, 1.0) == []
    assert replayed._conn is None and replayed.datagrams_to_send() == []
    honest.receive(with_token, 1.0)
    assert honest._conn is not None  # the same token from its own address


def test_a_peer_may_open_no_stream(pki: LivePki, tmp_path: Path) -> None:
    _pump, a, b = connected(*contexts(pki, tmp_path))
    assert a._conn is not None and b._conn is not None
    assert a._conn._remote_max_data == 0 and b._conn._remote_max_data == 0


def test_the_hooks_hold_on_the_pinned_aioquic(pki: LivePki, tmp_path: Path) -> None:
    """The private aioquic API the scheme uses: a server that asks for the client's
    certificate, the exporter secret captured, the peer chain and the confirmation."""
    assert aioquic.__version__ == "1.7.2"
    _pump, a, b = connected(*contexts(pki, tmp_path))
    assert a._conn is not None and b._conn is not None
    assert b._conn.tls._request_client_certificate is True
    assert a._conn.exporter is not None and a._conn.exporter == b._conn.exporter
    assert a._conn._handshake_confirmed and b._conn._handshake_confirmed
    assert len(b._conn.peer_chain()) >= 1


def test_the_exporter_matches_openssl_on_a_tls13_session(pki: LivePki, tmp_path: Path) -> None:
    """Our RFC 8446 §7.5 derivation, fed OpenSSL's exporter secret (its key log),
    gives what OpenSSL's own exporter gives."""
    from cryptography.hazmat.primitives import hashes

    from trustmesh.tls import TlsContext

    a = TlsContext(pki.config("node-a", tmp_path / "a"), server=False)
    b = TlsContext(pki.config("node-b", tmp_path / "b"), server=True)
    secrets: dict[str, bytes] = {}

    def keylog(_conn: SSL.Connection, line: bytes) -> None:
        label, _random, secret = line.split()
        secrets[label.decode()] = bytes.fromhex(secret.decode())

    a.ssl.set_keylog_callback(keylog)
    client, server = SSL.Connection(a.ssl), SSL.Connection(b.ssl)
    client.set_connect_state()
    server.set_accept_state()
    for _ in range(10):
        for src, dst in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                src.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                dst.bio_write(src.bio_read(65536))
    cipher = client.get_cipher_name() or ""
    algorithm: hashes.HashAlgorithm = (
        hashes.SHA384() if cipher.endswith("SHA384") else hashes.SHA256()
    )
    label = b"EXPORTER-trustmesh-psec-confirm"
    ours = tls_exporter(algorithm, secrets["EXPORTER_SECRET"], label, b"", 32)
    assert (
        ours == client.export_keying_material(label, 32) == server.export_keying_material(label, 32)
    )


# --- the scheme inside a PSEC channel ----------------------------------------------------


def channel(config: TlsConfig, schemes: tuple[str, ...]) -> PsecChannel:
    identity = psec_identity(config, schemes)
    return PsecChannel(identity.peer_id, identity.factories_for(b""))


def test_a_psec_channel_negotiates_quic_and_carries_datagrams(pki: LivePki, tmp_path: Path) -> None:
    a = channel(pki.config("node-a", tmp_path / "a"), (NAME, DTLS))
    b = channel(pki.config("node-b", tmp_path / "b"), (NAME, DTLS))
    a.connect(0.0)
    pump = Pump(a, b)
    pump.run()
    assert a.up is not None and b.up is not None
    assert a.up.scheme == b.up.scheme == NAME
    assert a.up.initiator and not b.up.initiator
    a.send(b"datagram over psec quic")
    pump.run(until=lambda: bool(pump.of(1, ChannelData)))
    assert pump.of(1, ChannelData) == [ChannelData(b"datagram over psec quic")]


def test_quic_converges_through_30_percent_loss(pki: LivePki, tmp_path: Path) -> None:
    a = channel(pki.config("node-a", tmp_path / "a"), (NAME,))
    b = channel(pki.config("node-b", tmp_path / "b"), (NAME,))
    a.connect(0.0)
    pump = Pump(a, b, loss=0.3)
    pump.run()
    assert a.up is not None and b.up is not None
    assert pump.now < 30.0


def test_a_proposal_downgraded_from_quic_to_dtls_is_caught(pki: LivePki, tmp_path: Path) -> None:
    a = channel(pki.config("node-a", tmp_path / "a"), (NAME, DTLS))
    b = channel(pki.config("node-b", tmp_path / "b"), (NAME, DTLS))
    a.connect(0.0)
    pump = Pump(a, b)

    def strip_quic(datagram: bytes) -> bytes:
        if is_psec(datagram) and datagram[0] == 0:
            proposal = decode_frame(datagram)
            assert isinstance(proposal, Propose)
            return Propose(proposal.peer_id, (DTLS,), None).encode()
        return datagram

    pump.tamper = strip_quic
    pump.run()
    assert a.up is None and b.up is None
    closed = pump.of(0, ChannelClosed) + pump.of(1, ChannelClosed)
    assert any("confirm does not match" in e.reason for e in closed)  # type: ignore[attr-defined]


def test_simultaneous_proposals_settle_on_quic_on_a_tie(pki: LivePki, tmp_path: Path) -> None:
    a = channel(pki.config("node-a", tmp_path / "a"), (NAME, DTLS))
    b = channel(pki.config("node-b", tmp_path / "b"), (DTLS, NAME))
    a.connect(0.0)
    b.connect(0.0)
    pump = Pump(a, b)
    pump.run()
    assert a.up is not None and b.up is not None
    lower = a if int(a.negotiation.local) < int(b.negotiation.local) else b
    favoured = NAME if lower is a else DTLS  # a tie at index 1: the smaller ID's choice
    assert a.up.scheme == b.up.scheme == favoured
    assert lower.up is not None and lower.up.initiator
    assert isinstance(a.up, ChannelUp)


def test_a_server_knows_the_address_validated_once_its_retry_token_came_back(
    pki: LivePki, tmp_path: Path
) -> None:
    client, server = contexts(pki, tmp_path)
    a, b = QuicScheme(client, initiator=True), QuicScheme(server, initiator=False)
    assert a.address_validated and not b.address_validated
    a.start(1.0)
    for datagram in a.datagrams_to_send():
        b.receive(datagram, 1.0)
    assert not b.address_validated  # a Retry, nothing else
    Pump(a, b).run()
    assert b.up and b.address_validated


class SlowPump(Pump):
    """Every datagram takes ``latency`` seconds (the fake clock's), both ways."""

    def __init__(self, a: Ends, b: Ends, latency: float) -> None:
        super().__init__(a, b)
        self.latency = latency
        self.in_flight: list[tuple[float, int, bytes]] = []
        self.carried = 0

    def run_until(self, end: float) -> None:
        while self.now < end:
            for side in (0, 1):
                for datagram in self.ends[side].datagrams_to_send():
                    self.in_flight.append((self.now + self.latency, 1 - side, datagram))
            timers = [t for e in self.ends if (t := e.get_timer()) is not None]
            arrivals = [at for at, _, _ in self.in_flight]
            upcoming = min([*timers, *arrivals], default=end)
            self.now = max(self.now, min(upcoming, end))
            due = [f for f in self.in_flight if f[0] <= self.now]
            self.in_flight = [f for f in self.in_flight if f[0] > self.now]
            for _, side, datagram in due:
                self.carried += 1
                self.events[side] += self.ends[side].receive(datagram, self.now)
            for side in (0, 1):
                self.events[side] += self.ends[side].handle_timer(self.now)


def test_two_up_sides_never_trade_confirms_over_a_slow_path(pki: LivePki, tmp_path: Path) -> None:
    """With a round trip over the first confirm retry (0.5 s), both sides resend their
    confirm; each is answered once, and the answers are not answered: no confirm
    ping-pong for the life of the channel."""
    a = channel(pki.config("node-a", tmp_path / "a"), (DTLS,))
    b = channel(pki.config("node-b", tmp_path / "b"), (DTLS,))
    a.connect(0.0)
    pump = SlowPump(a, b, latency=0.4)
    pump.run_until(20.0)
    assert a.up is not None and b.up is not None
    carried = pump.carried
    pump.run_until(50.0)
    assert pump.carried - carried <= 2  # quiet once both are up


def test_an_up_channel_that_hears_nothing_closes_after_the_idle_timeout(
    pki: LivePki, tmp_path: Path
) -> None:
    a = channel(pki.config("node-a", tmp_path / "a"), (DTLS,))
    b = channel(pki.config("node-b", tmp_path / "b"), (DTLS,))
    a.connect(0.0)
    pump = Pump(a, b)
    pump.run()
    assert a.up is not None and b.up is not None
    pump.now += IDLE_TIMEOUT + 1
    for end in (a, b):
        end.handle_timer(pump.now)
    assert a.closed is not None and b.closed is not None
    assert a.closed.reason.startswith("idle")


def test_a_spoofed_proposal_to_an_up_channel_changes_nothing(pki: LivePki, tmp_path: Path) -> None:
    """An off-path attacker who knows a dialler's peer ID and address sends a proposal
    with other schemes to the listener: the channel stays up."""
    a = channel(pki.config("node-a", tmp_path / "a"), (NAME, DTLS))
    b = channel(pki.config("node-b", tmp_path / "b"), (NAME, DTLS))
    a.connect(0.0)
    pump = Pump(a, b)
    pump.run()
    assert b.up is not None
    spoofed = Propose(a.negotiation.local, ("/x/1",)).encode()
    assert b.receive(spoofed, pump.now) == [] and b.closed is None
    assert b.datagrams_to_send() == []


def _role_files(pki: LivePki, directory: Path, role: str) -> TlsConfig:
    """An admin's certificate (client use only) or the CA API's (server use only)."""
    from trustmesh.crypto.keys import KeyKind, PrivateKey

    key = PrivateKey.generate(KeyKind.P256).to_cryptography()
    public = key.public_key()
    ca = pki.ca
    cert = ca.issue_admin("ops", public) if role == "admin" else ca.issue_server(["x"], public)
    directory.mkdir(parents=True)
    pem = serialization.Encoding.PEM
    (directory / "node.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / "node.crt").write_bytes(cert.public_bytes(pem) + ca.issuing_cert.public_bytes(pem))
    (directory / "ca.crt").write_bytes(ca.root_cert.public_bytes(pem))
    return TlsConfig(directory / "node.crt", directory / "node.key", directory / "ca.crt")


@pytest.mark.parametrize("wrong_side", ["server is an admin", "client is the CA's server"])
def test_a_certificate_not_made_for_its_role_is_refused(
    pki: LivePki, tmp_path: Path, wrong_side: str
) -> None:
    """As OpenSSL refuses it for DTLS: an admin's certificate (client use only) is no
    server, and the CA API's (server use only) no client."""
    if wrong_side == "server is an admin":
        client = QuicContext(pki.config("node-a", tmp_path / "a"))
        server = QuicContext(_role_files(pki, tmp_path / "admin", "admin"))
        checker = 0
    else:
        client = QuicContext(_role_files(pki, tmp_path / "api", "server"))
        server = QuicContext(pki.config("node-b", tmp_path / "b"))
        checker = 1
    pump, a, b = connected(client, server)
    assert not (a if checker == 0 else b).up
    assert "is no TLS" in closed_reason(pump, checker)


def test_a_peer_leaving_no_room_for_datagrams_is_refused(pki: LivePki, tmp_path: Path) -> None:
    client, server = contexts(pki, tmp_path)
    client.client = dataclasses.replace(client.client, max_datagram_frame_size=40)
    pump, _a, b = connected(client, server)
    assert not b.up
    assert "DATAGRAM frames of" in closed_reason(pump, 1)


def test_a_revocation_view_that_fails_refuses(pki: LivePki, tmp_path: Path) -> None:
    def broken(serial: int) -> bool:
        raise RuntimeError("the view is gone")

    a = pki.config("node-a", tmp_path / "a")
    b = dataclasses.replace(pki.config("node-b", tmp_path / "b"), is_revoked=broken)
    pump, _, b_scheme = connected(QuicContext(a), QuicContext(b))
    assert not b_scheme.up
    assert "revocation check failed" in closed_reason(pump, 1)


@pytest.mark.parametrize("scheme", [NAME, DTLS])
def test_a_fresh_crl_replaces_an_expired_one_for_new_handshakes(
    pki: LivePki, tmp_path: Path, scheme: str
) -> None:
    """A CRL loaded at start expires (its next update), and the handshake then fails;
    ``replace_crl`` puts a fresh one in every scheme's context."""
    import datetime

    stale = pki.ca.crl(now=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2))
    crl_file = tmp_path / "crl.pem"
    crl_file.write_bytes(stale.public_bytes(serialization.Encoding.PEM))
    a_config = dataclasses.replace(pki.config("node-a", tmp_path / "a"), crl_file=crl_file)
    b_config = dataclasses.replace(pki.config("node-b", tmp_path / "b"), crl_file=crl_file)
    a_id, b_id = psec_identity(a_config, (scheme,)), psec_identity(b_config, (scheme,))

    def attempt() -> tuple[bool, str]:
        a = PsecChannel(a_id.peer_id, a_id.factories_for(b"a"))
        b = PsecChannel(b_id.peer_id, b_id.factories_for(b"b"))
        a.connect(0.0)
        pump = Pump(a, b)
        pump.run()
        # What each side saw, so that a failure explains itself.
        return a.up is not None and b.up is not None, f"fake time {pump.now}: {pump.events}"

    up, events = attempt()
    assert not up, events
    fresh = pki.ca.crl()
    for identity in (a_id, b_id):
        identity.replace_crl(fresh)
    up, events = attempt()
    assert up, events
