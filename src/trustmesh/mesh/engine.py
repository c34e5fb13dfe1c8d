"""The gossip engine: what a node does with a message (zero-trust-mesh.md section 6.3).

Sans-IO. For each message it checks, in this order (cheapest first): lifetime, the
seen-cache, the sender's rate, that the id is derived from the origin and content, the
origin's certificate and revocation, the signature. A duplicate is recognised by its id
before the id is checked: a copy under an id already seen changes nothing, and only a
message under a correctly derived id is ever marked seen, so no node can take another's
id first.
A new valid message is marked seen, kept for peers that ask for it, and forwarded to
``fanout`` peers chosen at random, never the sender or the origin.

Eager push to a few peers reaches most nodes in a few hops; to make coverage certain on
any connected mesh, nodes also trade digests (``ihave``) of the messages they hold with
the peers not known to hold them, and pull what they lack (``iwant``), as gossipsub does.
A peer "knows" a message once it sent it to us, we sent it to them, or either side
announced it.

Costly junk is penalised, in the manner of gossipsub v1.1's P4 (invalid messages) and P7
(behaviour) (:class:`ScoreParams`): each peer has a score, 0 until it misbehaves, lowered
by invalid signatures, undecodable frames, ids not derived from their message, and
duplicates beyond an allowance, and decaying back towards 0 with time. A peer whose score
falls below the threshold is graylisted: its gossip frames, IHAVEs and IWANTs are dropped
unread until a cooldown ends. Scores outlive the peer's link (a bounded table), so a
reconnect does not clear them. A duplicate that carries a chain the engine would check
(its origin unknown) takes a token from the sender's rate first, as a new message does.
"""

from __future__ import annotations

import dataclasses
import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography.exceptions import InvalidSignature

from trustmesh.errors import DecodeError, ProtocolError
from trustmesh.mesh.errors import (
    BadMessageId,
    BadSignature,
    ExpiredMessage,
    GossipRejected,
    RateLimited,
    RevokedOrigin,
    UntrustedOrigin,
)
from trustmesh.mesh.gossip import MAX_TTL_MS, GossipMessage, crl_from_payload, decode_message
from trustmesh.mesh.trust import ECDSA_SHA256, CrlUpdate, Identity, TrustView
from trustmesh.ratelimit import TokenBucket

T = TypeVar("T")
DEFAULT_FANOUT = 3
DEFAULT_SEEN_CAPACITY = 100_000
DEFAULT_RECENT_CAPACITY = 1024  # messages kept to answer iwant
DEFAULT_RATE = 200.0  # gossip messages per second per peer, on average
DEFAULT_BURST = 400
CLOCK_SKEW_MS = 60_000  # how far in the future a timestamp may be
MAX_DIGEST = 512  # ids per ihave or iwant
REPEAT_MS = 2_000  # an id pushed or announced to a peer is announced again after this ...
REPEATS = 4  # ... then after twice as long, this many times at most (2, 4, 8, 16 s)
KEPT_CERTIFICATES = 3  # per origin: the latest proven and the two before it (rotations)


@dataclass(frozen=True, slots=True)
class ScoreParams:
    """How peers are scored (docs/protocols/mesh-link.md section 6.2). Scores only go
    down, and decay back towards 0 with a half-life."""

    invalid: float = -10.0  # an invalid signature, an undecodable frame, a bad message id
    duplicate: float = -1.0  # each duplicate beyond the allowance below
    duplicate_rate: float = 400.0  # duplicates a second allowed per peer, on average
    duplicate_burst: int = 800
    threshold: float = -50.0  # below it, the peer is graylisted
    cooldown_ms: int = 300_000  # how long a graylisting lasts
    half_life_ms: int = 300_000  # a score halves in this time
    forget_above: float = -0.5  # a score decayed above this is forgotten (it is 0 again)
    capacity: int = 4096  # peers scored, linked or not; the least recently penalised go

    def __post_init__(self) -> None:
        if not (self.invalid < 0 and self.duplicate <= 0 and self.threshold < 0):
            raise ValueError("penalties and the threshold must be negative")
        if self.cooldown_ms < 0 or self.half_life_ms < 1 or self.capacity < 1:
            raise ValueError("bad cooldown, half-life or capacity")


class Graylisted(GossipRejected):
    """The sending peer is graylisted: its frames are dropped unread until its cooldown ends."""

    code = "graylisted"


