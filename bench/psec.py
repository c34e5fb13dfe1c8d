"""PSEC: handshakes and datagrams of the /dtls/1.2 scheme.

- dtls_handshakes_per_s: PSEC channels to ChannelUp in memory (proposal carrying the
  ClientHello, Accept, cookie exchange, DTLS 1.2 with mutual P-256 certificates, the
  confirm both ways). Anchor: bare pyOpenSSL DTLS 1.2 handshakes in memory with the
  same certificates (no cookie, no negotiation, no confirm). Goal: >= 0.8.
- dtls_datagrams_per_s: 1,200-byte datagrams echoed over loopback UDP through two
  DtlsSchemes (sealed, sent, opened, echoed, sealed, sent, opened). Anchor: the same
  echo of plain UDP datagrams. Report only (aim >= 0.6).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path

from OpenSSL import SSL

from bench.harness import Result, compare
from trustmesh.node.local import issue_node_files
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.psec.channel import PsecChannel
from trustmesh.psec.dtls import DtlsContext, DtlsScheme
from trustmesh.psec.identity import dtls_identity
from trustmesh.tls import TlsConfig

DTLS = "/dtls/1.2"
SIZE = 1200


def _identity(ca: CertificateAuthority, node_id: str, directory: Path) -> TlsConfig:
    return issue_node_files(ca, node_id, directory)


class _Node:
    def __init__(self, config: TlsConfig) -> None:
        self.identity = dtls_identity(config)
        self.client = DtlsContext(config, server=False)
        self.server = DtlsContext(config, server=True)

    def channel(self) -> PsecChannel:
        return PsecChannel(self.identity.peer_id, self.identity.factories_for(b""))


def _psec_handshake(a: _Node, b: _Node) -> None:
    x, y = a.channel(), b.channel()
    x.connect(0.0)
    for _ in range(20):
        for src, dst in ((x, y), (y, x)):
            for datagram in src.datagrams_to_send():
                dst.receive(datagram, 0.0)
        if x.up is not None and y.up is not None:
            return
    raise AssertionError("no PSEC channel")


def _bare_handshake(a: _Node, bare_server: SSL.Context) -> None:
    client = SSL.Connection(a.client.ssl, None)
    server = SSL.Connection(bare_server, None)
    for conn in (client, server):
        conn.set_ciphertext_mtu(SIZE)  # without it a memory BIO gives "unexpected EOF"
    client.set_connect_state()
    server.set_accept_state()
    for _ in range(20):
        for conn in (client, server):
            with contextlib.suppress(SSL.WantReadError):
                conn.do_handshake()
        moved = False
        for src, dst in ((client, server), (server, client)):
            try:
                data = src.bio_read(65536)
            except SSL.WantReadError:
                continue
            moved = True
            dst.bio_write(data)
        if not moved:
            return
    raise AssertionError("no bare handshake")


def _bare_server_context(config: TlsConfig) -> SSL.Context:
    ctx = SSL.Context(SSL.DTLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(str(config.cert_file))
    ctx.use_privatekey_file(str(config.key_file))
    ctx.load_verify_locations(str(config.ca_file))
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET)
    return ctx


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
            b_config = _identity(ca, "node-b", root / "b")
            b = _Node(b_config)
            bare_server = _bare_server_context(b_config)
            rounds = 3 if quick else 7
            ours, bare = compare(
                lambda: _psec_handshake(a, b),
                lambda: _bare_handshake(a, bare_server),
                work=1,
                rounds=rounds,
                min_time=0.3,
            )
            results = [
                Result(
                    "dtls_handshakes_per_s", ours, "/s", "bare pyOpenSSL DTLS 1.2 handshakes", bare
                )
            ]
            results.append(_datagrams(a, b, rounds))
        finally:
            ca.close()
    return results


def _datagrams(a: _Node, b: _Node, rounds: int) -> Result:
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
    ra, rb = _echo_pair()
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

        def plain() -> None:
            ra.send(payload)
            rb.send(rb.recv(2048))
            ra.recv(2048)

        ours, bare = compare(sealed, plain, work=1, rounds=rounds, min_time=0.2)
    finally:
        for sock in (sa, sb, ra, rb):
            sock.close()
    return Result("dtls_datagrams_per_s", ours, "/s", "plain UDP echo, 1,200 bytes", bare)
