"""The ``/quic-datagram/1`` scheme: QUIC v1 with RFC 9221 DATAGRAM frames and mutual
certificate authentication, sans-IO (aioquic; docs/protocols/psec.md §7).

    scheme = QuicScheme(context, initiator=True)
    scheme.start(now)                        # the client's Initial is ready
    events = scheme.receive(datagram, now)   # SchemeUp, SchemeData, SchemeClosed
    for datagram in scheme.datagrams_to_send(): ...
    scheme.handle_timer(now) when scheme.get_timer() is due

aioquic falls short of what PSEC needs in three places, each closed here:

- A server never asks for a client certificate, and accepts an empty one. The server
  here asks (``_Connection._initialize``) and checks the client's chain itself, against
  the mesh root, the CRL and the live revocation view, once the handshake is done and
  before anything of the application goes out; a refusal closes with the TLS alert
  as a QUIC CRYPTO_ERROR. The client's scheme is up once its own checks pass (its
  PSEC confirm then rides with its Finished), but its channel comes up only with the
  server's confirm, which the server sends, with HANDSHAKE_DONE, only after accepting.
- No keying material exporter: ``_Connection`` keeps the exporter master secret
  (RFC 8446 §7.1, derived when the 1-RTT keys are, over the transcript up to the
  server's Finished) and :func:`tls_exporter` derives per RFC 8446 §7.5.
- A DATAGRAM frame too big for a packet stays queued forever and jams every later one:
  ``send`` refuses a payload over ``payload_limit`` with ``PayloadTooLarge``, and never
  queues more than ``MAX_PENDING`` datagrams (a datagram is unreliable; the excess is
  dropped and counted in ``dropped``).

The hooks reach into aioquic's private API; pyproject pins aioquic to the tested release
and tests/psec/test_psec_quic.py checks each hook.
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import ssl
from collections import deque
from dataclasses import replace
from typing import Any

from aioquic._buffer import Buffer
from aioquic.quic import events as quic_events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicPacketType,
    encode_quic_retry,
    pull_quic_header,
)
from aioquic.tls import AlertDescription, Epoch
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.x509.oid import ExtendedKeyUsageOID

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
from trustmesh.tls.context import TlsConfig, TlsContext

log = logging.getLogger("trustmesh.psec.quic")

NAME = "/quic-datagram/1"
ALPN = "psec-quic-datagram/1"
PEER = ("psec-peer", 0)  # aioquic wants an address; the UDP driver routes by address
MAX_PENDING = 64  # DATAGRAM frames waiting for congestion room, at most
IDLE_TIMEOUT = 60.0  # seconds without a packet before the connection closes (RFC 9000 §10.1)
# A 1-RTT packet around one DATAGRAM frame: the first byte, the peer's connection ID,
# the packet number (at most 4 bytes), the AEAD tag (16), the frame type and a 2-byte
# length: what is left of the datagram is the payload limit.
SHORT_HEADER = 1
PACKET_NUMBER_MAX = 4
AEAD_TAG = 16
FRAME_HEADER = 1 + 2
MIN_PAYLOAD = 256  # the smallest payload limit a peer may leave us (a confirm takes 33)
RETRY_TOKEN_LIFETIME = 10.0  # seconds a Retry token is good for
RETRY_MAC = 16


class QuicSchemeError(ProtocolError):
    """The QUIC handshake or connection failed (the reason says which check)."""


class QuicContext:
    """One identity's QUIC configurations (client and server), built once; the peer
    chain is checked by the mesh's TLS rules (``TlsContext.refuse_resumed``: the mesh
    root, the CRL file, the live revocation view)."""

    def __init__(self, config: TlsConfig, *, max_datagram: int = DEFAULT_MAX_FRAME) -> None:
        self.checks = TlsContext(config, server=True)
        self.max_datagram = max_datagram
        chain = x509.load_pem_x509_certificates(config.cert_file.read_bytes())
        self.client = QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN],
            certificate=chain[0],
            certificate_chain=[c for c in chain[1:] if c.issuer != c.subject],
            private_key=self.checks.private_key(),
            cafile=str(config.ca_file),
            verify_mode=ssl.CERT_REQUIRED,
            max_datagram_size=max_datagram,
            max_datagram_frame_size=max_datagram,
            idle_timeout=IDLE_TIMEOUT,
            # No streams: a peer's stream data would only fill buffers.
            max_data=0,
            max_stream_data=0,
        )
        self.server = replace(self.client, is_client=False)
        self.retry = RetryTokens()

    def refusal(
        self, chain: tuple[x509.Certificate, ...], *, of_server: bool
    ) -> tuple[int, str] | None:
        """Why a peer chain is refused, as (TLS alert, reason); None if it passes.
        ``of_server``: a client checks the server's chain, which aioquic verified to the
        root already, so its purpose and revocation are left; a server checks the
        client's in full. A certificate must allow its role (extended key usage), as
        OpenSSL requires of DTLS peers: an admin's (client only) is no server."""
        if not chain:
            return AlertDescription.certificate_required, "the peer presented no certificate"
        usage = ExtendedKeyUsageOID.SERVER_AUTH if of_server else ExtendedKeyUsageOID.CLIENT_AUTH
        if not _allows(chain[0], usage):
            role = "server" if of_server else "client"
            return AlertDescription.unsupported_certificate, f"the certificate is no TLS {role}'s"
        try:
            if of_server:
                is_revoked = self.checks.config.is_revoked
                revoked = self.checks.crl_revokes(chain[0]) or (
                    is_revoked is not None and is_revoked(chain[0].serial_number)
                )
                reason = "certificate verify failed (certificate revoked)" if revoked else None
            else:
                reason = self.checks.refuse_resumed(chain, None)
        except Exception:  # a revocation view that fails refuses, as for TLS links
            log.exception("the revocation check failed; refusing the certificate")
            reason = "certificate verify failed (the revocation check failed)"
        if reason is None:
            return None
        alert = (
            AlertDescription.certificate_revoked
            if "revoked" in reason
            else AlertDescription.bad_certificate
        )
        return alert, reason


