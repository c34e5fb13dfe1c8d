"""Signed peer records: the only addresses a node dials besides its bootstrap list
(docs/protocols/mesh-link.md section 8.1; zero-trust-mesh.md sections 1.2 and 5.3).

A node signs its own record with its node key, as it signs gossip::

    {"node_id": "node-1", "addresses": ["10.0.0.5:7400"], "seq": 1767225600000,
     "expires": 1767229200000, "signature": "<base64>", "chain": ["<base64 DER>", ...]}

The signature covers ``RECORD_LABEL`` followed by the canonical JSON of
``[node_id, addresses, seq, expires]``; ``chain`` (the node's certificate, then its issuing
CA) rides outside it, so that any node can forward the record and any receiver can check
it. A record is taken only when its chain verifies to the mesh root, is not revoked and
names ``node_id``, its signature verifies under that certificate, it has not expired, and
its ``seq`` is higher than that of the record held for the node. The :class:`PeerBook`
keeps one record per node_id, at most ``capacity`` of them, and drops those that expire,
whose certificate expires, or whose certificate is revoked.

Sans-IO: nothing here reads a clock; every call takes ``now_ms`` (Unix milliseconds).
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from trustmesh.errors import ProtocolError
from trustmesh.keystore.signer import Signer
from trustmesh.mesh.errors import (
    ExpiredMessage,
    GossipRejected,
    MalformedMessage,
    UntrustedOrigin,
)
from trustmesh.mesh.gossip import MAX_CERT, MAX_CHAIN, NODE_ID, decode_base64
from trustmesh.mesh.link import is_address
from trustmesh.mesh.trust import TrustView
from trustmesh.wire.jsonwire import canonical_json, compact_json, strict_loads

RECORD_LABEL = b"trustmesh-peer-record/1\n"
RECORD_FIELDS = frozenset({"node_id", "addresses", "seq", "expires", "signature", "chain"})
MAX_RECORD_ADDRESSES = 4  # one per interface a node listens on; each is dialled in turn
MAX_RECORD = 48 * 1024  # encoded; a chain of 4 certificates of 8 KiB fits
MAX_SIGNATURE = 512
DEFAULT_RECORD_TTL_MS = 3600 * 1000  # a node signs its record for an hour ...
REFRESH_FRACTION = 0.5  # ... and signs a new one once half of that has passed
MAX_RECORD_TTL_MS = 7 * 24 * 3600 * 1000  # a receiver refuses longer lifetimes
CLOCK_SKEW_MS = 60_000  # how far in the future a record's seq may be
DEFAULT_CAPACITY = 1024  # records a book holds (one per node_id)
_MAX_INT = (1 << 53) - 1


class RecordRejected(GossipRejected):
    """A record this node will not keep (the book is full of fresher ones)."""

    code = "book-full"


@dataclass(frozen=True)
class PeerRecord:
    """A node's signed statement of where it accepts links, until ``expires``."""

    node_id: str
    addresses: tuple[str, ...]
    seq: int  # Unix ms when it was signed: a higher seq replaces a lower one
    expires: int  # Unix ms
    signature: bytes
    chain: tuple[bytes, ...]  # DER, the node's certificate first

    def signed_bytes(self) -> bytes:
        return record_signing_input(self.node_id, self.addresses, self.seq, self.expires)

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "addresses": list(self.addresses),
            "seq": self.seq,
            "expires": self.expires,
            "signature": base64.b64encode(self.signature).decode(),
            "chain": [base64.b64encode(der).decode() for der in self.chain],
        }

    def encode(self) -> bytes:
        return self._encoded

    @cached_property
    def _encoded(self) -> bytes:
        # Sent in every PEERS frame a node sends: encoded (chain in base64) once.
        return compact_json(self.to_json())


def record_signing_input(node_id: str, addresses: Sequence[str], seq: int, expires: int) -> bytes:
    return RECORD_LABEL + canonical_json([node_id, list(addresses), seq, expires])


def sign_record(
    signer: Signer,
    node_id: str,
    addresses: Sequence[str],
    *,
    seq: int,
    expires: int,
    chain: tuple[bytes, ...],
) -> PeerRecord:
    """Sign ``node_id``'s record; it is checked first, so a node never signs a record its
    peers would refuse as malformed."""
    record = PeerRecord(node_id, tuple(addresses), seq, expires, b"\0", chain)
    record_from_json(record.to_json())  # the field rules, on what we are about to sign
    if expires <= seq:
        raise ValueError("a record expires after it is signed")
    return PeerRecord(
        node_id, tuple(addresses), seq, expires, signer.sign(record.signed_bytes()), chain
    )


def decode_record(data: bytes | bytearray | memoryview) -> PeerRecord:
    return record_from_json(strict_loads(data, max_size=MAX_RECORD, error=MalformedMessage))


