"""PSEC: handshakes and datagrams of both schemes, /dtls/1.2 and /quic-datagram/1.

- dtls_handshakes_per_s: PSEC channels to ChannelUp in memory (proposal carrying the
  ClientHello, Accept, cookie exchange, DTLS 1.2 with mutual P-256 certificates, the
  confirm both ways). Anchor: bare pyOpenSSL DTLS 1.2 handshakes in memory with the
  same certificates and a cookie exchange. Goal: >= 0.8.
- quic_handshakes_per_s: the same for QUIC (proposal, Accept, Retry, QUIC with mutual
  certificates and our check of the client's chain, the confirm both ways). Anchor:
  bare aioquic handshakes with the same certificates, the server asking for the
  client's, and a Retry. Goal: >= 0.8.
- *_no_address_check_anchor: the same subjects against anchors that skip the cookie or
  the Retry (what a server open to spoofed sources must not skip): reported so that the
  share of address validation stays visible.
- dtls_datagrams_per_s, quic_datagrams_per_s: 1,200-byte datagrams echoed over
  loopback UDP through two schemes (sealed, sent, opened, echoed, sealed, sent,
  opened). Anchor: the same echo of plain UDP datagrams. Report only (aim >= 0.6 on
  DTLS).

The handshake anchors do the same work as far as the libraries go (bench/anchors/
bare_datagram.py): the same certificates and keys (P-256), both sides authenticated,
the same 1,200-byte datagrams, both ends in memory, driven by the same kind of loop.
What they leave out is PSEC's own: the negotiation frames, the peer IDs, the check of
the client's chain (aioquic has none), the confirm, and packing records into datagrams
(the DTLS anchor hands a whole flight over as one write). For the datagram echo no
pyOpenSSL path can reach 0.6 (OpenSSL's own calls for the two sealed hops, with no
Python around them, take about 70 % of the plain echo's time); aioquic's per-packet
Python costs far more.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.anchors import bare_datagram
from bench.harness import Result, compare
from trustmesh.node.local import issue_node_files
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.psec.channel import PsecChannel
from trustmesh.psec.dtls import DtlsContext, DtlsScheme
from trustmesh.psec.identity import psec_identity
from trustmesh.psec.quic import NAME as QUIC
from trustmesh.psec.quic import QuicContext, QuicScheme, RetryTokens
from trustmesh.psec.scheme import SchemeData
from trustmesh.tls import TlsConfig

DTLS = "/dtls/1.2"
SIZE = 1200


def _identity(ca: CertificateAuthority, node_id: str, directory: Path) -> TlsConfig:
    return issue_node_files(ca, node_id, directory)


class _Node:
    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        self.dtls = psec_identity(config, (DTLS,))
        self.quic = psec_identity(config, (QUIC,))
        self.client = DtlsContext(config, server=False)
        self.server = DtlsContext(config, server=True)


def _psec_handshake(a: _Node, b: _Node, scheme: str) -> None:
    ends = []
    for node in (a, b):
        identity = node.dtls if scheme == DTLS else node.quic
        ends.append(PsecChannel(identity.peer_id, identity.factories_for(b"peer")))
    x, y = ends
    now = 1.0
    x.connect(now)
    for _ in range(40):
        moved = False
        for src, dst in ((x, y), (y, x)):
            for datagram in src.datagrams_to_send():
                moved = True
                dst.receive(datagram, now)
        if x.up is not None and y.up is not None:
            return
        if not moved:  # QUIC's pacer holds a packet for a few microseconds
            now = min(t for end in (x, y) if (t := end.get_timer()) is not None)
            for end in (x, y):
                end.handle_timer(now)
    raise AssertionError(f"no PSEC channel over {scheme}")


def _echo_pair() -> tuple[socket.socket, socket.socket]:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    a.connect(b.getsockname())
    b.connect(a.getsockname())
    return a, b


def run(*, quick: bool = False) -> list[Result]:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        ca = CertificateAuthority.init(root / "ca", None, name="bench psec")
        try:
            a = _Node(_identity(ca, "node-a", root / "a"))
            b = _Node(_identity(ca, "node-b", root / "b"))
            rounds = 3 if quick else 7
            results = _handshakes(a, b, rounds)
            results.append(_dtls_datagrams(a, b, rounds))
            results.append(_quic_datagrams(a, b, rounds))
        finally:
            ca.close()
    return results


def _handshakes(a: _Node, b: _Node, rounds: int) -> list[Result]:
    dtls_server = {
        cookie: bare_datagram.dtls_server_context(b.config, cookie=cookie)
        for cookie in (True, False)
    }
    quic_client, quic_server = QuicContext(a.config).client, QuicContext(b.config).server
    tokens = RetryTokens()
    cases = [
        ("dtls_handshakes_per_s", DTLS, "bare pyOpenSSL DTLS 1.2 handshakes, cookie exchange",
         lambda: bare_datagram.dtls_handshake(a.client.ssl, dtls_server[True])),
        ("quic_handshakes_per_s", QUIC, "bare aioquic handshakes, client certificate, Retry",
         lambda: bare_datagram.quic_handshake(quic_client, quic_server, tokens)),
        ("dtls_handshakes_no_address_check_anchor", DTLS, "the same, without the cookie",
         lambda: bare_datagram.dtls_handshake(a.client.ssl, dtls_server[False])),
        ("quic_handshakes_no_address_check_anchor", QUIC, "the same, without the Retry",
         lambda: bare_datagram.quic_handshake(quic_client, quic_server, None)),
    ]  # fmt: skip
    results = []
    for metric, scheme, anchor, bare in cases:
        comparison = compare(
            lambda scheme=scheme: _psec_handshake(a, b, scheme),  # type: ignore[misc]
            bare,
            work=1,
            rounds=rounds,
            min_time=0.3,
        )
        results.append(Result.of(metric, comparison, "/s", anchor))
    return results


def _dtls_datagrams(a: _Node, b: _Node, rounds: int) -> Result:
    x = DtlsScheme(a.client, initiator=True, max_datagram=1500)
    y = DtlsScheme(b.server, initiator=False, max_datagram=1500)
    x.start(0.0)
    for _ in range(20):
        for src, dst in ((x, y), (y, x)):
            for datagram in src.datagrams_to_send():
                dst.receive(datagram, 0.0)
    assert x.up
    assert y.up
    payload = os.urandom(SIZE)
    sa, sb = _echo_pair()
    try:

        def sealed() -> None:
            x.send(payload)
            for datagram in x.datagrams_to_send():
                sa.send(datagram)
            (event,) = y.receive(sb.recv(2048), 0.0)
            y.send(event.data)  # type: ignore[attr-defined]
            for datagram in y.datagrams_to_send():
                sb.send(datagram)
            x.receive(sa.recv(2048), 0.0)

        return _against_plain_echo("dtls_datagrams_per_s", sealed, payload, rounds)
    finally:
        for sock in (sa, sb):
            sock.close()


def _quic_datagrams(a: _Node, b: _Node, rounds: int) -> Result:
    clock = time.monotonic
    x = QuicScheme(QuicContext(a.config, max_datagram=1500), initiator=True)
    y = QuicScheme(QuicContext(b.config, max_datagram=1500), initiator=False)
    x.start(clock())
    for _ in range(40):
        for src, dst in ((x, y), (y, x)):
            for datagram in src.datagrams_to_send():
                dst.receive(datagram, clock())
        if x.up and y.up:
            break
    assert x.up
    assert y.up
    payload = os.urandom(SIZE)
    sa, sb = _echo_pair()
    for sock in (sa, sb):
        sock.settimeout(2.0)  # a datagram held back fails the run instead of hanging it

    def hop(src: QuicScheme, out: socket.socket, into: socket.socket, dst: QuicScheme) -> bytes:
        """Send what ``src`` has; read at ``dst`` until a datagram of data comes (an
        acknowledgement may come first)."""
        for datagram in src.datagrams_to_send():
            out.send(datagram)
        while True:
            for event in dst.receive(into.recv(2048), clock()):
                if isinstance(event, SchemeData):
                    return event.data

    try:

        def sealed() -> None:
            for end in (x, y):  # acknowledgements, loss detection: on their timers
                when = end.get_timer()
                if when is not None and when <= clock():
                    end.handle_timer(clock())
            x.send(payload)
            y.send(hop(x, sa, sb, y))
            hop(y, sb, sa, x)

        return _against_plain_echo("quic_datagrams_per_s", sealed, payload, rounds)
    finally:
        for sock in (sa, sb):
            sock.close()


def _against_plain_echo(
    metric: str, sealed: Callable[[], None], payload: bytes, rounds: int
) -> Result:
    """``sealed`` (one echo through the schemes) against the same echo of plain UDP."""
    ra, rb = _echo_pair()

    def plain() -> None:
        ra.send(payload)
        rb.send(rb.recv(2048))
        ra.recv(2048)

    try:
        comparison = compare(sealed, plain, work=1, rounds=rounds, min_time=0.2)
    finally:
        ra.close()
        rb.close()
    return Result.of(metric, comparison, "/s", "plain UDP echo, 1,200 bytes")
