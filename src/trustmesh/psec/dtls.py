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

The per-datagram and per-flight calls (handshake steps, record reads and writes, BIO
reads and writes) go to OpenSSL through pyOpenSSL's binding directly: pyOpenSSL would
raise an exception for every "nothing more to read", which here is the normal case
(several times a handshake, once a datagram); any other outcome is raised and handled
as pyOpenSSL raised it before. A datagram that is one record of data is read once. The
peer's certificates come straight from OpenSSL's stack (the leaf once) and are parsed
once per distinct certificate; the exporter is computed once a label.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import os
import time
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from OpenSSL._util import no_zero_allocator as _alloc

from trustmesh.errors import ProtocolError
from trustmesh.psec.frames import DEFAULT_MAX_FRAME
from trustmesh.psec.scheme import (
    EXPORTER_LABEL,
    PayloadTooLarge,
    SchemeClosed,
    SchemeData,
    SchemeUp,
)
from trustmesh.sansio import Event
from trustmesh.tls.context import TlsContext
from trustmesh.tls.errors import TlsConfigError
from trustmesh.tls.stream import failure_reason

NAME = "/dtls/1.2"
DTLS1_2_VERSION = 0xFEFD
MODE_NO_AUTO_CHAIN = 0x00000008  # SSL_MODE_NO_AUTO_CHAIN
APPLICATION_DATA = 23  # the content type of a record of application data
RECORD_HEADER = 13  # type, version (2), epoch (2), sequence (6), length (2)
COOKIE_SIZE = 16
COOKIE_PERIOD = 60.0  # seconds; a cookie is good in its period and the next
BIO_CHUNK = 16384
READ_SIZE = 16384  # SSL3_RT_MAX_PLAIN_LENGTH: one whole record, so a datagram stays one
WANT_READ = _lib.SSL_ERROR_WANT_READ
NULL = _ffi.NULL
# The binding's functions on the per-datagram path, looked up once.
_BIO_read = _lib.BIO_read
_BIO_write = _lib.BIO_write
_SSL_read = _lib.SSL_read
_SSL_write = _lib.SSL_write
_SSL_get_error = _lib.SSL_get_error
_unpack = _ffi.unpack


class DtlsError(ProtocolError):
    """The DTLS handshake or a record failed (the reason says which check)."""


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
            ctx.set_cookie_generate_callback(lambda conn: self._cookie(conn, _cookie_period()))
            ctx.set_cookie_verify_callback(self._cookie_came_back)
        return ctx

    def _cookie(self, conn: SSL.Connection, period: int) -> bytes:
        """An HMAC of the peer's address and the period (a minute) it was made in."""
        scheme = conn.get_app_data()
        peer = scheme.peer_address if isinstance(scheme, DtlsScheme) else b""
        message = period.to_bytes(8, "big") + peer
        return hmac.digest(self._cookie_secret, message, "sha256")[:COOKIE_SIZE]

    def _cookie_came_back(self, conn: SSL.Connection, cookie: bytes) -> bool:
        """A ClientHello brought back a cookie made for its address in this period or
        the one before (so it is good for 1 to 2 minutes, not for ever): the address
        receives what we send (the scheme says so: ``address_validated``)."""
        now = _cookie_period()
        ok = any(hmac.compare_digest(self._cookie(conn, p), cookie) for p in (now, now - 1))
        scheme = conn.get_app_data()
        if ok and isinstance(scheme, DtlsScheme):
            scheme.address_validated = True
        return ok


