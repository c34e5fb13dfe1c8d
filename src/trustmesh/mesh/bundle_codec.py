"""Bundles as the mesh makes and checks them (docs/protocols/bundles.md sections 7 and 8).

:class:`MeshBundleCodec` is the bundle agent's codec: it makes this node's bundles
(fragmented to the link's bundle size, each fragment with a hop count block and signed
by this node), and it admits a peer's bundle only if it parses, its CRCs hold, it carries
its source's signature, the signing certificate chains to the mesh CA and is not
revoked, the source is that certificate's node, it has not expired, and it is under its
hop limit. It reads no clock: the time comes in.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from trustmesh.bundle.bib import find_signature_block, read_signature, sign_bundle, signing_input
from trustmesh.bundle.codec import (
    BlockFlag,
    BlockType,
    Bundle,
    CanonicalBlock,
    CreationTimestamp,
    HopCount,
    decode_bundle,
    hop_count_block,
)
from trustmesh.bundle.eid import BROADCAST, Eid, Scheme, inbox, node_eid
from trustmesh.bundle.errors import BundleError, BundleTooLargeError
from trustmesh.bundle.fragment import fragment, reassemble
from trustmesh.bundle.ids import dtn_ms_to_unix_ms, unix_ms_to_dtn_ms
from trustmesh.mesh.dtn import Admitted
from trustmesh.mesh.errors import ExpiredMessage, MeshError, UntrustedOrigin
from trustmesh.mesh.trust import TrustView
from trustmesh.pki.ca import NODE_ID

MAX_WIRE_BUNDLE = 64 * 1024  # a bundle on a link: one frame, so one never holds a link long
FRAGMENT_ROOM = 8 * 1024  # left beside each fragment's payload for the signature and chain
MAX_PAYLOAD = 1024 * 1024  # an application payload (POST /v1/bundles) at most
MAX_LIFETIME_MS = 30 * 24 * 3600 * 1000
MAX_CLOCK_SKEW_MS = 5 * 60 * 1000  # a bundle created later than this ahead of us is refused
HOP_LIMIT = 32
MAX_REASSEMBLY = MAX_PAYLOAD + 64 * 1024


class BundleRefused(BundleError):
    """A well-formed bundle this node will not take (its spec'd reason in the text)."""


class HopLimitExceeded(BundleRefused):
    """The bundle went through more hops than its hop count block allows."""


class ForeignSource(BundleRefused):
    """A bundle handed to a node's API whose source is not that node."""


class MeshBundleCodec:
    def __init__(
        self,
        node_id: str,
        trust: TrustView,
        sign: Callable[[bytes], bytes],
        chain: Callable[[], tuple[bytes, ...]],
        *,
        rng: random.Random | None = None,
        hop_limit: int = HOP_LIMIT,
    ) -> None:
        """``sign``: this node's identity key; ``chain()``: its current certificate
        chain (DER, leaf first: it changes at renewal)."""
        self.node_id = node_id
        self.trust = trust
        self.sign = sign
        self.chain = chain
        self.hop_limit = hop_limit
        # Bundle ids are (creation ms, sequence): a random start makes an id made after
        # a restart (or with a clock that stepped back) differ from the ones before.
        self._sequence = (rng or random.SystemRandom()).getrandbits(32)

    # --- making ---------------------------------------------------------------------------

    def destination(self, text: str) -> Eid:
        """A destination as the API and CLI take it: a node_id, "broadcast", or an EID."""
        if text == "broadcast":
            return BROADCAST
        if text.startswith(("dtn:", "ipn:")):
            eid = Eid.parse(text)
            _check_routable(eid)
            return eid
        if not NODE_ID.fullmatch(text):
            raise BundleRefused(f"{text!r} is not a node_id (or broadcast, or a dtn:// EID)")
        return inbox(text)

    def make(self, destination: Eid, payload: bytes, lifetime_ms: int, now_ms: int) -> list[Bundle]:
        """This node's bundle to ``destination``, signed: one, or its fragments."""
        if not 0 < lifetime_ms <= MAX_LIFETIME_MS:
            raise BundleRefused(f"a lifetime is 1 ms to {MAX_LIFETIME_MS // 86_400_000} days")
        self._sequence = (self._sequence + 1) % (1 << 32)
        hop = hop_count_block(HopCount(self.hop_limit), number=2, flags=BlockFlag.REPLICATE)
        bundle = Bundle.build(
            source=node_eid(self.node_id),
            destination=destination,
            payload=payload,
            creation=CreationTimestamp(unix_ms_to_dtn_ms(now_ms), self._sequence),
            lifetime_ms=lifetime_ms,
            extensions=(hop,),
        )
        return self.sign_all(bundle)

    def sign_all(self, bundle: Bundle) -> list[Bundle]:
        """Fragment ``bundle`` to the link's bundle size, then sign each piece."""
        chain = self.chain()
        pieces = fragment(bundle, MAX_WIRE_BUNDLE - FRAGMENT_ROOM)
        return [sign_bundle(piece, self.node_id, chain, self.sign) for piece in pieces]

    def adopt(self, data: bytes, now_ms: int) -> list[Bundle]:
        """A raw bundle the node's own application made (POST /v1/bundles as CBOR): its
        source must be this node; it gets a hop count block if it has none, then the
        node's signature (fragmented first if it is too big for a link)."""
        bundle = decode_bundle(data, max_size=MAX_PAYLOAD + 64 * 1024)
        source = bundle.primary.source
        if source.scheme != Scheme.DTN or source.is_null or source.node != self.node_id:
            raise ForeignSource(f"the bundle's source is {source}, not this node ({self.node_id})")
        self._check_destination(bundle)
        self._check_time(bundle, now_ms)
        if bundle.hop_count is None:
            hop = HopCount(self.hop_limit).encode()
            number = bundle.next_block_number()
            block = CanonicalBlock(BlockType.HOP_COUNT, number, hop, BlockFlag.REPLICATE)
            bundle = bundle.with_block(block)
        return self.sign_all(bundle)

    # --- checking -------------------------------------------------------------------------

    def admit(self, data: bytes, now_ms: int) -> Admitted:
        bundle = decode_bundle(data, max_size=MAX_WIRE_BUNDLE)
        try:
            return self._admit(bundle, data, now_ms)
        except BundleError as exc:
            exc.bundle_id = _id_of(bundle)  # type: ignore[attr-defined]  # for the refusal
            raise
        except MeshError as exc:
            exc.bundle_id = _id_of(bundle)  # type: ignore[attr-defined]
            raise

    def _admit(self, bundle: Bundle, data: bytes, now_ms: int) -> Admitted:
        total = bundle.primary.total_adu_length
        if total is not None and total > MAX_REASSEMBLY:
            raise BundleTooLargeError(
                f"a fragment of a {total}-byte bundle (at most {MAX_REASSEMBLY})"
            )
        signer = self._verify(bundle, now_ms)
        hop = bundle.hop_count
        if hop is not None:
            hop = HopCount(hop.limit, hop.count + 1)  # this hop counts
            if hop.exceeded:
                raise HopLimitExceeded(f"the bundle went {hop.count} hops, over {hop.limit}")
            bundle = bundle.with_hop_count(hop)
            data = bundle.encode()
        return self.admitted(bundle, signer, data)

    def admitted(self, bundle: Bundle, signer: str, data: bytes) -> Admitted:
        primary = bundle.primary
        bundle_id = bundle.bundle_id
        destination = primary.destination
        node = None if destination.node == BROADCAST.node else destination.node
        created = dtn_ms_to_unix_ms(primary.creation.time)
        return Admitted(
            bundle_id=str(bundle_id),
            whole_id=str(bundle_id.whole),
            source=primary.source.node,
            signer=signer,
            destination=destination.text,
            destination_node=node,
            service=destination.service,
            created_ms=created,
            expires_ms=created + primary.lifetime,
            is_fragment=bundle.is_fragment,
            data=data,
        )

    def reassemble(self, fragments: list[bytes], now_ms: int) -> Admitted | None:
        """The whole bundle once the fragments (each admitted before) cover it. Each
        fragment's signature covered that fragment: the whole keeps none."""
        parts = [decode_bundle(f, max_size=MAX_WIRE_BUNDLE) for f in fragments]
        whole = reassemble(parts, max_bytes=MAX_REASSEMBLY)
        if whole is None:
            return None
        first = min(parts, key=lambda part: part.primary.fragment_offset or 0)
        signer = self.trust.identity(read_signature(first).chain, now_ms=now_ms).serial_hex
        block = find_signature_block(whole)
        if block is not None:
            whole = whole.without_block(block.number)
        return self.admitted(whole, signer, whole.encode())

    def payload_of(self, data: bytes) -> bytes:
        return decode_bundle(data, max_size=MAX_REASSEMBLY + 64 * 1024).payload

    # --- internals ------------------------------------------------------------------------

    def _verify(self, bundle: Bundle, now_ms: int) -> str:
        """The signer's serial (hex), once everything checks out."""
        self._check_destination(bundle)
        self._check_time(bundle, now_ms)
        signature = read_signature(bundle)
        source = bundle.primary.source
        if source.scheme != Scheme.DTN or source.is_null:
            raise UntrustedOrigin(f"a bundle from {source} has no node to vouch for it")
        identity = self.trust.identity(signature.chain, now_ms=now_ms)  # chain, revocation
        if identity.node_id != source.node or signature.source.node != source.node:
            raise UntrustedOrigin(
                f"a bundle from {source.node} signed by {identity.node_id}'s certificate"
            )
        identity.verify(
            signature.signature,
            signing_input(bundle, signature.block.number, signature.block.flags),
        )
        return identity.serial_hex

    def _check_destination(self, bundle: Bundle) -> None:
        _check_routable(bundle.primary.destination)

    def _check_time(self, bundle: Bundle, now_ms: int) -> None:
        primary = bundle.primary
        if primary.creation.time == 0:
            raise ExpiredMessage("a bundle without a creation time (every node has a clock)")
        created = dtn_ms_to_unix_ms(primary.creation.time)
        if primary.lifetime > MAX_LIFETIME_MS:
            raise ExpiredMessage(f"a lifetime over {MAX_LIFETIME_MS // 86_400_000} days")
        if created > now_ms + MAX_CLOCK_SKEW_MS:
            raise ExpiredMessage("a bundle created in the future")
        if created + primary.lifetime <= now_ms:
            raise ExpiredMessage("the bundle's lifetime is over")


def _id_of(bundle: Bundle) -> str | None:
    try:
        return str(bundle.bundle_id)
    except BundleError:
        return None


def _check_routable(destination: Eid) -> None:
    """A destination the mesh routes: a node's dtn endpoint, or the ~mesh group."""
    if destination.scheme != Scheme.DTN or destination.is_null:
        raise BundleRefused(f"{destination} is not a dtn endpoint this mesh routes to")
    if destination.node.startswith("~"):
        if destination.node != BROADCAST.node:
            raise BundleRefused(f"{destination}: the only group this mesh routes is ~mesh")
    elif not NODE_ID.fullmatch(destination.node):
        raise BundleRefused(f"{destination}: {destination.node!r} is not a node_id")