@functools.lru_cache(maxsize=256)
def _allows(cert: x509.Certificate, usage: x509.ObjectIdentifier) -> bool:
    """Whether ``cert`` may be used for ``usage`` (no extended key usage: any)."""
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return usage in usages or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usages


class RetryTokens:
    """Stateless Retry tokens (RFC 9000 §8.1.2): a server answers a client's first
    Initial with a Retry carrying one, and starts a connection (and its handshake) only
    for an Initial that brings it back from the same address within
    ``RETRY_TOKEN_LIFETIME``. Token: the time in ms (8 bytes), the original destination
    connection ID (length-prefixed), and an HMAC over those, the peer address and the
    Retry's source connection ID."""

    def __init__(self) -> None:
        self._secret = os.urandom(32)

    def make(self, address: bytes, original_dcid: bytes, retry_scid: bytes, now: float) -> bytes:
        stamp = max(0, int(now * 1000)).to_bytes(8, "big")
        body = stamp + bytes([len(original_dcid)]) + original_dcid
        return body + self._mac(address, body, retry_scid)

    def check(self, address: bytes, token: bytes, dcid: bytes, now: float) -> bytes | None:
        """The original destination connection ID a valid token names, else None."""
        if len(token) < 9 + RETRY_MAC or len(token) != 9 + token[8] + RETRY_MAC:
            return None
        body, mac = token[:-RETRY_MAC], token[-RETRY_MAC:]
        if not hmac.compare_digest(mac, self._mac(address, body, dcid)):
            return None
        age = now - int.from_bytes(body[:8], "big") / 1000
        return body[9:] if 0 <= age <= RETRY_TOKEN_LIFETIME else None

    def _mac(self, address: bytes, body: bytes, retry_scid: bytes) -> bytes:
        message = len(address).to_bytes(2, "big") + address + body + retry_scid
        return hmac.digest(self._secret, message, "sha256")[:RETRY_MAC]


class _Connection(QuicConnection):
    """aioquic's connection with the hooks PSEC needs (see the module's docstring)."""

    exporter: tuple[hashes.HashAlgorithm, bytes] | None = None

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            self.tls._request_client_certificate = True

    def _update_traffic_key(self, direction: Any, epoch: Epoch, *args: Any) -> None:
        super()._update_traffic_key(direction, epoch, *args)
        if epoch == Epoch.ONE_RTT and self.exporter is None:
            # The first 1-RTT key comes right after the server's Finished: the
            # transcript is the one RFC 8446 §7.1 derives the exporter secret over.
            schedule = self.tls.key_schedule
            assert schedule is not None
            self.exporter = (schedule.algorithm, schedule.derive_secret(b"exp master"))

    @property
    def pending_datagrams(self) -> int:
        return len(self._datagrams_pending)

    def peer_chain(self) -> tuple[x509.Certificate, ...]:
        leaf = self.tls._peer_certificate
        return () if leaf is None else (leaf, *self.tls._peer_certificate_chain)


