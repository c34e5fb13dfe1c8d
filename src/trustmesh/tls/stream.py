"""TLS 1.3 as a sans-IO adapter: :class:`TlsStream` wraps any inner StreamCore.

Bytes from the socket go into an OpenSSL memory BIO; plaintext comes out to the inner
core, and the inner core's output goes back through TLS. The inner core starts only
once the peer is *known to have accepted us*:

- a server knows it when the handshake completes (OpenSSL has verified the client's
  certificate by then);
- a TLS 1.3 client finishes its handshake before the server has looked at the client's
  certificate, so it waits for the first record the server sends after the handshake
  (a session ticket, which OpenSSL servers send at once, or data). A server that refuses
  the certificate sends an alert instead, which fails the connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from OpenSSL._util import no_zero_allocator as _no_zero_allocator

from trustmesh.sansio import ConnectionClosed, Event, StreamCore
from trustmesh.tls.context import TlsContext
from trustmesh.tls.errors import TlsError

READ_CHUNK = 64 * 1024
RECORD_ROOM = 16 * 1024 + 256  # a TLS 1.3 record's plaintext, and then some
DEFAULT_HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class TlsEstablished(Event):
    """The handshake is done and the peer accepted us; ``peer_chain`` starts with the
    peer's own certificate, which chains to our CA bundle when ``verified``. A server
    whose context only *requests* client certificates gets the chain as presented (maybe
    empty) and ``verified`` false: its application must verify it."""

    peer_chain: tuple[x509.Certificate, ...]
    alpn: str | None
    group: str | None
    resumed: bool
    verified: bool = True
    # When the session stops being valid, on the stream's clock (the ``now`` of its
    # calls): the earlier expiry of the peer's certificate and ours. None when the
    # stream was not told how its clock maps to Unix time (``unix_offset``).
    expires_at: float | None = None


class TlsStream:
    """TLS 1.3 with mutual authentication around ``inner``; itself a StreamCore."""

    def __init__(
        self,
        context: TlsContext,
        inner: StreamCore,
        *,
        session: SSL.Session | None = None,
        server_name: str | None = None,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        unix_offset: float | None = None,
    ) -> None:
        """``unix_offset``: Unix time minus the clock the driver passes as ``now``; it
        dates certificate checks on resumption, ticket lifetimes and ``expires_at``.
        Without it OpenSSL's clock dates the checks, and no expiry is reported."""
        self.context = context
        self.inner = inner
        self.unix_offset = unix_offset
        conn = SSL.Connection(context.ssl, None)  # no socket: memory BIOs
        if context.server:
            conn.set_accept_state()
        else:
            conn.set_connect_state()
            if session is not None:
                conn.set_session(session)
            if server_name:
                conn.set_tlsext_host_name(server_name.encode())
        self._conn = conn
        self._handshake_timeout = handshake_timeout
        self._deadline: float | None = None
        self._handshake_done = False
        self._connected = False
        self._closed = False
        self._shutdown_pending = False
        self._peer_closed = False  # the peer sent close_notify
        self._failed = False  # a TLS error ended the session: no more records from us
        self._post_handshake = bytearray()  # client: bytes since the handshake, until accepted
        self.established: TlsEstablished | None = None  # the handshake's outcome, once connected

    # --- what the session offers ------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    def export_keying_material(self, label: bytes, length: int, context: bytes | None) -> bytes:
        """RFC 8446 section 7.5 exporter for this session."""
        if not self._handshake_done:
            raise TlsError("no keying material before the handshake completes")
        return bytes(self._conn.export_keying_material(label, length, context))

    def exporter(self, label: bytes, context: bytes) -> bytes:
        """32 bytes of RFC 8446 exporter output (the binding Catalyst's proofs use)."""
        return self.export_keying_material(label, 32, context)

    def peer_names(self) -> frozenset[str]:
        """The peer certificate's subject CN and its DNS, URI and IP SANs (canonical)."""
        leaf = self._conn.get_peer_certificate(as_cryptography=True)
        return frozenset() if leaf is None else certificate_names(leaf, ips=True)

    def session(self) -> SSL.Session | None:
        """The session to resume with later (client side), once a ticket arrived."""
        return self._conn.get_session()

    def ticket_expiry(self, unix_now: float) -> float:
        """Unix time after which the session of :meth:`session` must not be offered: a
        ticket lives less than both certificates (zero-trust-mesh.md section 2.3)."""
        limit = unix_now + self.context.ticket_lifetime(unix_now)
        established = self.established
        if established is not None and established.peer_chain:
            limit = min(limit, established.peer_chain[0].not_valid_after_utc.timestamp() - 1)
        return limit

    def inner_action(self, action: Callable[[StreamCore], list[Event]]) -> list[Event]:
        """Run an application action on the inner core (a driver's ``act``); its output
        goes out through TLS and a close it causes ends the TLS session too."""
        if self._closed or not self._connected:
            return []
        return self._from_inner(action(self.inner))

    # --- StreamCore -------------------------------------------------------------------

    def start(self, now: float) -> list[Event]:
        self._deadline = now + self._handshake_timeout
        if self.context.server and self.unix_offset is not None:
            # The tickets this connection gets live less than our certificate; the
            # client's is checked again whenever it resumes.
            self.context.set_ticket_lifetime(now + self.unix_offset)
        if not self.context.server:
            return self._guard(lambda events: self._advance_handshake())
        return []

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        if self._closed:
            return []
        if not data:
            return self._on_eof(now)
        self._conn.bio_write(data)
        return self._guard(lambda events: self._on_input(data, now, events))

    def handle_timer(self, now: float) -> list[Event]:
        if self._closed:
            return []
        if not self._connected:
            if self._deadline is not None and now >= self._deadline:
                return self._finish(ConnectionClosed("TLS handshake timed out", error=True))
            return []
        return self._from_inner(self.inner.handle_timer(now))

    def get_timer(self) -> float | None:
        if self._closed:
            return None
        if not self._connected:
            return self._deadline
        return self.inner.get_timer()

    def data_to_send(self) -> bytes:
        if self._connected and not self._failed:
            plaintext = self.inner.data_to_send()
            if plaintext:
                self._conn.sendall(plaintext)
        if self._shutdown_pending:
            self._shutdown_pending = False
            # close_notify after the inner core's last bytes (unless the session failed)
            with contextlib.suppress(SSL.Error):
                self._conn.shutdown()
        return self._drain()

    def close(self, reason: str, now: float) -> list[Event]:
        if self._closed:
            return []
        if self._connected:
            return self._from_inner(self.inner.close(reason, now))
        return self._finish(ConnectionClosed(reason))

    # --- internals ----------------------------------------------------------------------

    def _on_input(self, data: bytes, now: float, events: list[Event]) -> None:
        if not self._handshake_done:
            self._advance_handshake()
            if not self._handshake_done:
                return
            if self.context.server:
                events += self._connect(now)
                if self._closed:
                    return
            data = b""  # this input ended the handshake: none of it is a later record
        plaintext = self._read()
        if not self._connected and (plaintext or self._whole_record_after_handshake(data)):
            # A complete record from the server after the handshake, processed without
            # an alert: the server accepted our certificate.
            events += self._connect(now)
            if self._closed:
                return
        if plaintext:
            events += self._from_inner(self.inner.receive_data(plaintext, now))
        if self._peer_closed and not self._closed:
            events += self._from_inner(self.inner.receive_data(b"", now))

    def _whole_record_after_handshake(self, data: bytes) -> bool:
        """Whether the bytes since the handshake hold one whole TLS record (5-byte header,
        then its length)."""
        self._post_handshake += data
        buf = self._post_handshake
        return len(buf) >= 5 and len(buf) >= 5 + int.from_bytes(buf[3:5], "big")

    def _advance_handshake(self) -> None:
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            return
        self._handshake_done = True

    def _read(self) -> bytes:
        """All the plaintext the records received so far hold, as one ``bytes``: read
        with ``SSL_read`` into one buffer sized for it, so there is no buffer per record,
        no join, and no exception at the end of the input. Plaintext is never longer
        than the ciphertext: what waits in the memory BIO, plus at most one partial
        record OpenSSL already took from it (``RECORD_ROOM``); should it be longer, the
        buffer is taken as it is and another follows. Errors other than "want more
        input" and the peer's close_notify are raised as pyOpenSSL's ``recv`` raises
        them."""
        conn = self._conn
        ssl = conn._ssl
        size = _lib.BIO_get_mem_data(conn._into_ssl, _ffi.NULL) + _lib.SSL_pending(ssl)
        size += RECORD_ROOM
        buf = _no_zero_allocator("char[]", size)
        total = 0
        chunks: list[bytes] = []
        while True:
            if total == size:  # full: keep it, read on into a new one
                chunks.append(_ffi.buffer(buf, total)[:])
                buf, total = _no_zero_allocator("char[]", size), 0
            result = _lib.SSL_read(ssl, buf + total, size - total)
            if result > 0:
                total += result
                continue
            error = _lib.SSL_get_error(ssl, result)
            if error == _lib.SSL_ERROR_ZERO_RETURN:  # the peer's close_notify
                self._peer_closed = True
            elif error != _lib.SSL_ERROR_WANT_READ:
                conn._raise_ssl_error(ssl, result)  # an SSL.Error, as recv() raises it
            break
        last = _ffi.buffer(buf, total)[:] if total else b""
        if chunks:
            chunks.append(last)
            return b"".join(chunks)
        return last

    def _connect(self, now: float) -> list[Event]:
        if self._connected or self._closed:
            return []
        resumed = bool(_lib.SSL_session_reused(self._conn._ssl))
        verified = self.context.config.client_auth == "require" or not self.context.server
        if resumed and verified:
            refusal = self._refuse_resumed(now)
            if refusal is not None:
                return refusal
        self._connected = True
        # The verified chain starts with the peer's certificate on both sides (the raw
        # peer chain leaves it out on a server).
        chain = self._peer_chain(verified)
        alpn = self._conn.get_alpn_proto_negotiated()
        group = self._conn.get_group_name()
        # OpenSSL reports "x25519"; name it as the configuration does.
        named = {g.lower(): g for g in self.context.groups}
        established = TlsEstablished(
            peer_chain=tuple(chain),
            alpn=alpn.decode() if alpn else None,
            group=named.get(group.lower(), group) if group else None,
            resumed=resumed,
            verified=verified,
            expires_at=self._expires_at(chain),
        )
        self.established = established
        return [established, *self._from_inner(self.inner.start(now))]

    def _peer_chain(self, verified: bool) -> list[x509.Certificate]:
        """The peer's chain, its own certificate first (the raw peer chain leaves it out
        on a server; a resumed session has no verified chain, the session keeps the leaf)."""
        chain = self._conn.get_verified_chain(as_cryptography=True) if verified else None
        if not chain:
            leaf = self._conn.get_peer_certificate(as_cryptography=True)
            rest = self._conn.get_peer_cert_chain(as_cryptography=True) or []
            chain = ([leaf] if leaf is not None else []) + [c for c in rest if c != leaf]
        return list(chain)

    def _refuse_resumed(self, now: float) -> list[Event] | None:
        """A resumed session skipped certificate verification: check the peer's
        certificate now as a full handshake would, against today's revocation view and
        clock. A refused session sends nothing more (a server drops the tickets it has
        queued, so the client never counts itself connected) and closes."""
        unix_now = now + self.unix_offset if self.unix_offset is not None else None
        reason = self.context.refuse_resumed(self._peer_chain(False), unix_now)
        if reason is None:
            return None
        self._failed = True
        self._drain()  # a server's tickets, not sent: this session must not be resumed
        return self._finish(ConnectionClosed(f"TLS failed: resumed session: {reason}", error=True))

    def _expires_at(self, chain: list[x509.Certificate]) -> float | None:
        if self.unix_offset is None:
            return None
        ends = [self.context.certificate.not_valid_after_utc.timestamp()]
        if chain:
            ends.append(chain[0].not_valid_after_utc.timestamp())
        return min(ends) - self.unix_offset

    def _from_inner(self, events: list[Event]) -> list[Event]:
        if any(isinstance(e, ConnectionClosed) for e in events):
            self._closed = True
            self._shutdown_pending = True
        return events

    def _on_eof(self, now: float) -> list[Event]:
        if self._connected:
            return self._from_inner(self.inner.receive_data(b"", now))
        if self._handshake_done and not self.context.server:
            # Our handshake was done, but the server closed instead of accepting us: it
            # refused our certificate without an alert (a resumed session it refused).
            resumed = " (resumed session)" if _lib.SSL_session_reused(self._conn._ssl) else ""
            return self._finish(
                ConnectionClosed(
                    f"TLS failed: the peer closed after the handshake{resumed}",
                    error=True,
                    by_peer=True,
                )
            )
        return self._finish(
            ConnectionClosed("peer closed during the TLS handshake", error=True, by_peer=True)
        )

    def _guard(self, step: Callable[[list[Event]], object]) -> list[Event]:
        """Run a step that appends events; a TLS failure keeps them and closes after."""
        events: list[Event] = []
        try:
            step(events)
        except SSL.Error as exc:
            self._failed = True
            reason = failure_reason(self._conn, exc)
            events += self._finish(ConnectionClosed(f"TLS failed: {reason}", error=True))
        return events

    def _finish(self, event: ConnectionClosed) -> list[Event]:
        if self._closed:
            return []
        self._closed = True
        return [event]

    def _drain(self) -> bytes:
        """The records waiting to go out, read from the memory BIO in one piece (its
        length asked first: no loop ending in an exception, no join)."""
        pending = _lib.BIO_get_mem_data(self._conn._from_ssl, _ffi.NULL)
        return self._conn.bio_read(pending) if pending > 0 else b""


