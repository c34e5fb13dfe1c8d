"""The Catalyst session: RFC 4271's FSM over one mutually authenticated TLS connection.

States: Idle -> OpenSent (our OPEN is out) -> OpenConfirm (their OPEN checked, our
KEEPALIVE out) -> Established (their KEEPALIVE in). "Connect" is the TLS layer's job:
this core starts only once the peer has accepted our certificate. Every check failure
sends a NOTIFICATION with its code and subcode, then closes (docs/protocols/catalyst.md).

A session lives no longer than its certificates: it reads when the earlier of the two
expires from its TLS binding at start and ceases then (6/240); the application ends it
when a newer CRL revokes the peer's certificate (:meth:`CatalystSession.revoke`, 6/241).
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import hmac
import ipaddress
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from cryptography import x509

from trustmesh.catalyst import messages as m
from trustmesh.catalyst.collision import CollisionRegistry
from trustmesh.catalyst.errors import CatalystError
from trustmesh.catalyst.jose import JWS_EXPORTER_LABEL, JwsSigner, verify_detached
from trustmesh.catalyst.policy import PeeringPolicy, PeeringRequest
from trustmesh.errors import DecodeError, OversizeError
from trustmesh.sansio import Authenticated, ConnectionClosed, Event
from trustmesh.wire.frames import FrameDecoder
from trustmesh.wire.varint import encode_uvarint

if TYPE_CHECKING:
    from trustmesh.tls.stream import TlsEstablished

OPEN_HOLD_TIME = 240.0  # RFC 4271's "large" hold time; we wait open_timeout instead
DEFAULT_OPEN_TIMEOUT = 10.0  # for the peer's OPEN, and then for its KEEPALIVE
DEFAULT_MIN_HOLD_TIME = 9  # keepalives from a peer at most every 3 s
PSK_EXPORTER_LABEL = b"EXPORTER-catalyst-psk"
EXPORTER_LENGTH = 32
# Cease subcodes private to trustmesh (RFC 4271 leaves 240 and up unassigned): a session
# ends when a certificate it runs on stops being valid (docs/protocols/catalyst.md 8).
CEASE_CERTIFICATE_EXPIRED = 240  # the peer's certificate or ours expired
CEASE_CERTIFICATE_REVOKED = 241  # a newer CRL revokes the peer's certificate


class TlsBinding(Protocol):
    """What the session needs from its TLS connection."""

    def peer_names(self) -> frozenset[str]:
        """The peer certificate's CN and SAN names (DNS, URI, and IP in canonical form)."""

    def exporter(self, label: bytes, context: bytes) -> bytes:
        """RFC 8446 exporter output, EXPORTER_LENGTH bytes."""

    @property
    def established(self) -> TlsEstablished | None:
        """The handshake's outcome once connected: the peer's chain, and ``expires_at``,
        when the earlier of the two certificates expires (on the session's clock)."""


@dataclass(frozen=True)
class Peer:
    """A permitted peer: an ASN, optionally pinned to one BGP identifier."""

    asn: int
    identifier: str | None = None

    def matches(self, asn: int, identifier: str) -> bool:
        return asn == self.asn and self.identifier in (None, identifier)


@dataclass
class Counters:
    """Shared by every session of a node: what an operator graphs."""

    sessions_established: int = 0
    hold_timer_expiries: int = 0
    notifications_sent: Counter[tuple[int, int]] = field(default_factory=Counter)
    notifications_received: Counter[tuple[int, int]] = field(default_factory=Counter)


