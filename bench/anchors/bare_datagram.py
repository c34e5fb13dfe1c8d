"""Bare handshakes of the two PSEC schemes' libraries, in memory: the anchors of
``bench psec``. Same certificates and keys as the subject, mutual authentication, and,
when asked, the same address validation a server exposed to spoofing must do (a DTLS
cookie exchange, RFC 6347 §4.2.1; a QUIC Retry, RFC 9000 §8.1.2). No negotiation,
peer IDs, chain check of the client by us, or confirm: that is PSEC's own cost."""

from __future__ import annotations

import contextlib
import hmac
import os

from aioquic._buffer import Buffer
from aioquic.quic import events as quic_events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import encode_quic_retry, pull_quic_header
from OpenSSL import SSL

from trustmesh.psec.quic import RetryTokens
from trustmesh.tls import TlsConfig

MTU = 1200
PEER = ("bench", 0)


def dtls_server_context(config: TlsConfig, *, cookie: bool) -> SSL.Context:
    ctx = SSL.Context(SSL.DTLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(str(config.cert_file))
    ctx.use_privatekey_file(str(config.key_file))
    ctx.load_verify_locations(str(config.ca_file))
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET)
    if cookie:
        secret = os.urandom(32)

        def make(conn: SSL.Connection) -> bytes:
            return hmac.digest(secret, b"peer", "sha256")[:16]

        assert SSL.OP_COOKIE_EXCHANGE is not None
        ctx.set_options(SSL.OP_COOKIE_EXCHANGE)
        ctx.set_cookie_generate_callback(make)
        ctx.set_cookie_verify_callback(lambda conn, got: hmac.compare_digest(make(conn), got))
    return ctx


def dtls_handshake(client_ctx: SSL.Context, server_ctx: SSL.Context) -> None:
    client = SSL.Connection(client_ctx, None)
    server = SSL.Connection(server_ctx, None)
    for conn in (client, server):
        conn.set_ciphertext_mtu(MTU)  # without it a memory BIO gives "unexpected EOF"
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
    raise AssertionError("no bare DTLS handshake")


class _AsksForClientCertificate(QuicConnection):
    """An aioquic server that asks for the client's certificate (aioquic's own switch
    for it; aioquic checks the client's signature, not its chain)."""

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        self.tls._request_client_certificate = True


def quic_handshake(
    client: QuicConfiguration, server: QuicConfiguration, tokens: RetryTokens | None
) -> None:
    """Until both ends report HandshakeCompleted; with ``tokens``, after a Retry."""
    x = QuicConnection(configuration=client)
    x.connect(PEER, 1.0)
    y: QuicConnection | None = None
    done = [False, False]
    for _ in range(20):
        for data, _ in x.datagrams_to_send(1.0):
            if y is None:
                y = _first_initial(x, server, tokens, data)
            else:
                y.receive_datagram(data, PEER, 1.0)
        if y is not None:
            for data, _ in y.datagrams_to_send(1.0):
                x.receive_datagram(data, PEER, 1.0)
        for side, conn in enumerate((x, y)):
            while conn is not None and (event := conn.next_event()) is not None:
                if isinstance(event, quic_events.HandshakeCompleted):
                    done[side] = True
        if all(done):
            return
    raise AssertionError("no bare QUIC handshake")


def _first_initial(
    client: QuicConnection,
    server: QuicConfiguration,
    tokens: RetryTokens | None,
    initial: bytes,
) -> QuicConnection | None:
    """What a server does with a client's Initial: a stateless Retry first (with
    ``tokens``), then the connection."""
    header = pull_quic_header(Buffer(data=initial), host_cid_length=server.connection_id_length)
    assert header.version is not None  # an Initial has one
    if tokens is None:
        original, retry_scid = header.destination_cid, None
    elif not header.token:
        scid = os.urandom(server.connection_id_length)
        retry = encode_quic_retry(
            version=header.version,
            source_cid=scid,
            destination_cid=header.source_cid,
            original_destination_cid=header.destination_cid,
            retry_token=tokens.make(b"", header.destination_cid, scid, 1.0),
        )
        client.receive_datagram(retry, PEER, 1.0)
        return None
    else:
        checked = tokens.check(b"", header.token, header.destination_cid, 1.0)
        assert checked is not None
        original, retry_scid = checked, header.destination_cid
    conn = _AsksForClientCertificate(
        configuration=server,
        original_destination_connection_id=original,
        retry_source_connection_id=retry_scid,
    )
    conn.receive_datagram(initial, PEER, 1.0)
    return conn
