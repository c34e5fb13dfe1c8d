"""PSEC over UDP: one asyncio datagram socket, many peers (docs/protocols/psec.md §9).

    endpoint = await open_psec(psec_identity(tls_config), "127.0.0.1", 9000, on_event=print)
    endpoint.connect(("127.0.0.1", 9001))      # or wait for a peer's proposal
    endpoint.send(("127.0.0.1", 9001), b"hi")  # once ChannelUp came
    endpoint.close()

Each datagram goes to the channel of its source address. Only a PSEC proposal makes a
new one, within the resource policy: ``max_connections`` channels in all,
``max_per_source`` per source address (an IPv6 /64 counts as one), of which
``max_unauthenticated_per_source`` not yet up; a channel not up within
``handshake_timeout`` goes. Until an address has proved it receives what we send (its
channel is up, which needs our confirm, its scheme proved it with a cookie or a Retry
token, or we dialled it), we send it at most 3 times the bytes it sent us (RFC 9000
§8.1); the rest waits, at most ``max_queued_bytes``, for more bytes from it. A spoofed
source can make us hold a small table entry and answer with a cookie or a Retry, never
with a certificate flight or a handshake's work.

Simultaneous negotiation (psec.md §4.2): ``connect(address, simultaneous=True)`` when the
peer proposes to us as well. Its proposal goes to the same channel (channels are by
address); one that came before our ``connect`` has opened a channel already, which is
kept (we answered it: a standard negotiation). To leave no such window at all, connect
from ``on_bound``, which runs before the socket reads anything.

Revocation for the life of a channel: with ``is_revoked`` (serial number -> revoked, as
``TlsConfig.is_revoked``), a channel whose peer certificate is revoked is closed when it
comes up, and :meth:`PsecEndpoint.revalidate` closes every up channel whose peer has
been revoked since; nothing from such a channel is delivered after.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from trustmesh.errors import ProtocolError
from trustmesh.io.limits import LimitStats, ResourcePolicy, source_of
from trustmesh.psec.channel import ChannelClosed, ChannelUp, PsecChannel
from trustmesh.psec.frames import FrameType
from trustmesh.psec.identity import PsecIdentity
from trustmesh.sansio import Event
from trustmesh.wire.peerid import PeerId

log = logging.getLogger("trustmesh.io.psec")

AMPLIFICATION = 3  # bytes sent per byte received, to an address not yet validated
MAX_DATAGRAM = 65535
REVOKED = "the peer's certificate was revoked"

Address = tuple[str, int]
EventHandler = Callable[[Address, Event], None]
RevocationCheck = Callable[[int], bool]  # certificate serial number -> revoked


@dataclass
class _Peer:
    channel: PsecChannel
    validated: bool
    dialled: bool = False  # connect() made it (else the peer's proposal did)
    received: int = 0
    sent: int = 0
    held: deque[bytes] = field(default_factory=deque)
    held_bytes: int = 0
    timer: asyncio.TimerHandle | None = None
    deadline: asyncio.TimerHandle | None = None


class PsecEndpoint(asyncio.DatagramProtocol):
    def __init__(
        self,
        identity: PsecIdentity,
        *,
        on_event: EventHandler,
        policy: ResourcePolicy | None = None,
        is_revoked: RevocationCheck | None = None,
        on_bound: Callable[[PsecEndpoint], None] | None = None,
    ) -> None:
        """``is_revoked``: asked for the serial of each peer's certificate when its
        channel comes up and at each :meth:`revalidate`. ``on_bound``: called once the
        socket is bound, before it reads anything (connect there and no datagram from
        the peer can come first); what it raises, :func:`open_psec` raises."""
        self.local = identity.peer_id
        self.factories_for = identity.factories_for
        self.on_event = on_event
        self.policy = policy or ResourcePolicy()
        self.is_revoked = is_revoked
        self.stats = LimitStats("psec")
        self.peers: dict[Address, _Peer] = {}
        self._unproven: Counter[str] = Counter()  # channels not yet up, per source
        self._per_source: Counter[str] = Counter()  # all channels, per source
        self._transport: asyncio.DatagramTransport | None = None
        self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self._on_bound = on_bound
        self._bound_error: Exception | None = None

    # --- asyncio ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)
        if self._on_bound is not None:
            # asyncio starts reading only after connection_made returns
            try:
                self._on_bound(self)
            except Exception as exc:  # open_psec raises it
                self._bound_error = exc

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed.set()

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        address = (str(addr[0]), int(str(addr[1])))
        peer = self.peers.get(address)
        if peer is None:
            if not data or data[0] != FrameType.PROPOSE:
                return  # only a proposal opens a channel: nothing else costs us state
            peer = self._admit(address)
            if peer is None:
                return
        peer.received += len(data)
        self._run(address, peer, peer.channel.receive(data, self._loop.time()))

    def error_received(self, exc: Exception) -> None:
        log.debug("psec socket error: %s", exc)

    # --- the application's side ------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._transport is not None
        return int(self._transport.get_extra_info("sockname")[1])

    def connect(
        self,
        address: Address,
        *,
        expected_peer: PeerId | None = None,
        simultaneous: bool = False,
    ) -> None:
        """Propose to ``address`` (we chose to send to it: it counts as validated).

        ``simultaneous``: the peer proposes to us as well (psec.md §4.2). Its proposal
        joins this channel, and if it came first (a channel it opened exists) that
        channel stays: we answered it, and the standard negotiation goes on."""
        held = self.peers.get(address)
        if held is not None:
            if not simultaneous or held.dialled:
                raise ProtocolError(f"a channel with {address} exists already")
            proposer = held.channel.negotiation.peer_id
            if expected_peer is not None and proposer not in (None, expected_peer):
                raise ProtocolError(f"{address} proposed as {proposer}, not {expected_peer}")
            held.dialled = True
            self._validate(address, held)
            self._flush(address, held)
            return
        channel = PsecChannel(
            self.local,
            self.factories_for(_key(address)),
            expected_peer=expected_peer,
            simultaneous=simultaneous,
        )
        peer = _Peer(channel, validated=True, dialled=True)
        self.peers[address] = peer
        self._per_source[source_of(address)] += 1
        self._arm_deadline(address, peer)
        self._run(address, peer, channel.connect(self._loop.time()))

    def send(self, address: Address, data: bytes) -> None:
        peer = self.peers.get(address)
        if peer is None or peer.channel.up is None:
            raise ProtocolError(f"no channel up with {address}")
        peer.channel.send(data)
        self._flush(address, peer)
        self._arm(address, peer)  # a scheme may hold it for a moment (QUIC paces)

    def revalidate(self) -> list[Address]:
        """Close every up channel whose peer's certificate ``is_revoked`` now says is
        revoked: its scheme sends its close, ``ChannelClosed("the peer's certificate was
        revoked")`` goes to ``on_event``, and the channel is forgotten (a datagram from
        the address is then dropped unless it is a new proposal). Returns the addresses
        of the channels closed. Call it whenever the revocation view changes."""
        closed: list[Address] = []
        for address, peer in list(self.peers.items()):
            up = peer.channel.up
            if up is not None and self._revoked(up):
                self._shut(address, peer, REVOKED)
                closed.append(address)
        return closed

    def close(self) -> None:
        """Close every channel (each scheme sends its close: best effort on UDP) and
        the socket."""
        for address, peer in list(self.peers.items()):
            peer.channel.close("the endpoint closed")
            self._flush(address, peer)
            self._forget(address)
        if self._transport is not None:
            self._transport.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # --- internals ---------------------------------------------------------------------------

    def _admit(self, address: Address) -> _Peer | None:
        source = source_of(address)
        if len(self.peers) >= self.policy.max_connections:
            self.stats.hit("max_connections", source)
            return None
        if self._per_source[source] >= self.policy.max_per_source:
            self.stats.hit("max_per_source", source)  # up channels count too
            return None
        if self._unproven[source] >= self.policy.max_unauthenticated_per_source:
            self.stats.hit("max_unauthenticated_per_source", source)
            return None
        channel = PsecChannel(self.local, self.factories_for(_key(address)))
        peer = _Peer(channel, validated=False)
        self.peers[address] = peer
        self._per_source[source] += 1
        self._unproven[source] += 1
        self._arm_deadline(address, peer)
        return peer

    def _arm_deadline(self, address: Address, peer: _Peer) -> None:
        peer.deadline = self._loop.call_later(
            self.policy.handshake_timeout, self._expire, address, peer
        )

    def _expire(self, address: Address, peer: _Peer) -> None:
        if self.peers.get(address) is peer and peer.channel.up is None:
            self.stats.hit("handshake_timeout", source_of(address))
            self.on_event(address, ChannelClosed("no channel within the handshake deadline"))
            self._forget(address)

    def _run(self, address: Address, peer: _Peer, events: list[Event]) -> None:
        self._flush(address, peer)
        for event in events:
            if isinstance(event, ChannelUp):
                self._proven(address, peer)
                if self._revoked(event):
                    self._shut(address, peer, REVOKED)
                    return
            self.on_event(address, event)
            if isinstance(event, ChannelClosed):
                self._forget(address)
                return
        self._arm(address, peer)

    def _revoked(self, up: ChannelUp) -> bool:
        if self.is_revoked is None or not up.peer_chain:
            return False
        try:
            return self.is_revoked(up.peer_chain[0].serial_number)
        except Exception:
            log.exception("the revocation check failed; taking the peer as revoked")
            return True

    def _shut(self, address: Address, peer: _Peer, reason: str) -> None:
        """Close a channel from our side: the scheme sends its close (best effort, on
        UDP), the application hears ``reason``, and the channel is forgotten."""
        for event in peer.channel.close(reason):
            self.on_event(address, event)
        self._flush(address, peer)
        self._forget(address)

    def _proven(self, address: Address, peer: _Peer) -> None:
        if peer.deadline is not None:
            peer.deadline.cancel()
            peer.deadline = None
        self._validate(address, peer)
        self._flush(address, peer)

    def _validate(self, address: Address, peer: _Peer) -> None:
        if not peer.validated:
            peer.validated = True
            _count_down(self._unproven, source_of(address))

    def _flush(self, address: Address, peer: _Peer) -> None:
        for datagram in peer.channel.datagrams_to_send():
            if peer.held_bytes + len(datagram) > self.policy.max_queued_bytes:
                self.stats.hit("max_queued_bytes", source_of(address))
                continue  # UDP: the sender's retransmission covers it
            peer.held.append(datagram)
            peer.held_bytes += len(datagram)
        while peer.held:
            datagram = peer.held[0]
            budget = AMPLIFICATION * peer.received - peer.sent
            limited = not (peer.validated or peer.channel.address_validated)
            if limited and len(datagram) > budget:
                break  # more bytes from the address raise the budget
            peer.held.popleft()
            peer.held_bytes -= len(datagram)
            peer.sent += len(datagram)
            if self._transport is not None:
                self._transport.sendto(datagram, address)

    def _arm(self, address: Address, peer: _Peer) -> None:
        if peer.timer is not None:
            peer.timer.cancel()
            peer.timer = None
        when = peer.channel.get_timer()
        if when is not None:
            peer.timer = self._loop.call_at(when, self._tick, address, peer)

    def _tick(self, address: Address, peer: _Peer) -> None:
        peer.timer = None
        if self.peers.get(address) is peer:
            self._run(address, peer, peer.channel.handle_timer(self._loop.time()))

    def _forget(self, address: Address) -> None:
        peer = self.peers.pop(address, None)
        if peer is None:
            return
        for handle in (peer.timer, peer.deadline):
            if handle is not None:
                handle.cancel()
        source = source_of(address)
        _count_down(self._per_source, source)
        if not peer.validated:
            _count_down(self._unproven, source)


async def open_psec(
    identity: PsecIdentity,
    host: str,
    port: int,
    *,
    on_event: EventHandler,
    policy: ResourcePolicy | None = None,
    is_revoked: RevocationCheck | None = None,
    on_bound: Callable[[PsecEndpoint], None] | None = None,
) -> PsecEndpoint:
    """Bind a UDP socket at ``host:port`` (0: any free port) for PSEC. ``on_bound`` runs
    once it is bound, before it reads a datagram (see :class:`PsecEndpoint`)."""
    loop = asyncio.get_running_loop()
    _, endpoint = await loop.create_datagram_endpoint(
        lambda: PsecEndpoint(
            identity, on_event=on_event, policy=policy, is_revoked=is_revoked, on_bound=on_bound
        ),
        local_addr=(host, port),
    )
    if endpoint._bound_error is not None:
        endpoint.close()
        raise endpoint._bound_error
    return endpoint


def _count_down(counter: Counter[str], source: str) -> None:
    """One less for ``source``; a source at 0 leaves the counter (spoofed sources must
    not grow it without bound)."""
    counter[source] -= 1
    if counter[source] <= 0:
        del counter[source]


def _key(address: Address) -> bytes:
    return f"{address[0]}:{address[1]}".encode()