@dataclass(frozen=True)
class CatalystConfig:
    """One node's settings.

    ``open_timeout``: how long we wait for the peer's OPEN once ours is out (OpenSent),
    and then for its KEEPALIVE (OpenConfirm, or the hold time if that is shorter); a
    peer late for either gets NOTIFICATION 4/0. Unlike RFC 4271's 240 s, a peer that
    completed TLS 1.3 has no reason to be slow.
    ``min_hold_time``: a peer's OPEN whose hold time is not 0 but below this is refused
    (2/6). It never exceeds our own ``hold_time``: what we offer, we accept (and with
    our own 0 the peer's offer does not matter: the session has no hold timer).
    ``allow_zero_hold``: accept a peer's hold time of 0 (no hold timer, no keepalives:
    a peer that goes silent is held until TCP notices). Refused (2/6) unless set, or
    unless our own ``hold_time`` is 0 and the session has no hold timer anyway.
    """

    my_asn: int
    bgp_identifier: str
    hold_time: int = 180
    permitted: tuple[Peer, ...] = ()  # empty: any peer whose certificate validates
    psk_secrets: Mapping[str, bytes] = field(default_factory=dict)
    psk_key_id: str | None = None  # the secret we prove, sent as "psk"
    require_psk: bool = False
    jws_key: JwsSigner | None = None  # signs our OPEN; its public key goes in "jwks"
    require_jws: bool = False
    capabilities: tuple[str, ...] = ()
    policy: PeeringPolicy | None = None  # asked last, once every other check passed
    open_timeout: float = DEFAULT_OPEN_TIMEOUT
    min_hold_time: int = DEFAULT_MIN_HOLD_TIME
    allow_zero_hold: bool = False

    def __post_init__(self) -> None:
        if self.hold_time in (1, 2) or not 0 <= self.hold_time <= m.MAX_HOLD_TIME:
            raise ValueError("hold_time must be 0 or 3..65535 seconds")
        if not 3 <= self.min_hold_time <= m.MAX_HOLD_TIME:
            raise ValueError("min_hold_time must be 3..65535 seconds")
        if not 0 < self.open_timeout <= OPEN_HOLD_TIME:
            raise ValueError(f"open_timeout must be in (0, {OPEN_HOLD_TIME:g}] seconds")
        if not 0 < self.my_asn <= m.MAX_ASN:
            raise ValueError("my_asn must be in 1..4294967295")
        if self.psk_key_id is not None and self.psk_key_id not in self.psk_secrets:
            raise ValueError(f"no secret for PSK key id {self.psk_key_id!r}")
        if self.require_psk and not self.psk_secrets:
            raise ValueError("require_psk needs at least one PSK secret")


class State(enum.Enum):
    IDLE = "idle"
    OPEN_SENT = "open-sent"
    OPEN_CONFIRM = "open-confirm"
    ESTABLISHED = "established"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SessionEstablished(Authenticated):
    peer_id: str
    peer_asn: int
    hold_time: int


@dataclass(frozen=True, slots=True)
class NotificationEvent(Event):
    """A NOTIFICATION we sent (``direction="sent"``) or received."""

    code: int
    subcode: int
    message: str
    direction: str


@dataclass(frozen=True, slots=True)
class KeepaliveReceived(Event):
    """The peer's KEEPALIVE arrived on an established session (the hold timer restarted)."""


