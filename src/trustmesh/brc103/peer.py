"""The BRC-103 peer as a sans-IO state machine.

It takes AuthMessages in (:meth:`Peer.receive`), returns events, and queues the messages
it must send (:meth:`Peer.messages_to_send`); the application's own messages come from
:meth:`Peer.create_general` and friends. Time comes in as milliseconds; the driver calls
:meth:`Peer.handle_timer` at :meth:`Peer.get_timer`.

Stricter than the references, without changing a byte on the wire
(``docs/protocols/brc103.md`` lists each point):

- each message nonce is accepted once per session (replays are refused);
- a signed message's ``identityKey`` must be the session's peer, and events carry the
  session's (verified) identity, never the message's field;
- an initialResponse is accepted once, only for a handshake we started;
- certificates are checked against what we asked for: certifier, type and every
  revealed field name, on every path (initialResponse, certificateResponse);
- general messages from a peer we asked for certificates are held until they validate
  (bounded in count, bytes and time), then delivered in order; a peer known to have none
  (an empty certificateResponse, or none at all within ``certificate_grace_ms``) has
  them dropped and later ones refused at once, until a certificate validates.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from trustmesh.brc103.certificates import (
    MasterCertificate,
    VerifiableCertificate,
)
from trustmesh.brc103.encoding import b64decode, b64encode
from trustmesh.brc103.errors import (
    Brc103Error,
    CertificateError,
    CertificatesMissingError,
    CertificatesTimeoutError,
    HandshakeTimeoutError,
    IdentityMismatchError,
    MessageSignatureError,
    ReplayError,
    SessionNotFoundError,
    UnexpectedMessageError,
    UnrequestedCertificateError,
)
from trustmesh.brc103.messages import (
    NO_REQUEST,
    AuthMessage,
    MessageType,
    RequestedCertificates,
)
from trustmesh.brc103.nonces import create_nonce, verify_nonce
from trustmesh.brc103.revocation import RevocationChecker, check_revocation
from trustmesh.brc103.sessions import Session, SessionTable
from trustmesh.brc103.wallet import Wallet
from trustmesh.errors import InvalidKeyError, InvalidSignatureError

SIGNATURE_PROTOCOL = (2, "auth message signature")
HANDSHAKE_TIMEOUT_MS = 10_000
CERTIFICATE_TIMEOUT_MS = 30_000
# The grace grows with a slow handshake up to this (the peer controls that time: a client
# that waits before its first request must not hold it for the whole certificate timeout).
MAX_SCALED_GRACE_MS = 3_000


# --- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    session_nonce: str
    identity_key: str


@dataclass(frozen=True, slots=True)
class GeneralMessageReceived:
    session_nonce: str
    identity_key: str  # the session's verified peer
    payload: bytes
    message: AuthMessage


@dataclass(frozen=True, slots=True)
class CertificatesReceived:
    session_nonce: str
    identity_key: str
    certificates: list[VerifiableCertificate]  # each with decrypted_fields filled in


@dataclass(frozen=True, slots=True)
class CertificatesRequested:
    """The peer asked for certificates and the peer has no store to answer from (or
    was told not to answer by itself): the application answers with
    :meth:`Peer.create_certificate_response`.

    From an initialRequest (unsigned) ``identity_key`` is only what the requester
    claims; the answer is encrypted and signed for that key, so only its holder can use
    it. From a certificateRequest it is the session's verified peer."""

    session_nonce: str
    identity_key: str
    requested: RequestedCertificates


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    session_nonce: str
    error: Brc103Error


@dataclass(frozen=True, slots=True)
class HeldMessagesDropped:
    session_nonce: str
    identity_key: str
    messages: list[AuthMessage]
    error: Brc103Error


Event = (
    HandshakeCompleted
    | GeneralMessageReceived
    | CertificatesReceived
    | CertificatesRequested
    | HandshakeFailed
    | HeldMessagesDropped
)


