"""Store, carry and forward bundles between linked nodes, sans-IO (docs/protocols/bundles.md
sections 7 and 8; zero-trust-mesh.md sections 1.1, 6.4 and 7.5).

:class:`BundleAgent` is the node's bundle policy. Its driver (the node core) tells it
what happened: a bundle was submitted here, a link came up or went, a peer sent an
OFFER, a WANT, a BUNDLE or an ACK, the time is ``now_ms``. It answers with actions (frames
to send, bundles delivered). The store it is given is written before any action that
promises something goes out: custody is acknowledged (ACK, or a 201 from the API) only
for a bundle already committed.

Routing, per bundle:

- to this node: delivered to the inbox once (ids delivered are remembered until they
  expire); fragments wait until their bundle is whole;
- to ``dtn://~mesh/...`` (broadcast): delivered here, and held until it expires, offered
  to every linked peer that does not hold it (so a node that comes back gets it);
- to another node: straight to it when linked; otherwise held, and with more than one
  copy, half the copies handed to a relay that takes custody (binary spray-and-wait).
  A relay holding one copy waits to meet the destination.

Custody is hop by hop: a forwarding copy goes only once the next hop acknowledged that it
persisted the bundle (BUNDLE_ACK, or WANT's ``have``): the destination itself, or a relay
that took all our spare copies.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from trustmesh.bundle.errors import BundleError
from trustmesh.bundle.store import BundleStore, Role, StoredBundle, StoreError
from trustmesh.errors import ProtocolError
from trustmesh.mesh.link import MAX_BUNDLE_IDS

DEFAULT_COPIES = 8  # spray-and-wait copies a bundle starts with
EXPIRE_INTERVAL_MS = 10_000  # how often expired bundles are purged
REOFFER_INTERVAL_MS = 30_000  # how often held bundles are offered again on every link
MAX_FRAGMENTS = 64  # fragments held of one bundle (a source cuts 56 KiB pieces)
WANT_TIMEOUT_MS = 10_000  # an id wanted from one peer is not wanted from another meanwhile
MAX_WANTING = 4096  # such ids remembered
OFFER_BATCH = MAX_BUNDLE_IDS
MAX_OFFERED = 4096  # ids remembered as offered to one peer (then it may be offered again)


L = TypeVar("L", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Admitted:
    """A bundle that checked out: parsed, CRCs right, signed by its source, whose
    certificate chains to the mesh CA and is not revoked, not expired, under its hop
    limit. ``data`` is what to store and pass on (its hop count already counts us)."""

    bundle_id: str
    whole_id: str  # the id without a fragment offset
    source: str  # node_id
    signer: str  # serial (hex) of the source's certificate
    destination: str  # EID text
    destination_node: str | None  # None: broadcast
    service: str
    created_ms: int  # Unix ms
    expires_ms: int  # Unix ms
    is_fragment: bool
    data: bytes

    @property
    def broadcast(self) -> bool:
        return self.destination_node is None


class FragmentsRefused(StoreError):
    """More fragments of one bundle than a node holds."""


class DuplicateBundleError(StoreError):
    """A bundle made here reuses the id of one held or delivered (HTTP 409)."""


class BundleCodec(Protocol):
    def admit(self, data: bytes, now_ms: int) -> Admitted:
        """Check a bundle from a peer (raises a ProtocolError to refuse it)."""

    def reassemble(self, fragments: list[bytes], now_ms: int) -> Admitted | None:
        """The whole bundle once ``fragments`` cover it, else None."""


# --- actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendBundleOffer(Generic[L]):
    link: L
    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SendBundleWant(Generic[L]):
    link: L
    want: tuple[str, ...]
    have: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SendBundle(Generic[L]):
    link: L
    copies: int
    data: bytes


@dataclass(frozen=True, slots=True)
class SendBundleAck(Generic[L]):
    link: L
    ids: tuple[str, ...]
    refused: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class BundleDelivered:
    """A bundle (whole) reached this node: in the inbox, or for a mesh service."""

    bundle: StoredBundle
    service: str


@dataclass(frozen=True, slots=True)
class BundleForwarded:
    """``peer`` took custody of a bundle (of ``copies`` of it); ``released``: we hold
    it no more."""

    bundle_id: str
    peer: str
    released: bool


BundleAction = (
    SendBundleOffer[L]
    | SendBundleWant[L]
    | SendBundle[L]
    | SendBundleAck[L]
    | BundleDelivered
    | BundleForwarded
)


@dataclass(slots=True)
class BundleStats:
    submitted: int = 0
    received: int = 0
    delivered: int = 0
    duplicates: int = 0
    forwarded: int = 0  # custody handed on (acknowledged by the next hop)
    refused: dict[str, int] | None = None
    expired: int = 0

    def refuse(self, code: str) -> None:
        if self.refused is None:
            self.refused = {}
        self.refused[code] = self.refused.get(code, 0) + 1


class BundleAgent(Generic[L]):
    """One node's bundle policy; see the module docstring."""

    def __init__(
        self,
        node_id: str,
        store: BundleStore,
        codec: BundleCodec,
        *,
        is_revoked: Callable[[str], bool] = lambda serial: False,
        copies: int = DEFAULT_COPIES,
        mesh_services: Iterable[str] = (),
    ) -> None:
        """``is_revoked(serial_hex)``: asked again before a held bundle goes out.
        ``mesh_services``: broadcast services this node consumes itself (delivered as an
        event, never to the inbox)."""
        if not 1 <= copies <= 255:
            raise ValueError("copies must be 1..255")
        self.node_id = node_id
        self.store = store
        self.codec = codec
        self.is_revoked = is_revoked
        self.copies = copies
        self.mesh_services = frozenset(mesh_services)
        self.stats = BundleStats()
        self.links: dict[str, L] = {}  # peers that speak bundles, by node_id
        self._offered: dict[str, set[str]] = {}  # peer -> ids offered on this link
        self._handed: dict[tuple[str, str], int] = {}  # (id, peer) -> copies in flight
        self._in_flight: dict[str, int] = {}  # id -> copies handed, not yet acknowledged
        self._wanting: dict[str, tuple[str, int]] = {}  # id -> (peer asked, until when)
        self._next_expire = 0
        self._next_reoffer = REOFFER_INTERVAL_MS

    # --- inputs -------------------------------------------------------------------------

    def submit(self, bundles: list[Admitted], now_ms: int) -> list[BundleAction[L]]:
        """Bundles made here (API, CLI, gossip; the fragments of one payload): stored in
        one transaction before this returns (all or none: raises a StoreError when a
        quota is full), then routed as any other. One to this node is delivered."""
        for admitted in bundles:
            if self.store.holds(admitted.bundle_id):
                raise DuplicateBundleError(f"bundle {admitted.bundle_id} exists already")
        mine = [b for b in bundles if b.destination_node == self.node_id]
        rows = [self._row(b, "forwarding", self.copies, now_ms) for b in bundles if b not in mine]
        self.store.add_many(rows)
        self.stats.submitted += len(bundles)
        actions: list[BundleAction[L]] = []
        for admitted in mine:
            self._deliver_here(admitted, now_ms, actions)
        for row in rows:
            self._route(row, exclude=None, actions=actions)
        return actions

    def link_up(self, peer: str, link: L, now_ms: int) -> list[BundleAction[L]]:
        """Offer the peer what we hold for it: bundles to it, broadcasts, and bundles
        with copies to spare."""
        if peer in self.links:
            self.link_down(peer)  # a new link to a linked peer replaced the old one
        self.links[peer] = link
        actions: list[BundleAction[L]] = []
        self._offer_held(peer, actions)
        return actions

    def _offer_held(self, peer: str, actions: list[BundleAction[L]]) -> None:
        """Offer ``peer`` what we hold that it may take, afresh (at link up, and every
        REOFFER_INTERVAL_MS: a bundle refused or offered beyond a batch gets its turn)."""
        self._offered[peer] = set()
        held = self.store.forwarding_for([_inbox_of(peer)], limit=OFFER_BATCH)
        held += [row for row in self.store.spreadable(limit=OFFER_BATCH) if row.source != peer]
        ids = [row.bundle_id for row in held if (row.bundle_id, peer) not in self._handed]
        self._offer(peer, list(dict.fromkeys(ids)), actions)

    def link_down(self, peer: str) -> None:
        self.links.pop(peer, None)
        self._offered.pop(peer, None)
        for key in [key for key in self._handed if key[1] == peer]:
            self._settle(key)  # never acknowledged: still ours, offered again later

    def on_offer(self, peer: str, ids: Iterable[str], now_ms: int) -> list[BundleAction[L]]:
        link = self.links.get(peer)
        if link is None:
            return []
        want: list[str] = []
        have: list[str] = []
        for bundle_id in ids:
            if self.store.holds(bundle_id):
                have.append(bundle_id)
                continue
            asked = self._wanting.get(bundle_id)
            if asked is not None and asked[1] > now_ms and asked[0] in self.links:
                continue  # on its way from another peer (a broadcast offered by several)
            self._wanting[bundle_id] = (peer, now_ms + WANT_TIMEOUT_MS)
            want.append(bundle_id)
        while len(self._wanting) > MAX_WANTING:
            del self._wanting[next(iter(self._wanting))]
        return [SendBundleWant(link, tuple(want), tuple(have))]

    def on_want(
        self, peer: str, want: Iterable[str], have: Iterable[str], now_ms: int
    ) -> list[BundleAction[L]]:
        link = self.links.get(peer)
        if link is None:
            return []
        actions: list[BundleAction[L]] = []
        offered = self._offered.get(peer, set())
        for bundle_id in have:
            self._custody_taken(bundle_id, peer, 0, actions)
        for bundle_id in want:
            if bundle_id not in offered:
                continue  # a peer takes what we offered it, never any id it names
            row = self.store.get(bundle_id, "forwarding")
            if row is None or row.expires_ms <= now_ms or (bundle_id, peer) in self._handed:
                continue
            if self.is_revoked(row.signer):
                self._drop(row, "revoked")
                continue
            copies = self._copies_for(row, peer, self._in_flight.get(bundle_id, 0))
            if copies == 0:
                continue
            self._handed[(bundle_id, peer)] = copies
            self._in_flight[bundle_id] = self._in_flight.get(bundle_id, 0) + copies
            actions.append(SendBundle(link, copies, row.data))
        return actions

    def on_bundle(self, peer: str, copies: int, data: bytes, now_ms: int) -> list[BundleAction[L]]:
        """A bundle from a linked peer: checked, stored, acknowledged, passed on."""
        link = self.links.get(peer)
        if link is None:
            return []
        self.stats.received += 1
        try:
            admitted = self.codec.admit(data, now_ms)
            self._wanting.pop(admitted.bundle_id, None)
        except ProtocolError as exc:
            code = getattr(exc, "code", type(exc).__name__)
            self.stats.refuse(str(code))
            bundle_id = getattr(exc, "bundle_id", None) or _id_hint(data)
            return [SendBundleAck(link, (), ((bundle_id, str(exc)[:120]),))]
        actions: list[BundleAction[L]] = []
        try:
            # A peer hands at most as many copies as a bundle starts with here.
            self._take(admitted, peer, min(copies, self.copies), now_ms, actions)
        except StoreError as exc:
            self.stats.refuse(type(exc).__name__)
            return [SendBundleAck(link, (), ((admitted.bundle_id, str(exc)[:120]),))]
        # Committed: custody is ours now, and the sender may let go.
        actions.insert(0, SendBundleAck(link, (admitted.bundle_id,)))
        return actions

    def on_ack(
        self, peer: str, ids: Iterable[str], refused: Iterable[tuple[str, str]], now_ms: int
    ) -> list[BundleAction[L]]:
        actions: list[BundleAction[L]] = []
        for bundle_id in ids:
            handed = self._settle((bundle_id, peer))
            if handed is not None:
                self._custody_taken(bundle_id, peer, handed, actions)
        for bundle_id, _reason in refused:
            # Kept: another peer may take it; this one is not asked again on this link.
            self._settle((bundle_id, peer))
        return actions

    def _settle(self, key: tuple[str, str]) -> int | None:
        """A hand-over ended (acknowledged, refused, or its link gone): its copies."""
        handed = self._handed.pop(key, None)
        if handed is not None:
            left = self._in_flight.get(key[0], 0) - handed
            if left > 0:
                self._in_flight[key[0]] = left
            else:
                self._in_flight.pop(key[0], None)
        return handed

    def acknowledge(self, bundle_id: str) -> bool:
        """The application took a delivered bundle (DELETE /v1/bundles/{id})."""
        return self.store.delete(bundle_id, "inbox")

    def revoked(self, serials: Iterable[int]) -> int:
        """Certificates were revoked: their bundles go, here and (each node does the
        same when it takes the CRL) everywhere."""
        gone = self.store.purge_signers(format(serial, "x") for serial in serials)
        return len(gone)

    def wanted(self, limit: int) -> list[str]:
        """Nodes we hold bundles for and are not linked to, the newest bundles' first:
        the node core dials those it knows where (store until contact)."""
        nodes = [_node_of(d) for d in self.store.destinations(limit=limit + len(self.links))]
        return list(dict.fromkeys(n for n in nodes if n is not None and n not in self.links))[
            :limit
        ]

    def holds_for(self, node_id: str) -> bool:
        return self.store.holds_for(node_id)

    def next_deadline(self) -> int:
        return min(self._next_expire, self._next_reoffer)

    def handle_timer(self, now_ms: int) -> list[BundleAction[L]]:
        actions: list[BundleAction[L]] = []
        if now_ms >= self._next_expire:
            self._next_expire = now_ms + EXPIRE_INTERVAL_MS
            self.stats.expired += len(self.store.expire(now_ms))
        if now_ms >= self._next_reoffer:
            self._next_reoffer = now_ms + REOFFER_INTERVAL_MS
            for peer in list(self.links):
                self._offer_held(peer, actions)
        return actions

    # --- routing ------------------------------------------------------------------------

    def _take(
        self,
        admitted: Admitted,
        peer: str,
        copies: int,
        now_ms: int,
        actions: list[BundleAction[L]],
    ) -> None:
        if admitted.destination_node == self.node_id:
            self._deliver_here(admitted, now_ms, actions)
            return
        # A broadcast is never sprayed (every holder offers it). Its relay copy is stored
        # first: over a quota, nothing is delivered and the sender keeps it.
        row = self._row(admitted, "forwarding", 1 if admitted.broadcast else copies, now_ms)
        added = self.store.add(row)
        if admitted.broadcast:
            self._deliver_here(admitted, now_ms, actions)  # counts a duplicate itself
        elif not added:
            self.stats.duplicates += 1
        if not added:
            return
        self._route(row, exclude=peer, actions=actions)

    def _deliver_here(
        self, admitted: Admitted, now_ms: int, actions: list[BundleAction[L]]
    ) -> None:
        if admitted.is_fragment:
            self._take_fragment(admitted, now_ms, actions)
            return
        row = self._row(admitted, "inbox", 1, now_ms)
        if self._consumed(admitted):
            # A mesh service's bundle is consumed at once, never kept in the inbox.
            if self.store.was_delivered(admitted.bundle_id):
                self.stats.duplicates += 1
                return
            self.store.mark_delivered(admitted.bundle_id, admitted.expires_ms)
        elif not self.store.add(row, delivered=True):
            self.stats.duplicates += 1
            return
        self.stats.delivered += 1
        actions.append(BundleDelivered(row, admitted.service))

    def _consumed(self, admitted: Admitted) -> bool:
        """A mesh service's broadcast: consumed at once, never kept in the inbox. (One
        addressed to a single node goes to its inbox, under quota, as any bundle.)"""
        service = admitted.service.split("/", 1)[0]  # seek/<node_id> is the seek service
        return admitted.broadcast and service in self.mesh_services

    def _take_fragment(
        self, admitted: Admitted, now_ms: int, actions: list[BundleAction[L]]
    ) -> None:
        if self.store.was_delivered(admitted.whole_id):
            self.stats.duplicates += 1
            return
        fragments = self.store.fragments_of(admitted.whole_id)
        if len(fragments) >= MAX_FRAGMENTS:
            raise FragmentsRefused(f"{admitted.whole_id} has {MAX_FRAGMENTS} fragments here")
        self.store.add(self._row(admitted, "fragment", 1, now_ms))
        fragments = self.store.fragments_of(admitted.whole_id)
        try:
            whole = self.codec.reassemble([f.data for f in fragments], now_ms)
        except BundleError as exc:
            # Its source signed fragments that disagree: the bundle is dropped here for
            # good (its id counts as delivered until it expires), the link is kept.
            self.stats.refuse(type(exc).__name__)
            ids = [f.bundle_id for f in fragments]
            self.store.deliver_whole(
                None, ids, whole_id=admitted.whole_id, expires_ms=admitted.expires_ms
            )
            return
        if whole is None:
            return
        row = self._row(whole, "inbox", 1, now_ms)
        kept = None if self._consumed(whole) else row
        ids = [f.bundle_id for f in fragments]
        if self.store.deliver_whole(kept, ids, whole_id=row.bundle_id, expires_ms=row.expires_ms):
            self.stats.delivered += 1
            actions.append(BundleDelivered(row, whole.service))

    def _route(
        self, row: StoredBundle, *, exclude: str | None, actions: list[BundleAction[L]]
    ) -> None:
        """Offer a held bundle: to its destination if linked; else a broadcast to every
        peer, and a bundle with copies to spare to every relay."""
        destination = _node_of(row.destination)
        if destination is not None and destination in self.links:
            self._offer(destination, [row.bundle_id], actions)
            return
        if destination is not None and row.copies <= 1:
            return  # wait for the destination
        for peer in self.links:
            if peer != exclude and peer != row.source:
                self._offer(peer, [row.bundle_id], actions)

    def _offer(self, peer: str, ids: list[str], actions: list[BundleAction[L]]) -> None:
        offered = self._offered.setdefault(peer, set())
        fresh = [bundle_id for bundle_id in ids if bundle_id not in offered]
        if not fresh:
            return
        if len(offered) + len(fresh) > MAX_OFFERED:
            offered.clear()  # bounded: the peer may hear an id twice, and answers "have"
        offered.update(fresh)
        link = self.links[peer]
        for start in range(0, len(fresh), OFFER_BATCH):
            actions.append(SendBundleOffer(link, tuple(fresh[start : start + OFFER_BATCH])))

    def _copies_for(self, row: StoredBundle, peer: str, in_flight: int) -> int:
        """Copies to hand ``peer`` with the bundle: all of them to its destination, one
        for a broadcast, half of those not already on their way to a relay (0: the relay
        gets none)."""
        destination = _node_of(row.destination)
        if destination is None:
            return 1
        if destination == peer:
            return max(1, row.copies)
        return max(0, row.copies - in_flight) // 2

    def _custody_taken(
        self, bundle_id: str, peer: str, handed: int, actions: list[BundleAction[L]]
    ) -> None:
        """``peer`` persisted ``bundle_id`` (with ``handed`` of our copies)."""
        row = self.store.get(bundle_id, "forwarding")
        if row is None:
            return
        destination = _node_of(row.destination)
        if destination is None:
            return  # a broadcast is held until it expires, for nodes yet to come
        if destination == peer:
            self.store.delete(bundle_id, "forwarding")
            released = True
        elif handed:
            left = row.copies - handed
            released = left <= 0
            if released:
                self.store.delete(bundle_id, "forwarding")
            else:
                self.store.set_copies(bundle_id, left)
        else:
            return
        self.stats.forwarded += 1
        actions.append(BundleForwarded(bundle_id, peer, released))

    def _drop(self, row: StoredBundle, code: str) -> None:
        self.store.delete(row.bundle_id, "forwarding")
        self.stats.refuse(code)

    def _row(self, admitted: Admitted, role: Role, copies: int, now_ms: int) -> StoredBundle:
        return StoredBundle(
            admitted.bundle_id if role != "inbox" else admitted.whole_id,
            role,
            admitted.source,
            admitted.signer,
            admitted.destination,
            admitted.created_ms,
            admitted.expires_ms,
            copies,
            now_ms,
            admitted.data,
        )


def _inbox_of(node_id: str) -> str:
    return f"dtn://{node_id}/inbox"


def _node_of(destination: str) -> str | None:
    """The node of a singleton dtn EID (None for ``dtn://~...``, a broadcast)."""
    if not destination.startswith("dtn://"):
        return None
    node = destination[6:].split("/", 1)[0]
    return None if node.startswith("~") else node


def _id_hint(data: bytes) -> str:
    """An id for a refusal of a bundle that did not parse (it has none of its own)."""
    return f"unparsed:{len(data)}"
