"""A mesh node's policy, sans-IO: who to link with, what to forward, whom to cut off.

zero-trust-mesh.md sections 1.1 (overlay), 5.3 (enforcement) and 6.3 (propagation);
docs/protocols/mesh-link.md sections 5 (admission), 8 (peer records) and 9 (CRLs).

:class:`NodeCore` holds the peer table, the address book of signed peer records, the
links by peer, dial cooldowns, the CRL schedule and the renewal schedule. Its driver
tells it what happened (a link came up, a frame arrived, a dial failed, a CRL was
fetched, the time is now ``now_ms``) and carries out the actions it returns: dial, send
a frame, close a link, persist, fetch the CRL, renew. It reads no clock and touches no
socket, so the asyncio node (``trustmesh.node.runtime``) and the simulator
(``trustmesh.sim``) run the same policy.

Links are the driver's own handles (any hashable object that tells its certificate's
serial and the dialler's TCP port, :class:`LinkFacts`); the core keeps them as keys.

Admission is a connection manager with two marks. A node dials out only while it holds
fewer than ``dial_target`` links (the low mark) and accepts links up to ``max_links``
(the high mark, at least three times the low one), so that the average node keeps room
for newcomers. A node at its cap answers a new link with PEERS (its peers' records,
those that lately had free slots named in ``open``) and CLOSE ``link-cap``; the dialler
waits before it dials that node again (1 s, doubling per refusal, up to a minute) and
dials the open ones first. Candidates are dialled in random order.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

from trustmesh.errors import ProtocolError
from trustmesh.keystore.signer import Signer
from trustmesh.mesh.attest import (
    NONCE_SIZE,
    LinkAttestation,
    LinkAttestationPolicy,
    MakeQuote,
    ReportAttestation,
    SendAttestChallenge,
    SendAttestEvidence,
)
from trustmesh.mesh.dtn import (
    BundleAction,
    BundleAgent,
    SendBundle,
    SendBundleAck,
    SendBundleOffer,
    SendBundleWant,
)
from trustmesh.mesh.engine import GossipEngine, Received
from trustmesh.mesh.errors import BadSignature, GossipRejected
from trustmesh.mesh.gossip import GossipMessage
from trustmesh.mesh.link import (
    CLEAN_CLOSES,
    AttestChallengeFrame,
    AttestEvidenceFrame,
    BundleAckFrame,
    BundleFrame,
    BundleOfferFrame,
    BundleWantFrame,
    CloseCode,
    CrlFrame,
    GossipFrame,
    IHaveFrame,
    IWantFrame,
    LinkClosed,
    LinkUp,
    MeshLink,
    PeerAddress,
    PeersFrame,
)
from trustmesh.mesh.peers import (
    PeerBook,
    PeerRecord,
    decode_record,
    own_record,
    own_record_due,
)
from trustmesh.mesh.renewal import RenewalSchedule
from trustmesh.mesh.trust import CrlRejected, CrlUpdate, TrustView
from trustmesh.sansio import ConnectionClosed, Event

BOOTSTRAP_BACKOFF_MS = (500, 30_000)  # first and longest wait before a bootstrap redial
PEER_BACKOFF_MS = (1_000, 60_000)  # the same for a learned address, or after a refusal
BACKOFF_JITTER = 0.2
SEEN_PRUNE_MS = 60_000
REFUSAL_PEERS = 4  # records a refusal carries at most
MIN_LINK_AGE_MS = 10_000  # a link closed sooner never counts as having run its course
CONTACT_INTERVAL_MS = 5_000  # how often a node dials the nodes it holds bundles for
MAX_CONTACT_DIALS = 4  # such dials in flight at most
MAX_CONTACT_CANDIDATES = 64  # destinations looked at for them, the newest bundles' first
SEEK_ADMIT_MS = 60_000  # a node that sought us may link beyond our cap this long after
MAX_SOUGHT_BY = 64  # such nodes remembered
MAX_OWN_ADDRESSES = 16  # addresses found to be our own


class LinkFacts(Hashable, Protocol):
    """What the core reads from a driver's link handle (both ends of a link agree on
    ``dialler_port``, which settles collisions)."""

    @property
    def serial(self) -> int | None: ...

    @property
    def dialler_port(self) -> int: ...


L = TypeVar("L", bound=LinkFacts)


# --- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dial:
    address: str


@dataclass(frozen=True, slots=True)
class CloseLink(Generic[L]):
    link: L
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class SendGossip(Generic[L]):
    link: L
    raw: bytes


@dataclass(frozen=True, slots=True)
class SendCrl(Generic[L]):
    link: L
    der: bytes


@dataclass(frozen=True, slots=True)
class SendPeers(Generic[L]):
    link: L
    peers: tuple[PeerAddress, ...]
    records: tuple[bytes, ...]
    room: int
    spare: int
    open_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SendIHave(Generic[L]):
    link: L
    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SendIWant(Generic[L]):
    link: L
    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SaveCrl:
    number: int
    der: bytes


@dataclass(frozen=True, slots=True)
class SavePeerRecords:
    records: tuple[PeerRecord, ...]


@dataclass(frozen=True, slots=True)
class ForgetPeers:
    node_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class KeepAnomaly:
    """A new anomaly to keep (the driver stores it with the time it arrived)."""

    message: GossipMessage


@dataclass(frozen=True, slots=True)
class FetchCrl:
    """Fetch the CRL from the CA, then call :meth:`NodeCore.crl_fetched` (or
    ``crl_fetch_failed``)."""


@dataclass(frozen=True, slots=True)
class Renew:
    """Renew the certificate, then call :meth:`NodeCore.renewed` (or ``renew_failed``)."""


@dataclass(frozen=True, slots=True)
class Notify:
    """Something an operator may want to know: logged, and given to event listeners."""

    event: str
    fields: dict[str, Any]
    level: int = logging.INFO


Action = (
    Dial
    | CloseLink[L]
    | SendGossip[L]
    | SendCrl[L]
    | SendPeers[L]
    | SendIHave[L]
    | SendIWant[L]
    | SaveCrl
    | SavePeerRecords
    | ForgetPeers
    | KeepAnomaly
    | FetchCrl
    | Renew
    | Notify
    | BundleAction[L]
    | SendAttestChallenge[L]
    | SendAttestEvidence[L]
    | MakeQuote[L]
    | ReportAttestation
)


LinkAction = (
    SendGossip[L]
    | SendIHave[L]
    | SendIWant[L]
    | SendPeers[L]
    | SendCrl[L]
    | CloseLink[L]
    | SendBundleOffer[L]
    | SendBundleWant[L]
    | SendBundle[L]
    | SendBundleAck[L]
    | SendAttestChallenge[L]
    | SendAttestEvidence[L]
)
LINK_ACTIONS = (
    SendGossip,
    SendIHave,
    SendIWant,
    SendPeers,
    SendCrl,
    CloseLink,
    SendBundleOffer,
    SendBundleWant,
    SendBundle,
    SendBundleAck,
    SendAttestChallenge,
    SendAttestEvidence,
)


def send_on(link: MeshLink, action: LinkAction[Any]) -> list[Event]:
    """Carry out a link action on the link's protocol core: the frame it sends, or its
    CLOSE (an error unless the code is ``shutdown``)."""
    match action:
        case SendGossip(_, raw):
            return link.send_gossip(raw)
        case SendIHave(_, ids):
            return link.send_ihave(ids)
        case SendIWant(_, ids):
            return link.send_iwant(ids)
        case SendPeers(_, peers, records, room, spare, open_ids):
            return link.send_peers(peers, records, room=room, spare=spare, open_ids=open_ids)
        case SendCrl(_, der):
            return link.send_crl(der)
        case CloseLink(_, code, reason):
            return link.close_with(code, reason, error=code not in CLEAN_CLOSES)
        case SendBundleOffer(_, ids):
            return link.send_bundle_offer(ids)
        case SendBundleWant(_, want, have):
            return link.send_bundle_want(want, have)
        case SendBundle(_, copies, data):
            return link.send_bundle(copies, data)
        case SendBundleAck(_, ids, refused):
            return link.send_bundle_ack(ids, refused)
        case SendAttestChallenge(_, nonce):
            return link.send_attest_challenge(nonce)
        case SendAttestEvidence(_, raw):
            return link.send_attest_evidence(raw)
    raise TypeError(f"not a link action: {action!r}")


# --- settings and state ----------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSettings:
    node_id: str
    advertise: str  # the address peers dial us on (never dialled by us)
    bootstrap: tuple[str, ...] = ()
    max_links: int = 12  # the high mark: links held at most
    dial_target: int | None = None  # the low mark; default max(1, max_links // 3)
    digest_interval_ms: int = 1_000
    crl_interval_ms: int = 60_000
    record_capacity: int = 1024
    # False: candidates in the address book's order, most recently signed first, as
    # nodes dialled before version 2026-12 (kept so that `trustmesh sim --admission
    # legacy` can show what that order did to a growing mesh).
    random_order: bool = True
    # Every this often (jittered) a node at its dial target dials one more known node
    # and gives up its oldest outbound link: the graph keeps mixing, so islands that
    # formed (or a healed partition's halves) join up. 0: never.
    rotate_interval_ms: int = 60_000

    @property
    def low_mark(self) -> int:
        return self.dial_target if self.dial_target is not None else max(1, self.max_links // 3)


@dataclass(frozen=True)
class NodeIdentity:
    """What the node signs with: its key, its chain (DER, leaf first), its validity."""

    key: Signer
    chain_der: tuple[bytes, ...]
    not_before_ms: int
    not_after_ms: int
    serial: int


@dataclass
class PeerInfo:
    """A row of the peer table (``GET /v1/mesh/peers``)."""

    node_id: str
    address: str | None
    status: str  # "connected" or "disconnected"
    last_seen: int  # Unix ms of the last frame (keepalives included)
    direction: str | None = None
    serial: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "status": self.status,
            "last_seen": datetime.fromtimestamp(self.last_seen / 1e3, UTC).isoformat(),
            "last_seen_ms": self.last_seen,
            "address": self.address,
            "direction": self.direction,
            "serial": format(self.serial, "x") if self.serial is not None else None,
        }


@dataclass(slots=True)
class _LinkState:
    initiator: bool
    address: str | None  # what we dialled (None inbound)
    peer_id: str | None = None
    listen: str | None = None  # the peer's HELLO ``listen``
    was_up: bool = False
    up_at: int = 0  # Unix ms of its HELLO exchange
    hints: tuple[str, ...] = ()  # PEERS ``open`` of a node we dialled, until it refuses

    @property
    def direction(self) -> str:
        return "outbound" if self.initiator else "inbound"


@dataclass(slots=True)
class _Cooldown:
    until_ms: int
    failures: int


@dataclass(slots=True)
class FormationStats:
    """How the mesh formed, from this node's side."""

    dials: int = 0
    dials_failed: int = 0
    refused_at_cap: int = 0  # links we refused, at our cap
    evicted: int = 0  # inbound links we closed to make room for a newcomer
    rotated: int = 0  # outbound links we gave up for a new one (rotate_interval_ms)
    refusals_received: int = 0  # our dials a peer refused (link-cap, duplicate ...)
    links_made: int = 0