def certificate_names(
    cert: x509.Certificate | x509.CertificateSigningRequest,
    *,
    uris: bool = True,
    ips: bool = False,
) -> frozenset[str]:
    """A certificate's (or CSR's) subject common names plus its DNS-name SANs, its URI
    SANs unless ``uris`` is false, and its IP SANs (canonical text) if ``ips``."""
    names = {str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset(names)
    names.update(san.get_values_for_type(x509.DNSName))
    if uris:
        names.update(san.get_values_for_type(x509.UniformResourceIdentifier))
    if ips:
        names.update(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    return frozenset(names)


def failure_reason(conn: SSL.Connection, exc: SSL.Error) -> str:
    """Why a handshake failed: OpenSSL's error queue, and which check refused the peer's
    certificate when one did (``certificate revoked``, ``unable to get local issuer``)."""
    reason = _reason(exc)
    verify = _lib.SSL_get_verify_result(conn._ssl)
    if verify != 0:
        text = _ffi.string(_lib.X509_verify_cert_error_string(verify)).decode()
        reason = f"{reason} ({text})"
    return reason


def _reason(exc: SSL.Error) -> str:
    """OpenSSL's error queue as one line: ``reason (library)`` entries."""
    parts = []
    for entry in exc.args[0] if exc.args and isinstance(exc.args[0], list) else []:
        if isinstance(entry, tuple) and len(entry) == 3:
            parts.append(str(entry[2]))
    return "; ".join(parts) or str(exc) or type(exc).__name__
