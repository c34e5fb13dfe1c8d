"""The mesh link protocol, ``dadm-mesh/1``, inside TLS 1.3 (docs/protocols/mesh-link.md).

A frame is ``uvarint(length) || type || body``: one type byte, then a body that is JSON
for control frames, a gossip message's own JSON text (forwarded byte for byte), or a
CRL's DER. Both sides send HELLO as soon as TLS is up; nothing but HELLO or CLOSE may
come before the peer's HELLO. Then either side sends KEEPALIVE every third of the hold
time, and a link silent for the hold time is closed. Every refusal is a CLOSE frame with
a code and a reason, then close_notify.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509

from trustmesh.errors import DecodeError, OversizeError
from trustmesh.mesh.crlparts import CRL_PARTS_VERSION, DEFAULT_CRL_TIMEOUT, CrlParts
from trustmesh.mesh.errors import MalformedMessage, MeshError, RevokedOrigin
from trustmesh.mesh.gossip import NODE_ID
from trustmesh.mesh.trust import MAX_CRL, CrlRejected, crl_number_of
from trustmesh.pki.extensions import AttestedPlatform, ExtensionError, attested_platform_of
from trustmesh.sansio import Authenticated, ConnectionClosed, Event
from trustmesh.tls import TlsEstablished
from trustmesh.wire.frames import FrameDecoder
from trustmesh.wire.jsonwire import compact_json, strict_loads
from trustmesh.wire.varint import encode_uvarint

ALPN = "dadm-mesh/1"
VERSION = 1
MAX_FRAME = 1 << 20
MAX_HELLO_FRAME = 16 * 1024
MAX_CONTROL = 64 * 1024
DEFAULT_HOLD_TIME = 30
DEFAULT_MIN_HOLD_TIME = 9  # keepalives from a peer at most every 3 s
DEFAULT_HELLO_TIMEOUT = 10.0  # from TLS up to the peer's HELLO
MAX_HOLD_TIME = 3600
MAX_PEERS = 64
MAX_IDS = 512
MAX_ADDRESS = 300  # characters of a host:port a peer sends
MAX_ROOM = 1024  # free link slots a PEERS frame may claim (max_links is at most 1024)
BUNDLES_VERSION = 1  # HELLO "bundles": the bundle frames this node speaks
ATTEST_VERSION = 1  # HELLO "attest": the attestation frames this node speaks
EXPORTER_LABEL = b"EXPORTER-dadm-mesh-attestation"
ATTEST_NONCE = 32
MAX_BUNDLE_IDS = 256  # bundle ids in one OFFER, WANT or ACK frame
MAX_BUNDLE_ID = 300  # characters of a bundle id (a node_id is up to 253)
MAX_REASON = 128  # characters of a refusal's reason in BUNDLE_ACK


class Frame(enum.IntEnum):
    HELLO = 1
    KEEPALIVE = 2
    GOSSIP = 3
    CRL = 4
    PEERS = 5
    IHAVE = 6
    IWANT = 7
    CLOSE = 8
    CRL_PART = 9  # a piece of a CRL over one frame, to peers whose HELLO has crl_parts
    CRL_ACK = 10  # the bytes of that CRL received so far
    # Bundles (docs/protocols/bundles.md section 8), to peers whose HELLO has bundles:
    BUNDLE_OFFER = 11  # ids of bundles we hold for the peer
    BUNDLE_WANT = 12  # which offered ids the peer wants, and which it holds already
    BUNDLE = 13  # u8 copies handed over, then one RFC 9171 bundle
    BUNDLE_ACK = 14  # ids persisted (custody taken), and ids refused with a reason
    # Attestation after the handshake (mesh.attest), to peers whose HELLO has attest:
    ATTEST_CHALLENGE = 15  # 32 random bytes
    ATTEST_EVIDENCE = 16  # a TPM quote over SHA-256(nonce || exporter), JSON; empty: no TPM


class CloseCode(enum.StrEnum):
    SHUTDOWN = "shutdown"
    PROTOCOL = "protocol-error"
    HOLD_TIMER = "hold-timer-expired"
    REFUSED = "refused"  # the peer's certificate, name or hold time is not acceptable
    REVOKED = "revoked"
    BAD_SIGNATURE = "bad-signature"
    DUPLICATE = "duplicate-link"
    LINK_CAP = "link-cap"
    EXPIRED = "certificate-expired"  # the peer's certificate or ours expired on a live link
    # The link's slot went to another peer (admission or rotation, mesh-link.md 8.2):
    # not an error; the node that lost it dials a replacement.
    REPLACED = "replaced"
    ATTESTATION = "attestation-failed"  # the peer's quote did not prove its platform


CLEAN_CLOSES = frozenset({CloseCode.SHUTDOWN, CloseCode.REPLACED})  # no error, no cooldown


@dataclass(frozen=True, slots=True)
class PeerAddress:
    node_id: str
    address: str  # host:port of its link listener


@dataclass(frozen=True, slots=True)
class LinkUp(Authenticated):
    """The peer's HELLO arrived and checked out. ``exporter`` binds attestation to this
    session; ``platform`` is what the peer's certificate says its TPM is (or None)."""

    peer_id: str
    listen: str | None
    crl_number: int
    hold_time: int
    exporter: bytes = b""
    platform: AttestedPlatform | None = None