def _cookie_period() -> int:
    return int(time.time() // COOKIE_PERIOD)


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
        self.conn = conn = SSL.Connection(context.ssl, None)
        self.peer_address = peer_address
        # Proved by a cookie that came back (a server's); a client chose the address.
        self.address_validated = initiator
        conn.set_app_data(self)
        conn.set_ciphertext_mtu(max_datagram)
        if initiator:
            conn.set_connect_state()
        else:
            conn.set_accept_state()
        # The SSL object and its memory BIOs (kept alive by ``conn``), for direct calls.
        self._ssl: Any = conn._ssl
        self._into_ssl: Any = conn._into_ssl
        self._from_ssl: Any = conn._from_ssl
        self.up = False
        self.closed: SchemeClosed | None = None
        self._out: list[bytes] = []
        self._timer: float | None = None
        self._limit = 0  # the cleartext MTU, read once the handshake is done
        self._exported: dict[tuple[bytes, int], bytes] = {}

    @property
    def payload_limit(self) -> int:
        """The largest datagram ``send`` takes (what fits in one record)."""
        return self._limit

    # --- the sans-IO surface ------------------------------------------------------------

    def start(self, now: float) -> list[Event]:
        """The client writes its first flight (ClientHello); the server waits."""
        return self._handshake(now) if self.initiator else []

    def first_flight(self) -> bytes | None:
        """The client's first datagram, to carry in a PSEC proposal (kept to be sent
        here as well: the scheme retransmits it on its own timer)."""
        return self._out[0] if self.initiator and self._out else None

    def receive(self, datagram: bytes, now: float) -> list[Event]:
        if self.closed is not None or not datagram:
            return []  # an empty datagram holds no record
        if type(datagram) is not bytes:
            datagram = bytes(datagram)
        size = len(datagram)
        if _BIO_write(self._into_ssl, datagram, size) != size:
            raise DtlsError("the memory BIO did not take the datagram")
        if self.up:
            # One application record that fills the datagram (the common case): a read
            # that returns data took all there was, records are read whole and none was
            # left from before, so no second read is spent learning that nothing is left.
            single = datagram[0] == APPLICATION_DATA and size == RECORD_HEADER + (
                datagram[11] << 8 | datagram[12]
            )
            return self._read(single)
        events = self._handshake(now)
        if not self.up:
            return events
        return events + self._read(False)

    def send(self, payload: bytes) -> None:
        if not self.up or self.closed is not None:
            raise DtlsError("the channel is not up")
        size = len(payload)
        if size > self._limit:
            raise PayloadTooLarge(f"a datagram of {size} bytes is over the limit of {self._limit}")
        if type(payload) is not bytes or not size:
            self.conn.send(payload)  # pyOpenSSL takes any buffer (and an empty one) as it did
        else:
            ssl = self._ssl
            result = _SSL_write(ssl, payload, size)
            if result <= 0:
                self.conn._raise_ssl_error(ssl, result)  # raises what conn.send raised
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
        key = (label, length)
        exported = self._exported.get(key)
        if exported is None:  # one session, one value a label: computed once
            exported = bytes(self.conn.export_keying_material(label, length))
            self._exported[key] = exported
        return exported

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
        ssl = self._ssl
        result = _lib.SSL_do_handshake(ssl)
        if result != 1:
            if result < 0 and _SSL_get_error(ssl, result) == WANT_READ:
                self._collect()  # the next flight, or nothing while a flight is partial
                self._arm(now)
                return []
            try:
                self.conn._raise_ssl_error(ssl, result)
                raise SSL.Error([("", "", "the handshake stopped")])  # never: it raised
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
        self._limit = int(self.conn.get_cleartext_mtu())
        return [SchemeUp(self._peer_chain())]

    def _peer_chain(self) -> tuple[x509.Certificate, ...]:
        """The peer's certificate, then the chain it sent (a server's OpenSSL leaves the
        client's own certificate out of the chain; a client's holds it first, the same
        X509 object, taken once)."""
        ssl = self._ssl
        stack = _lib.SSL_get_peer_cert_chain(ssl)
        sent = (
            []
            if stack == NULL
            else [_lib.sk_X509_value(stack, i) for i in range(_lib.sk_X509_num(stack))]
        )
        ders = [_der(cert) for cert in sent]
        leaf = _lib.SSL_get_peer_certificate(ssl)  # a reference of our own
        if leaf != NULL:
            try:
                if not sent or sent[0] != leaf:  # not the same object: a server's view
                    der = _der(leaf)
                    if not ders or ders[0] != der:
                        ders.insert(0, der)
            finally:
                _lib.X509_free(leaf)
        return tuple(_certificate(der) for der in ders)

    def _read(self, single: bool) -> list[Event]:
        events: list[Event] = []
        ssl = self._ssl
        buf = _alloc("char[]", READ_SIZE)
        while True:
            result = _SSL_read(ssl, buf, READ_SIZE)
            if result > 0:
                events.append(SchemeData(_unpack(buf, result)))
                if single:
                    # Reading a record of data writes nothing (no alert, no flight):
                    # nothing to collect.
                    return events
                continue
            if _SSL_get_error(ssl, result) == WANT_READ:
                break  # every record of the datagram is read
            try:
                self.conn._raise_ssl_error(ssl, result)
                break  # never: it raised
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                return events + self._finish(SchemeClosed("peer closed the channel", error=False))
            except SSL.Error as exc:
                reason = failure_reason(self.conn, exc)
                return events + self._finish(SchemeClosed(f"DTLS record failed: {reason}"))
        self._collect()
        return events

    def _collect(self) -> None:
        """Split what OpenSSL wrote into records, and pack them into datagrams."""
        bio = self._from_ssl
        buf = _alloc("char[]", BIO_CHUNK)
        size = _BIO_read(bio, buf, BIO_CHUNK)
        if size <= 0:
            return  # the memory BIO is empty
        pending = _unpack(buf, size)
        while size == BIO_CHUNK:  # more than a chunk: read on until the BIO is empty
            size = _BIO_read(bio, buf, BIO_CHUNK)
            if size <= 0:
                break
            pending += _unpack(buf, size)
        if len(pending) <= self.max_datagram:
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


def _der(cert: Any) -> bytes:
    """The DER of an OpenSSL ``X509 *``."""
    bio = _lib.BIO_new(_lib.BIO_s_mem())
    if bio == NULL:
        raise MemoryError("no memory BIO")
    try:
        if _lib.i2d_X509_bio(bio, cert) != 1:
            raise DtlsError("a peer certificate does not encode")
        data = _ffi.new("char **")
        size = _lib.BIO_get_mem_data(bio, data)
        return bytes(_ffi.unpack(data[0], size))
    finally:
        _lib.BIO_free(bio)


@functools.lru_cache(maxsize=256)
def _certificate(der: bytes) -> x509.Certificate:
    """A certificate parsed from its DER: once per distinct certificate (peers come
    back, and their CA is everyone's); a parsed certificate is immutable."""
    return x509.load_der_x509_certificate(der)