class PeerScore:
    """A peer's score as of ``updated_ms``; :meth:`at` decays it to a later time."""

    __slots__ = ("graylisted_until", "updated_ms", "value")

    def __init__(self, now_ms: int) -> None:
        self.value = 0.0
        self.updated_ms = now_ms
        self.graylisted_until = 0  # Unix ms; 0 when never graylisted

    def at(self, now_ms: int, half_life_ms: int) -> float:
        elapsed = now_ms - self.updated_ms
        if elapsed <= 0 or self.value == 0.0:
            return self.value
        return float(self.value * 0.5 ** (elapsed / half_life_ms))


@dataclass(slots=True)
class Received:
    """A message was taken: ``new`` is false for a duplicate (nothing else is set then)."""

    message_id: str
    new: bool
    message: GossipMessage | None = None
    raw: bytes = b""  # the message as received
    origin: Identity | None = None
    forward_to: tuple[str, ...] = ()
    crl: CrlUpdate | None = None
    chain: tuple[bytes, ...] = ()  # the origin's certificate chain, for peers that lack it
    full: bytes | None = None  # encoded with the chain, once a peer needs it
    light: bytes | None = None  # encoded without it, once a peer needs it


@dataclass
class GossipStats:
    accepted: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    forwarded: int = 0

    def reject(self, code: str) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1


class SeenCache:
    """Message ids seen, each until its message expires; at most ``capacity``, the oldest
    forgotten first. New entries wait in :attr:`pending` until the node persists them."""

    def __init__(self, capacity: int = DEFAULT_SEEN_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("the seen-cache needs room for at least one id")
        self.capacity = capacity
        self._ids: OrderedDict[str, int] = OrderedDict()
        self.pending: list[tuple[str, int]] = []

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, message_id: str, expiry: int, *, persist: bool = True) -> None:
        self._ids[message_id] = expiry
        if persist:
            self.pending.append((message_id, expiry))
        if len(self._ids) > self.capacity:  # one in, at most one out
            self._ids.popitem(last=False)

    def load(self, entries: Iterable[tuple[str, int]], now_ms: int) -> None:
        """Restore persisted ids (oldest first), skipping expired ones."""
        for message_id, expiry in entries:
            if expiry > now_ms:
                self.add(message_id, expiry, persist=False)

    def take_pending(self) -> list[tuple[str, int]]:
        pending, self.pending = self.pending, []
        return pending

    def prune(self, now_ms: int) -> None:
        """Forget ids whose message has expired: a replay of it is refused as expired."""
        expired = [mid for mid, expiry in self._ids.items() if expiry <= now_ms]
        for message_id in expired:
            del self._ids[message_id]


