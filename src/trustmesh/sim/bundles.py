"""Bundles in the simulator (``trustmesh sim --bundles N``; docs/sim.md): the sim's
stand-in for the bundle codec, and the tally of the bundles a run sends.

:class:`SimBundleCodec` replaces :class:`trustmesh.mesh.bundle_codec.MeshBundleCodec`,
whose cost is the RFC 9171 encoding and a P-256 signature per bundle and per hop
(measured by ``python -m bench dtn``). A sim bundle is the fields the agent reads, in a
few bytes: ``id US source US signer US destination US service US created US expires US
hops RS payload`` (US = 0x1F, RS = 0x1E, numbers in decimal ASCII). It is not signed.
Admission keeps the checks whose outcome depends on the scenario: the lifetime (an
expired bundle is refused, ``expired``), the signer's certificate against the receiving
node's own CRL (``revoked``), and the hop limit (each hop counts, as the real codec
re-encodes the hop count block). What it skips: CBOR, CRCs, the signature and the chain
(which the real codec checks against the trust view). No sim bundle is fragmented.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from trustmesh.mesh.bundle_codec import HOP_LIMIT, HopLimitExceeded
from trustmesh.mesh.dtn import Admitted
from trustmesh.mesh.errors import ExpiredMessage, MalformedMessage, RevokedOrigin

US = b"\x1f"
RS = b"\x1e"
FIELDS = 8
BROADCAST_PREFIX = "dtn://~"
CONTACT_SERVICE = "contact"  # as trustmesh.node.bundles: "I am back, here is my record"
CONTACT_TTL_MS = 300_000  # trustmesh.node.bundles.CONTACT_TTL_S
SEEK_SERVICE = "seek"  # as trustmesh.node.bundles: "I hold bundles for you, here I am"
SEEK_TTL_MS = 300_000  # trustmesh.node.bundles.SEEK_TTL_S
SEEK_INTERVAL_MS = 300_000  # trustmesh.node.bundles.SEEK_INTERVAL_MS


def encode(
    bundle_id: str,
    source: str,
    signer: str,
    destination: str,
    service: str,
    created_ms: int,
    expires_ms: int,
    hops: int,
    payload: bytes,
) -> bytes:
    head = "\x1f".join(
        (
            bundle_id,
            source,
            signer,
            destination,
            service,
            str(created_ms),
            str(expires_ms),
            str(hops),
        )
    )
    return head.encode() + RS + payload


def make(
    bundle_id: str,
    source: str,
    signer: str,
    destination: str,
    service: str,
    created_ms: int,
    lifetime_ms: int,
    payload: bytes,
) -> Admitted:
    """A bundle made at ``source`` (hop count 0), as its agent's ``submit`` takes it."""
    data = encode(
        bundle_id,
        source,
        signer,
        destination,
        service,
        created_ms,
        created_ms + lifetime_ms,
        0,
        payload,
    )
    return _admitted(
        bundle_id,
        source,
        signer,
        destination,
        service,
        created_ms,
        created_ms + lifetime_ms,
        data,
    )


def payload_of(data: bytes) -> bytes:
    return data.partition(RS)[2]


def _node_of(destination: str) -> str | None:
    if destination.startswith(BROADCAST_PREFIX):
        return None
    return destination[6:].split("/", 1)[0]


def _admitted(
    bundle_id: str,
    source: str,
    signer: str,
    destination: str,
    service: str,
    created_ms: int,
    expires_ms: int,
    data: bytes,
) -> Admitted:
    return Admitted(
        bundle_id=bundle_id,
        whole_id=bundle_id,
        source=source,
        signer=signer,
        destination=destination,
        destination_node=_node_of(destination),
        service=service,
        created_ms=created_ms,
        expires_ms=expires_ms,
        is_fragment=False,
        data=data,
    )