@dataclass(frozen=True, slots=True)
class KeepaliveFrame(Event):
    """The peer's KEEPALIVE (the hold timer restarted)."""


@dataclass(frozen=True, slots=True)
class GossipFrame(Event):
    raw: bytes

    def payload_size(self) -> int:
        return len(self.raw)


@dataclass(frozen=True, slots=True)
class CrlFrame(Event):
    der: bytes

    def payload_size(self) -> int:
        return len(self.der)


@dataclass(frozen=True, slots=True)
class PeersFrame(Event):
    peers: tuple[PeerAddress, ...]  # unsigned hints: never dialled (mesh-link.md 8.1)
    records: tuple[dict[str, Any], ...] = ()  # signed peer records, checked by mesh.peers
    room: int | None = None  # the sender's free link slots, when it says
    spare: int | None = None  # links the sender holds beyond its dial target, when it says
    open: tuple[str, ...] = ()  # node_ids of records whose nodes had free slots lately


@dataclass(frozen=True, slots=True)
class IHaveFrame(Event):
    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class IWantFrame(Event):
    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BundleOfferFrame(Event):
    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BundleWantFrame(Event):
    want: tuple[str, ...]
    have: tuple[str, ...]  # held already (persisted, or delivered): custody is done


@dataclass(frozen=True, slots=True)
class BundleFrame(Event):
    copies: int  # spray-and-wait copies the sender hands over (at least 1)
    data: bytes  # the bundle, unchecked

    def payload_size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class BundleAckFrame(Event):
    ids: tuple[str, ...]  # persisted by the peer
    refused: tuple[tuple[str, str], ...] = ()  # (id, reason): the peer will not take it


@dataclass(frozen=True, slots=True)
class AttestChallengeFrame(Event):
    nonce: bytes


@dataclass(frozen=True, slots=True)
class AttestEvidenceFrame(Event):
    raw: bytes

    def payload_size(self) -> int:
        return len(self.raw)


@dataclass(frozen=True, slots=True)
class LinkClosed(ConnectionClosed):
    """The link ended; ``code`` is the CLOSE frame's (sent or received)."""

    code: str = CloseCode.SHUTDOWN


class TlsBinding(Protocol):
    @property
    def established(self) -> TlsEstablished | None:
        """The TLS handshake's outcome, once connected."""

    def exporter(self, label: bytes, context: bytes) -> bytes:
        """32 bytes of the session's RFC 8446 exporter."""


Authorizer = Callable[[Sequence[x509.Certificate]], str]