@dataclass(slots=True)
class HandshakeStats:
    """Link handshakes (TLS, then both HELLOs), from this node's side: how many
    completed, and why the others failed (:func:`handshake_failure`), for metrics."""

    completed: int = 0
    failed: dict[str, int] = field(default_factory=dict)

    def fail(self, reason: str) -> None:
        self.failed[reason] = self.failed.get(reason, 0) + 1


_CLOSE_CODES = frozenset(c.value for c in CloseCode)


def handshake_failure(event: ConnectionClosed) -> str:
    """A short, bounded label for why a link ended before both HELLOs: a CLOSE code of
    ours (anything else a peer sent is ``other``), or the TLS layer's failure by kind."""
    if isinstance(event, LinkClosed) and event.reason != "peer closed the link":
        return event.code if event.code in _CLOSE_CODES else "other"
    reason = event.reason.lower()
    if reason.startswith("tls failed"):
        if "revoked" in reason:
            return "tls-revoked"
        if "expired" in reason:
            return "tls-expired"
        if "alert" in reason:
            return "tls-alert"  # the peer refused us, and said so
        return "tls"
    if "timed out" in reason or "in time" in reason:
        return "timeout"
    if "closed" in reason or "reset" in reason or "never started" in reason:
        return "peer-closed"
    return "other"


