"""The PSEC benchmark's subjects and anchors each complete a handshake (the figures
come from `python -m bench psec`)."""

from __future__ import annotations

from pathlib import Path

from bench import psec as psec_bench
from bench.anchors import bare_datagram
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.psec.dtls import NAME as DTLS
from trustmesh.psec.quic import NAME as QUIC
from trustmesh.psec.quic import QuicContext, RetryTokens


def test_every_handshake_of_the_psec_bench_completes(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", None, name="bench psec test")
    try:
        a = psec_bench._Node(psec_bench._identity(ca, "node-a", tmp_path / "a"))
        b = psec_bench._Node(psec_bench._identity(ca, "node-b", tmp_path / "b"))
        for scheme in (DTLS, QUIC):
            psec_bench._psec_handshake(a, b, scheme)  # raises if no channel
        for cookie in (True, False):
            server = bare_datagram.dtls_server_context(b.config, cookie=cookie)
            bare_datagram.dtls_handshake(a.client.ssl, server)
        client, server_config = QuicContext(a.config).client, QuicContext(b.config).server
        for tokens in (RetryTokens(), None):
            bare_datagram.quic_handshake(client, server_config, tokens)
    finally:
        ca.close()