@dataclass(frozen=True)
class LinkConfig:
    """One node's link settings.

    ``hold_time``: what we offer in HELLO; the link runs on the lower of the two offers,
    or without hold timer and keepalives when either is 0.
    ``hello_timeout``: the peer's HELLO must come this soon after TLS is up, whatever
    the hold times.
    ``min_hold_time``: a peer HELLO whose hold time is not 0 but below this is refused
    (CLOSE ``refused``). It never exceeds our own ``hold_time``: what we offer, we accept
    (and with our own 0 the peer's offer does not matter).
    ``allow_zero_hold``: accept a peer's hold time of 0, a link that nothing but TCP
    ever times out. Refused (CLOSE ``refused``) unless set, or unless we offer 0 too.
    """

    node_id: str
    listen: str | None = None  # the address peers may dial us on, told in HELLO
    hold_time: int = DEFAULT_HOLD_TIME
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    min_hold_time: int = DEFAULT_MIN_HOLD_TIME
    allow_zero_hold: bool = False
    crl_timeout: float = DEFAULT_CRL_TIMEOUT  # a CRL in pieces must be whole by then
    attest: bool = False  # we check peers' attestation or answer challenges (mesh.attest)

    def __post_init__(self) -> None:
        if self.hold_time in (1, 2) or not 0 <= self.hold_time <= MAX_HOLD_TIME:
            raise ValueError(f"hold_time must be 0 or 3..{MAX_HOLD_TIME} seconds")
        if not 3 <= self.min_hold_time <= MAX_HOLD_TIME:
            raise ValueError(f"min_hold_time must be 3..{MAX_HOLD_TIME} seconds")
        if not 0 < self.hello_timeout <= MAX_HOLD_TIME:
            raise ValueError(f"hello_timeout must be in (0, {MAX_HOLD_TIME}] seconds")
        if not 0 < self.crl_timeout <= MAX_HOLD_TIME:
            raise ValueError(f"crl_timeout must be in (0, {MAX_HOLD_TIME}] seconds")


class State(enum.Enum):
    AWAIT_HELLO = "await-hello"
    ESTABLISHED = "established"
    CLOSED = "closed"