class CatalystSession:
    """One side of one Catalyst session; ``initiator`` is the side that dialled."""

    def __init__(
        self,
        config: CatalystConfig,
        *,
        initiator: bool,
        binding: TlsBinding | None = None,
        counters: Counters | None = None,
        registry: CollisionRegistry[CatalystSession] | None = None,
    ) -> None:
        self.config = config
        self.initiator = initiator
        self.binding = binding
        self.counters = counters if counters is not None else Counters()
        self.registry = registry
        self.state = State.IDLE
        self.offered: m.Open | None = None  # the peer's OPEN as received, checked or not
        self.peer: m.Open | None = None  # the peer's OPEN once every check passed
        self.hold_time: int | None = None  # negotiated
        self._decoder = FrameDecoder(m.MAX_MESSAGE)
        self._out: list[bytes] = []
        self._hold_deadline: float | None = None
        self._keepalive_due: float | None = None
        # When the earlier of the two certificates expires (from TLS, at start).
        self._expires_at: float | None = None

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def expires_at(self) -> float | None:
        """When this session ceases because a certificate expires (None: never, or not
        started)."""
        return self._expires_at

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The peer's certificate, once TLS is connected."""
        tls = self.binding.established if self.binding is not None else None
        return tls.peer_chain[0] if tls is not None and tls.peer_chain else None

    def bind(self, binding: TlsBinding) -> None:
        self.binding = binding

    # --- StreamCore -------------------------------------------------------------------

    def start(self, now: float) -> list[Event]:
        if self.state is not State.IDLE:
            return []
        tls = self.binding.established if self.binding is not None else None
        self._expires_at = tls.expires_at if tls is not None else None
        self._send(self._our_open())
        self.state = State.OPEN_SENT
        self._hold_deadline = now + self.config.open_timeout
        return []

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        if not data:
            return self._finish("peer closed the connection", error=True, by_peer=True)
        events: list[Event] = []
        try:
            try:
                frames, error = self._decoder.feed(data), None
            except DecodeError as exc:
                frames, error = list(exc.frames), exc
            for frame in frames:
                self._on_message(m.decode(frame), now, events)
                if self.closed:  # a NOTIFICATION from the peer ended it
                    return events
            if error is not None:
                raise CatalystError(
                    f"bad framing: {error}",
                    code=m.MESSAGE_HEADER_ERROR,
                    subcode=m.BAD_MESSAGE_LENGTH,
                )
        except CatalystError as exc:
            events += self._notify(exc.code, exc.subcode, str(exc))
        return events

    def handle_timer(self, now: float) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        if self._expires_at is not None and now >= self._expires_at:
            return self._notify(m.CEASE, CEASE_CERTIFICATE_EXPIRED, "certificate expired")
        if self._hold_deadline is not None and now >= self._hold_deadline:
            self.counters.hold_timer_expiries += 1
            return self._notify(m.HOLD_TIMER_EXPIRED, 0, "hold timer expired")
        if self._keepalive_due is not None and now >= self._keepalive_due:
            self._send(m.Keepalive())
            self._schedule_keepalive(now)
        return []

    def get_timer(self) -> float | None:
        if self.state is State.CLOSED:
            return None
        deadlines = [
            d for d in (self._hold_deadline, self._keepalive_due, self._expires_at) if d is not None
        ]
        return min(deadlines) if deadlines else None

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def close(self, reason: str, now: float) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        return self._notify(m.CEASE, m.CEASE_ADMIN_SHUTDOWN, reason, error=False)

    def evict(self, now: float) -> list[Event]:
        """Close because a newer session to the same peer won the collision (6/7)."""
        if self.state is State.CLOSED:
            return []
        return self._notify(m.CEASE, m.CEASE_COLLISION, "connection collision resolution")

    def revoke(self, now: float) -> list[Event]:
        """Close because the peer's certificate is revoked (a CRL that arrived while the
        session lived, 6/241). The application decides; the core only ends the session."""
        if self.state is State.CLOSED:
            return []
        return self._notify(m.CEASE, CEASE_CERTIFICATE_REVOKED, "certificate revoked")

    # --- the FSM ----------------------------------------------------------------------

    def _on_message(self, message: m.Message, now: float, events: list[Event]) -> None:
        if isinstance(message, m.Notification):
            self.counters.notifications_received[(message.code, message.subcode)] += 1
            events.append(
                NotificationEvent(message.code, message.subcode, message.message, "received")
            )
            events += self._finish(
                f"peer sent NOTIFICATION {message.code}/{message.subcode}: {message.message}",
                # A Cease is an orderly end, unless it says a certificate failed.
                error=message.code != m.CEASE
                or message.subcode in (CEASE_CERTIFICATE_EXPIRED, CEASE_CERTIFICATE_REVOKED),
                by_peer=True,
            )
            return
        if self.state is State.OPEN_SENT:
            if not isinstance(message, m.Open):
                raise CatalystError("expected OPEN", code=m.FSM_ERROR, subcode=1)
            self.offered = message
            self._check_open(message)
            self.peer = message  # proven; kept even if the collision check ends us
            if self.registry is not None and not self.registry.claim(self, message.bgp_identifier):
                raise CatalystError(
                    f"connection collision with {message.bgp_identifier}: the other "
                    "connection survives",
                    code=m.CEASE,
                    subcode=m.CEASE_COLLISION,
                )
            hold = min(self.config.hold_time, message.hold_time)
            self.hold_time = hold
            self._send(m.Keepalive())
            self.state = State.OPEN_CONFIRM
            # The KEEPALIVE that confirms our OPEN is due at once: wait open_timeout
            # for it, even when the negotiated hold time is longer or 0.
            wait = min(hold, self.config.open_timeout) if hold else self.config.open_timeout
            self._hold_deadline = now + wait
            self._schedule_keepalive(now)
        elif self.state is State.OPEN_CONFIRM:
            if not isinstance(message, m.Keepalive):
                raise CatalystError("expected KEEPALIVE", code=m.FSM_ERROR, subcode=2)
            assert self.peer is not None
            assert self.hold_time is not None
            self.state = State.ESTABLISHED
            self.counters.sessions_established += 1
            self._restart_hold(now)
            events.append(
                SessionEstablished(self.peer.bgp_identifier, self.peer.my_asn, self.hold_time)
            )
        elif self.state is State.ESTABLISHED:
            if not isinstance(message, m.Keepalive):
                raise CatalystError("unexpected OPEN", code=m.FSM_ERROR, subcode=3)
            self._restart_hold(now)
            events.append(KeepaliveReceived())

    def _check_open(self, peer: m.Open) -> None:
        self._check_hold_time(peer.hold_time)
        binding = self._binding()
        names = binding.peer_names()
        if peer.bgp_identifier == self.config.bgp_identifier:
            raise CatalystError(
                f"the peer claims our own BGP identifier {peer.bgp_identifier!r}",
                code=m.OPEN_MESSAGE_ERROR,
                subcode=m.BAD_BGP_IDENTIFIER,
            )
        if not identifier_in(peer.bgp_identifier, names):
            raise CatalystError(
                f"bgpIdentifier {peer.bgp_identifier!r} is not in the peer certificate "
                f"(CN/SAN: {', '.join(sorted(names)) or 'none'})",
                code=m.OPEN_MESSAGE_ERROR,
                subcode=m.BAD_BGP_IDENTIFIER,
            )
        permitted = self.config.permitted
        if permitted and not any(p.matches(peer.my_asn, peer.bgp_identifier) for p in permitted):
            raise CatalystError(
                f"AS{peer.my_asn} ({peer.bgp_identifier}) is not a permitted peer",
                code=m.OPEN_MESSAGE_ERROR,
                subcode=m.BAD_PEER_AS,
            )
        psk_key_id = self._check_psk(peer, binding)
        jws_kid = self._check_jws(peer, binding)
        if self.config.policy is not None:
            refusal = self.config.policy.decide(
                PeeringRequest(
                    local_asn=self.config.my_asn,
                    local_identifier=self.config.bgp_identifier,
                    peer_asn=peer.my_asn,
                    peer_identifier=peer.bgp_identifier,
                    certificate_names=names,
                    psk_key_id=psk_key_id,
                    jws_kid=jws_kid,
                    capabilities=peer.capabilities,
                    initiator=self.initiator,
                )
            )
            if refusal is not None:
                raise CatalystError(
                    f"peering policy refused {peer.bgp_identifier}: {refusal}",
                    code=m.OPEN_MESSAGE_ERROR,
                    subcode=m.POLICY_REFUSED,
                )

    def _check_hold_time(self, hold: int) -> None:
        """RFC 4271 6.2: an implementation may refuse hold times it finds too low."""
        cfg = self.config
        if hold in (1, 2):
            raise CatalystError(
                "hold time of 1 or 2 s", code=m.OPEN_MESSAGE_ERROR, subcode=m.UNACCEPTABLE_HOLD_TIME
            )
        if hold == 0:
            if not cfg.allow_zero_hold and cfg.hold_time != 0:
                raise CatalystError(
                    "hold time 0 (no hold timer) is not allowed here",
                    code=m.OPEN_MESSAGE_ERROR,
                    subcode=m.UNACCEPTABLE_HOLD_TIME,
                )
            return
        floor = min(cfg.min_hold_time, cfg.hold_time)  # with ours 0, theirs does not count
        if hold < floor:
            raise CatalystError(
                f"hold time {hold} s is below our minimum of {floor} s",
                code=m.OPEN_MESSAGE_ERROR,
                subcode=m.UNACCEPTABLE_HOLD_TIME,
            )

    def _check_jws(self, peer: m.Open, binding: TlsBinding) -> str | None:
        """Verify the OPEN's signature, if any; return the kid that signed it."""
        if peer.jws is None:
            if peer.jwks is not None or self.config.require_jws:
                raise CatalystError(
                    "OPEN carries no jws signature",
                    code=m.OPEN_MESSAGE_ERROR,
                    subcode=m.JWS_BAD_SIGNATURE,
                )
            return None
        if peer.jwks is None:
            raise CatalystError(
                "jws without jwks", code=m.OPEN_MESSAGE_ERROR, subcode=m.JWKS_MALFORMED
            )
        payload = jws_payload(peer, binding, sender_is_initiator=not self.initiator)
        return verify_detached(peer.jws, payload, peer.jwks)

    def _check_psk(self, peer: m.Open, binding: TlsBinding) -> str | None:
        """Verify the OPEN's PSK proof, if any; return the key id it proved.

        A node that holds no secrets cannot check a proof and relies on none: it ignores
        it (the policy sees no PSK). A node that holds secrets refuses an unknown key id.
        """
        if peer.psk is None:
            if self.config.require_psk:
                raise CatalystError(
                    "a PSK proof is required", code=m.OPEN_MESSAGE_ERROR, subcode=m.PSK_REQUIRED
                )
            return None
        if not self.config.psk_secrets:
            return None
        secret = self.config.psk_secrets.get(peer.psk)
        if secret is None:
            raise CatalystError(
                f"unknown PSK key id {peer.psk!r}",
                code=m.OPEN_MESSAGE_ERROR,
                subcode=m.PSK_UNKNOWN_KEY,
            )
        expected = psk_proof(secret, binding, sender_is_initiator=not self.initiator)
        if peer.psk_proof is None or not hmac.compare_digest(
            peer.psk_proof.encode(), expected.encode()
        ):
            raise CatalystError(
                "PSK proof does not match this session",
                code=m.OPEN_MESSAGE_ERROR,
                subcode=m.PSK_BAD_PROOF,
            )
        return peer.psk

    def _our_open(self) -> m.Open:
        cfg = self.config
        proof = None
        if cfg.psk_key_id is not None:
            proof = psk_proof(
                cfg.psk_secrets[cfg.psk_key_id], self._binding(), sender_is_initiator=self.initiator
            )
        ours = m.Open(
            my_asn=cfg.my_asn,
            bgp_identifier=cfg.bgp_identifier,
            hold_time=cfg.hold_time,
            psk=cfg.psk_key_id,
            jwks=cfg.jws_key.jwks() if cfg.jws_key else None,
            capabilities=cfg.capabilities,
            psk_proof=proof,
        )
        if cfg.jws_key is None:
            return ours
        payload = jws_payload(ours, self._binding(), sender_is_initiator=self.initiator)
        return dataclasses.replace(ours, jws=cfg.jws_key.sign_detached(payload))

    def _binding(self) -> TlsBinding:
        if self.binding is None:
            raise RuntimeError("the session has no TLS binding")
        return self.binding

    # --- output and timers ------------------------------------------------------------

    def _send(self, message: m.Message) -> None:
        payload = m.encode(message)
        if len(payload) > m.MAX_MESSAGE:
            raise OversizeError(
                f"frame of {len(payload)} bytes exceeds the {m.MAX_MESSAGE}-byte limit"
            )
        # The length prefix and the message queued apart: joined (copied) once, when sent.
        self._out += (encode_uvarint(len(payload)), payload)

    def _restart_hold(self, now: float) -> None:
        self._hold_deadline = now + self.hold_time if self.hold_time else None

    def _schedule_keepalive(self, now: float) -> None:
        self._keepalive_due = now + self.hold_time / 3 if self.hold_time else None

    def _notify(self, code: int, subcode: int, text: str, *, error: bool = True) -> list[Event]:
        self._send(m.Notification(code, subcode, text))
        self.counters.notifications_sent[(code, subcode)] += 1
        event = NotificationEvent(code, subcode, text, "sent")
        return [event, *self._finish(f"sent NOTIFICATION {code}/{subcode}: {text}", error=error)]

    def _finish(self, reason: str, *, error: bool, by_peer: bool = False) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        self.state = State.CLOSED
        self._hold_deadline = self._keepalive_due = None
        if self.registry is not None:
            self.registry.release(self)
        return [ConnectionClosed(reason, error=error, by_peer=by_peer)]


