"""A PSEC channel, sans-IO: the negotiation, then the agreed scheme, then the confirm
(docs/protocols/psec.md §5), then datagrams.

    channel = PsecChannel(my_peer_id, {"/dtls/1.2": dtls_factory})
    channel.connect(now)                         # or wait for the peer's proposal
    events = channel.receive(datagram, now)      # ChannelUp, ChannelData, ChannelClosed
    for datagram in channel.datagrams_to_send(): ...
    channel.handle_timer(now) when channel.get_timer() is due

Inside the scheme every datagram starts with a kind byte: ``C`` and a 32-byte confirm,
``A`` and the same confirm sent in answer, or ``D`` and application data. ``ChannelUp``
comes only once the peer's confirm checks out and its certificate's peer ID is the one
it proposed under (or the one we dialled); no data is delivered before. A confirm is
sent again (0.5 s, doubling to 4 s) until the peer's confirm or data shows it got ours;
a side that is up answers a repeated confirm with ``A``, which is never answered (two
sides that are up never trade confirms). With no valid confirm within
``CONFIRM_DEADLINE`` the channel closes, and so does an up channel that hears nothing
authenticated from its peer for ``IDLE_TIMEOUT``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509

from trustmesh.errors import ProtocolError
from trustmesh.psec.frames import is_psec
from trustmesh.psec.identity import peer_id_of
from trustmesh.psec.negotiation import Negotiated, Negotiation, Refused, SchemePacket
from trustmesh.psec.scheme import Scheme, SchemeClosed, SchemeData, SchemeFactory, SchemeUp
from trustmesh.sansio import Event
from trustmesh.wire.peerid import PeerId

CONFIRM = b"C"
ANSWER = b"A"  # a confirm sent in answer to a repeated one: never answered itself
DATA = b"D"
TAG_SIZE = 32
CONFIRM_RETRY = (0.5, 4.0)
CONFIRM_DEADLINE = 30.0
IDLE_TIMEOUT = 60.0  # seconds an up channel waits for a datagram from its peer (as QUIC)


@dataclass(frozen=True, slots=True)
class ChannelUp(Event):
    scheme: str
    initiator: bool
    peer_id: PeerId
    peer_chain: tuple[x509.Certificate, ...]


@dataclass(frozen=True, slots=True)
class ChannelData(Event):
    data: bytes

    def payload_size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class ChannelClosed(Event):
    reason: str


class PsecChannel:
    def __init__(
        self,
        local: PeerId,
        schemes: Mapping[str, SchemeFactory],
        *,
        expected_peer: PeerId | None = None,
        simultaneous: bool = False,
    ) -> None:
        """``simultaneous``: the peer proposes to us as well (psec.md §4.2)."""
        self.negotiation = Negotiation(
            local, list(schemes), expected_peer=expected_peer, simultaneous=simultaneous
        )
        self.factories = dict(schemes)
        self.scheme: Scheme | None = None
        self.agreed: Negotiated | None = None
        self.up: ChannelUp | None = None
        self.closed: ChannelClosed | None = None
        self._early: Scheme | None = None  # our first choice, started to carry its flight
        self._early_out: list[bytes] = []  # its datagrams, if the proposal could not carry them
        self._peer: tuple[PeerId, tuple[x509.Certificate, ...]] | None = None
        self._heard_from_peer = False  # its confirm or data: it holds our confirm
        self._confirm_at: float | None = None
        self._confirm_wait = CONFIRM_RETRY[0]
        self._deadline: float | None = None
        self._idle_at: float | None = None
        self._out: list[bytes] = []

    # --- the sans-IO surface ------------------------------------------------------------

    def connect(self, now: float) -> list[Event]:
        """Propose, carrying our first choice's first flight when it has one (and it
        fits); otherwise its datagrams go once the peer takes that scheme."""
        first = next(iter(self.factories))
        self._early = self.factories[first](True)
        self._early.start(now)
        flight = self._early.first_flight()
        self._early_out = self._early.datagrams_to_send()
        self.negotiation.propose(now, flight)
        self._drain()
        return []

    def receive(self, datagram: bytes, now: float) -> list[Event]:
        if self.closed is not None:
            return []
        scheme = self.scheme
        if self.up is not None and is_psec(datagram):
            return []  # the confirm proved the peer settled: frames now are stale or forged
        if scheme is not None and self.negotiation.settled_packet(datagram):
            events = self._scheme_events(scheme.receive(bytes(datagram), now), now)
        else:
            events = self._negotiated(self.negotiation.receive(datagram, now), now)
        self._drain()
        return events

    def send(self, data: bytes) -> None:
        if self.up is None or self.scheme is None:
            raise ProtocolError("the channel is not up")
        self.scheme.send(DATA + data)
        self._drain()

    def datagrams_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    @property
    def address_validated(self) -> bool:
        """The scheme proved the peer receives at its address (psec.md §9)."""
        return self.scheme is not None and self.scheme.address_validated

    def close(self, reason: str) -> list[Event]:
        """Close from our side (the scheme sends its close, best effort on UDP)."""
        return self._close(reason)

    def get_timer(self) -> float | None:
        times = [self.negotiation.get_timer(), self._confirm_at, self._deadline, self._idle_at]
        if self.scheme is not None:
            times.append(self.scheme.get_timer())
        present = [t for t in times if t is not None]
        return min(present) if present and self.closed is None else None

    def handle_timer(self, now: float) -> list[Event]:
        if self.closed is not None:
            return []
        events = self._negotiated(self.negotiation.handle_timer(now), now)
        if self.scheme is not None:
            events += self._scheme_events(self.scheme.handle_timer(now), now)
        if self._deadline is not None and now >= self._deadline and self.up is None:
            events += self._close("no valid confirm from the peer in time")
        elif self._idle_at is not None and now >= self._idle_at:
            events += self._close(f"idle: nothing from the peer for {IDLE_TIMEOUT:g} s")
        elif self._confirm_at is not None and now >= self._confirm_at:
            self._send_confirm(now)
        self._drain()
        return events

    # --- internals ----------------------------------------------------------------------

    def _negotiated(self, events: list[Event], now: float) -> list[Event]:
        out: list[Event] = []
        for event in events:
            if isinstance(event, Negotiated):
                out += self._start_scheme(event, now)
            elif isinstance(event, Refused):
                out += self._close(f"negotiation failed: {event.reason}")
            elif isinstance(event, SchemePacket) and self.scheme is not None:
                out += self._scheme_events(self.scheme.receive(event.data, now), now)
        return out

    def _start_scheme(self, agreed: Negotiated, now: float) -> list[Event]:
        self.agreed = agreed
        self._deadline = now + CONFIRM_DEADLINE
        early, self._early = self._early, None
        if agreed.initiator and early is not None and agreed.scheme == next(iter(self.factories)):
            self.scheme = early
            if not agreed.flight_sent:
                self._out += self._early_out  # not in the proposal: it goes now
            self._early_out = []
            return []
        self.scheme = self.factories[agreed.scheme](agreed.initiator)
        events = self.scheme.start(now)
        if agreed.first_flight is not None:
            events += self.scheme.receive(agreed.first_flight, now)
        return self._scheme_events(events, now)

    def _scheme_events(self, events: list[Event], now: float) -> list[Event]:
        out: list[Event] = []
        for event in events:
            if isinstance(event, SchemeUp):
                out += self._on_scheme_up(event, now)
            elif isinstance(event, SchemeData):
                out += self._on_data(event.data, now)
            elif isinstance(event, SchemeClosed):
                out += self._close(event.reason)
        return out

    def _on_scheme_up(self, event: SchemeUp, now: float) -> list[Event]:
        assert self.agreed is not None
        if not event.peer_chain:
            return self._close("the peer presented no certificate")
        try:
            actual = peer_id_of(event.peer_chain[0])
        except ProtocolError as exc:
            return self._close(f"the peer's key has no peer ID: {exc}")
        claimed = self.agreed.peer_id
        if claimed is not None and claimed != actual:
            return self._close(f"the certificate's peer ID {actual} is not {claimed}")
        self._peer = (actual, event.peer_chain)
        self.negotiation.peer_settled()
        self._send_confirm(now)
        return []

    def _send_confirm(self, now: float, kind: bytes = CONFIRM) -> None:
        assert self.scheme is not None
        assert self.agreed is not None
        tag = self.negotiation.confirm_tag(
            self.scheme.export(), from_initiator=self.agreed.initiator
        )
        self.scheme.send(kind + tag)
        if kind == ANSWER:
            return  # an answer is never sent again on its own, nor answered
        if self._heard_from_peer:
            self._confirm_at = None
        else:
            self._confirm_at = now + self._confirm_wait
            self._confirm_wait = min(self._confirm_wait * 2, CONFIRM_RETRY[1])

    def _on_data(self, data: bytes, now: float) -> list[Event]:
        assert self.scheme is not None
        assert self.agreed is not None
        kind, body = data[:1], data[1:]
        if self.up is not None:
            self._idle_at = now + IDLE_TIMEOUT  # checked below: a bad one closes anyway
        if kind in (CONFIRM, ANSWER):
            ok = len(body) == TAG_SIZE and self.negotiation.check_confirm(
                self.scheme.export(), body, from_initiator=not self.agreed.initiator
            )
            if not ok:
                return self._close("the peer's confirm does not match the negotiation")
            first = not self._heard_from_peer
            self._heard_from_peer = True
            if self.up is not None:
                if kind == CONFIRM:
                    self._send_confirm(now, ANSWER)  # it did not get ours: an answer
                return []
            self._confirm_at = None if first else self._confirm_at
            self._idle_at = now + IDLE_TIMEOUT
            return self._come_up()
        if kind == DATA:
            if self.up is None:
                return []  # never before the peer's confirm checks out
            self._heard_from_peer = True
            self._confirm_at = None
            return [ChannelData(body)]
        return self._close("an unknown datagram kind on the channel")

    def _come_up(self) -> list[Event]:
        assert self.agreed is not None
        assert self._peer is not None
        self._deadline = None
        self.up = ChannelUp(self.agreed.scheme, self.agreed.initiator, *self._peer)
        return [self.up]

    def _close(self, reason: str) -> list[Event]:
        if self.closed is not None:
            return []
        self.closed = ChannelClosed(reason)
        if self.scheme is not None:
            self.scheme.close()
        self._drain()
        return [self.closed]

    def _drain(self) -> None:
        self._out += self.negotiation.datagrams_to_send()
        if self.scheme is not None:
            self._out += self.scheme.datagrams_to_send()