@dataclass(slots=True)
class PeerConfig:
    """What we ask peers for, what we can show, and the limits."""

    requested_certificates: RequestedCertificates = NO_REQUEST
    certificates: list[MasterCertificate] = field(default_factory=list)
    answer_certificate_requests: bool = True
    handshake_timeout_ms: int = HANDSHAKE_TIMEOUT_MS
    certificate_timeout_ms: int = CERTIFICATE_TIMEOUT_MS
    # A peer we hold general messages for that sends no certificateResponse at all within
    # this long of its first held message (or twice the time from the handshake to that
    # message, if longer, up to MAX_SCALED_GRACE_MS: a slow link gets longer, but the peer
    # chooses that time, so not much longer) has none: the held messages are dropped
    # with CertificatesMissingError at once. The TS AuthFetch holding no certificate says
    # nothing at all. None: wait the whole certificate timeout (the reference's behaviour).
    certificate_grace_ms: int | None = None
    session_idle_ms: int | None = None  # drop sessions unused this long (None: never)
    # Bounds on what peers can make us keep (least recently used goes first):
    max_sessions: int = 10_000
    max_unproven_sessions: int = 1_000  # sessions whose peer has not signed anything yet
    # ... of them made by initialRequests from one source (``receive(source=...)``)
    max_unproven_sessions_per_source: int = 16
    max_seen_nonces: int = 2_000_000  # replay memory, all sessions (about 135 B each)
    max_session_messages: int = 10_000  # then the session ends and the peer handshakes again
    max_held_messages: int = 64  # per session, while its certificates are awaited
    max_held_bytes: int = 8 * 1024 * 1024  # per session
    max_held_total: int = 64 * 1024 * 1024  # all sessions together