class NodeCore(Generic[L]):
    """One node's mesh policy; see the module docstring."""

    def __init__(
        self,
        settings: NodeSettings,
        identity: NodeIdentity,
        trust: TrustView,
        engine: GossipEngine,
        book: PeerBook,
        *,
        rng: random.Random,
        bundles: BundleAgent[L] | None = None,
        attestation: LinkAttestation[L] | None = None,
    ) -> None:
        """``bundles``: the node's store-and-forward agent (None: no bundles).
        ``attestation``: how links are attested (mesh.attest; default: not checked)."""
        self.settings = settings
        self.bundles = bundles
        self.attestation: LinkAttestation[L] = attestation or LinkAttestation()
        self.node_id = settings.node_id
        self.identity = identity
        self.trust = trust
        self.engine = engine
        self.book = book
        self.rng = rng
        self.links: dict[str, L] = {}  # established, by peer node_id
        self.peers: dict[str, PeerInfo] = {}
        self.revoked_nodes: set[str] = set()
        self.stats = FormationStats()
        self.handshakes = HandshakeStats()
        self.record: PeerRecord | None = None
        self.renewal = RenewalSchedule(identity.not_before_ms, identity.not_after_ms)
        self._states: dict[L, _LinkState] = {}  # every open link, up or not
        self._dialing: set[str] = set()  # addresses with a dial in flight
        self._cooldown: dict[str, _Cooldown] = {}
        self._room: dict[str, int] = {}  # linked peer -> the free slots it last told us
        self._spare: dict[str, int] = {}  # linked peer -> the spare links it last told us
        # node_ids a refusing peer said have room, oldest first (a dict: its order, unlike
        # a set's, does not depend on the hash seed, so the simulator stays reproducible)
        self._open: dict[str, None] = {}
        self._inbox: dict[L, list[bytes]] = {}  # gossip frames, until drain_gossip
        self._next_digest = 0
        self._next_crl: int | None = None  # None while a fetch runs
        self._next_prune = 0
        self._retry_at: int | None = None  # the earliest cooldown a top-up waits for
        self._busy: set[str] = set()  # addresses of open links, during a top-up
        # Addresses that turned out to be our own (a dial that reached our certificate:
        # our bootstrap list or a record may name us under another form): never again.
        self._own_addresses: set[str] = set()
        self.self_revoked = False  # our own certificate is on the CA's CRL
        self._announced = (True, False)  # what peers last heard: (room, spare links)
        self._extra = 0  # dials wanted beyond the dial target (a lost link to replace)
        self._next_rotate = 0
        self._next_contact = 0
        self._contacting: set[str] = set()  # addresses of contact dials in flight
        self._sought_by: dict[str, int] = {}  # node that seeks us -> until when it may link
        self._rotating: str | None = None  # the address of a rotation's dial in flight
        self._rotated_in: L | None = None  # a rotation's new link, kept at the next tick
        self._stopping = False
        # (node_id, address) found on the local network (mDNS), dialled like the address
        # book's: the driver checks such a link against the advert (node/discovery.py)
        self._discovered: tuple[tuple[str, str], ...] = ()

    # --- properties -------------------------------------------------------------------------

    @property
    def dial_target(self) -> int:
        return self.settings.low_mark

    @property
    def room(self) -> int:
        """Free link slots."""
        return max(0, self.settings.max_links - len(self.links))

    @property
    def spare(self) -> int:
        """Links held beyond the dial target: we could lose that many and not dial."""
        return max(0, len(self.links) - self.dial_target)

    def direction_of(self, link: L) -> str | None:
        state = self._states.get(link)
        return state.direction if state is not None else None

    @property
    def next_crl_poll(self) -> int | None:
        """When the next CRL poll is due (None while one runs)."""
        return self._next_crl

    def dialling(self, address: str) -> bool:
        return address in self._dialing

    def dialable(self, now_ms: int) -> dict[str, str]:
        """node_id -> the address it would be dialled at, for each valid signed record."""
        return dict(self.book.dialable(now_ms))

    def discovered(self, found: Iterable[tuple[str, str]], now_ms: int) -> list[Action[L]]:
        """The (node_id, address) pairs a local discovery (mDNS) holds now, replacing
        the last ones: candidates after the address book's (a node_id the book can dial
        is dialled there), under the same cooldowns."""
        self._discovered = tuple(found)
        actions: list[Action[L]] = []
        self._topup(now_ms, actions)
        return actions

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, now_ms: int) -> list[Action[L]]:
        """The first actions: sign our record, dial, schedule the CRL polls (the
        driver fetched the CRL once already before it listened)."""
        self._next_digest = now_ms + self.settings.digest_interval_ms
        # The first poll anywhere in one interval: nodes that start together (a fleet
        # after an outage) spread their polls at once, and a revocation reaches the first
        # of N pollers within about interval / N.
        self._next_crl = now_ms + int(self.settings.crl_interval_ms * self.rng.random())
        self._next_prune = now_ms + SEEN_PRUNE_MS
        self._next_rotate = now_ms + self._rotate_wait()
        actions: list[Action[L]] = []
        self._refresh_record(now_ms, actions, force=True)
        self._topup(now_ms, actions)
        return actions

    def stop(self) -> None:
        """Dial nothing more (links stay up until the driver closes them)."""
        self._stopping = True

    def next_deadline(self) -> int | None:
        """When :meth:`handle_timer` has work next (Unix ms)."""
        if self._stopping:
            return None
        times = [self._next_digest, self._next_prune]
        if self.settings.rotate_interval_ms:
            times.append(self._next_rotate)
        if self.bundles is not None:
            times += (self.bundles.next_deadline(), self._next_contact)
        attesting = self.attestation.next_deadline()
        for value in (self._next_crl, self.renewal.next_ms(), self._retry_at, attesting):
            if value is not None:
                times.append(value)
        return min(times)

    def handle_timer(self, now_ms: int) -> list[Action[L]]:
        actions: list[Action[L]] = []
        if self._stopping:
            return actions
        if now_ms >= self._next_digest:
            self._next_digest = now_ms + self.settings.digest_interval_ms
            self._digests(now_ms, actions)
            self._refresh_record(now_ms, actions)
            gone = self.book.prune(now_ms, revoked=False)  # expired records
            if gone:
                actions.append(ForgetPeers(tuple(gone)))
        if self._next_crl is not None and now_ms >= self._next_crl:
            self._next_crl = None
            actions.append(FetchCrl())
        if self.renewal.start_if_due(now_ms):
            actions.append(Renew())
        if now_ms >= self._next_prune:
            self._next_prune = now_ms + SEEN_PRUNE_MS
            self.engine.seen.prune(now_ms)
            self._forget_old(now_ms)
        if self._retry_at is not None and now_ms >= self._retry_at:
            self._retry_at = None
        if self._rotated_in is not None:
            state = self._states.get(self._rotated_in)
            if state is None:
                self._rotated_in = None  # it did not last
            elif now_ms - state.up_at >= self.settings.digest_interval_ms:
                self._drop_oldest_outbound(self._rotated_in, actions)
                self._rotated_in = None
        if self.settings.rotate_interval_ms and now_ms >= self._next_rotate:
            self._next_rotate = now_ms + self._rotate_wait()
            self._rotate(now_ms, actions)
        if self.bundles is not None and now_ms >= self.bundles.next_deadline():
            actions += self.bundles.handle_timer(now_ms)
        for link, peer in self.attestation.expired(now_ms):
            if self.links.get(peer) is link:
                reason = f"no attestation within {self.attestation.timeout_ms / 1000:g} s"
                self._attestation_failed(link, peer, reason, b"", actions)
        if self.bundles is not None and now_ms >= self._next_contact:
            self._next_contact = now_ms + CONTACT_INTERVAL_MS
            self._contact(now_ms, actions)
        self._topup(now_ms, actions)
        return actions

    def _forget_old(self, now_ms: int) -> None:
        """Cooldowns long over (their doubling is forgotten), and the rows of peers
        long disconnected beyond ``record_capacity`` rows: neither table may grow with
        every address or node a long-running node ever met."""
        stale = now_ms - PEER_BACKOFF_MS[1]
        for address in [a for a, c in self._cooldown.items() if c.until_ms < stale]:
            del self._cooldown[address]
        excess = len(self.peers) - self.settings.record_capacity
        if excess > 0:
            gone = sorted(
                (info.last_seen, node_id)
                for node_id, info in self.peers.items()
                if node_id not in self.links
            )[:excess]
            for _, node_id in gone:
                del self.peers[node_id]

    def _rotate_wait(self) -> int:
        return int(self.settings.rotate_interval_ms * self.rng.uniform(0.5, 1.5))

    def _rotate(self, now_ms: int, actions: list[Action[L]]) -> None:
        """Dial one more known node; once it is up, the oldest outbound link goes
        (CLOSE ``replaced``: its peer dials a replacement). Degrees stay as they were,
        and the graph keeps mixing."""
        if self._rotating is not None or len(self.links) < self.dial_target:
            return
        if len(self.links) + len(self._dialing) >= self.settings.max_links:
            return
        known = self._candidates(now_ms, [])
        if known:
            self._rotating = self.rng.choice(known)[1]
            self._dial(self._rotating, actions)

    # --- links ------------------------------------------------------------------------------

    def authorize_chain(self, chain: Sequence[Any], now_ms: int) -> str:
        """The node_id of a TLS peer chain (raises a MeshError: untrusted, revoked)."""
        return self.trust.identity_of(chain, now_ms=now_ms).node_id

    def link_opened(self, link: L, *, initiator: bool, address: str | None) -> None:
        """A connection exists (its HELLO exchange is not done)."""
        self._states[link] = _LinkState(initiator, address)

    def link_event(self, link: L, event: Event, now_ms: int) -> list[Action[L]]:
        """An event of the link's core (LinkUp, a frame, ConnectionClosed)."""
        actions: list[Action[L]] = []
        state = self._states.get(link)
        if state is None:
            return actions
        peer = state.peer_id
        if peer is not None and peer in self.peers and self.links.get(peer) is link:
            self.peers[peer].last_seen = now_ms
        try:
            if isinstance(event, LinkUp):
                self._on_up(link, state, event, now_ms, actions)
            elif isinstance(event, ConnectionClosed):
                self._on_closed(link, state, event, now_ms, actions)
            elif peer is not None and self.links.get(peer) is link:
                self._on_frame(link, peer, event, now_ms, actions)
            # else: a frame of a link refused or replaced, which is moot
        except ProtocolError as exc:  # a peer's frame this node cannot use: refuse the link
            actions.append(CloseLink(link, CloseCode.PROTOCOL, str(exc)))
        return actions

    def _on_frame(
        self, link: L, peer: str, event: Event, now_ms: int, actions: list[Action[L]]
    ) -> None:
        """A frame of an established link that we hold."""
        if self.attestation.excluded(peer) and isinstance(
            event, GossipFrame | IHaveFrame | IWantFrame
        ):
            # A peer that failed attestation has no say in what spreads.
            actions.append(Notify("gossip.demoted_dropped", {"peer": peer}, logging.DEBUG))
            return
        if isinstance(event, AttestChallengeFrame | AttestEvidenceFrame):
            self._on_attestation(link, peer, event, actions)
        elif isinstance(event, GossipFrame):
            self._inbox.setdefault(link, []).append(event.raw)
        elif isinstance(event, IHaveFrame):
            wanted = self.engine.on_ihave(peer, event.ids, now_ms)
            if wanted:
                actions.append(SendIWant(link, tuple(wanted)))
        elif isinstance(event, IWantFrame):
            for held in self.engine.on_iwant(peer, event.ids, now_ms):
                raw = self.engine.wire_for(peer, held, with_chain=True)
                actions.append(SendGossip(link, raw))
        elif isinstance(event, CrlFrame):
            self._on_crl_frame(link, event.der, now_ms, actions)
        elif isinstance(event, PeersFrame):
            self._learn(link, peer, event, now_ms, actions)
        elif self.bundles is not None:
            self._on_bundle_frame(peer, event, now_ms, actions)

    def _on_bundle_frame(
        self, peer: str, event: Event, now_ms: int, actions: list[Action[L]]
    ) -> None:
        assert self.bundles is not None
        if isinstance(event, BundleFrame):
            actions += self.bundles.on_bundle(peer, event.copies, event.data, now_ms)
        elif isinstance(event, BundleOfferFrame):
            actions += self.bundles.on_offer(peer, event.ids, now_ms)
        elif isinstance(event, BundleWantFrame):
            actions += self.bundles.on_want(peer, event.want, event.have, now_ms)
        elif isinstance(event, BundleAckFrame):
            actions += self.bundles.on_ack(peer, event.ids, event.refused, now_ms)
            self._release_contact_link(peer, actions)

    def _release_contact_link(self, peer: str, actions: list[Action[L]]) -> None:
        """A link beyond the cap (a bundle contact) goes once we hold nothing more for
        its peer: the slot is for the next node that needs it."""
        assert self.bundles is not None
        if len(self.links) <= self.settings.max_links or self.bundles.holds_for(peer):
            return
        link = self.links.get(peer)
        if link is not None:
            actions.append(CloseLink(link, CloseCode.SHUTDOWN, "bundles handed over"))

    @property
    def gossip_pending(self) -> bool:
        """Gossip frames wait for :meth:`drain_gossip` (call it once the events of one
        read are all handed in: the engine checks a batch faster per message)."""
        return bool(self._inbox)

    def dial_failed(self, address: str, reason: str, now_ms: int) -> list[Action[L]]:
        """A dial to ``address`` ended before both HELLOs (the link, if any, was
        reported closed already)."""
        self._dialing.discard(address)
        self._forget_hint(address)
        if address == self._rotating:
            self._rotating = None
        self.stats.dials_failed += 1
        delay = self._cool_down(address, now_ms)
        actions: list[Action[L]] = []
        # An operator watches its bootstrap list; other addresses come and go.
        level = logging.INFO if address in self.settings.bootstrap else logging.DEBUG
        fields = {"address": address, "error": reason, "retry_in": delay / 1000}
        actions.append(Notify("link.dial_failed", fields, level))
        self._topup(now_ms, actions)  # another candidate now, or a retry when one cools
        return actions

    def _on_up(
        self, link: L, state: _LinkState, event: LinkUp, now_ms: int, actions: list[Action[L]]
    ) -> None:
        peer = event.peer_id
        state.peer_id, state.listen, state.was_up, state.up_at = peer, event.listen, True, now_ms
        self.handshakes.completed += 1
        rotation = state.address is not None and state.address == self._rotating
        if state.address is not None:
            self._dialing.discard(state.address)
        if rotation:
            self._rotating = None  # whatever comes of this link, the rotation's dial is done
        current = self.links.get(peer)
        if current is not None:
            keep, drop = self._collision(current, link)
            actions.append(CloseLink(drop, CloseCode.DUPLICATE, "a link to this peer exists"))
            if keep is current:
                return
        elif (
            len(self.links) >= self.settings.max_links
            and not self._bundle_contact(peer, now_ms)
            and not self._evict_for(peer, actions)
        ):
            self.stats.refused_at_cap += 1
            actions.append(self._peers_for(link, exclude=peer, now_ms=now_ms, refusal=True))
            actions.append(
                CloseLink(
                    link, CloseCode.LINK_CAP, f"at the cap of {self.settings.max_links} links"
                )
            )
            return
        self.links[peer] = link
        self.stats.links_made += 1
        self.revoked_nodes.discard(peer)  # re-enrolled: this certificate just checked out
        self._open.pop(peer, None)
        address = event.listen or state.address  # HELLO listen is shown, never dialled
        self.peers[peer] = PeerInfo(
            peer, address, "connected", now_ms, state.direction, link.serial
        )
        actions.append(self._peers_for(link, exclude=peer, now_ms=now_ms))
        self._attest_link(link, peer, event, now_ms, actions)
        ids = [] if self.attestation.excluded(peer) else self.engine.ihave_for(peer, now_ms)
        if ids:
            actions.append(SendIHave(link, tuple(ids)))
        if self.bundles is not None:
            actions += self.bundles.link_up(peer, link, now_ms)
        if self.trust.crl_der is not None and event.crl_number < self.trust.crl_number:
            actions.append(SendCrl(link, self.trust.crl_der))
        actions.append(
            Notify("link.up", {"peer": peer, "direction": state.direction, "address": address})
        )
        if rotation:
            # Kept once it has lasted a digest interval (a peer at its cap says HELLO
            # before it refuses): only then does the oldest outbound link go.
            self._rotated_in = link
        self._announce_room(actions)

    def _bundle_contact(self, peer: str, now_ms: int) -> bool:
        """At the cap, a link with a node we hold bundles for, or one that sought us
        lately, is still taken, up to MAX_CONTACT_DIALS links beyond the cap: it is how
        bundles reach their destination."""
        if self.bundles is None or len(self.links) >= self.settings.max_links + MAX_CONTACT_DIALS:
            return False
        sought = self._sought_by.pop(peer, None)
        return (sought is not None and sought > now_ms) or self.bundles.holds_for(peer)

    def _drop_oldest_outbound(self, keep: L, actions: list[Action[L]]) -> None:
        """A rotation's new link has lasted: the oldest link we dialled goes, if we hold
        more than the dial target and the new one is still up."""
        state = self._states.get(keep)
        if state is None or state.peer_id is None or self.links.get(state.peer_id) is not keep:
            return
        if len(self.links) <= self.dial_target:
            return
        ours = [
            (state.up_at, link)
            for link in self.links.values()
            if link is not keep and (state := self._states[link]).initiator
        ]
        if not ours:
            return
        _, link = min(ours, key=lambda entry: entry[0])
        self.stats.rotated += 1
        actions.append(CloseLink(link, CloseCode.REPLACED, "rotating links"))

    def _evict_for(self, newcomer: str, actions: list[Action[L]]) -> bool:
        """At the cap: close one inbound link whose peer holds spare links (it stays at
        or above its dial target, so nobody redials) to take ``newcomer``. Links we
        dialled are never evicted: peers that flood us with links cannot push out the
        ones we chose. True when a link was closed."""
        rich = [
            (spare, peer)
            for peer, link in self.links.items()
            if (spare := self._spare.get(peer, 0)) > 0 and not self._states[link].initiator
        ]
        if not rich:
            return False
        most = max(spare for spare, _ in rich)
        victim = self.rng.choice(sorted(peer for spare, peer in rich if spare == most))
        link = self.links.pop(victim)
        self._inbox.pop(link, None)
        self._room.pop(victim, None)
        self._spare.pop(victim, None)
        self.engine.forget_peer(victim)
        if self.bundles is not None:
            self.bundles.link_down(victim)
        info = self.peers.get(victim)
        if info is not None:
            info.status = "disconnected"
        self.stats.evicted += 1
        actions.append(CloseLink(link, CloseCode.REPLACED, f"making room for {newcomer}"))
        actions.append(Notify("link.evicted", {"peer": victim, "for": newcomer}))
        return True

    def _collision(self, first: L, second: L) -> tuple[L, L]:
        """Two links to one peer: keep the one dialled by the smaller node_id, or if one
        side dialled both, the one from the dialler's lower TCP port. Both ends see the
        same facts, so both keep the same link."""

        def rank(link: L) -> tuple[str, int]:
            state = self._states[link]
            return (self.node_id if state.initiator else str(state.peer_id), link.dialler_port)

        return (first, second) if rank(first) <= rank(second) else (second, first)

    def _on_closed(
        self,
        link: L,
        state: _LinkState,
        event: ConnectionClosed,
        now_ms: int,
        actions: list[Action[L]],
    ) -> None:
        del self._states[link]
        self._inbox.pop(link, None)
        if state.address is not None and link.serial == self.identity.serial:
            self._own_addresses.add(state.address)  # we dialled ourselves
            if len(self._own_addresses) > MAX_OWN_ADDRESSES:
                self._own_addresses.pop()
        peer_id = state.peer_id
        linked = peer_id is not None and self.links.get(peer_id) not in (None, link)
        self.attestation.link_closed(link, peer_id, still_linked=linked)
        code = event.code if isinstance(event, LinkClosed) else None
        # Only a link that ran its course (a clean close after MIN_LINK_AGE_MS) clears
        # its address's cooldown, and only such a link of ours given away ('replaced')
        # is replaced: a member that links and at once gives the slot away can neither
        # keep a node redialling it without a pause, nor push it past its dial target.
        lasted = now_ms - state.up_at >= MIN_LINK_AGE_MS
        clean = code is None or code in CLEAN_CLOSES
        replaced = code == CloseCode.REPLACED and lasted and state.initiator and event.by_peer
        if code == CloseCode.LINK_CAP and state.hints:
            for node_id in state.hints:  # the refusal named peers with room: try them first
                if node_id != self.node_id and node_id not in self.links:
                    self._open[node_id] = None
            while len(self._open) > self.settings.record_capacity:
                del self._open[next(iter(self._open))]
        if state.address is not None and state.was_up:
            self._forget_hint(state.address)
            if not clean:
                # At its cap, a duplicate, or worse: not at once, and each refusal in a
                # row waits longer (the peer's HELLO came before its refusal, so HELLO
                # must not reset the backoff).
                self.stats.refusals_received += 1
                self._cool_down(state.address, now_ms)
            elif lasted:
                self._cooldown.pop(state.address, None)  # a link that ran its course
        if not state.was_up:
            self.handshakes.fail(handshake_failure(event))
        if not state.was_up and event.reason.startswith("TLS failed"):
            # Refused at the handshake, by us or by the peer: say which check and why.
            fields = {"direction": state.direction, "address": state.address}
            actions.append(Notify("link.tls_failed", {**fields, "reason": event.reason}))
        peer = state.peer_id
        if peer is None or self.links.get(peer) is not link:
            return
        del self.links[peer]
        self._room.pop(peer, None)
        self._spare.pop(peer, None)
        self.engine.forget_peer(peer)
        if self.bundles is not None:
            self.bundles.link_down(peer)
        info = self.peers.get(peer)
        if info is not None:
            info.status = "disconnected"
        if replaced:
            # The peer gave the slot of a link we dialled to another: link with someone
            # else, back to as many links as we held (the graph keeps its edges, and
            # keeps mixing). Never more than one dial beyond the target.
            self._extra = min(1, max(0, len(self.links) + 1 - self.dial_target))
        actions.append(Notify("link.down", {"peer": peer, "reason": event.reason}))
        self._announce_room(actions)
        self._topup(now_ms, actions)

    # --- dialling ---------------------------------------------------------------------------

    def _cool_down(self, address: str, now_ms: int) -> int:
        """Wait before dialling ``address`` again, longer after each failure in a row."""
        first, longest = (
            BOOTSTRAP_BACKOFF_MS if address in self.settings.bootstrap else PEER_BACKOFF_MS
        )
        held = self._cooldown.get(address)
        failures = held.failures if held is not None else 0
        delay = min(longest, first * 2 ** min(failures, 30))
        delay = int(delay * (1 + BACKOFF_JITTER * self.rng.random()))
        self._cooldown[address] = _Cooldown(now_ms + delay, failures + 1)
        return delay

    def _forget_hint(self, address: str) -> None:
        """A dial to ``address`` ended: whatever room its node had is used or gone."""
        for node_id in [n for n in self._open if address in self._addresses_of(n)]:
            self._open.pop(node_id, None)

    def _addresses_of(self, node_id: str) -> tuple[str, ...]:
        record = self.book.get(node_id)
        return record.addresses if record is not None else ()

    def _announce_room(self, actions: list[Action[L]]) -> None:
        """Tell every linked peer when we fill up or have room again, and when we come
        to hold spare links or no longer do (only then: a refusing peer's ``open`` list
        and its choice of whom to evict are only as good as what it was told)."""
        state = (self.room > 0, self.spare > 0)
        if state == self._announced:
            return
        self._announced = state
        for link in self.links.values():
            actions.append(SendPeers(link, (), (), self.room, self.spare))

    def cooldown_of(self, address: str) -> tuple[int, int] | None:
        """(until when, failures in a row) of an address in cooldown."""
        held = self._cooldown.get(address)
        return (held.until_ms, held.failures) if held is not None else None

    def _linked_addresses(self) -> set[str]:
        found: set[str] = set()
        for state in self._states.values():
            if state.address is not None:
                found.add(state.address)
            if state.listen is not None:
                found.add(state.listen)
        return found

    def _topup(self, now_ms: int, actions: list[Action[L]]) -> None:
        """Dial until the links and the dials in flight reach the low mark (plus one to
        replace a link the peer gave to another, CLOSE ``replaced``): first the nodes a
        refusing peer named as open, then known nodes and bootstrap addresses in random
        order (in a fixed order every newcomer would dial the same nodes)."""
        if self._stopping or self.self_revoked:
            return
        held = len(self.links) + len(self._dialing)
        room = min(self.dial_target + self._extra, self.settings.max_links) - held
        if room <= 0:
            return
        waits: list[int] = []
        known = self._candidates(now_ms, waits)
        hinted = [address for node_id, address in known if node_id in self._open]
        if hinted:
            # Nodes said to have room: dial only those now; the rest are likely full,
            # and each refusal costs both sides a TLS handshake.
            candidates = hinted
        elif known or not self.settings.random_order:
            candidates = [address for _, address in known]
            candidates += [a for a in self.settings.bootstrap if self._usable(a, now_ms, [])]
        else:
            # Nobody known to dial: one bootstrap address at a time. It is a way in,
            # not a peer to fill our links with; every newcomer dialling every one of
            # them at once would only get refusals from the busiest nodes of the mesh.
            boot = [a for a in self.settings.bootstrap if self._usable(a, now_ms, waits)]
            in_flight = any(a in self._dialing for a in self.settings.bootstrap)
            candidates = [] if in_flight or not boot else [self.rng.choice(boot)]
        for address in dict.fromkeys(candidates):
            if room <= 0:
                break
            room -= 1
            self._dial(address, actions)
        if len(self.links) + len(self._dialing) > self.dial_target:
            self._extra = 0  # the replacement is on its way
        if room > 0 and waits:
            soonest = min(waits)
            self._retry_at = soonest if self._retry_at is None else min(self._retry_at, soonest)

    def _contact(self, now_ms: int, actions: list[Action[L]]) -> None:
        """Store until contact, made: dial the nodes we hold bundles for, at an address
        of their signed record, while we have room. A node that is down fails the dial,
        and its address cools down as any other (up to a minute between tries)."""
        assert self.bundles is not None
        self._contacting &= self._dialing
        # Among the nodes we hold bundles for, those whose address we know, in random
        # order: names without a record (made up, or not yet heard of) take no turn.
        known = [n for n in self.bundles.wanted(MAX_CONTACT_CANDIDATES) if self.book.get(n)]
        self.rng.shuffle(known)
        for node_id in known:
            if len(self._contacting) >= MAX_CONTACT_DIALS:
                return
            if len(self.links) + len(self._dialing) >= self.settings.max_links:
                break
            self._contact_one(node_id, now_ms, actions)
        # Nodes that sought us and are not linked yet (refused at their cap, say): again,
        # until their invitation runs out.
        for node_id, until in list(self._sought_by.items()):
            if until <= now_ms:
                del self._sought_by[node_id]
            elif node_id not in self.links:
                self._contact_one(node_id, now_ms, actions, overflow=True)

    def _contact_one(
        self, node_id: str, now_ms: int, actions: list[Action[L]], *, overflow: bool = False
    ) -> None:
        """Dial ``node_id`` for bundles; ``overflow``: up to MAX_CONTACT_DIALS links
        beyond the cap (a node that seeks us holds bundles for us)."""
        if node_id in self.revoked_nodes or node_id == self.node_id:
            return
        if len(self._contacting & self._dialing) >= MAX_CONTACT_DIALS:
            return
        cap = self.settings.max_links + (MAX_CONTACT_DIALS if overflow else 0)
        if len(self.links) + len(self._dialing) >= cap:
            return
        busy = self._linked_addresses()
        for address in self._addresses_of(node_id):
            if address in busy or address in self._dialing:
                continue
            # A seek is an invitation: it is answered even while the address cools down
            # (it may have refused us at its cap before).
            if overflow or self._usable(address, now_ms, []):
                self._contacting.add(address)
                self._dial(address, actions)
                return

    def _dial(self, address: str, actions: list[Action[L]]) -> None:
        if self.self_revoked:
            return  # every peer would refuse us (topping up, contacts, rotation alike)
        self._dialing.add(address)
        self.stats.dials += 1
        actions.append(Dial(address))

    def _usable(self, address: str, now_ms: int, waits: list[int]) -> bool:
        """Whether ``address`` may be dialled now; one in cooldown adds its end to
        ``waits``."""
        if address in self._dialing or address == self.settings.advertise:
            return False
        if address in self._own_addresses:
            return False
        if address in self._busy:
            return False
        held = self._cooldown.get(address)
        if held is not None and held.until_ms > now_ms:
            waits.append(held.until_ms)
            return False
        return True

    def _candidates(self, now_ms: int, waits: list[int]) -> list[tuple[str, str]]:
        """(node_id, address) of the known nodes we may dial now, in dialling order."""
        self._busy = self._linked_addresses()
        known = [
            (node_id, address)
            for node_id, address in self.book.dialable(
                now_ms,
                lambda a: self._usable(a, now_ms, waits),
                newest_first=not self.settings.random_order,
            )
            if node_id not in self.links
            and node_id not in self.revoked_nodes
            and node_id != self.node_id
        ]
        listed = {node_id for node_id, _ in known} | {self.node_id}
        known += [
            (node_id, address)
            for node_id, address in self._discovered
            if node_id not in listed
            and node_id not in self.links
            and node_id not in self.revoked_nodes
            and self._usable(address, now_ms, waits)
        ]
        if self.settings.random_order:
            self.rng.shuffle(known)
        return known

    # --- peer records -----------------------------------------------------------------------

    def _learn(
        self, link: L, peer: str, frame: PeersFrame, now_ms: int, actions: list[Action[L]]
    ) -> None:
        """Keep the PEERS frame's signed records that check out. Its unsigned ``peers``
        entries are never dialled; its ``room`` and ``open`` only order our dials, and
        ``open`` counts only from a node we dialled that then refused us (CLOSE
        ``link-cap``): a peer cannot steer whom we dial next otherwise."""
        if frame.room is not None:
            self._room[peer] = frame.room
        if frame.spare is not None:
            self._spare[peer] = frame.spare
        state = self._states.get(link)
        if state is not None and state.initiator and frame.open:
            state.hints = frame.open[:REFUSAL_PEERS]  # taken if a link-cap CLOSE follows
        learned = self.book.receive_json(frame.records, now_ms)
        if learned.accepted:
            actions.append(SavePeerRecords(tuple(learned.accepted)))
        if learned.rejected:
            refused = {"peer": peer, "rejected": dict(learned.rejected)}
            actions.append(Notify("peer.records_refused", refused, logging.DEBUG))
        self._topup(now_ms, actions)

    def _peers_for(
        self, link: L, *, exclude: str, now_ms: int, refusal: bool = False
    ) -> SendPeers[L]:
        """PEERS: our own record, then the valid records of our other linked peers (and
        their addresses, unsigned, for version-1 nodes that do not read records). A
        refusal carries only the peers that lately had room, named in ``open`` (or, if
        none had, ``REFUSAL_PEERS`` others at random): a refused node needs somewhere to
        go, not our whole neighbourhood to parse."""
        others = [n for n in self.links if n != exclude]
        if refusal:
            self.rng.shuffle(others)
            roomy = [n for n in others if self._room.get(n, 0) > 0][:REFUSAL_PEERS]
            for node_id in roomy:
                # We send a newcomer there: count the slot as taken, so that the next
                # refused node is sent elsewhere rather than all of them to one peer.
                self._room[node_id] -= 1
            others = roomy or others[:REFUSAL_PEERS]
        linked = self.book.valid(others, now_ms)
        records = [self.record, *linked] if self.record is not None else linked
        peers = tuple(PeerAddress(r.node_id, r.addresses[0]) for r in linked)
        open_ids = tuple(r.node_id for r in linked if self._room.get(r.node_id, 0) > 0)
        return SendPeers(
            link,
            peers,
            tuple(r.encode() for r in records),
            self.room,
            self.spare,
            open_ids if refusal else (),
        )

    def _refresh_record(
        self, now_ms: int, actions: list[Action[L]], *, force: bool = False
    ) -> None:
        """Sign a new record of our own when half the last one's life has passed (or our
        certificate changed), and give it to every link."""
        if not force and not own_record_due(self.record, now_ms):
            return
        self.record = own_record(
            self.identity.key,
            self.node_id,
            [self.settings.advertise],
            previous=self.record,
            now_ms=now_ms,
            not_after_ms=self.identity.not_after_ms,
            chain=self.identity.chain_der,
        )
        if self.record is not None:
            encoded = (self.record.encode(),)
            for link in self.links.values():
                actions.append(SendPeers(link, (), encoded, self.room, self.spare))

    def contact_record(self, raw: bytes, now_ms: int) -> list[Action[L]]:
        """A node's signed record from its contact broadcast (it came back): kept like
        any record, and if we hold bundles for it, it is dialled now."""
        actions: list[Action[L]] = []
        record = self._take_record(raw, "bundle.contact_refused", now_ms, actions)
        if (
            record is not None
            and self.bundles is not None
            and record.node_id not in self.links
            and self.bundles.holds_for(record.node_id)
        ):
            self._contact_one(record.node_id, now_ms, actions)
        return actions

    def seeker_record(self, raw: bytes, now_ms: int) -> list[Action[L]]:
        """A node that holds bundles for us and does not know where we are broadcast
        its record (a seek): we dial it, and it hands them over on link up."""
        actions: list[Action[L]] = []
        record = self._take_record(raw, "bundle.seek_refused", now_ms, actions)
        if record is not None and record.node_id not in self.links:
            self._sought_by[record.node_id] = now_ms + SEEK_ADMIT_MS
            while len(self._sought_by) > MAX_SOUGHT_BY:
                del self._sought_by[next(iter(self._sought_by))]
            self._contact_one(record.node_id, now_ms, actions, overflow=True)
        return actions

    def _take_record(
        self, raw: bytes, refused: str, now_ms: int, actions: list[Action[L]]
    ) -> PeerRecord | None:
        """A signed peer record that came in a bundle, checked and kept as any other."""
        try:
            record = decode_record(raw)
            taken = self.book.add(record, now_ms)
        except ProtocolError as exc:
            actions.append(Notify(refused, {"error": str(exc)}))
            return None
        if taken:
            actions.append(SavePeerRecords((record,)))
        return record

    def load_records(self, raws: Iterable[bytes], now_ms: int) -> list[str]:
        """The peer records of the last run, checked again: the node_ids to forget."""
        return self.book.load(raws, now_ms)

    # --- gossip -----------------------------------------------------------------------------

    def publish(
        self, message: GossipMessage, raw: bytes, now_ms: int
    ) -> tuple[Received, list[Action[L]]]:
        """A message from the local API or our own (raises GossipRejected)."""
        received = self.engine.receive(
            message, raw, sender=None, peers=self.gossip_peers(), now_ms=now_ms
        )
        actions: list[Action[L]] = []
        self._deliver(received, now_ms, actions)
        return received, actions

    def drain_gossip(self, now_ms: int) -> list[Action[L]]:
        actions: list[Action[L]] = []
        inbox, self._inbox = self._inbox, {}
        for link, raws in inbox.items():
            state = self._states.get(link)
            if state is None or state.peer_id is None or self.links.get(state.peer_id) is not link:
                continue  # closed, evicted or revoked meanwhile: its frames are moot
            results = self.engine.receive_batch(
                raws, sender=state.peer_id, peers=self.gossip_peers(), now_ms=now_ms
            )
            for result in results:
                if isinstance(result, Received):
                    self._deliver(result, now_ms, actions)
                elif self._refuse(link, state.peer_id, result, actions):
                    break  # the link is closed: the rest of its frames are moot
        return actions

    def _refuse(self, link: L, peer: str, error: ProtocolError, actions: list[Action[L]]) -> bool:
        """Answer a gossip frame the engine refused; True when that ends the link."""
        if isinstance(error, BadSignature):
            actions.append(CloseLink(link, CloseCode.BAD_SIGNATURE, str(error)))
            actions.append(Notify("gossip.bad_signature", {"peer": peer, "error": str(error)}))
            return True
        if isinstance(error, CrlRejected):
            actions.append(CloseLink(link, CloseCode.REFUSED, str(error)))
            return True
        if not isinstance(error, GossipRejected):  # malformed
            actions.append(CloseLink(link, CloseCode.PROTOCOL, f"malformed gossip: {error}"))
            return True
        # Expired, revoked, over the rate: dropped, the link kept.
        fields = {"peer": peer, "error": str(error)}
        actions.append(Notify("gossip.dropped", fields, logging.DEBUG))
        return False

    def _deliver(self, received: Received, now_ms: int, actions: list[Action[L]]) -> None:
        message = received.message
        if not received.new or message is None:
            actions.append(
                Notify("gossip.duplicate", {"message_id": received.message_id}, logging.DEBUG)
            )
            return
        for peer in received.forward_to:
            target = self.links.get(peer)
            if target is not None:
                actions.append(SendGossip(target, self.engine.wire_for(peer, received)))
        if message.kind == "anomaly":
            actions.append(KeepAnomaly(message))
            fields = {"message_id": message.message_id, "origin": message.origin}
            actions.append(Notify("gossip.anomaly", fields))
        if received.crl is not None:
            self._after_crl(received.crl, f"gossip from {message.origin}", now_ms, actions)

    def gossip_peers(self) -> list[str]:
        """The peers gossip goes to: all linked ones but those attestation excludes."""
        attestation = self.attestation
        if not (attestation.demoted or attestation.unproven):
            return list(self.links)
        return [p for p in self.links if not attestation.excluded(p)]

    def _digests(self, now_ms: int, actions: list[Action[L]]) -> None:
        for peer, link in self.links.items():
            if self.attestation.excluded(peer):
                continue
            ids = self.engine.ihave_for(peer, now_ms)
            if ids:
                actions.append(SendIHave(link, tuple(ids)))

    # --- attestation (spec sections 2.2 and 5.1; mesh.attest) --------------------------------

    def _attest_link(
        self, link: L, peer: str, event: LinkUp, now_ms: int, actions: list[Action[L]]
    ) -> None:
        checking = self.attestation.policy is not LinkAttestationPolicy.OFF
        if not event.exporter:
            if checking:
                self._attestation_failed(link, peer, "the peer does not attest", b"", actions)
            return
        nonce = secrets.token_bytes(NONCE_SIZE)
        actions += self.attestation.link_up(
            link, peer, event.exporter, event.platform, nonce, now_ms
        )

    def _on_attestation(
        self,
        link: L,
        peer: str,
        event: AttestChallengeFrame | AttestEvidenceFrame,
        actions: list[Action[L]],
    ) -> None:
        if isinstance(event, AttestChallengeFrame):
            actions += self.attestation.on_challenge(link, event.nonce)
            return
        verdict = self.attestation.on_evidence(link, event.raw)
        if verdict is None:
            return  # no challenge of ours was open: an answer to nothing
        _, reason = verdict
        if reason is not None:
            self._attestation_failed(link, peer, reason, event.raw, actions)
        else:
            actions.append(Notify("link.attested", {"peer": peer}))

    def quote_made(self, link: L, raw: bytes) -> list[Action[L]]:
        """Our TPM's quote for a peer's challenge (``MakeQuote``); empty: it failed."""
        if link not in self._states:
            return []
        return [SendAttestEvidence(link, raw)]

    def _attestation_failed(
        self, link: L, peer: str, reason: str, raw: bytes, actions: list[Action[L]]
    ) -> None:
        policy = self.attestation.policy
        fields = {"peer": peer, "reason": reason, "policy": str(policy)}
        actions.append(Notify("link.attestation_failed", fields, logging.WARNING))
        self.attestation.failed(peer, demote=policy is LinkAttestationPolicy.DEMOTE)
        if policy in (LinkAttestationPolicy.CLOSE, LinkAttestationPolicy.REVOKE):
            actions.append(CloseLink(link, CloseCode.ATTESTATION, reason))
            serial = link.serial
            if (
                policy is LinkAttestationPolicy.REVOKE
                and raw
                and serial is not None
                and self.attestation.first_report(serial)
            ):
                # Only a quote can convince the CA: it checks it against its own policy.
                actions.append(ReportAttestation(peer, serial, raw))

    # --- revocation (spec section 5.3) --------------------------------------------------------

    def _crl_wait(self) -> int:
        """The next CRL poll, jittered so that a fleet's polls spread out."""
        return int(self.settings.crl_interval_ms * self.rng.uniform(0.75, 1.25))

    def crl_fetched(
        self, der: bytes | None, now_ms: int, *, sign: Callable[[bytes], GossipMessage] | None
    ) -> list[Action[L]]:
        """The CA's CRL (None: unchanged since the last fetch). A newer one is gossiped
        when ``sign`` can sign it for us (the mesh learns it faster than by everyone's
        own fetch), else applied and pushed over links (mesh-link.md section 9.1)."""
        self._next_crl = now_ms + self._crl_wait()
        actions: list[Action[L]] = []
        if der is None or not self.trust.is_newer_crl(der):
            return actions
        if sign is not None and self.links:
            message = sign(der)
            try:
                received, actions = self.publish(message, message.encode(), now_ms)
            except ProtocolError:
                received = None  # if we are the one revoked: applied below
            if received is not None and received.crl is not None:
                return actions
        self.apply_crl(der, "CA", now_ms, actions)
        return actions

    def crl_fetch_failed(self, error: str, now_ms: int) -> list[Action[L]]:
        self._next_crl = now_ms + self._crl_wait()
        return [Notify("crl.fetch_failed", {"error": error}, logging.WARNING)]

    def apply_crl(
        self, der: bytes, source: str, now_ms: int, actions: list[Action[L]]
    ) -> CrlUpdate | None:
        """Take a CRL (raises CrlRejected); the actions cut off every revoked peer."""
        update = self.trust.apply_crl(der)
        if update is not None:
            self._after_crl(update, source, now_ms, actions)
        return update

    def _on_crl_frame(self, link: L, der: bytes, now_ms: int, actions: list[Action[L]]) -> None:
        state = self._states[link]
        try:
            self.apply_crl(der, f"link from {state.peer_id}", now_ms, actions)
        except CrlRejected as exc:
            actions.append(CloseLink(link, CloseCode.REFUSED, str(exc)))

    def _after_crl(
        self, update: CrlUpdate, source: str, now_ms: int, actions: list[Action[L]]
    ) -> None:
        """A newer CRL: keep it, cut off every revoked peer (links up or coming up, and
        its rows), pass it on."""
        der = self.trust.crl_der
        assert der is not None
        actions.append(SaveCrl(update.number, der))
        revoked = self.trust.is_revoked
        for link, state in list(self._states.items()):
            serial = link.serial
            if serial is None or not revoked(serial):
                continue
            actions.append(CloseLink(link, CloseCode.REVOKED, "your certificate is revoked"))
            if state.peer_id is not None and self.links.get(state.peer_id) is link:
                self._forget_node(state.peer_id, now_ms, actions)
        for peer, info in list(self.peers.items()):
            if info.serial is not None and revoked(info.serial):
                self._forget_node(peer, now_ms, actions)
        for link in self.links.values():
            actions.append(SendCrl(link, der))
        if self.bundles is not None and update.revoked:
            dropped = self.bundles.revoked(update.revoked)
            if dropped:
                actions.append(Notify("bundles.revoked", {"dropped": dropped}))
        gone = self.book.prune(now_ms)  # records of revoked nodes
        if gone:
            actions.append(ForgetPeers(tuple(gone)))
        fields = {"number": update.number, "revoked": len(update.revoked), "source": source}
        actions.append(Notify("crl.updated", fields))
        if revoked(self.identity.serial) and not self.self_revoked:
            # Only the CA's CRL says so (a peer's CLOSE or TLS alert could lie): from now
            # on we dial nobody, who would only refuse us, until a new certificate.
            self.self_revoked = True
            mine = {"serial": format(self.identity.serial, "x"), "source": source}
            actions.append(Notify("node.revoked", mine, logging.ERROR))

    def _forget_node(self, node_id: str, now_ms: int, actions: list[Action[L]]) -> None:
        self.revoked_nodes.add(node_id)
        self.peers.pop(node_id, None)
        self._room.pop(node_id, None)
        self._spare.pop(node_id, None)
        self._open.pop(node_id, None)
        gone = self.links.pop(node_id, None)
        if gone is not None:
            self._inbox.pop(gone, None)
            self._topup(now_ms, actions)  # find a replacement
        if self.book.remove(node_id):
            actions.append(ForgetPeers((node_id,)))
        self.engine.forget_peer(node_id)
        if self.bundles is not None:
            self.bundles.link_down(node_id)
        actions.append(Notify("peer.revoked", {"peer": node_id}))

    # --- renewal ------------------------------------------------------------------------------

    def renewed(self, identity: NodeIdentity, now_ms: int) -> list[Action[L]]:
        """A new certificate: new links use it, and peers get a record signed with it."""
        self.identity = identity
        self.self_revoked = self.trust.is_revoked(identity.serial)
        self.renewal.renewed(identity.not_before_ms, identity.not_after_ms)
        actions: list[Action[L]] = []
        self._refresh_record(now_ms, actions, force=True)
        return actions

    def renew_failed(self, error: str, now_ms: int) -> list[Action[L]]:
        retry = self.renewal.failed(now_ms)
        fields = {"error": error, "retry_in": retry / 1000}
        return [Notify("cert.renew_failed", fields, logging.WARNING)]
