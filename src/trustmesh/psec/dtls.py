"""The ``/dtls/1.2`` scheme: DTLS 1.2 with mutual certificate authentication, sans-IO
(pyOpenSSL over memory BIOs; docs/protocols/psec.md §6).

    scheme = DtlsScheme(context, initiator=True)
    scheme.start(now)                   # the client's first flight is ready
    events = scheme.receive(datagram, now)   # SchemeUp, SchemeData, SchemeClosed
    for datagram in scheme.datagrams_to_send(): ...
    scheme.handle_timer(now) when scheme.get_timer() is due (retransmissions)

The traps of DTLS over memory BIOs are handled here: path MTU queries are off and the
ciphertext MTU is set, or OpenSSL writes 256-byte records; the memory BIO concatenates
the datagrams OpenSSL writes, so outgoing bytes are split on record headers and packed
into datagrams of at most ``max_datagram`` bytes; a write over the payload limit is
refused here, since OpenSSL would not refuse it; and the CA is not sent along with the
chain (``SSL_MODE_NO_AUTO_CHAIN``).
"""

from __future__ import annotations

import contextlib
import hmac
import os
from dataclasses import dataclass

from cryptography import x509
from OpenSSL import SSL

from trustmesh.errors import ProtocolError
from trustmesh.psec.frames import DEFAULT_MAX_FRAME
from trustmesh.sansio import Event
from trustmesh.tls.context import TlsContext
from trustmesh.tls.errors import TlsConfigError
from trustmesh.tls.stream import failure_reason

NAME = "/dtls/1.2"
DTLS1_2_VERSION = 0xFEFD
MODE_NO_AUTO_CHAIN = 0x00000008  # SSL_MODE_NO_AUTO_CHAIN
RECORD_HEADER = 13  # type, version (2), epoch (2), sequence (6), length (2)
EXPORTER_LABEL = b"EXPORTER-trustmesh-psec-confirm"
COOKIE_SIZE = 16
BIO_CHUNK = 65536


class DtlsError(ProtocolError):
    """The DTLS handshake or a record failed (the reason says which check)."""


class PayloadTooLarge(DtlsError):
    """A datagram over the channel's payload limit: refused, never split."""


@dataclass(frozen=True, slots=True)
class SchemeUp(Event):
    """The handshake is done and the peer proved its certificate chain."""

    peer_chain: tuple[x509.Certificate, ...]


@dataclass(frozen=True, slots=True)
class SchemeData(Event):
    data: bytes

    def payload_size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class SchemeClosed(Event):
    reason: str
    error: bool = True


class DtlsContext(TlsContext):
    """A DTLS 1.2 context for one role, built once: the mesh certificate and key, the
    mesh CA, a client certificate required, revocation asked of the live view."""

    def _build(self) -> SSL.Context:
        ctx = SSL.Context(SSL.DTLS_SERVER_METHOD if self.server else SSL.DTLS_CLIENT_METHOD)
        ctx.set_min_proto_version(DTLS1_2_VERSION)
        ctx.set_max_proto_version(DTLS1_2_VERSION)
        try:
            ctx.use_certificate_chain_file(str(self.config.cert_file))
            ctx.use_privatekey(self._private_key())
            ctx.check_privatekey()
            ctx.load_verify_locations(str(self.config.ca_file))
        except (SSL.Error, OSError) as exc:
            raise TlsConfigError(f"cannot load certificate, key or CA bundle: {exc}") from None
        if self.config.is_revoked is not None:
            self._set_revocation_callback(ctx)
        else:
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        if self.config.crl_file is not None:
            self._load_crl(ctx, self.config.crl_file)
        ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET)
        ctx.set_mode(MODE_NO_AUTO_CHAIN)
        if self.server:
            # A ClientHello is answered with a HelloVerifyRequest (a cookie, about 60
            # bytes) until it comes back with the cookie: the address is validated
            # before the certificate flight (over 1 KiB) goes to it (RFC 6347 4.2.1).
            self._cookie_secret = os.urandom(32)
            assert SSL.OP_COOKIE_EXCHANGE is not None  # set in every OpenSSL with DTLS
            ctx.set_options(SSL.OP_COOKIE_EXCHANGE)
            ctx.set_cookie_generate_callback(self._cookie)
            ctx.set_cookie_verify_callback(
                lambda conn, cookie: hmac.compare_digest(self._cookie(conn), cookie)
            )
        return ctx

    def _cookie(self, conn: SSL.Connection) -> bytes:
        address = conn.get_app_data()
        peer = address if isinstance(address, bytes) else b""
        return hmac.new(self._cookie_secret, peer, "sha256").digest()[:COOKIE_SIZE]