class Peer:
    def __init__(
        self,
        wallet: Wallet,
        config: PeerConfig | None = None,
        *,
        revocation: RevocationChecker | None = None,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.wallet = wallet
        self.config = config or PeerConfig()
        for master in self.config.certificates:
            if master.certificate.subject != wallet.identity_key:
                raise ValueError("a certificate to show must be issued to this wallet's key")
        # None: no revocation source; revocable certificates are refused.
        self.revocation: RevocationChecker | None = revocation
        self._random = random
        self.sessions = SessionTable(
            self.config.max_sessions,
            max_unproven=self.config.max_unproven_sessions,
            max_unproven_per_source=self.config.max_unproven_sessions_per_source,
            max_seen=self.config.max_seen_nonces,
        )
        self._late: list[Event] = []  # about sessions evicted while handling something else
        self._outbox: list[AuthMessage] = []
        self._deadlines: list[tuple[int, int, str]] = []  # (deadline ms, sequence, nonce)
        self._sequence = 0

    @property
    def identity_key(self) -> str:
        return self.wallet.identity_key

    def messages_to_send(self) -> list[AuthMessage]:
        out, self._outbox = self._outbox, []
        return out

    # --- starting a handshake -----------------------------------------------------------

    def initiate(self, now_ms: int, *, peer_identity_key: str | None = None) -> AuthMessage:
        """An initialRequest (returned, not queued); its initialNonce names the session.

        With ``peer_identity_key`` the response must come from that key."""
        session_nonce = create_nonce(self.wallet, random_part=self._random(16))
        requested = self.config.requested_certificates
        session = Session(
            session_nonce=session_nonce,
            peer_identity_key=peer_identity_key,
            initiator=True,
            last_update_ms=now_ms,
            started_ms=now_ms,
            handshake_deadline_ms=now_ms + self.config.handshake_timeout_ms,
            certificates_required=requested.required,
            requested=requested,
        )
        self._add(session)
        assert session.handshake_deadline_ms is not None
        self._arm(session, session.handshake_deadline_ms)
        return AuthMessage(
            message_type=MessageType.INITIAL_REQUEST,
            identity_key=self.identity_key,
            initial_nonce=session_nonce,
            requested_certificates=requested,
        )

    # --- receiving ------------------------------------------------------------------------

    def receive(
        self, message: AuthMessage, now_ms: int, *, source: str | None = None
    ) -> list[Event]:
        """Process one message; raise a :class:`Brc103Error` (nothing changes) to refuse it.

        ``source`` names where the message came from (a BRC-104 server: the client's
        address); the unproven sessions that initialRequests make are bounded per source
        (``PeerConfig.max_unproven_sessions_per_source``)."""
        if message.message_type is MessageType.INITIAL_REQUEST:
            events = self._on_initial_request(message, now_ms, source)
        else:
            handler = {
                MessageType.INITIAL_RESPONSE: self._on_initial_response,
                MessageType.CERTIFICATE_REQUEST: self._on_certificate_request,
                MessageType.CERTIFICATE_RESPONSE: self._on_certificate_response,
                MessageType.GENERAL: self._on_general,
            }[message.message_type]
            events = handler(message, now_ms)
        return self._with_late(events)

    def receive_any(
        self, candidates: list[AuthMessage], now_ms: int
    ) -> tuple[AuthMessage, list[Event]]:
        """Receive one message that can be read several ways (BRC-104 payloads whose
        signer may have written an empty part as -1 or 0): the first candidate whose
        signature verifies. A refused candidate changes nothing, so the next is tried;
        the last one's error is raised."""
        for candidate in candidates[:-1]:
            try:
                return candidate, self.receive(candidate, now_ms)
            except MessageSignatureError:
                continue
        return candidates[-1], self.receive(candidates[-1], now_ms)

    def _with_late(self, events: list[Event]) -> list[Event]:
        if self._late:
            events, self._late = self._late + events, []
        return events

    def _on_initial_request(
        self, message: AuthMessage, now_ms: int, source: str | None
    ) -> list[Event]:
        their_nonce = message.initial_nonce
        assert their_nonce is not None  # the parser requires it
        our_nonce = create_nonce(self.wallet, random_part=self._random(16))
        requested = self.config.requested_certificates
        session = Session(
            session_nonce=our_nonce,
            peer_identity_key=message.identity_key,
            initiator=False,
            last_update_ms=now_ms,
            started_ms=now_ms,
            source=source,
            peer_nonce=their_nonce,
            is_authenticated=True,  # as the reference: the peer proves itself by signing
            certificates_required=requested.required,
            requested=requested,
        )
        certificates: list[VerifiableCertificate] = []
        events: list[Event] = []
        their_request = message.requested_certificates
        if their_request is not None and their_request.required:
            if self.config.answer_certificate_requests:
                certificates = self.prove(their_request, message.identity_key)
            else:
                events.append(CertificatesRequested(our_nonce, message.identity_key, their_request))
        signature = self.wallet.create_signature(
            b64decode(their_nonce, "initialNonce") + b64decode(our_nonce, "initialNonce"),
            SIGNATURE_PROTOCOL,
            f"{their_nonce} {our_nonce}",
            message.identity_key,
        )
        self._add(session)
        self._outbox.append(
            AuthMessage(
                message_type=MessageType.INITIAL_RESPONSE,
                identity_key=self.identity_key,
                initial_nonce=our_nonce,
                your_nonce=their_nonce,
                certificates=certificates or None,
                requested_certificates=requested,
                signature=signature,
            )
        )
        return events

    def _on_initial_response(self, message: AuthMessage, now_ms: int) -> list[Event]:
        session = self._session_for(message)
        if not session.initiator or session.is_authenticated:
            raise UnexpectedMessageError("initialResponse for a session that is not awaiting one")
        if session.peer_identity_key not in (None, message.identity_key):
            raise IdentityMismatchError(
                f"expected a response from {session.peer_identity_key}, "
                f"got one from {message.identity_key}"
            )
        our_nonce, their_nonce = session.session_nonce, message.initial_nonce
        assert their_nonce is not None
        assert message.signature is not None
        self._verify(
            b64decode(our_nonce, "yourNonce") + b64decode(their_nonce, "initialNonce"),
            message.signature,
            f"{our_nonce} {their_nonce}",
            message.identity_key,
        )
        # Certificates are checked before anything changes, so a bad one refuses the lot.
        received = self._validate_certificates(message, session) if message.certificates else []
        if session.peer_identity_key is None:
            self.sessions.set_identity(session, message.identity_key)
        session.peer_nonce = their_nonce
        session.is_authenticated = True
        self.sessions.mark_proven(session)
        session.handshake_deadline_ms = None
        session.last_update_ms = now_ms
        identity = message.identity_key
        events: list[Event] = [HandshakeCompleted(session.session_nonce, identity)]
        if received:
            events.extend(self._accept_certificates(session, received))
        elif session.certificates_required:
            self._hold_until(session, now_ms + self.config.certificate_timeout_ms)
        their_request = message.requested_certificates
        if their_request is not None and their_request.required:
            events.extend(self._answer_request(session, their_request, only_if_any=True))
        return events

    def _on_certificate_request(self, message: AuthMessage, now_ms: int) -> list[Event]:
        session = self._check_signed(message)
        self._commit_signed(session, message, now_ms)
        requested = message.requested_certificates or NO_REQUEST
        return self._answer_request(session, requested, only_if_any=False)

    def _on_certificate_response(self, message: AuthMessage, now_ms: int) -> list[Event]:
        session = self._check_signed(message)
        received = self._validate_certificates(message, session) if message.certificates else []
        self._commit_signed(session, message, now_ms)
        session.certificates_answered = True
        if received:
            return self._accept_certificates(session, received)
        if session.certificates_required and not session.certificates_validated:
            # It has none: what it holds now and what it sends later is refused at once
            # (until certificates validate), never held for the timeout.
            assert session.peer_identity_key is not None
            session.certificates_missing = True
            held = self._take_held(session)
            error = CertificatesMissingError("the peer has none of the requested certificates")
            return [
                HeldMessagesDropped(session.session_nonce, session.peer_identity_key, held, error)
            ]
        return []

    def _on_general(self, message: AuthMessage, now_ms: int) -> list[Event]:
        session = self._check_signed(message)
        if session.certificates_required and not session.certificates_validated:
            if session.certificates_missing:
                raise CertificatesMissingError(
                    "the peer has none of the requested certificates; show one first"
                )
            size = len(message.payload or b"")
            config = self.config
            if (
                len(session.held) >= config.max_held_messages
                or session.held_bytes + size > config.max_held_bytes
                or self.sessions.held_total + size > config.max_held_total
            ):
                raise UnexpectedMessageError(
                    "too many general messages held while waiting for certificates"
                )
            session.held.append(message)
            session.held_bytes += size
            self.sessions.held_total += size
            self._commit_signed(session, message, now_ms)
            if session.held and session.held_deadline_ms is None:
                self._hold_until(session, *self._hold_deadline(session, now_ms))
            return []
        self._commit_signed(session, message, now_ms)
        assert session.peer_identity_key is not None
        return [
            GeneralMessageReceived(
                session.session_nonce, session.peer_identity_key, message.payload or b"", message
            )
        ]

    def _add(self, session: Session) -> None:
        self._late.extend(self._dropped(old) for old in self.sessions.add(session))
        if self.config.session_idle_ms is not None:
            self._arm(session, session.last_update_ms + self.config.session_idle_ms)

    def _dropped(self, session: Session) -> Event:
        """What the application hears about a session dropped to stay within bounds."""
        error = SessionNotFoundError("the session was dropped to make room for others")
        if session.handshake_deadline_ms is not None:
            return HandshakeFailed(session.session_nonce, error)
        held = self._take_held(session)
        return HeldMessagesDropped(
            session.session_nonce, session.peer_identity_key or "", held, error
        )

    def _take_held(self, session: Session) -> list[AuthMessage]:
        held = session.held
        self.sessions.held_total -= session.held_bytes
        session.held, session.held_bytes, session.held_deadline_ms = [], 0, None
        session.held_is_grace = False
        return held

    def _hold_deadline(self, session: Session, now_ms: int) -> tuple[int, bool]:
        """When messages held from ``now_ms`` give up: the certificate timeout, or the
        grace for a peer that has sent no certificateResponse yet (then True)."""
        timeout = now_ms + self.config.certificate_timeout_ms
        grace = self.config.certificate_grace_ms
        if grace is None or session.certificates_answered:
            return timeout, False
        grace = max(grace, min(2 * (now_ms - session.started_ms), MAX_SCALED_GRACE_MS))
        if now_ms + grace >= timeout:
            return timeout, False
        return now_ms + grace, True

    def _hold_until(self, session: Session, deadline: int, is_grace: bool = False) -> None:
        session.held_deadline_ms = deadline
        session.held_is_grace = is_grace
        self._arm(session, deadline)

    # --- checks -------------------------------------------------------------------------

    def _session_for(self, message: AuthMessage) -> Session:
        """The session our nonce in ``yourNonce`` names.

        Every key of the session table is a nonce we made, so a hit needs no HMAC check;
        a miss is checked, to tell a forged or foreign nonce from an expired session."""
        your_nonce = message.your_nonce
        assert your_nonce is not None
        session = self.sessions.get(your_nonce)
        if session is None:
            verify_nonce(self.wallet, your_nonce)
            raise SessionNotFoundError(f"Session not found for nonce: {your_nonce}")
        return session

    def _check_signed(self, message: AuthMessage) -> Session:
        """Nonce, session, identity, replay and signature of a certificate or general
        message; nothing is recorded until :meth:`_commit_signed`."""
        session = self._session_for(message)
        if not session.is_authenticated:
            raise UnexpectedMessageError("the session's handshake is not complete")
        if message.identity_key != session.peer_identity_key:
            raise IdentityMismatchError(
                f"message names {message.identity_key}, the session is with "
                f"{session.peer_identity_key}"
            )
        nonce = message.nonce
        assert nonce is not None
        assert message.signature is not None
        if nonce in session.seen_nonces:
            raise ReplayError("this message nonce was already accepted in the session")
        self._verify(
            message.signed_data(),
            message.signature,
            f"{nonce} {session.session_nonce}",
            session.peer_identity_key,
        )
        return session

    def _commit_signed(self, session: Session, message: AuthMessage, now_ms: int) -> None:
        """Record an accepted signed message: its nonce, the proof of the peer, the use."""
        assert message.nonce is not None
        evicted = self.sessions.remember_nonce(session, message.nonce)
        self._late.extend(self._dropped(old) for old in evicted)
        self.sessions.mark_proven(session)
        self.sessions.touch(session)
        session.last_update_ms = now_ms
        if len(session.seen_nonces) >= self.config.max_session_messages:
            # Replay memory must stay bounded: this session ends, the next message finds
            # none and the peer handshakes again (reference clients do so by themselves).
            self.sessions.remove(session)
            if session.held:
                self._late.append(self._dropped(session))

    def _verify(self, data: bytes, signature: bytes, key_id: str, signer: str | None) -> None:
        if signer is None:
            raise SessionNotFoundError("the session has no peer identity yet")
        try:
            self.wallet.verify_signature(data, signature, SIGNATURE_PROTOCOL, key_id, signer)
        except (InvalidSignatureError, InvalidKeyError):
            raise MessageSignatureError("Signature is not valid") from None

    # --- certificates -------------------------------------------------------------------

    def _validate_certificates(
        self, message: AuthMessage, session: Session
    ) -> list[VerifiableCertificate]:
        """Every certificate must be the sender's, signed, unrevoked, requested (certifier,
        type and each revealed field) and decryptable by us."""
        requested = session.requested or NO_REQUEST
        out: list[VerifiableCertificate] = []
        for certificate in message.certificates or []:
            cert = certificate.certificate
            if cert.subject != message.identity_key:
                raise CertificateError("a certificate's subject is not the sender")
            why = requested.allows(cert.certifier, cert.type, list(certificate.keyring))
            if why is not None:
                raise UnrequestedCertificateError(why)
            cert.verify()
            check_revocation(cert, self.revocation)
            fields = certificate.decrypt_fields(self.wallet)
            out.append(VerifiableCertificate(cert, certificate.keyring, fields))
        return out

    def _accept_certificates(
        self, session: Session, received: list[VerifiableCertificate]
    ) -> list[Event]:
        assert session.peer_identity_key is not None
        session.certificates.extend(received)
        events: list[Event] = [
            CertificatesReceived(session.session_nonce, session.peer_identity_key, received)
        ]
        session.certificates_missing = False
        if not session.certificates_validated:
            session.certificates_validated = True
            held = self._take_held(session)
            events.extend(
                GeneralMessageReceived(
                    session.session_nonce, session.peer_identity_key, m.payload or b"", m
                )
                for m in held
            )
        return events

    def prove(self, requested: RequestedCertificates, verifier: str) -> list[VerifiableCertificate]:
        """Our certificates that answer ``requested``, revealing the requested fields."""
        out: list[VerifiableCertificate] = []
        for master in self.config.certificates:
            cert = master.certificate
            wanted = requested.types.get(cert.type)
            if cert.certifier not in requested.certifiers or wanted is None:
                continue
            names = [name for name in wanted if name in cert.fields]
            if names:
                out.append(master.reveal(self.wallet, verifier, names))
        return out

    def _answer_request(
        self, session: Session, requested: RequestedCertificates, *, only_if_any: bool
    ) -> list[Event]:
        assert session.peer_identity_key is not None
        if not self.config.answer_certificate_requests:
            return [
                CertificatesRequested(session.session_nonce, session.peer_identity_key, requested)
            ]
        certificates = self.prove(requested, session.peer_identity_key)
        if certificates or not only_if_any:
            self._outbox.append(self.create_certificate_response(certificates, session=session))
        return []

    def answer_certificate_request(
        self, requested: RequestedCertificates, *, identity_key: str
    ) -> list[Event]:
        """Answer a request that came outside a certificateRequest message (a BRC-104
        response header): queue a certificateResponse if we hold matching certificates."""
        return self._answer_request(
            self.session(identity_key=identity_key), requested, only_if_any=True
        )

    # --- sending --------------------------------------------------------------------------

    def has_session(self, identity_key: str) -> bool:
        """Is there an authenticated session to send on to ``identity_key``?"""
        return self.sessions.by_identity(identity_key) is not None

    def session(
        self, *, identity_key: str | None = None, session_nonce: str | None = None
    ) -> Session:
        """The session to send on: by our nonce, else the latest with ``identity_key``."""
        session = None
        if session_nonce is not None:
            session = self.sessions.get(session_nonce)
        elif identity_key is not None:
            session = self.sessions.by_identity(identity_key)
        if session is None or not session.is_authenticated:
            raise SessionNotFoundError("no authenticated session with that peer")
        return session

    def _signed(
        self, session: Session, message_type: MessageType, **members: object
    ) -> AuthMessage:
        assert session.peer_nonce is not None
        assert session.peer_identity_key is not None
        nonce = b64encode(self._random(32))
        message = AuthMessage(
            message_type=message_type,
            identity_key=self.identity_key,
            nonce=nonce,
            your_nonce=session.peer_nonce,
            **members,  # type: ignore[arg-type]
        )
        message.signature = self.wallet.create_signature(
            message.signed_data(),
            SIGNATURE_PROTOCOL,
            f"{nonce} {session.peer_nonce}",
            session.peer_identity_key,
        )
        return message

    def create_general(
        self,
        payload: bytes,
        *,
        identity_key: str | None = None,
        session_nonce: str | None = None,
        session: Session | None = None,
    ) -> AuthMessage:
        """A signed general message on ``session`` (which may since have left the table:
        an answer to a request it carried is still owed), else on the session that
        ``session_nonce`` names, else on the latest proven one with ``identity_key``."""
        if session is None:
            session = self.session(identity_key=identity_key, session_nonce=session_nonce)
        if session.certificates_required and not session.certificates_validated:
            raise UnexpectedMessageError(
                "Cannot send general message before certificate validation is complete"
            )
        return self._signed(session, MessageType.GENERAL, payload=bytes(payload))

    def create_certificate_request(
        self,
        requested: RequestedCertificates,
        *,
        identity_key: str | None = None,
        session_nonce: str | None = None,
    ) -> AuthMessage:
        session = self.session(identity_key=identity_key, session_nonce=session_nonce)
        session.requested = requested
        session.certificates_required = requested.required
        return self._signed(
            session,
            MessageType.CERTIFICATE_REQUEST,
            initial_nonce=session.session_nonce,
            requested_certificates=requested,
        )

    def create_certificate_response(
        self,
        certificates: list[VerifiableCertificate],
        *,
        session: Session | None = None,
        identity_key: str | None = None,
        session_nonce: str | None = None,
    ) -> AuthMessage:
        if session is None:
            session = self.session(identity_key=identity_key, session_nonce=session_nonce)
        return self._signed(
            session,
            MessageType.CERTIFICATE_RESPONSE,
            initial_nonce=session.session_nonce,
            certificates=list(certificates),
        )

    # --- timers ---------------------------------------------------------------------------

    def get_timer(self) -> int | None:
        """The next deadline (ms) at which :meth:`handle_timer` has work, if any."""
        while self._deadlines:
            deadline, _, nonce = self._deadlines[0]
            if self.sessions.get(nonce) is not None:
                return deadline
            heapq.heappop(self._deadlines)  # the session is gone
        return None

    def handle_timer(self, now_ms: int) -> list[Event]:
        events: list[Event] = []
        while self._deadlines and self._deadlines[0][0] <= now_ms:
            _, _, nonce = heapq.heappop(self._deadlines)
            session = self.sessions.get(nonce)
            if session is not None:
                events.extend(self._expire(session, now_ms))
        return self._with_late(events)

    def _arm(self, session: Session, deadline: int) -> None:
        self._sequence += 1
        heapq.heappush(self._deadlines, (deadline, self._sequence, session.session_nonce))

    def _expire(self, session: Session, now_ms: int) -> list[Event]:
        if session.handshake_deadline_ms is not None and now_ms >= session.handshake_deadline_ms:
            self.sessions.remove(session)
            timeout = HandshakeTimeoutError("no initialResponse before the handshake timeout")
            return [HandshakeFailed(session.session_nonce, timeout)]
        events: list[Event] = []
        if session.held_deadline_ms is not None and now_ms >= session.held_deadline_ms:
            silent = session.held_is_grace
            held = self._take_held(session)
            assert session.peer_identity_key is not None
            error: Brc103Error
            if silent:
                # It sent no certificateResponse at all: it has none (the TS AuthFetch
                # says nothing then). Later messages are refused at once too.
                session.certificates_missing = True
                error = CertificatesMissingError(
                    "the peer sent none of the requested certificates in time"
                )
            else:
                error = CertificatesTimeoutError(
                    "Timeout waiting for certificate validation from peer "
                    f"{session.peer_identity_key}"
                )
            events.append(
                HeldMessagesDropped(session.session_nonce, session.peer_identity_key, held, error)
            )
        idle = self.config.session_idle_ms
        if idle is not None:
            if now_ms - session.last_update_ms >= idle:
                self.sessions.remove(session)
                if session.handshake_deadline_ms is not None:
                    timeout = HandshakeTimeoutError("the session went idle before its handshake")
                    events.append(HandshakeFailed(session.session_nonce, timeout))
                elif session.held:
                    error = CertificatesTimeoutError("the session went idle with messages held")
                    held = self._take_held(session)
                    identity = session.peer_identity_key or ""
                    events.append(HeldMessagesDropped(session.session_nonce, identity, held, error))
            else:
                self._arm(session, session.last_update_ms + idle)
        return events

    def unhold(self, message: AuthMessage) -> bool:
        """Let go of a general message held for its session's certificates, without an
        event (the application has answered it otherwise: a driver that evicted the
        request it came in). False if it is not held."""
        session = self.sessions.get(message.your_nonce or "")
        if session is None:
            return False
        index = next((i for i, held in enumerate(session.held) if held is message), None)
        if index is None:
            return False
        del session.held[index]
        size = len(message.payload or b"")
        session.held_bytes -= size
        self.sessions.held_total -= size
        if not session.held:
            session.held_deadline_ms = None  # its timer finds nothing to do
            session.held_is_grace = False
        return True

    def forget(self, session_nonce: str) -> None:
        """Drop a session (a transport closed, or the application is done with it)."""
        session = self.sessions.get(session_nonce)
        if session is not None:
            self.sessions.remove(session)


__all__ = [
    "CertificatesReceived",
    "CertificatesRequested",
    "Event",
    "GeneralMessageReceived",
    "HandshakeCompleted",
    "HandshakeFailed",
    "HeldMessagesDropped",
    "Peer",
    "PeerConfig",
]