class MeshLink:
    """One side of one link. ``authorize(chain)`` returns the peer's node_id from its TLS
    chain or raises a :class:`MeshError` (revoked, not a node certificate); ``crl_number``
    reads the CRL number we hold when HELLO goes out."""

    def __init__(
        self,
        config: LinkConfig,
        *,
        initiator: bool,
        authorize: Authorizer,
        crl_number: Callable[[], int] = lambda: -1,
    ) -> None:
        self.config = config
        self.initiator = initiator
        self.state = State.AWAIT_HELLO
        self.peer_id: str | None = None  # from the certificate, confirmed by HELLO
        self.hold_time = config.hold_time
        self._authorize = authorize
        self._crl_number = crl_number
        self._binding: TlsBinding | None = None
        # One limit for every frame; HELLO's own body has a smaller one (_on_frame).
        self._decoder = FrameDecoder(MAX_FRAME)
        self._out: list[bytes] = []  # frames to send, their pieces joined once
        self._hold_deadline: float | None = None
        self._keepalive_at: float | None = None
        # When the earlier of the two certificates expires (TLS tells, at link start).
        self._expires_at: float | None = None
        self.crl = CrlParts(timeout=config.crl_timeout)  # CRLs over one frame, in pieces
        self.peer_crl_parts = False  # the peer's HELLO says it takes CRL_PART
        self.peer_bundles = False  # the peer's HELLO says it speaks the bundle frames
        self.peer_attest = False  # the peer's HELLO says it speaks the attestation frames

    def bind(self, binding: TlsBinding) -> None:
        self._binding = binding

    @property
    def established(self) -> bool:
        return self.state is State.ESTABLISHED

    # --- StreamCore -----------------------------------------------------------------------

    def start(self, now: float) -> list[Event]:
        tls = self._binding.established if self._binding is not None else None
        if tls is None:
            return self._close(CloseCode.PROTOCOL, "no TLS session", error=True)
        if tls.alpn != ALPN:
            return self._close(CloseCode.REFUSED, f"ALPN {tls.alpn!r} is not {ALPN}", error=True)
        try:
            self.peer_id = self._authorize(tls.peer_chain)
        except MeshError as exc:
            code = CloseCode.REVOKED if isinstance(exc, RevokedOrigin) else CloseCode.REFUSED
            return self._close(code, str(exc), error=True)
        if self.peer_id == self.config.node_id:
            return self._close(CloseCode.REFUSED, "a link to ourselves", error=True)
        self._expires_at = tls.expires_at
        hello: dict[str, Any] = {
            "version": VERSION,
            "node_id": self.config.node_id,
            "hold_time": self.config.hold_time,
            "crl_number": self._crl_number(),
            "crl_parts": CRL_PARTS_VERSION,
            "bundles": BUNDLES_VERSION,
        }
        if self.config.listen:
            hello["listen"] = self.config.listen
        if self.config.attest:
            hello["attest"] = ATTEST_VERSION
        self._send(Frame.HELLO, compact_json(hello))
        self._hold_deadline = now + self.config.hello_timeout  # nothing before HELLO moves it
        return []

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        if not data:
            return self._finish(LinkClosed("peer closed the link", error=True, by_peer=True))
        events: list[Event] = []
        try:
            frames = self._decoder.feed(data)
        except DecodeError as exc:
            frames = list(exc.frames)
            self._handle_frames(frames, now, events)
            return events + self._close(CloseCode.PROTOCOL, f"bad frame: {exc}", error=True)
        self._handle_frames(frames, now, events)
        return events

    def handle_timer(self, now: float) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        if self._expires_at is not None and now >= self._expires_at:
            return self._close(CloseCode.EXPIRED, "a certificate of this link expired", error=True)
        if self._hold_deadline is not None and now >= self._hold_deadline:
            if self.state is State.AWAIT_HELLO:
                reason = f"no HELLO within {self.config.hello_timeout:g} s"
                return self._close(CloseCode.HOLD_TIMER, reason, error=True)
            return self._close(CloseCode.HOLD_TIMER, "hold timer expired", error=True)
        if self._keepalive_at is not None and now >= self._keepalive_at:
            self._send(Frame.KEEPALIVE, b"")
            self._keepalive_at = now + self.hold_time / 3
        for body in self.crl.on_timer(now):  # a CRL not whole in time: dropped, declined
            self._send(Frame.CRL_ACK, body)
        return []

    def get_timer(self) -> float | None:
        if self.state is State.CLOSED:
            return None
        deadlines = (self._hold_deadline, self._keepalive_at, self.crl.deadline)
        times = [t for t in (*deadlines, self._expires_at) if t is not None]
        return min(times) if times else None

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def close(self, reason: str, now: float) -> list[Event]:
        return self.close_with(CloseCode.SHUTDOWN, reason)

    # --- actions (through the driver's ``act``) -----------------------------------------------

    def close_with(self, code: str, reason: str, *, error: bool = False) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        return self._close(code, reason, error=error)

    def send_gossip(self, raw: bytes) -> list[Event]:
        return self._send_established(Frame.GOSSIP, raw)

    def send_crl(self, der: bytes) -> list[Event]:
        """Send our CRL: one CRL frame when it fits in one, else CRL_PART pieces if the
        peer takes them. Nothing goes to a peer known to hold that CRL or a newer one,
        nor, when it does not fit in a frame, to a peer without ``crl_parts`` (an older
        node: it gets the CRL from the CA). Bytes that are not a CRL go as a frame."""
        if self.state is not State.ESTABLISHED:
            return []
        try:
            number: int | None = crl_number_of(der)
        except CrlRejected:
            number = None
        if number is not None and (number <= self.crl.peer_number or number == self.crl.sending):
            return []
        if 1 + len(der) <= MAX_FRAME:
            self._send(Frame.CRL, der)
            if number is not None:
                self.crl.peer_number = number
        elif number is not None and self.peer_crl_parts and len(der) <= MAX_CRL:
            for body in self.crl.send(der, number):
                self._send(Frame.CRL_PART, body)
        return []

    def send_peers(
        self,
        peers: Sequence[PeerAddress],
        records: Sequence[bytes] = (),
        *,
        room: int | None = None,
        spare: int | None = None,
        open_ids: Sequence[str] = (),
    ) -> list[Event]:
        """PEERS: ``peers`` (for version-1 nodes without records), our free link slots
        (``room``), the links we hold beyond our dial target (``spare``) and the node_ids
        known to have room (``open``), then as many of the encoded signed ``records`` as
        fit in the body limit, in their order."""
        body = [{"node_id": p.node_id, "address": p.address} for p in peers[:MAX_PEERS]]
        hints: dict[str, Any] = {}
        if room is not None:
            hints["room"] = max(0, min(room, MAX_ROOM))
        if spare is not None:
            hints["spare"] = max(0, min(spare, MAX_ROOM))
        if open_ids:
            hints["open"] = list(open_ids[:MAX_PEERS])
        data = compact_json({"peers": body, **hints})
        if records:
            room = MAX_CONTROL - len(data) - len(b',"records":[]')
            kept: list[bytes] = []
            for record in records[:MAX_PEERS]:
                if len(record) + 1 <= room:
                    kept.append(record)
                    room -= len(record) + 1
            data = data[:-1] + b',"records":[' + b",".join(kept) + b"]}"
        return self._send_established(Frame.PEERS, data)

    def send_ihave(self, ids: Sequence[str]) -> list[Event]:
        return self._send_established(Frame.IHAVE, compact_json({"ids": list(ids[:MAX_IDS])}))

    def send_iwant(self, ids: Sequence[str]) -> list[Event]:
        return self._send_established(Frame.IWANT, compact_json({"ids": list(ids[:MAX_IDS])}))

    def send_bundle_offer(self, ids: Sequence[str]) -> list[Event]:
        return self._send_bundles(Frame.BUNDLE_OFFER, {"ids": list(ids[:MAX_BUNDLE_IDS])})

    def send_bundle_want(self, want: Sequence[str], have: Sequence[str]) -> list[Event]:
        body = {"want": list(want[:MAX_BUNDLE_IDS]), "have": list(have[:MAX_BUNDLE_IDS])}
        return self._send_bundles(Frame.BUNDLE_WANT, body)

    def send_bundle(self, copies: int, data: bytes) -> list[Event]:
        if not 1 <= copies <= 255:
            raise ValueError("copies must be 1..255")
        if 2 + len(data) > MAX_FRAME:
            raise ValueError(f"a bundle of {len(data)} bytes does not fit in a frame")
        if self.state is State.ESTABLISHED and self.peer_bundles:
            self._send(Frame.BUNDLE, data, bytes((copies,)))
        return []

    def send_bundle_ack(
        self, ids: Sequence[str], refused: Sequence[tuple[str, str]] = ()
    ) -> list[Event]:
        body: dict[str, Any] = {"ids": list(ids[:MAX_BUNDLE_IDS])}
        if refused:
            body["refused"] = [[i, r[:MAX_REASON]] for i, r in refused[:MAX_BUNDLE_IDS]]
        return self._send_bundles(Frame.BUNDLE_ACK, body)

    def send_attest_challenge(self, nonce: bytes) -> list[Event]:
        if len(nonce) != ATTEST_NONCE:
            raise ValueError(f"a challenge is {ATTEST_NONCE} bytes")
        return self._send_attest(Frame.ATTEST_CHALLENGE, nonce)

    def send_attest_evidence(self, raw: bytes) -> list[Event]:
        return self._send_attest(Frame.ATTEST_EVIDENCE, raw[:MAX_CONTROL])

    def _send_attest(self, kind: Frame, body: bytes) -> list[Event]:
        """Attestation frames go only to a peer whose HELLO said it speaks them."""
        if self.state is State.ESTABLISHED and self.peer_attest:
            self._send(kind, body)
        return []

    def _send_bundles(self, kind: Frame, body: dict[str, Any]) -> list[Event]:
        """Bundle frames go only to a peer whose HELLO said it speaks them."""
        if self.state is State.ESTABLISHED and self.peer_bundles:
            self._send(kind, compact_json(body))
        return []

    # --- internals ----------------------------------------------------------------------------

    def _handle_frames(self, frames: list[bytes], now: float, events: list[Event]) -> None:
        for frame in frames:
            if self.state is State.CLOSED:
                return
            if self.hold_time and self.state is State.ESTABLISHED:
                self._hold_deadline = now + self.hold_time
            try:
                events += self._on_frame(frame, now)
            except (MalformedMessage, DecodeError) as exc:
                events += self._close(CloseCode.PROTOCOL, str(exc), error=True)

    def _on_frame(self, frame: bytes, now: float) -> list[Event]:
        if not frame:
            raise MalformedMessage("empty frame: no type byte")
        kind = frame[0]
        if kind == Frame.BUNDLE and self.state is State.ESTABLISHED:
            # The bulk frame: its bundle sliced out of the frame once (as _bundle_frame
            # would take it, after slicing the body out first).
            if len(frame) < 3 or frame[1] == 0:
                raise MalformedMessage("BUNDLE is a copy count of 1..255, then a bundle")
            return [BundleFrame(frame[1], frame[2:])]
        body = frame[1:]
        if kind == Frame.CLOSE:
            data = _control(body)
            code, reason = data.get("code"), data.get("reason", "")
            code_text = code[:64] if isinstance(code, str) and code else CloseCode.PROTOCOL
            text = str(reason)[:512]
            return self._finish(
                LinkClosed(
                    f"{code_text}: {text}",
                    error=code_text not in CLEAN_CLOSES,
                    by_peer=True,
                    code=code_text,
                )
            )
        if self.state is State.AWAIT_HELLO:
            if kind != Frame.HELLO:
                raise MalformedMessage(f"frame type {kind} before HELLO")
            return self._on_hello(_control(body, MAX_HELLO_FRAME), now)
        if kind == Frame.KEEPALIVE:
            if body:
                raise MalformedMessage("KEEPALIVE has no body")
            return [KeepaliveFrame()]
        if kind == Frame.GOSSIP:
            return [GossipFrame(body)]
        if kind == Frame.CRL:
            return [CrlFrame(body)]
        if kind == Frame.CRL_PART:
            acks, whole = self.crl.on_part(body, now, self._crl_number())
            for ack in acks:
                self._send(Frame.CRL_ACK, ack)
            return [CrlFrame(whole)] if whole is not None else []
        if kind == Frame.CRL_ACK:
            for part in self.crl.on_ack(body):
                self._send(Frame.CRL_PART, part)
            return []
        if kind == Frame.PEERS:
            data = _control(body)
            hints = _count(data, "room"), _count(data, "spare")
            return [PeersFrame(_peers(data), _records(data), *hints, _open(data))]
        if kind in (Frame.IHAVE, Frame.IWANT):
            ids = _ids(_control(body))
            return [IHaveFrame(ids) if kind == Frame.IHAVE else IWantFrame(ids)]
        if Frame.BUNDLE_OFFER <= kind <= Frame.BUNDLE_ACK:
            return [_bundle_frame(kind, body)]
        if kind == Frame.ATTEST_CHALLENGE:
            if len(body) != ATTEST_NONCE:
                raise MalformedMessage(f"ATTEST_CHALLENGE is {ATTEST_NONCE} bytes")
            return [AttestChallengeFrame(body)]
        if kind == Frame.ATTEST_EVIDENCE:
            if len(body) > MAX_CONTROL:
                raise MalformedMessage(f"ATTEST_EVIDENCE is at most {MAX_CONTROL} bytes")
            return [AttestEvidenceFrame(body)]
        if kind == Frame.HELLO:
            raise MalformedMessage("a second HELLO")
        raise MalformedMessage(f"unknown frame type {kind}")

    def _on_hello(self, hello: dict[str, Any], now: float) -> list[Event]:
        version = hello.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version != VERSION:
            raise MalformedMessage(f"unsupported version {hello.get('version')!r}")
        node_id = hello.get("node_id")
        if node_id != self.peer_id:
            return self._close(
                CloseCode.REFUSED,
                f"HELLO names {node_id!r} but the certificate is {self.peer_id!r}",
                error=True,
            )
        hold = hello.get("hold_time")
        if isinstance(hold, bool) or not isinstance(hold, int) or hold in (1, 2):
            raise MalformedMessage("hold_time must be 0 or 3..3600")
        if not 0 <= hold <= MAX_HOLD_TIME:
            raise MalformedMessage("hold_time must be 0 or 3..3600")
        crl_number = hello.get("crl_number", -1)
        if isinstance(crl_number, bool) or not isinstance(crl_number, int):
            raise MalformedMessage("crl_number must be an integer")
        listen = hello.get("listen")
        if listen is not None and not is_address(listen):
            raise MalformedMessage("listen must be host:port")
        # Any other value (a later version) or none: the peer gets CRLs in one frame only.
        crl_parts = hello.get("crl_parts")
        self.peer_crl_parts = type(crl_parts) is int and crl_parts == CRL_PARTS_VERSION
        bundles = hello.get("bundles")
        self.peer_bundles = type(bundles) is int and bundles == BUNDLES_VERSION
        attest = hello.get("attest")
        self.peer_attest = type(attest) is int and attest == ATTEST_VERSION
        self.crl.peer_number = crl_number
        refusal = self._refuse_hold_time(hold)  # well-formed, but not what we accept
        if refusal is not None:
            return self._close(CloseCode.REFUSED, refusal, error=True)
        self.hold_time = min(self.config.hold_time, hold) if hold and self.config.hold_time else 0
        self.state = State.ESTABLISHED
        if self.hold_time:
            self._hold_deadline = now + self.hold_time
            self._keepalive_at = now + self.hold_time / 3
        else:
            self._hold_deadline = self._keepalive_at = None
        assert self.peer_id is not None
        exporter, platform = self._attestation_facts()
        return [LinkUp(self.peer_id, listen, crl_number, self.hold_time, exporter, platform)]

    def _attestation_facts(self) -> tuple[bytes, AttestedPlatform | None]:
        """The session's exporter and the peer's attested platform, when both sides
        speak attestation (else nothing is computed)."""
        tls = self._binding.established if self._binding is not None else None
        if not (self.config.attest and self.peer_attest) or tls is None or not tls.peer_chain:
            return b"", None
        assert self._binding is not None
        try:
            platform = attested_platform_of(tls.peer_chain[0])
        except ExtensionError:
            platform = None  # the check fails later, as for a certificate without one
        return self._binding.exporter(EXPORTER_LABEL, b""), platform

    def _refuse_hold_time(self, hold: int) -> str | None:
        """Why the peer's (well-formed) hold time is not acceptable here, if it is not."""
        config = self.config
        if hold == 0:
            if config.allow_zero_hold or config.hold_time == 0:
                return None
            return "hold_time 0 (no hold timer) is not accepted here"
        floor = min(config.min_hold_time, config.hold_time)  # with ours 0, theirs does not count
        if hold < floor:
            return f"hold_time {hold} is below our minimum of {floor} seconds"
        return None

    def _send_established(self, kind: Frame, body: bytes) -> list[Event]:
        if self.state is State.ESTABLISHED:
            self._send(kind, body)
        return []

    def _send(self, kind: Frame, body: bytes, head: bytes = b"") -> None:
        """Queue one frame: its length prefix, type byte and ``head``, then ``body`` as
        it is (copied once, when :meth:`data_to_send` joins what is queued)."""
        size = 1 + len(head) + len(body)
        if size > MAX_FRAME:
            raise OversizeError(f"frame of {size} bytes exceeds the {MAX_FRAME}-byte limit")
        if type(body) is not bytes:
            body = bytes(body)  # kept until sent: never a buffer its owner may change
        self._out += (encode_uvarint(size) + bytes((kind,)) + head, body)

    def _close(self, code: str, reason: str, *, error: bool) -> list[Event]:
        if self.state is State.CLOSED:
            return []  # nothing more goes out once the link is closed
        self._send(Frame.CLOSE, compact_json({"code": str(code), "reason": reason[:512]}))
        return self._finish(LinkClosed(f"{code}: {reason}", error=error, code=str(code)))

    def _finish(self, event: LinkClosed) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        self.state = State.CLOSED
        self._hold_deadline = self._keepalive_at = None
        return [event]