class GossipEngine:
    """One node's gossip state: trust, the seen-cache, recent messages, peer knowledge."""

    def __init__(
        self,
        node_id: str,
        trust: TrustView,
        *,
        fanout: int = DEFAULT_FANOUT,
        seen: SeenCache | None = None,
        recent_capacity: int = DEFAULT_RECENT_CAPACITY,
        rate: float = DEFAULT_RATE,
        burst: int = DEFAULT_BURST,
        max_ttl_ms: int = MAX_TTL_MS,
        rng: random.Random | None = None,
        scoring: ScoreParams | None = None,
    ) -> None:
        if fanout < 1:
            raise ValueError("fanout must be at least 1")
        self.node_id = node_id
        self.trust = trust
        self.fanout = fanout
        self.seen = seen if seen is not None else SeenCache()
        self.recent_capacity = recent_capacity
        self.rate = rate
        self.burst = burst
        self.max_ttl_ms = max_ttl_ms
        # Which peers to push to need not be unpredictable, only spread.
        self.rng = rng if rng is not None else random.Random()  # noqa: S311
        self.stats = GossipStats()
        # Per origin, the certificates proven by a signature: the latest, then the one before.
        self._origins: dict[str, list[tuple[Identity, tuple[bytes, ...]]]] = {}
        self._recent: OrderedDict[str, Received] = OrderedDict()  # to answer iwant
        self._known: dict[str, set[str]] = {}  # peer -> ids it is known to hold
        # peer -> id -> (when to announce it again, announcements so far): ids pushed or
        # announced to a peer not known to hold them.
        self._told: dict[str, dict[str, tuple[int, int]]] = {}
        self._soonest_expiry = 1 << 62  # no message in _recent expires before this
        # peer -> (origin, serial) of the certificates it has seen: it gets those origins'
        # messages without the chain.
        self._certs_known: dict[str, set[tuple[str, int]]] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self.scoring = scoring if scoring is not None else ScoreParams()
        # Peers that misbehaved, least recently penalised first; kept after their link
        # goes (bounded by scoring.capacity), so a reconnect does not clear a score.
        self._scores: OrderedDict[str, PeerScore] = OrderedDict()
        self._duplicate_buckets: dict[str, TokenBucket] = {}

    # --- receiving ------------------------------------------------------------------------

    def receive_raw(
        self, raw: bytes, *, sender: str | None, peers: Sequence[str], now_ms: int
    ) -> Received:
        """One frame: as :meth:`receive_batch`, raising the error that refused it."""
        (result,) = self.receive_batch([raw], sender=sender, peers=peers, now_ms=now_ms)
        if isinstance(result, ProtocolError):
            raise result
        return result

    def receive(
        self,
        message: GossipMessage,
        raw: bytes,
        *,
        sender: str | None,
        peers: Sequence[str],
        now_ms: int,
    ) -> Received:
        """Take one message from ``sender`` (a peer's node_id, or None for the local API);
        ``peers`` are the node_ids of the live links. Raises a
        :class:`~trustmesh.mesh.errors.GossipRejected` subclass for a message to drop."""
        if sender is not None and self._scores and self.is_graylisted(sender, now_ms):
            error = self._drop_unread(sender, 1)[0]
            assert isinstance(error, Graylisted)
            raise error
        try:
            return self._receive(message, raw, sender, peers, now_ms)
        except GossipRejected as exc:
            self.stats.reject(exc.code)
            if isinstance(exc, BadSignature):
                self._penalise(sender, self.scoring.invalid, now_ms)
            raise
        except BadMessageId:
            self._penalise(sender, self.scoring.invalid, now_ms)
            raise

    def receive_batch(
        self, raws: Sequence[bytes], *, sender: str | None, peers: Sequence[str], now_ms: int
    ) -> list[Received | ProtocolError]:
        """Take the gossip frames of one read from ``sender`` together: screen them all
        (parse, lifetime, seen-cache, rate), then check all their signatures, then record
        them. Signatures checked back to back keep OpenSSL's curve tables in the CPU
        cache, which makes each check markedly cheaper than one between other work
        (docs/performance.md). Each frame's outcome is a :class:`Received` or the error
        that refused it, in order.

        Every check runs for every frame, as :meth:`receive` runs them; what is done once
        per batch is only what cannot change within it (the sender's tables, the time)."""
        if sender is not None and self._scores and self.is_graylisted(sender, now_ms):
            return self._drop_unread(sender, len(raws))
        results: list[Received | ProtocolError | None] = [None] * len(raws)
        screened: list[tuple[int, GossipMessage, bytes, bytes]] = []
        graylisted = False  # set when the sender is graylisted by this batch's frames
        stats = self.stats
        seen = self.seen._ids  # the ids, read and written here as SeenCache does
        # The lifetime bounds, as _check_lifetime checks them (it says why on a failure).
        max_ttl, latest = self.max_ttl_ms, now_ms + CLOCK_SKEW_MS
        known = None if sender is None else self._known_by(sender)
        known_bound = 4 * self.recent_capacity
        bucket, now = None, now_ms / 1e3
        for index, raw in enumerate(raws):
            if graylisted:  # the rest of its frames go unread
                results[index] = self._drop_unread(sender, 1)[0]
                continue
            try:
                message = decode_message(raw)
            except DecodeError as exc:
                stats.reject("malformed")
                results[index] = exc
                graylisted = self._penalise(sender, self.scoring.invalid, now_ms)
                continue
            try:
                timestamp, expiry = message.timestamp, message.expiry
                if not (
                    timestamp < expiry
                    and now_ms < expiry
                    and timestamp <= latest
                    and expiry - timestamp <= max_ttl
                ):
                    self._check_lifetime(message, now_ms)  # raises, saying which bound
                message_id = message.message_id
                if known is not None:
                    known.add(message_id)
                    if len(known) > known_bound:
                        self._bound_known(known)
                if message_id in seen:
                    results[index] = self._duplicate(message, sender, now_ms)
                    continue
                if sender is not None:
                    if bucket is None:  # one bucket, one time: fetched once per batch
                        bucket = self._bucket(sender, now_ms)
                    if bucket.take(now) is not None:
                        raise RateLimited(
                            f"{sender} is over {self.rate:g} gossip messages a second"
                        )
            except GossipRejected as exc:
                stats.reject(exc.code)
                results[index] = exc
                graylisted = isinstance(exc, Graylisted)
                continue
            try:
                signed = message.checked_signed_bytes()
            except BadMessageId as exc:
                stats.reject(exc.code)
                results[index] = exc
                graylisted = self._penalise(sender, self.scoring.invalid, now_ms)
                continue
            screened.append((index, message, raw, signed))
        proven: list[tuple[int, GossipMessage, bytes, Identity, tuple[bytes, ...]]] = []
        verify, origins, is_revoked = self._verify, self._origins, self.trust.is_revoked
        for index, message, raw, signed in screened:
            skip = 0
            if graylisted:
                results[index] = self._drop_unread(sender, 1)[0]
                continue
            if not message.chain:
                # The steady state: _verify's first candidate, inline. Its checks in its
                # order (revocation, expiry, signature); anything else goes to _verify.
                certified = origins.get(message.origin)
                if certified:
                    origin, chain = certified[0]
                    if (
                        origin.ecdsa
                        and not is_revoked(origin.serial)
                        and now_ms < origin.not_after_ms
                    ):
                        try:
                            origin.public_key.verify(message.signature, signed, ECDSA_SHA256)  # type: ignore[call-arg]
                        except InvalidSignature:
                            skip = 1  # _verify tries the others (not this one again)
                        else:
                            proven.append((index, message, raw, origin, chain))
                            continue
            try:
                origin, chain = verify(message, now_ms, signed, skip)
            except GossipRejected as exc:
                stats.reject(exc.code)
                results[index] = exc
                if isinstance(exc, BadSignature):
                    graylisted = self._penalise(sender, self.scoring.invalid, now_ms)
                continue
            proven.append((index, message, raw, origin, chain))
        # Record them: _record's work, with what is the same for the whole batch looked
        # up once (the sender's table, the peers to push an origin's messages to).
        pending, capacity = self.seen.pending, self.seen.capacity
        certs_known = None if sender is None else self._certs_known_by(sender)
        fanout, sample, told = self.fanout, self.rng.sample, self._told
        due = (now_ms + REPEAT_MS, 0)  # when each push is announced again, if not held
        pushes: dict[str, list[str]] = {}  # origin -> the peers that are neither it nor sender
        recent, recent_capacity = self._recent, self.recent_capacity
        for index, message, raw, origin, chain in proven:
            message_id = message.message_id
            if message_id in seen or message.payload["type"] != "anomaly":
                try:  # an earlier copy in this batch, or a CRL
                    results[index] = self._record(
                        message, raw, origin, chain, sender, peers, now_ms
                    )
                except GossipRejected as exc:
                    stats.reject(exc.code)
                    results[index] = exc
                continue
            expiry = message.expiry
            seen[message_id] = expiry  # SeenCache.add
            pending.append((message_id, expiry))
            if len(seen) > capacity:
                seen.popitem(last=False)
            if certs_known is not None:  # it sent us the message: it has seen the certificate
                certs_known.add((message.origin, origin.serial))
            received = Received(message_id, True, message, raw, origin, (), None, chain)
            recent[message_id] = received  # _remember
            if expiry < self._soonest_expiry:
                self._soonest_expiry = expiry
            if len(recent) > recent_capacity:
                self._forget_oldest()
            stats.accepted += 1
            candidates = pushes.get(message.origin)
            if candidates is None:
                candidates = pushes[message.origin] = [
                    p for p in peers if p != sender and p != message.origin
                ]
            forward = (
                tuple(sample(candidates, fanout)) if len(candidates) > fanout else tuple(candidates)
            )
            for peer in forward:  # a push counts as the first announcement
                (told.get(peer) or _dict_of(told, peer))[message_id] = due
            stats.forwarded += len(forward)
            received.forward_to = forward
            results[index] = received
        return [r for r in results if r is not None]

    def _receive(
        self,
        message: GossipMessage,
        raw: bytes,
        sender: str | None,
        peers: Sequence[str],
        now_ms: int,
    ) -> Received:
        duplicate = self._screen(message, sender, now_ms)
        if duplicate is not None:
            return duplicate
        try:
            signed = message.checked_signed_bytes()
        except BadMessageId as exc:
            self.stats.reject(exc.code)
            raise
        origin, chain = self._verify(message, now_ms, signed)
        return self._record(message, raw, origin, chain, sender, peers, now_ms)

    def _screen(self, message: GossipMessage, sender: str | None, now_ms: int) -> Received | None:
        """The cheap checks, before any signature: a Received for a duplicate, None for a
        message to verify; raises for one to drop."""
        message_id = message.message_id
        self._check_lifetime(message, now_ms)
        if sender is not None:
            known = self._known_by(sender)
            known.add(message_id)
            self._bound_known(known)
        if message_id in self.seen:
            return self._duplicate(message, sender, now_ms)
        if sender is not None:
            self._take_rate(sender, now_ms)
        return None

    def _take_rate(self, sender: str, now_ms: int) -> None:
        """One token from ``sender``'s gossip rate, or :class:`RateLimited`."""
        if self._bucket(sender, now_ms).take(now_ms / 1e3) is not None:
            raise RateLimited(f"{sender} is over {self.rate:g} gossip messages a second")

    def _bucket(self, sender: str, now_ms: int) -> TokenBucket:
        bucket = self._buckets.get(sender)
        if bucket is None:
            bucket = self._buckets[sender] = TokenBucket(self.rate, self.burst, now_ms / 1e3)
        return bucket

    def _duplicate(self, message: GossipMessage, sender: str | None, now_ms: int) -> Received:
        check_chain = bool(message.chain) and message.origin not in self._origins
        if sender is not None:
            now = now_ms / 1e3
            bucket = self._duplicate_buckets.get(sender)
            if bucket is None:
                scoring = self.scoring
                bucket = TokenBucket(scoring.duplicate_rate, scoring.duplicate_burst, now)
                self._duplicate_buckets[sender] = bucket
            if bucket.take(now) is not None and self._penalise(
                sender, self.scoring.duplicate, now_ms
            ):
                raise Graylisted(f"{sender} floods duplicates: graylisted")
            if check_chain:
                # Checking the chain costs as much as a new message: it takes a token
                # from the same rate, before the check.
                self._take_rate(sender, now_ms)
        self.stats.duplicates += 1
        if check_chain:
            # A restarted node remembers ids but not certificates: learn this one
            # (after its signature checks out), as later copies may come without it.
            try:
                self._verify(message, now_ms, message.checked_signed_bytes())
            except BadSignature as exc:  # a forgery under the chain it carries
                if self._penalise(sender, self.scoring.invalid, now_ms):
                    raise Graylisted(f"{sender} sent a forged duplicate: graylisted") from exc
            except (GossipRejected, BadMessageId):
                # Expired, revoked, unknown CA, a bad id: nothing to learn, and a
                # duplicate all the same (no penalty beyond the rate token it took).
                return Received(message.message_id, new=False)
        return Received(message.message_id, new=False)

    def _record(
        self,
        message: GossipMessage,
        raw: bytes,
        origin: Identity,
        chain: tuple[bytes, ...],
        sender: str | None,
        peers: Sequence[str],
        now_ms: int,
    ) -> Received:
        """A verified message: mark it seen, keep it, pick the peers to push it to."""
        message_id = message.message_id
        if message_id in self.seen:  # an earlier copy in the same batch
            return self._duplicate(message, sender, now_ms)
        crl = message.payload["type"] == "crl"
        received_crl = self.trust.apply_crl(crl_from_payload(message.payload)) if crl else None
        self.seen.add(message_id, message.expiry)
        if sender is not None:  # it sent us the message: it has seen the certificate
            self._certs_known_by(sender).add((message.origin, origin.serial))
        received = Received(message_id, True, message, raw, origin, (), received_crl, chain)
        self._remember(message_id, received, message.expiry)
        self.stats.accepted += 1
        if crl and received_crl is None:
            return received  # a CRL we hold already: not pushed on
        # The peers to push to: never the sender or the origin.
        candidates = [p for p in peers if p != sender and p != message.origin]
        if len(candidates) > self.fanout:
            forward = tuple(self.rng.sample(candidates, self.fanout))
        else:
            forward = tuple(candidates)
        due = (now_ms + REPEAT_MS, 0)
        told = self._told
        for peer in forward:  # a push counts as the first announcement
            told_peer = told.get(peer)
            if told_peer is None:
                told_peer = told[peer] = {}
            told_peer[message_id] = due
        self.stats.forwarded += len(forward)
        received.forward_to = forward
        return received

    def _check_lifetime(self, message: GossipMessage, now_ms: int) -> None:
        if message.expiry <= message.timestamp:
            raise ExpiredMessage("the message expires before it was made")
        if message.expiry <= now_ms:
            raise ExpiredMessage(f"message {message.message_id} has expired")
        if message.timestamp > now_ms + CLOCK_SKEW_MS:
            raise ExpiredMessage(f"message {message.message_id} is from the future")
        if message.expiry - message.timestamp > self.max_ttl_ms:
            raise ExpiredMessage(f"message lifetime exceeds {self.max_ttl_ms} ms")

    def _verify(
        self, message: GossipMessage, now_ms: int, signed: bytes, skip: int = 0
    ) -> tuple[Identity, tuple[bytes, ...]]:
        """Check the signature under the origin's certificate: the message's chain, or
        else the certificates last proven for that origin (its current and previous one,
        so a rotation in flight does not fail). A certificate is remembered only once a
        signature checked out under it. ``skip``: for a message without a chain, the
        signature already failed under the first known certificate (receive_batch)."""
        if message.chain:
            identity = self.trust.identity(message.chain, now_ms=now_ms)
            if identity.node_id != message.origin:
                raise UntrustedOrigin(
                    f"the certificate names {identity.node_id}, not the origin {message.origin}"
                )
            candidates = [(identity, message.chain)]
        else:
            candidates = self._origins.get(message.origin, [])
            if not candidates:
                raise UntrustedOrigin(f"no certificate known for {message.origin}: send its chain")
        failure: GossipRejected | None = None
        first = candidates[0][0]
        if skip and not message.chain:
            failure = UntrustedOrigin(
                f"signature does not verify under {candidates[0][0].node_id}'s key; "
                f"no known certificate of {message.origin} fits: send its chain"
            )
            candidates = candidates[skip:]
        is_revoked = self.trust.is_revoked
        for identity, chain in candidates:
            if is_revoked(identity.serial):
                failure = RevokedOrigin(f"{identity.node_id}'s certificate is revoked")
                continue
            if now_ms >= identity.not_after_ms:
                failure = failure or UntrustedOrigin(f"{identity.node_id}'s certificate expired")
                continue
            try:
                # Identity.verify, inline: the key object was built once, with the identity.
                if identity.ecdsa:
                    identity.public_key.verify(message.signature, signed, ECDSA_SHA256)  # type: ignore[call-arg]
                else:
                    identity.public_key.verify(message.signature, signed)  # type: ignore[call-arg]
            except InvalidSignature:
                if message.chain:  # the sender vouched for this certificate: a forgery
                    raise BadSignature(
                        f"signature does not verify under {identity.node_id}'s key"
                    ) from None
                # Without a chain it may be a certificate we have not seen: not proof of
                # a forgery, so the sender is not cut off.
                failure = failure or UntrustedOrigin(
                    f"signature does not verify under {identity.node_id}'s key; "
                    f"no known certificate of {message.origin} fits: send its chain"
                )
                continue
            if message.chain or identity is not first:
                self._prove(identity, chain)  # (the first known one is proven already)
            return identity, chain
        assert failure is not None
        raise failure

    def _prove(self, identity: Identity, chain: tuple[bytes, ...]) -> None:
        known = self._origins.get(identity.node_id)
        if known is not None and known[0][0].serial == identity.serial:
            return  # the usual case: nothing changes
        others = [k for k in known or () if k[0].serial != identity.serial]
        self._origins[identity.node_id] = [(identity, chain), *others[: KEPT_CERTIFICATES - 1]]

    def chain_of(self, origin: str) -> tuple[bytes, ...]:
        """The chain of the certificate last proven for ``origin`` (empty if none)."""
        known = self._origins.get(origin)
        return known[0][1] if known else ()

    # --- publishing -------------------------------------------------------------------------

    def publish(
        self, message: GossipMessage, raw: bytes, peers: Sequence[str], now_ms: int
    ) -> Received:
        """Our own message: checked like any other (a node must not sign what peers
        refuse), then sent to ``fanout`` peers."""
        return self.receive(message, raw, sender=None, peers=peers, now_ms=now_ms)

    # --- digests (lazy pull) -------------------------------------------------------------------

    def ihave_for(self, peer: str, now_ms: int) -> list[str]:
        """Ids of unexpired messages we hold that ``peer`` is not known to hold (it sent
        or announced them to us), each due again: a push or an announcement that was
        lost (a link that broke under it) is repeated ``REPEAT_MS`` later, then after
        twice that, up to ``REPEATS`` times (mesh-link.md section 7). At most
        ``MAX_DIGEST`` ids, the oldest due first: a backlog drains, nothing starves."""
        self._expire(now_ms)
        known = self._known_by(peer)
        told = _dict_of(self._told, peer)
        ids = []
        for message_id in self._recent:
            if message_id in known:
                continue
            due = told.get(message_id)
            if due is None or (due[1] < REPEATS and due[0] <= now_ms):
                tries = 0 if due is None else due[1] + 1
                told[message_id] = (now_ms + REPEAT_MS * 2**tries, tries)
                ids.append(message_id)
                if len(ids) == MAX_DIGEST:
                    break  # the rest are told next time: only what is sent counts
        return ids

    def on_ihave(self, peer: str, ids: Iterable[str], now_ms: int) -> list[str]:
        """The ids a peer announced that we lack: ask for them (none from a graylisted
        peer, whose ids are not read)."""
        if self._scores and self.is_graylisted(peer, now_ms):
            self._drop_unread(peer, 1)
            return []
        known = self._known_by(peer)
        wanted = []
        for message_id in ids:
            known.add(message_id)
            if message_id not in self.seen:
                wanted.append(message_id)
        self._bound_known(known)
        return wanted[:MAX_DIGEST]

    def on_iwant(self, peer: str, ids: Iterable[str], now_ms: int) -> list[Received]:
        """The messages a peer asked for that we still hold (none for a graylisted peer,
        whose ids are not read)."""
        if self._scores and self.is_graylisted(peer, now_ms):
            self._drop_unread(peer, 1)
            return []
        self._expire(now_ms)
        told = _dict_of(self._told, peer)
        found = []
        for message_id in list(ids)[:MAX_DIGEST]:
            entry = self._recent.get(message_id)
            if entry is not None:
                # Sent, not yet proven held: announced again if this copy is lost.
                tries = told.get(message_id, (0, 0))[1]
                told[message_id] = (now_ms + REPEAT_MS * 2**tries, tries)
                found.append(entry)
        return found

    def forget_peer(self, peer: str) -> None:
        """The peer's link is gone: forget what it knows and its buckets. Its score stays
        (until it decays, or the table of scores is full)."""
        self._known.pop(peer, None)
        self._told.pop(peer, None)
        self._certs_known.pop(peer, None)
        self._buckets.pop(peer, None)
        self._duplicate_buckets.pop(peer, None)

    # --- peer scores ----------------------------------------------------------------------------

    def penalise(self, peer: str, amount: float, now_ms: int) -> bool:
        """Lower ``peer``'s score by ``-amount`` (``amount`` is negative); True when this
        graylists the peer (its score fell below the threshold and it was not already)."""
        return self._penalise(peer, amount, now_ms)

    def _penalise(self, peer: str | None, amount: float, now_ms: int) -> bool:
        if peer is None or amount == 0.0:
            return False
        scoring = self.scoring
        entry = self._scores.pop(peer, None)
        if entry is None:
            entry = PeerScore(now_ms)
            while len(self._scores) >= scoring.capacity:
                self._scores.popitem(last=False)  # the least recently penalised
        entry.value = entry.at(now_ms, scoring.half_life_ms) + amount
        entry.updated_ms = max(entry.updated_ms, now_ms)
        self._scores[peer] = entry  # now the most recently penalised
        if entry.value < scoring.threshold and entry.graylisted_until <= now_ms:
            entry.graylisted_until = now_ms + scoring.cooldown_ms
            return True
        return False

    def score(self, peer: str, now_ms: int) -> float:
        """``peer``'s score at ``now_ms``: 0 for a peer that never misbehaved (or whose
        penalties have decayed away), negative otherwise."""
        entry = self._live_score(peer, now_ms)
        return entry.at(now_ms, self.scoring.half_life_ms) if entry is not None else 0.0

    def graylisted_until(self, peer: str, now_ms: int) -> int | None:
        """Until when (Unix ms) ``peer``'s frames are dropped unread; None if they are not."""
        entry = self._scores.get(peer)
        if entry is None or entry.graylisted_until <= now_ms:
            return None
        return entry.graylisted_until

    def is_graylisted(self, peer: str, now_ms: int) -> bool:
        entry = self._scores.get(peer)
        return entry is not None and entry.graylisted_until > now_ms

    def _live_score(self, peer: str, now_ms: int) -> PeerScore | None:
        """The peer's entry, forgotten once decayed to about 0 and not graylisted."""
        entry = self._scores.get(peer)
        if entry is None:
            return None
        if (
            entry.graylisted_until <= now_ms
            and entry.at(now_ms, self.scoring.half_life_ms) > self.scoring.forget_above
        ):
            del self._scores[peer]
            return None
        return entry

    def scored_peers(self) -> list[str]:
        """The peers with a score entry (linked or not), least recently penalised first."""
        return list(self._scores)

    def _drop_unread(self, peer: str | None, count: int) -> list[Received | ProtocolError]:
        """``count`` frames from a graylisted peer, refused without being read."""
        rejected = self.stats.rejected
        rejected[Graylisted.code] = rejected.get(Graylisted.code, 0) + count
        entry = self._scores.get(peer) if peer is not None else None
        until = entry.graylisted_until if entry is not None else None
        return [Graylisted(f"{peer} is graylisted until {until} (Unix ms): dropped unread")] * count

    # --- what goes on the wire ---------------------------------------------------------------

    def wire_for(self, peer: str, received: Received, *, with_chain: bool = False) -> bytes:
        """The bytes to send ``peer`` for an accepted message: with the origin's chain if
        the peer has not seen that certificate from us or sent it to us (it has from then
        on) or if ``with_chain`` (an answer to IWANT: the copy with the chain may have
        been lost), else without it (smaller, and cheaper to check). Each form is encoded
        at most once per message."""
        message, origin = received.message, received.origin
        assert message is not None
        assert origin is not None
        key = (message.origin, origin.serial)
        known = self._certs_known_by(peer)
        if key in known and not with_chain:
            if received.light is None:
                received.light = message.encode(with_chain=False) if message.chain else received.raw
            return received.light
        known.add(key)
        if received.full is None:
            received.full = (
                received.raw
                if message.chain
                else dataclasses.replace(message, chain=received.chain).encode()
            )
        return received.full

    def _certs_known_by(self, peer: str) -> set[tuple[str, int]]:
        return _set_of(self._certs_known, peer)

    def recent_ids(self) -> list[str]:
        return list(self._recent)

    def spread_of(self, message_id: str) -> tuple[list[str], list[str]]:
        """What this node knows of a message's spread among its linked peers: those
        known to hold it (they sent or announced it to us), and those we sent or
        announced it to that have not said they hold it (the mesh dashboard's coverage)."""
        held = {p for p, known in self._known.items() if message_id in known}
        told = {p for p, ids in self._told.items() if message_id in ids} - held
        return sorted(held), sorted(told)

    # --- internals ----------------------------------------------------------------------------

    def _known_by(self, peer: str) -> set[str]:
        return _set_of(self._known, peer)

    def _bound_known(self, known: set[str]) -> None:
        """Ids a peer announced or sent that we do not hold must not pile up."""
        if len(known) > 4 * self.recent_capacity:
            known.intersection_update(self._recent)

    def _remember(self, message_id: str, held: Received, expiry: int) -> None:
        self._recent[message_id] = held
        if expiry < self._soonest_expiry:
            self._soonest_expiry = expiry
        self._forget_oldest()

    def _forget_oldest(self) -> None:
        """Keep at most ``recent_capacity`` messages: the oldest go, and what peers are
        known to hold or were told of them."""
        while len(self._recent) > self.recent_capacity:
            gone, _ = self._recent.popitem(last=False)
            for known in self._known.values():
                known.discard(gone)
            for told in self._told.values():
                told.pop(gone, None)

    def _expire(self, now_ms: int) -> None:
        if now_ms < self._soonest_expiry:
            return  # called per peer each digest interval: nothing to walk until then
        expired = [mid for mid, held in self._recent.items() if _expiry(held) <= now_ms]
        for message_id in expired:
            del self._recent[message_id]
            for known in self._known.values():
                known.discard(message_id)
            for told in self._told.values():
                told.pop(message_id, None)
        self._soonest_expiry = min(map(_expiry, self._recent.values()), default=1 << 62)


def _expiry(held: Received) -> int:
    assert held.message is not None
    return held.message.expiry


def _dict_of(table: dict[str, dict[str, T]], peer: str) -> dict[str, T]:
    entry = table.get(peer)
    if entry is None:
        entry = table[peer] = {}
    return entry


def _set_of(table: dict[str, set[T]], peer: str) -> set[T]:
    """``table[peer]``, made empty on first use (without building a set per call, as
    ``setdefault`` would)."""
    entry = table.get(peer)
    if entry is None:
        entry = table[peer] = set()
    return entry