class SimBundleCodec:
    """The sim's stand-in for the mesh bundle codec (see the module docstring).
    ``is_revoked(serial)``: the receiving node's own trust view."""

    __slots__ = ("hop_limit", "is_revoked")

    def __init__(self, is_revoked: Callable[[int], bool], *, hop_limit: int = HOP_LIMIT) -> None:
        self.is_revoked = is_revoked
        self.hop_limit = hop_limit

    def admit(self, data: bytes, now_ms: int) -> Admitted:
        head, sep, payload = data.partition(RS)
        parts = head.split(US)
        if not sep or len(parts) != FIELDS:
            raise MalformedMessage("not a sim bundle")
        bundle_id, source, signer, destination, service, created, expires, hops = (
            p.decode() for p in parts
        )
        expires_ms = int(expires)
        if expires_ms <= now_ms:
            raise ExpiredMessage("the bundle's lifetime is over")
        if self.is_revoked(int(signer, 16)):
            raise RevokedOrigin(f"{source}'s certificate {signer} is revoked")
        count = int(hops) + 1  # this hop counts
        if count > self.hop_limit:
            raise HopLimitExceeded(f"the bundle went {count} hops, over {self.hop_limit}")
        created_ms = int(created)
        data = encode(
            bundle_id,
            source,
            signer,
            destination,
            service,
            created_ms,
            expires_ms,
            count,
            payload,
        )
        return _admitted(
            bundle_id, source, signer, destination, service, created_ms, expires_ms, data
        )

    def reassemble(self, fragments: list[bytes], now_ms: int) -> Admitted | None:
        return None  # the simulator never fragments


# --- the tally ------------------------------------------------------------------------------


@dataclass(slots=True)
class Unicast:
    bundle_id: str
    source: int  # node index
    destination: int
    sent_at: int  # virtual Unix ms
    expires_at: int
    destination_down: bool  # the destination was down when it was sent
    delivered_at: int | None = None


@dataclass(slots=True)
class Broadcast:
    bundle_id: str
    source: int
    sent_at: int
    expires_at: int
    got: dict[int, int] = field(default_factory=dict)  # node index -> delivered at


@dataclass(slots=True)
class BundleTally:
    """What the run sent and what became of it (the ``bundles`` section of the report)."""

    unicast: list[Unicast] = field(default_factory=list)
    broadcast: list[Broadcast] = field(default_factory=list)
    by_id: dict[str, Unicast | Broadcast] = field(default_factory=dict)
    contacts_announced: int = 0
    contacts_delivered: int = 0
    seeks: int = 0  # seek broadcasts sent (a unicast to a node its source is not linked to)
    redelivered: int = 0  # a bundle delivered again at a node that had it (never, if right)
    misdelivered: int = 0  # a unicast delivered to a node not its destination
    transmissions: int = 0  # BUNDLE frames sent (one bundle handed over one link)
    sequence: int = 0

    def next_id(self, source: str, now_ms: int) -> str:
        self.sequence += 1
        return f"{source}:{now_ms}:{self.sequence}"

    def delivered(self, bundle_id: str, node: int, now_ms: int) -> None:
        entry = self.by_id.get(bundle_id)
        if entry is None:
            return
        if isinstance(entry, Unicast):
            if node != entry.destination:
                self.misdelivered += 1
            elif entry.delivered_at is not None:
                self.redelivered += 1
            else:
                entry.delivered_at = now_ms
        elif node in entry.got:
            self.redelivered += 1
        else:
            entry.got[node] = now_ms

    def pending(self, now_ms: int, live: list[int]) -> bool:
        """Whether a bundle may still arrive somewhere it has not: a unicast undelivered,
        or a broadcast that a live node lacks, with its lifetime not over."""
        for u in self.unicast:
            if u.delivered_at is None and u.expires_at > now_ms:
                return True
        for b in self.broadcast:
            if b.expires_at > now_ms and any(i not in b.got and i != b.source for i in live):
                return True
        return False
