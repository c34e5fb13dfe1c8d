"""The PSEC negotiation, sans-IO (docs/protocols/psec.md §4).

    n = Negotiation(my_peer_id, ["/dtls/1.2", "/quic-datagram/1"])
    n.propose(now, first_flight=client_hello)   # or wait for the peer's proposal
    events = n.receive(datagram, now)           # Negotiated, Refused, SchemePacket
    for datagram in n.datagrams_to_send(): ...
    n.handle_timer(now) when n.get_timer() is due

Standard negotiation: the receiver of a proposal answers Accept (the proposer then
initiates the scheme) or Reject. Simultaneous negotiation (both sides proposed before
either answered): the scheme with the lowest cumulative index wins; on a tie the one
favoured by the peer whose peer ID is the smaller integer; that peer initiates.
Proposals are retransmitted (0.5, 1, 2, 4, 4 ... s, for 30 s) until an Accept, a Reject or the
first scheme packet arrives, re-wrapping the latest first flight; duplicates and late
frames are answered or dropped, never taken twice. Every negotiation frame is kept for
the transcript that the confirm (downgrade protection, psec.md §5) covers.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from trustmesh.errors import DecodeError, ProtocolError
from trustmesh.psec.frames import (
    DEFAULT_MAX_FRAME,
    Accept,
    Propose,
    Reject,
    check_schemes,
    decode_frame,
    is_psec,
)
from trustmesh.sansio import Event
from trustmesh.wire.peerid import PeerId
from trustmesh.wire.varint import encode_uvarint

FIRST_RETRY = 0.5  # seconds before the first retransmission of a proposal ...
MAX_RETRY = 4.0  # ... doubling up to this ...
GIVE_UP = 30.0  # ... until this long after the first proposal (10 tries)
SETTLED_ANSWERS = 5  # proposals we send again, at most, to a peer after settling
TRANSCRIPT_LABEL = b"trustmesh-psec-transcript/1\n"
CONFIRM_LABEL = b"trustmesh-psec-confirm/1\n"


class PsecError(ProtocolError):
    """The negotiation cannot go on (a peer that changed its proposal, a bad Accept)."""


@dataclass(frozen=True, slots=True)
class Negotiated(Event):
    """A scheme is agreed: start it as ``initiator`` (or responder). ``peer_id`` is the
    ID the peer proposed under, or the one we expected (None if neither: the scheme's
    certificate names the peer); the scheme's authenticated certificate must match it.
    ``first_flight`` is the peer's initiation packet for the scheme (feed it first);
    ``flight_sent`` says the peer already holds our own first flight."""

    scheme: str
    initiator: bool
    peer_id: PeerId | None
    simultaneous: bool
    first_flight: bytes | None = None
    flight_sent: bool = False


@dataclass(frozen=True, slots=True)
class Refused(Event):
    """No scheme: rejected by the peer, nothing in common, or no answer in time."""

    reason: str


@dataclass(frozen=True, slots=True)
class SchemePacket(Event):
    """A datagram of the negotiated scheme."""

    data: bytes

    def payload_size(self) -> int:
        return len(self.data)


class State(enum.Enum):
    IDLE = "idle"  # waiting for a proposal
    PROPOSED = "proposed"
    NEGOTIATED = "negotiated"
    FAILED = "failed"


class Negotiation:
    def __init__(
        self,
        local: PeerId,
        schemes: Sequence[str],
        *,
        expected_peer: PeerId | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        give_up: float = GIVE_UP,
        simultaneous: bool = False,
    ) -> None:
        """``expected_peer``: the peer we dial, if we know its ID; a proposal under
        another ID is then ignored. ``give_up``: seconds a proposal waits for an answer
        before the negotiation fails. ``simultaneous``: the peer proposes to us too, so
        a scheme packet before we settle may be the peer starting the scheme it settled
        on, not an answer to our first flight: only a frame settles us (psec.md §4.2)."""
        check_schemes(schemes)
        self.local = local
        self.schemes = tuple(schemes)
        self.max_frame = max_frame
        self.give_up = give_up
        self.simultaneous = simultaneous
        self.state = State.IDLE
        self.peer_id: PeerId | None = expected_peer
        self.result: Negotiated | None = None
        self._out: list[bytes] = []
        self._first_flight: bytes | None = None
        self._proposed_at: float | None = None
        self._retry_at: float | None = None
        self._retry_wait = FIRST_RETRY
        self._sent_flight = False
        self._accepted: bytes | None = None  # our Accept, sent again to a repeated proposal
        self._last_proposal = b""  # sent again, after a simultaneous settle, to a repeat
        self._last_proposal_at = float("-inf")
        self._answers_left = SETTLED_ANSWERS
        self._peer_settled = False  # its scheme came up with us: it holds our proposal
        self._proposals: dict[bytes, Propose] = {}  # by sender peer ID, initiation stripped
        self._transcript: bytes | None = None  # its hash, fixed when a scheme is agreed

    # --- the sans-IO surface ------------------------------------------------------------

    def propose(self, now: float, first_flight: bytes | None = None) -> None:
        """Send our proposal; ``first_flight`` is the first packet of our first-choice
        scheme, carried in the proposal if it fits."""
        if self.state is not State.IDLE:
            raise PsecError(f"cannot propose in state {self.state.value}")
        self.state = State.PROPOSED
        self._first_flight = first_flight
        self._proposed_at = now
        self._remember(Propose(self.local, self.schemes))
        self._send_proposal(now)

    def update_first_flight(self, first_flight: bytes) -> None:
        """The scheme retransmitted (or rebuilt) its first flight: wrap the new one."""
        self._first_flight = first_flight

    def receive(self, datagram: bytes, now: float) -> list[Event]:
        if self.state is State.FAILED:
            return []
        if not is_psec(datagram):
            return self._scheme_packet(bytes(datagram))
        try:
            frame = decode_frame(datagram, max_size=self.max_frame)
        except DecodeError:
            return []  # a malformed datagram on UDP: dropped (psec.md §4.4), not fatal
        if isinstance(frame, Propose):
            return self._on_propose(frame, now)
        if isinstance(frame, Accept):
            return self._on_accept(frame)
        return self._on_reject()

    def settled_packet(self, datagram: bytes) -> bool:
        """Whether ``datagram`` is the agreed scheme's, once settled (no PSEC frame): the
        caller hands it to the scheme itself (what :meth:`receive` would return as a
        SchemePacket)."""
        return self.state is State.NEGOTIATED and not is_psec(datagram)

    def peer_settled(self) -> None:
        """The scheme came up with the peer (authenticated), so the peer settled too:
        its repeated proposals get no more answers. Not any datagram from its address
        says so: a forged one would stop our answers."""
        self._peer_settled = True

    def datagrams_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        return self._retry_at if self.state is State.PROPOSED else None

    def handle_timer(self, now: float) -> list[Event]:
        if self.state is not State.PROPOSED or self._retry_at is None or now < self._retry_at:
            return []
        assert self._proposed_at is not None
        if now - self._proposed_at >= self.give_up:
            return self._fail(f"no answer to the proposal within {self.give_up:g} s")
        self._send_proposal(now)
        return []

    # --- the transcript and the confirm (psec.md §5) --------------------------------------

    def transcript_hash(self) -> bytes:
        """SHA-256 over the label, the agreed scheme and every proposal of the
        negotiation (initiation packets stripped), ordered by the sender's peer ID.
        Both ends compute the same value unless someone changed a frame in flight."""
        if self.result is None or self._transcript is None:
            raise PsecError("no transcript before a scheme is agreed")
        return self._transcript

    def confirm_tag(self, exporter: bytes, *, from_initiator: bool) -> bytes:
        """The confirm one side sends over the secured channel: HMAC-SHA256 keyed by
        the scheme's exported secret, over the direction and the transcript hash."""
        role = b"I" if from_initiator else b"R"
        return hmac.digest(exporter, CONFIRM_LABEL + role + self.transcript_hash(), "sha256")

    def check_confirm(self, exporter: bytes, tag: bytes, *, from_initiator: bool) -> bool:
        return hmac.compare_digest(self.confirm_tag(exporter, from_initiator=from_initiator), tag)

    # --- internals ----------------------------------------------------------------------

    def _send_proposal(self, now: float) -> None:
        flight = self._first_flight
        frame = Propose(self.local, self.schemes, flight).encode() if flight else b""
        if not frame or len(frame) > self.max_frame:
            frame = Propose(self.local, self.schemes).encode()  # the flight does not fit
            self._sent_flight = False
        else:
            self._sent_flight = True
        self._out.append(frame)
        self._last_proposal = frame
        self._last_proposal_at = now
        self._retry_at = now + self._retry_wait
        self._retry_wait = min(self._retry_wait * 2, MAX_RETRY)

    def _remember(self, proposal: Propose) -> None:
        key = proposal.peer_id.to_bytes()
        stripped = proposal.without_initiation()
        held = self._proposals.get(key)
        if held is not None and held != stripped:
            raise PsecError(f"{proposal.peer_id} changed its proposal")
        self._proposals[key] = stripped

    def _on_propose(self, frame: Propose, now: float) -> list[Event]:
        if frame.peer_id == self.local:
            return []  # our own proposal reflected back
        if self.state is State.NEGOTIATED and frame.peer_id.to_bytes() not in self._proposals:
            return []  # not a party to the negotiation, which is settled
        if self.peer_id is not None and frame.peer_id != self.peer_id:
            return []  # another peer at this address: not ours to answer here
        try:
            self._remember(frame)
        except PsecError as exc:
            if self.state is State.NEGOTIATED:
                return []  # settled: a frame can no longer undo it (a spoofed one might try)
            return self._fail(str(exc))
        self.peer_id = frame.peer_id
        if self.state is State.NEGOTIATED:
            if self._accepted is not None:
                self._out.append(self._accepted)  # our Accept was lost: say it again
            elif (
                self.result is not None
                and self.result.simultaneous
                and not self._peer_settled
                and self._answers_left > 0
                and now - self._last_proposal_at >= FIRST_RETRY
            ):
                # Ours may have been lost: the peer, still proposing, settles on the same
                # scheme once it has it (both sides apply the same rule to the same two
                # lists). Not to a peer that has shown it settled, not more often than
                # our retransmissions, and a few times only: two settled peers must not
                # trade proposals for ever.
                self._answers_left -= 1
                self._send_last_proposal(now)
            return []
        if self.state is State.PROPOSED:
            events = self._simultaneous(frame)
            if self.result is not None:
                self._send_last_proposal(now)  # the peer may lack ours: it settles too
            return events
        return self._standard(frame)

    def _standard(self, frame: Propose) -> list[Event]:
        """We are asked: accept the scheme with the lowest cumulative index (the
        proposer's order breaks a tie), or reject."""
        common = [s for s in frame.schemes if s in self.schemes]
        if not common:
            self._out.append(Reject().encode())
            return self._fail("no scheme in common with the proposal")
        scheme = min(
            common,
            key=lambda s: (frame.schemes.index(s) + self.schemes.index(s), frame.schemes.index(s)),
        )
        self._accepted = Accept(scheme).encode()
        self._out.append(self._accepted)
        flight = frame.initiation if scheme == frame.schemes[0] else None
        return self._settle(scheme, initiator=False, simultaneous=False, first_flight=flight)

    def _simultaneous(self, frame: Propose) -> list[Event]:
        theirs, ours = frame.schemes, self.schemes
        common = [s for s in ours if s in theirs]
        if not common:
            return self._fail("no scheme in common (simultaneous proposals)")
        lower_is_us = int(self.local) < int(frame.peer_id)
        favoured = ours if lower_is_us else theirs
        scheme = min(common, key=lambda s: (ours.index(s) + theirs.index(s), favoured.index(s)))
        flight = frame.initiation if (not lower_is_us and scheme == theirs[0]) else None
        return self._settle(scheme, initiator=lower_is_us, simultaneous=True, first_flight=flight)

    def _on_accept(self, frame: Accept) -> list[Event]:
        if self.state is State.NEGOTIATED:
            return []  # a late or repeated Accept: already settled
        if self.state is not State.PROPOSED:
            return []  # an Accept we did not ask for
        if frame.scheme not in self.schemes:
            return self._fail(f"the peer accepted {frame.scheme!r}, which we did not propose")
        return self._settle(frame.scheme, initiator=True, simultaneous=False, first_flight=None)

    def _on_reject(self) -> list[Event]:
        if self.state is not State.PROPOSED:
            return []
        return self._fail("the peer rejected every scheme we proposed")

    def _send_last_proposal(self, now: float) -> None:
        self._out.append(self._last_proposal)
        self._last_proposal_at = now

    def _scheme_packet(self, data: bytes) -> list[Event]:
        if self.state is State.NEGOTIATED:
            return [SchemePacket(data)]
        if self.state is State.PROPOSED and self._sent_flight and not self.simultaneous:
            # The peer answers our first flight, so it took our first choice (its Accept
            # was lost or is late): settled, and this is the scheme's packet.
            events = self._settle(
                self.schemes[0], initiator=True, simultaneous=False, first_flight=None
            )
            return [*events, SchemePacket(data)]
        return []  # nothing agreed yet: the sender will send it again

    def _settle(
        self, scheme: str, *, initiator: bool, simultaneous: bool, first_flight: bytes | None
    ) -> list[Event]:
        self.state = State.NEGOTIATED
        self._retry_at = None
        flight_sent = initiator and self._sent_flight and scheme == self.schemes[0]
        self.result = Negotiated(
            scheme, initiator, self.peer_id, simultaneous, first_flight, flight_sent
        )
        # Every proposal of the negotiation is in by now: the transcript is fixed here,
        # once (a stray proposal that comes later does not change it).
        parts = [TRANSCRIPT_LABEL, _lp(scheme.encode("ascii"))]
        for key in sorted(self._proposals, key=lambda b: int.from_bytes(b, "big")):
            parts.append(_lp(self._proposals[key].encode()))
        self._transcript = hashlib.sha256(b"".join(parts)).digest()
        return [self.result]

    def _fail(self, reason: str) -> list[Event]:
        self.state = State.FAILED
        self._retry_at = None
        return [Refused(reason)]


def _lp(data: bytes) -> bytes:
    return encode_uvarint(len(data)) + data