def _control(body: bytes, limit: int = MAX_CONTROL) -> dict[str, Any]:
    data = strict_loads(body, max_size=limit, error=MalformedMessage)
    if not isinstance(data, dict):
        raise MalformedMessage("a control frame's body is a JSON object")
    return data


def _peers(data: dict[str, Any]) -> tuple[PeerAddress, ...]:
    entries = data.get("peers")
    if not isinstance(entries, list) or len(entries) > MAX_PEERS:
        raise MalformedMessage(f"PEERS holds a list of at most {MAX_PEERS} peers")
    peers = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise MalformedMessage("a peer is an object")
        node_id, address = entry.get("node_id"), entry.get("address")
        if not isinstance(node_id, str) or not NODE_ID.fullmatch(node_id):
            raise MalformedMessage("a peer's node_id must be a DNS name")
        if not is_address(address):
            raise MalformedMessage("a peer's address must be host:port")
        assert isinstance(address, str)
        peers.append(PeerAddress(node_id, address))
    return tuple(peers)


def _records(data: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """PEERS ``records``: objects, checked field by field by ``mesh.peers``."""
    records = data.get("records", [])
    if not isinstance(records, list) or len(records) > MAX_PEERS:
        raise MalformedMessage(f"PEERS records is a list of at most {MAX_PEERS}")
    if not all(isinstance(r, dict) for r in records):
        raise MalformedMessage("a peer record is an object")
    return tuple(records)


def _count(data: dict[str, Any], name: str) -> int | None:
    """PEERS ``room`` or ``spare``: absent, or a count of links."""
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ROOM:
        raise MalformedMessage(f"PEERS {name} is an integer in 0..{MAX_ROOM}")
    return value


def _open(data: dict[str, Any]) -> tuple[str, ...]:
    ids = data.get("open", [])
    if not isinstance(ids, list) or len(ids) > MAX_PEERS:
        raise MalformedMessage(f"PEERS open is a list of at most {MAX_PEERS} node_ids")
    if not all(isinstance(i, str) and NODE_ID.fullmatch(i) for i in ids):
        raise MalformedMessage("PEERS open holds node_ids")
    return tuple(ids)


def _ids(data: dict[str, Any]) -> tuple[str, ...]:
    ids = data.get("ids")
    if not isinstance(ids, list) or len(ids) > MAX_IDS:
        raise MalformedMessage(f"ids must be a list of at most {MAX_IDS}")
    if not all(isinstance(i, str) and 0 < len(i) <= 128 for i in ids):
        raise MalformedMessage("each id is a string of 1-128 characters")
    return tuple(ids)


def _bundle_frame(kind: int, body: bytes) -> Event:
    if kind == Frame.BUNDLE:
        if len(body) < 2 or body[0] == 0:
            raise MalformedMessage("BUNDLE is a copy count of 1..255, then a bundle")
        return BundleFrame(body[0], body[1:])
    data = _control(body)
    if kind == Frame.BUNDLE_OFFER:
        return BundleOfferFrame(_bundle_ids(data, "ids"))
    if kind == Frame.BUNDLE_WANT:
        return BundleWantFrame(_bundle_ids(data, "want"), _bundle_ids(data, "have"))
    refused = data.get("refused", [])
    if not isinstance(refused, list) or len(refused) > MAX_BUNDLE_IDS:
        raise MalformedMessage(f"refused must be a list of at most {MAX_BUNDLE_IDS}")
    pairs: list[tuple[str, str]] = []
    for entry in refused:
        if not (isinstance(entry, list) and len(entry) == 2):
            raise MalformedMessage("each refusal is [bundle id, reason]")
        bundle_id, reason = entry
        if not _is_bundle_id(bundle_id) or not isinstance(reason, str):
            raise MalformedMessage("each refusal is [bundle id, reason]")
        pairs.append((bundle_id, reason[:MAX_REASON]))
    return BundleAckFrame(_bundle_ids(data, "ids"), tuple(pairs))


def _bundle_ids(data: dict[str, Any], name: str) -> tuple[str, ...]:
    ids = data.get(name, [])
    if not isinstance(ids, list) or len(ids) > MAX_BUNDLE_IDS:
        raise MalformedMessage(f"{name} must be a list of at most {MAX_BUNDLE_IDS} bundle ids")
    if not all(_is_bundle_id(i) for i in ids):
        raise MalformedMessage(f"each of {name} is a bundle id of 1-{MAX_BUNDLE_ID} characters")
    return tuple(ids)


def _is_bundle_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_BUNDLE_ID


_SPACE = re.compile(r"\s")  # what str.isspace() calls whitespace


def split_address(address: str, *, any_port: bool = False) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) into its parts; ValueError if it is not.
    Port 0 (any free port) is allowed only to listen, with ``any_port``."""
    host, sep, port_text = address.rpartition(":")
    low = 0 if any_port else 1
    if not sep or not host or not port_text.isdigit() or not low <= int(port_text) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if len(host) > 253 or _SPACE.search(host):
        raise ValueError(f"{address!r} has a bad host")
    return host, int(port_text)


def join_address(host: str, port: int) -> str:
    """The inverse of :func:`split_address`: ``host:port``, ``[v6]:port``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_address(value: object) -> bool:
    """Whether ``value`` is a ``host:port`` a peer may send (HELLO ``listen``, PEERS,
    peer records): at most 300 characters."""
    return isinstance(value, str) and len(value) <= MAX_ADDRESS and _is_address_text(value)


@functools.lru_cache(maxsize=4096)
def _is_address_text(value: str) -> bool:
    # Cached: the same few addresses arrive in every PEERS frame and record.
    try:
        split_address(value)
    except ValueError:
        return False
    return True