def record_from_json(data: Any) -> PeerRecord:
    """A record from its parsed JSON; :class:`MalformedMessage` if it breaks a rule."""
    if not isinstance(data, dict):
        raise MalformedMessage("a peer record is a JSON object")
    if data.keys() != RECORD_FIELDS:
        raise MalformedMessage(f"a peer record has exactly the fields {sorted(RECORD_FIELDS)}")
    node_id = data["node_id"]
    if not isinstance(node_id, str) or not NODE_ID.fullmatch(node_id):
        raise MalformedMessage("a record's node_id must be a DNS name")
    addresses = data["addresses"]
    if (
        not isinstance(addresses, list)
        or not 0 < len(addresses) <= MAX_RECORD_ADDRESSES
        or not all(is_address(a) for a in addresses)
        or len(set(addresses)) != len(addresses)
    ):
        raise MalformedMessage(
            f"a record's addresses are 1 to {MAX_RECORD_ADDRESSES} distinct host:port"
        )
    seq, expires = data["seq"], data["expires"]
    for name, value in (("seq", seq), ("expires", expires)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INT:
            raise MalformedMessage(f"a record's {name} is Unix milliseconds (an integer)")
    signature = decode_base64(data["signature"], "a record's signature", MAX_SIGNATURE)
    chain_field = data["chain"]
    if not isinstance(chain_field, list) or not 0 < len(chain_field) <= MAX_CHAIN:
        raise MalformedMessage(f"a record's chain holds 1 to {MAX_CHAIN} certificates")
    chain = tuple(decode_base64(c, "a record's chain entry", MAX_CERT) for c in chain_field)
    return PeerRecord(node_id, tuple(addresses), seq, expires, signature, chain)


def records_from_json(items: Iterable[Any]) -> list[PeerRecord]:
    return [record_from_json(item) for item in items]


def own_record_due(record: PeerRecord | None, now_ms: int) -> bool:
    """Whether a node should sign a new record of its own: it has none, or more than
    ``REFRESH_FRACTION`` of its record's lifetime has passed."""
    if record is None:
        return True
    return now_ms >= record.seq + (record.expires - record.seq) * REFRESH_FRACTION


def own_record(
    signer: Signer,
    node_id: str,
    addresses: Sequence[str],
    *,
    previous: PeerRecord | None,
    now_ms: int,
    not_after_ms: int,
    chain: tuple[bytes, ...],
    ttl_ms: int = DEFAULT_RECORD_TTL_MS,
) -> PeerRecord | None:
    """A node's new record of its own: ``seq`` is the time, or one more than the last
    one's if the clock went back; it expires after ``ttl_ms``, or with the certificate if
    that comes first. None once the certificate has expired (nothing to sign for)."""
    seq = max(now_ms, previous.seq + 1) if previous is not None else now_ms
    expires = min(seq + ttl_ms, not_after_ms)
    if expires <= seq:
        return None
    return sign_record(signer, node_id, addresses, seq=seq, expires=expires, chain=chain)


@dataclass(slots=True)
class _Entry:
    record: PeerRecord
    serial: int
    not_after_ms: int  # the certificate's; past it the record is dropped


@dataclass(slots=True)
class Learned:
    """What :meth:`PeerBook.receive` did: the records taken (new or newer), and the count
    of the ones refused, by code (``expired``, ``untrusted-origin``, ``revoked``,
    ``bad-signature``, ``book-full``). Records no newer than the one held are ``stale``."""

    accepted: list[PeerRecord] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    stale: int = 0


class PeerBook:
    """One node's peer records, by node_id, checked against ``trust``."""

    def __init__(
        self,
        trust: TrustView,
        node_id: str,
        *,
        capacity: int = DEFAULT_CAPACITY,
        max_ttl_ms: int = MAX_RECORD_TTL_MS,
    ) -> None:
        if capacity < 1:
            raise ValueError("a peer book needs room for one record")
        self.trust = trust
        self.node_id = node_id
        self.capacity = capacity
        self.max_ttl_ms = max_ttl_ms
        self._entries: dict[str, _Entry] = {}
        self._soonest = _MAX_INT  # no record expires before this (Unix ms)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._entries

    def get(self, node_id: str) -> PeerRecord | None:
        entry = self._entries.get(node_id)
        return entry.record if entry is not None else None

    def records(self) -> list[PeerRecord]:
        """Every record held, the most recently signed first."""
        return sorted((e.record for e in self._entries.values()), key=lambda r: -r.seq)

    # --- taking records ---------------------------------------------------------------------

    def receive(self, records: Iterable[PeerRecord], now_ms: int) -> Learned:
        """Take each record that checks out and is newer than the one held; refuse the
        rest (counted, never raised: a PEERS frame's good records are kept)."""
        learned = Learned()
        for record in records:
            try:
                if self.add(record, now_ms):
                    learned.accepted.append(record)
                else:
                    learned.stale += 1
            except GossipRejected as exc:
                learned.rejected[exc.code] += 1
        return learned

    def receive_json(self, items: Iterable[Any], now_ms: int) -> Learned:
        """As :meth:`receive`, for records as parsed JSON (a PEERS frame's): one no
        newer than the record held is counted stale before it is decoded, base64 chain
        and all; any other that breaks a rule raises :class:`MalformedMessage`."""
        fresh = []
        stale = 0
        for item in items:
            node_id = item.get("node_id") if isinstance(item, dict) else None
            held = self._entries.get(node_id) if isinstance(node_id, str) else None
            seq = item.get("seq") if held is not None else None
            if isinstance(seq, int) and held is not None and seq <= held.record.seq:
                stale += 1
                continue
            fresh.append(record_from_json(item))
        learned = self.receive(fresh, now_ms)
        learned.stale += stale
        return learned

    def load(self, raws: Iterable[bytes], now_ms: int) -> list[str]:
        """Records kept from an earlier run, checked again as if they had just arrived
        (the CRL may have revoked their nodes meanwhile); return the node_ids of those
        that no longer check out, for the caller to delete."""
        dropped = []
        for raw in raws:
            try:
                record = decode_record(raw)
            except ProtocolError:
                continue  # not ours to name; the store prunes it by age
            try:
                self.add(record, now_ms)
            except GossipRejected:
                dropped.append(record.node_id)
        return dropped

    def add(self, record: PeerRecord, now_ms: int) -> bool:
        """Take ``record``: True if it is now held, False if it is our own or no newer
        than the one held. Raise a :class:`GossipRejected` if it does not check out."""
        if record.node_id == self.node_id:
            return False  # our own record comes from us, never from a peer
        held = self._entries.get(record.node_id)
        if held is not None and record.seq <= held.record.seq:
            return False  # cheapest check first: a replay costs no signature check
        entry = self.verify(record, now_ms)
        if held is None and len(self._entries) >= self.capacity:
            self.prune(now_ms)
            if len(self._entries) >= self.capacity:
                # Full of valid records: the one that expires first gives way, if it
                # expires before this one.
                soonest = min(self._entries.values(), key=lambda e: e.record.expires)
                if soonest.record.expires >= record.expires:
                    raise RecordRejected(f"the peer book is full ({self.capacity} records)")
                del self._entries[soonest.record.node_id]
        self._entries[record.node_id] = entry
        self._soonest = min(self._soonest, record.expires, entry.not_after_ms)
        return True

    def verify(self, record: PeerRecord, now_ms: int) -> _Entry:
        """Check ``record`` on its own: lifetime, chain (to the mesh root, not revoked,
        naming the record's node_id), then signature."""
        if record.expires <= now_ms:
            raise ExpiredMessage(f"{record.node_id}'s record has expired")
        if record.expires <= record.seq or record.expires - record.seq > self.max_ttl_ms:
            raise ExpiredMessage(f"{record.node_id}'s record has a lifetime out of bounds")
        if record.seq > now_ms + CLOCK_SKEW_MS:
            raise ExpiredMessage(f"{record.node_id}'s record is from the future")
        identity = self.trust.identity(record.chain, now_ms=now_ms)  # untrusted, revoked
        if identity.node_id != record.node_id:
            raise UntrustedOrigin(
                f"a record for {record.node_id} signed with {identity.node_id}'s certificate"
            )
        identity.verify(record.signature, record.signed_bytes())  # BadSignature
        return _Entry(record, identity.serial, identity.not_after_ms)

    # --- using and dropping records ---------------------------------------------------------

    def _valid(self, entry: _Entry, now_ms: int) -> bool:
        return (
            entry.record.expires > now_ms
            and entry.not_after_ms > now_ms
            and not self.trust.is_revoked(entry.serial)
        )

    def dialable(
        self,
        now_ms: int,
        usable: Callable[[str], bool] = lambda _: True,
        *,
        newest_first: bool = True,
    ) -> Iterator[tuple[str, str]]:
        """(node_id, address) for each node whose record is valid now (the most
        recently signed first, unless the caller shuffles them anyway), with the first
        of its addresses that ``usable`` allows."""
        entries: Iterable[_Entry] = self._entries.values()
        if newest_first:
            entries = sorted(entries, key=lambda e: -e.record.seq)
        for entry in entries:
            if not self._valid(entry, now_ms):
                continue
            address = next((a for a in entry.record.addresses if usable(a)), None)
            if address is not None:
                yield entry.record.node_id, address

    def valid(self, node_ids: Iterable[str], now_ms: int) -> list[PeerRecord]:
        """The valid records of ``node_ids`` (those held), in the order given."""
        found = []
        for node_id in node_ids:
            entry = self._entries.get(node_id)
            if entry is not None and self._valid(entry, now_ms):
                found.append(entry.record)
        return found

    def remove(self, node_id: str) -> bool:
        return self._entries.pop(node_id, None) is not None

    def prune(self, now_ms: int, *, revoked: bool = True) -> list[str]:
        """Drop the records that expired, whose certificate expired, or (unless not
        ``revoked``: the CRL did not change) whose certificate is revoked; return their
        node_ids. Without revocations to look for, nothing is walked before the soonest
        expiry (a node prunes each digest interval, and its book may be full)."""
        if not revoked and now_ms < self._soonest:
            return []
        gone = [n for n, e in self._entries.items() if not self._valid(e, now_ms)]
        for node_id in gone:
            del self._entries[node_id]
        self._soonest = min(
            (min(e.record.expires, e.not_after_ms) for e in self._entries.values()),
            default=_MAX_INT,
        )
        return gone