def jws_payload(message: m.Open, binding: TlsBinding, *, sender_is_initiator: bool) -> bytes:
    """What an OPEN's detached JWS signs: the canonical OPEN, then the exporter."""
    return message.canonical() + binding.exporter(JWS_EXPORTER_LABEL, _role(sender_is_initiator))


def psk_proof(secret: bytes, binding: TlsBinding, *, sender_is_initiator: bool) -> str:
    """base64url(HMAC-SHA256(secret, exporter)), the exporter's context naming the
    sender's role so that a proof cannot be reflected back to its sender."""
    exported = binding.exporter(PSK_EXPORTER_LABEL, _role(sender_is_initiator))
    mac = hmac.new(secret, exported, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def _role(sender_is_initiator: bool) -> bytes:
    """The exporter context of a proof: the role of the OPEN's sender."""
    return b"initiator" if sender_is_initiator else b"responder"


def identifier_in(identifier: str, names: frozenset[str]) -> bool:
    """Whether a BGP identifier is among a certificate's names; an identifier that is an
    IPv4 or IPv6 address also matches an IP SAN (names hold those in canonical form, so
    ``2001:DB8::1`` matches ``2001:db8::1``)."""
    if identifier in names:
        return True
    try:
        return str(ipaddress.ip_address(identifier)) in names
    except ValueError:
        return False