class DtlsScheme:
    name = NAME

    def __init__(
        self,
        context: DtlsContext,
        *,
        initiator: bool,
        max_datagram: int = DEFAULT_MAX_FRAME,
        peer_address: bytes = b"",
    ) -> None:
        """``peer_address``: the peer's address as bytes, which a server's cookie
        binds (a cookie made for one address does not validate another)."""
        self.initiator = initiator
        self.max_datagram = max_datagram
        self.conn = SSL.Connection(context.ssl, None)
        self.conn.set_app_data(peer_address)
        self.conn.set_ciphertext_mtu(max_datagram)
        if initiator:
            self.conn.set_connect_state()
        else:
            self.conn.set_accept_state()
        self.up = False
        self.closed: SchemeClosed | None = None
        self._out: list[bytes] = []
        self._timer: float | None = None

    @property
    def payload_limit(self) -> int:
        """The largest datagram ``send`` takes (what fits in one record)."""
        return int(self.conn.get_cleartext_mtu()) if self.up else 0

    # --- the sans-IO surface ------------------------------------------------------------

    def start(self, now: float) -> list[Event]:
        """The client writes its first flight (ClientHello); the server waits."""
        return self._handshake(now) if self.initiator else []

    def first_flight(self) -> bytes | None:
        """The client's first datagram, to carry in a PSEC proposal (kept to be sent
        here as well: the scheme retransmits it on its own timer)."""
        return self._out[0] if self.initiator and self._out else None

    def receive(self, datagram: bytes, now: float) -> list[Event]:
        if self.closed is not None:
            return []
        self.conn.bio_write(datagram)
        if not self.up:
            events = self._handshake(now)
            if not self.up:
                return events
        else:
            events = []
        return events + self._read()

    def send(self, payload: bytes) -> None:
        if not self.up or self.closed is not None:
            raise DtlsError("the channel is not up")
        if len(payload) > self.payload_limit:
            raise PayloadTooLarge(
                f"a datagram of {len(payload)} bytes is over the limit of {self.payload_limit}"
            )
        self.conn.send(payload)
        self._collect()

    def datagrams_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        return self._timer if not self.up and self.closed is None else None

    def handle_timer(self, now: float) -> list[Event]:
        if self._timer is None or now < self._timer or self.up or self.closed is not None:
            return []
        self.conn.DTLSv1_handle_timeout()
        self._collect()
        self._arm(now)
        return []

    def export(self, label: bytes = EXPORTER_LABEL, length: int = 32) -> bytes:
        """Keying material exported from the session (RFC 5705), for the PSEC confirm."""
        if not self.up:
            raise DtlsError("no keys before the handshake is done")
        return bytes(self.conn.export_keying_material(label, length))

    def close(self) -> list[Event]:
        if self.closed is not None:
            return []
        if self.up:
            with contextlib.suppress(SSL.Error):  # a close alert is best effort on UDP
                self.conn.shutdown()
            self._collect()
        return self._finish(SchemeClosed("closed", error=False))

    # --- internals ----------------------------------------------------------------------

    def _handshake(self, now: float) -> list[Event]:
        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            self._collect()
            self._arm(now)
            return []
        except SSL.Error as exc:
            self._collect()  # the alert that tells the peer why
            reason = failure_reason(self.conn, exc)
            return self._finish(SchemeClosed(f"DTLS handshake failed: {reason}"))
        self._collect()
        self.up = True
        self._timer = None
        return [SchemeUp(self._peer_chain())]

    def _peer_chain(self) -> tuple[x509.Certificate, ...]:
        """The peer's certificate, then the chain it sent (a server's OpenSSL leaves the
        client's own certificate out of the chain)."""
        leaf = self.conn.get_peer_certificate(as_cryptography=True)
        chain = list(self.conn.get_peer_cert_chain(as_cryptography=True) or [])
        if leaf is not None and (not chain or chain[0] != leaf):
            chain.insert(0, leaf)
        return tuple(chain)

    def _read(self) -> list[Event]:
        events: list[Event] = []
        while True:
            try:
                data = self.conn.recv(65536)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                return events + self._finish(SchemeClosed("peer closed the channel", error=False))
            except SSL.Error as exc:
                reason = failure_reason(self.conn, exc)
                return events + self._finish(SchemeClosed(f"DTLS record failed: {reason}"))
            events.append(SchemeData(data))
        self._collect()
        return events

    def _collect(self) -> None:
        """Split what OpenSSL wrote into records, and pack them into datagrams."""
        pending = b""
        while True:
            try:
                chunk = self.conn.bio_read(BIO_CHUNK)
            except SSL.WantReadError:
                break
            pending += chunk
            if len(chunk) < BIO_CHUNK:
                break  # the BIO is empty: spare the exception another read would raise
        if len(pending) <= self.max_datagram:
            if pending:
                self._out.append(pending)  # the common case: what fits goes as it is
            return
        current = b""
        pos = 0
        while pos + RECORD_HEADER <= len(pending):
            size = int.from_bytes(pending[pos + 11 : pos + 13], "big")
            record = pending[pos : pos + RECORD_HEADER + size]
            pos += RECORD_HEADER + size
            if current and len(current) + len(record) > self.max_datagram:
                self._out.append(current)
                current = b""
            current += record
        if current:
            self._out.append(current)

    def _arm(self, now: float) -> None:
        wait = self.conn.DTLSv1_get_timeout()
        self._timer = now + wait if wait is not None else None

    def _finish(self, event: SchemeClosed) -> list[Event]:
        self.closed = event
        self._timer = None
        return [event]