class QuicScheme:
    name = NAME

    def __init__(self, context: QuicContext, *, initiator: bool, peer_address: bytes = b"") -> None:
        """``peer_address``: the peer's address as bytes, which a server's Retry token
        binds (a token made for one address does not validate another)."""
        self.context = context
        self.peer_address = peer_address
        # Proved by a Retry token that came back (a server's); a client chose the address.
        self.address_validated = initiator
        self.initiator = initiator
        self.up = False
        self.closed: SchemeClosed | None = None
        self.dropped = 0  # datagrams refused for want of congestion room
        self._conn: _Connection | None = None
        if initiator:
            self._conn = _Connection(configuration=context.client)
        self._now = 0.0
        self._retry: bytes | None = None  # a Retry to send: the server holds nothing else
        self._early: deque[bytes] = deque()  # data that came with the handshake's end
        self._checked = False
        self._exported: dict[tuple[bytes, int], bytes] = {}

    @property
    def payload_limit(self) -> int:
        """The largest datagram ``send`` takes: what fits in one 1-RTT packet, and in
        the peer's ``max_datagram_frame_size``."""
        return self._room() if self.up else 0

    def _room(self) -> int:
        if self._conn is None:
            return 0
        cid = len(self._conn._peer_cid.cid)
        room = self.context.max_datagram - SHORT_HEADER - cid - PACKET_NUMBER_MAX - AEAD_TAG
        peer_max = self._conn._remote_max_datagram_frame_size or 0
        return max(0, min(room, peer_max) - FRAME_HEADER)

    # --- the sans-IO surface ------------------------------------------------------------

    def start(self, now: float) -> list[Event]:
        """The client builds its Initial; the server waits for the client's."""
        self._now = now
        if self._conn is not None and self.initiator:
            self._conn.connect(PEER, now)
        return []

    def first_flight(self) -> bytes | None:
        """None: a QUIC Initial is padded to 1,200 bytes (RFC 9000 §14.1), so it never
        fits in a PSEC proposal; it goes once the negotiation settles."""
        return None

    def receive(self, datagram: bytes, now: float) -> list[Event]:
        self._now = now
        if self.closed is not None:
            return []
        if self._conn is None and not self._accept_initial(datagram):
            return []
        assert self._conn is not None
        self._conn.receive_datagram(datagram, PEER, now)
        return self._process()

    def send(self, payload: bytes) -> None:
        if not self.up or self.closed is not None or self._conn is None:
            raise QuicSchemeError("the channel is not up")
        if len(payload) > self.payload_limit:
            raise PayloadTooLarge(
                f"a datagram of {len(payload)} bytes is over the limit of {self.payload_limit}"
            )
        if self._conn.pending_datagrams >= MAX_PENDING:
            self.dropped += 1  # unreliable by contract: never an unbounded queue
            return
        self._conn.send_datagram_frame(payload)

    def datagrams_to_send(self) -> list[bytes]:
        """What aioquic has to send now: built here, late, so that what the caller
        queued in answer to our events (a confirm) shares their packets."""
        if self._conn is None:
            retry, self._retry = self._retry, None
            return [retry] if retry is not None else []
        # aioquic ends a call when a frame does not fit in the room left in the last
        # datagram; what is left (a confirm after a full flight) would wait for the
        # next event. Asking again starts a fresh datagram; an empty answer ends it.
        out: list[bytes] = []
        for _ in range(MAX_PENDING):
            batch = self._conn.datagrams_to_send(self._now)
            if not batch:
                break
            out += [data for data, _ in batch]
        return out

    def get_timer(self) -> float | None:
        if self._conn is None or self.closed is not None:
            return None
        return self._conn.get_timer()

    def handle_timer(self, now: float) -> list[Event]:
        self._now = now
        if self._conn is None or self.closed is not None:
            return []
        self._conn.handle_timer(now)
        return self._process()

    def export(self, label: bytes = EXPORTER_LABEL, length: int = 32) -> bytes:
        """Keying material per RFC 8446 §7.5 (empty context), for the PSEC confirm."""
        if self._conn is None or self._conn.exporter is None or not self.up:
            raise QuicSchemeError("no keys before the handshake is done")
        key = (label, length)
        if key not in self._exported:  # one session, one value a label: computed once
            algorithm, secret = self._conn.exporter
            self._exported[key] = tls_exporter(algorithm, secret, label, b"", length)
        return self._exported[key]

    def close(self) -> list[Event]:
        if self.closed is not None:
            return []
        if self._conn is not None:
            self._conn.close(reason_phrase="closed")
        return self._finish(SchemeClosed("closed", error=False))

    # --- internals ----------------------------------------------------------------------

    def _accept_initial(self, datagram: bytes) -> bool:
        """A server's connection starts with the client's Initial (a full 1,200-byte
        datagram of a version we speak) that brings back our Retry token: the address
        is validated before any handshake work. Anything else is dropped, and an
        Initial without a token is answered with a Retry, without state."""
        if len(datagram) < DEFAULT_MAX_FRAME:
            return False
        try:
            header = pull_quic_header(
                Buffer(data=datagram), host_cid_length=self.context.server.connection_id_length
            )
        except ValueError:
            return False
        if (
            header.packet_type != QuicPacketType.INITIAL
            or header.version not in self.context.server.supported_versions
        ):
            return False
        tokens = self.context.retry
        if not header.token:
            retry_scid = os.urandom(self.context.server.connection_id_length)
            token = tokens.make(self.peer_address, header.destination_cid, retry_scid, self._now)
            self._retry = encode_quic_retry(
                version=header.version,
                source_cid=retry_scid,
                destination_cid=header.source_cid,
                original_destination_cid=header.destination_cid,
                retry_token=token,
            )
            return False
        original = tokens.check(self.peer_address, header.token, header.destination_cid, self._now)
        if original is None:
            return False  # forged, stale, or from another address
        self.address_validated = True
        self._conn = _Connection(
            configuration=self.context.server,
            original_destination_connection_id=original,
            retry_source_connection_id=header.destination_cid,
        )
        return True

    def _process(self) -> list[Event]:
        assert self._conn is not None
        events: list[Event] = []
        while (event := self._conn.next_event()) is not None:
            if isinstance(event, quic_events.HandshakeCompleted):
                self._check_peer()
            elif isinstance(event, quic_events.DatagramFrameReceived):
                self._early.append(event.data)
            elif isinstance(event, quic_events.ConnectionTerminated):
                events += self._terminated(event)
        if self.closed is None and not self.up and self._checked:
            self.up = True
            events.append(SchemeUp(self._conn.peer_chain()))
        if self.up and self.closed is None:
            while self._early:
                events.append(SchemeData(self._early.popleft()))
        return events

    def _check_peer(self) -> None:
        """The peer's chain, by the mesh's rules, before anything of ours goes out."""
        assert self._conn is not None
        refusal = self.context.refusal(self._conn.peer_chain(), of_server=self.initiator)
        if refusal is not None:
            alert, reason = refusal
            code = QuicErrorCode.CRYPTO_ERROR + int(alert)
            self._conn.close(error_code=code, reason_phrase=reason)
        elif self._room() < MIN_PAYLOAD:
            self._conn.close(
                error_code=QuicErrorCode.TRANSPORT_PARAMETER_ERROR,
                reason_phrase=f"the peer takes DATAGRAM frames of {self._room()} bytes at most",
            )
        else:
            self._checked = True

    def _terminated(self, event: quic_events.ConnectionTerminated) -> list[Event]:
        self._early.clear()
        if event.error_code == QuicErrorCode.NO_ERROR:
            return self._finish(SchemeClosed("peer closed the channel", error=False))
        reason = event.reason_phrase or f"error 0x{event.error_code:x}"
        return self._finish(SchemeClosed(f"QUIC connection closed: {reason}"))

    def _finish(self, event: SchemeClosed) -> list[Event]:
        if self.closed is not None:
            return []
        self.closed = event
        return [event]


def tls_exporter(
    algorithm: hashes.HashAlgorithm,
    exporter_secret: bytes,
    label: bytes,
    context: bytes,
    length: int,
) -> bytes:
    """TLS-Exporter(label, context, length) of RFC 8446 §7.5 over an exporter master
    secret: HKDF-Expand-Label(Derive-Secret(secret, label, ""), "exporter",
    Hash(context), length)."""
    empty = _digest(algorithm, b"")
    derived = _expand_label(algorithm, exporter_secret, label, empty, algorithm.digest_size)
    return _expand_label(algorithm, derived, b"exporter", _digest(algorithm, context), length)


def _expand_label(
    algorithm: hashes.HashAlgorithm, secret: bytes, label: bytes, context: bytes, length: int
) -> bytes:
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + bytes([len(context)]) + context
    return HKDFExpand(algorithm, length, info).derive(secret)


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()
