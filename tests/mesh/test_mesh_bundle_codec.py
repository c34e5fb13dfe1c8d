"""Bundles as the mesh makes and admits them: the source's signature block, the trust
and revocation checks, lifetime, hop limit, fragments, and adopting an application's
raw bundle."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshtools import T0_MS, MeshPki, Node

from trustmesh.bundle.bib import SignatureBlockError, find_signature_block, read_signature
from trustmesh.bundle.codec import (
    BlockType,
    Bundle,
    CanonicalBlock,
    CreationTimestamp,
    HopCount,
    decode_bundle,
)
from trustmesh.bundle.eid import BROADCAST, Eid, inbox, node_eid
from trustmesh.bundle.errors import BundleError, BundleTooLargeError
from trustmesh.bundle.ids import unix_ms_to_dtn_ms
from trustmesh.mesh.bundle_codec import (
    MAX_WIRE_BUNDLE,
    BundleRefused,
    ForeignSource,
    HopLimitExceeded,
    MeshBundleCodec,
)
from trustmesh.mesh.errors import BadSignature, ExpiredMessage, RevokedOrigin, UntrustedOrigin
from trustmesh.mesh.trust import TrustView


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshPki]:
    pki = MeshPki(tmp_path_factory.mktemp("ca"))
    yield pki
    pki.close()


@pytest.fixture(scope="module")
def nodes(pki: MeshPki) -> tuple[Node, Node]:
    return pki.node("node-a"), pki.node("node-b")


def codec(node: Node, trust: TrustView) -> MeshBundleCodec:
    return MeshBundleCodec(node.node_id, trust, node.key.sign, lambda: node.chain_der)


def test_a_signed_bundle_is_admitted_with_its_facts_and_counts_the_hop(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    a, b = nodes
    (bundle,) = codec(a, pki.trust()).make(inbox("node-b"), b"hello", 60_000, T0_MS)
    assert bundle.hop_count == HopCount(32, 0)
    admitted = codec(b, pki.trust()).admit(bundle.encode(), T0_MS)
    assert admitted.source == "node-a" and admitted.destination_node == "node-b"
    assert admitted.destination == "dtn://node-b/inbox" and admitted.service == "inbox"
    assert admitted.signer == format(a.serial, "x")
    assert admitted.expires_ms - admitted.created_ms == 60_000
    assert abs(admitted.created_ms - T0_MS) <= 1 and not admitted.is_fragment
    relayed = decode_bundle(admitted.data, max_size=MAX_WIRE_BUNDLE)
    assert relayed.hop_count == HopCount(32, 1) and relayed.payload == b"hello"
    # The hop count is outside the signature: the next hop admits the relayed bytes.
    assert codec(a, pki.trust()).admit(admitted.data, T0_MS).bundle_id == admitted.bundle_id


def test_a_broadcast_has_no_destination_node(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    (bundle,) = codec(a, pki.trust()).make(BROADCAST, b"all", 60_000, T0_MS)
    admitted = codec(b, pki.trust()).admit(bundle.encode(), T0_MS)
    assert admitted.broadcast and admitted.destination == "dtn://~mesh/inbox"


def test_each_new_bundle_has_its_own_id(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    maker = codec(nodes[0], pki.trust())
    ids = {maker.make(inbox("node-b"), b"x", 1000, T0_MS)[0].bundle_id for _ in range(50)}
    assert len(ids) == 50


def tampered(bundle: Bundle, payload: bytes) -> bytes:
    blocks = (*bundle.extensions, CanonicalBlock(BlockType.PAYLOAD, 1, payload))
    return Bundle(bundle.primary, blocks).encode()


def test_a_changed_payload_or_a_borrowed_source_is_refused(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    a, b = nodes
    checker = codec(b, pki.trust())
    (bundle,) = codec(a, pki.trust()).make(inbox("node-b"), b"pay me 1", 60_000, T0_MS)
    with pytest.raises(BadSignature):
        checker.admit(tampered(bundle, b"pay me 9"), T0_MS)
    # node-b signs a bundle that claims node-a as its source:
    forged = Bundle.build(
        source=node_eid("node-a"),
        destination=inbox("node-b"),
        payload=b"x",
        creation=CreationTimestamp(unix_ms_to_dtn_ms(T0_MS), 1),
        lifetime_ms=60_000,
    )
    (forged,) = codec(b, pki.trust()).sign_all(forged)
    with pytest.raises(UntrustedOrigin, match="signed by node-b"):
        checker.admit(forged.encode(), T0_MS)


def test_an_unsigned_bundle_and_a_foreign_ca_are_refused(
    pki: MeshPki, nodes: tuple[Node, Node], tmp_path: Path
) -> None:
    _a, b = nodes
    plain = Bundle.build(
        source=node_eid("node-a"),
        destination=inbox("node-b"),
        payload=b"x",
        creation=CreationTimestamp(unix_ms_to_dtn_ms(T0_MS), 1),
        lifetime_ms=60_000,
    )
    with pytest.raises(SignatureBlockError):
        codec(b, pki.trust()).admit(plain.encode(), T0_MS)
    other = MeshPki(tmp_path / "other")
    stranger = other.node("node-a")
    (bundle,) = codec(stranger, other.trust()).make(inbox("node-b"), b"x", 60_000, T0_MS)
    with pytest.raises(UntrustedOrigin):
        codec(b, pki.trust()).admit(bundle.encode(), T0_MS)
    other.close()


def test_a_revoked_source_is_refused(pki: MeshPki) -> None:
    c, b = pki.node("node-c"), pki.node("node-b")
    (bundle,) = codec(c, pki.trust()).make(inbox("node-b"), b"x", 60_000, T0_MS)
    pki.revoke(c)
    trust = pki.trust()
    trust.apply_crl(pki.crl())
    with pytest.raises(RevokedOrigin):
        codec(b, trust).admit(bundle.encode(), T0_MS)


def test_lifetime_and_clock_rules(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    maker, checker = codec(a, pki.trust()), codec(b, pki.trust())
    (bundle,) = maker.make(inbox("node-b"), b"x", 1_000, T0_MS)
    with pytest.raises(ExpiredMessage, match="lifetime is over"):
        checker.admit(bundle.encode(), T0_MS + 1_000)
    (future,) = maker.make(inbox("node-b"), b"x", 1_000, T0_MS + 3_600_000)
    with pytest.raises(ExpiredMessage, match="future"):
        checker.admit(future.encode(), T0_MS)
    with pytest.raises(BundleRefused, match="lifetime"):
        maker.make(inbox("node-b"), b"x", 31 * 86_400_000, T0_MS)


def test_a_bundle_over_its_hop_limit_is_refused(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    (bundle,) = codec(a, pki.trust()).make(inbox("node-c"), b"x", 60_000, T0_MS)
    data = bundle.with_hop_count(HopCount(2, 2)).encode()
    with pytest.raises(HopLimitExceeded):
        codec(b, pki.trust()).admit(data, T0_MS)


def test_a_big_payload_travels_in_signed_fragments_and_is_whole_again(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    a, b = nodes
    payload = bytes(range(256)) * 800  # 200 KiB
    pieces = codec(a, pki.trust()).make(inbox("node-b"), payload, 60_000, T0_MS)
    assert len(pieces) == 4 and all(len(p.encode()) <= MAX_WIRE_BUNDLE for p in pieces)
    checker = codec(b, pki.trust())
    admitted = [checker.admit(p.encode(), T0_MS) for p in reversed(pieces)]
    assert all(x.is_fragment and x.whole_id == admitted[0].whole_id for x in admitted)
    assert checker.reassemble([x.data for x in admitted[:3]], T0_MS) is None
    whole = checker.reassemble([x.data for x in admitted], T0_MS)
    assert whole is not None and whole.bundle_id == admitted[0].whole_id
    assert checker.payload_of(whole.data) == payload
    assert find_signature_block(decode_bundle(whole.data, max_size=1 << 21)) is None


def test_an_application_bundle_is_adopted_only_from_this_node(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    a, b = nodes
    mine = codec(a, pki.trust())
    raw = Bundle.build(
        source=Eid.dtn("node-a", "app"),
        destination=inbox("node-b"),
        payload=b"from the app",
        creation=CreationTimestamp(unix_ms_to_dtn_ms(T0_MS), 7),
        lifetime_ms=60_000,
    )
    (signed,) = mine.adopt(raw.encode(), T0_MS)
    assert signed.hop_count == HopCount(32, 0)
    assert read_signature(signed).source == node_eid("node-a")
    assert (
        codec(b, pki.trust()).admit(signed.encode(), T0_MS).bundle_id
        == "node-a:" + str(unix_ms_to_dtn_ms(T0_MS)) + ":7"
    )
    with pytest.raises(ForeignSource):
        codec(b, pki.trust()).adopt(raw.encode(), T0_MS)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_any_signature_block_data_is_read_or_refused_with_a_typed_error(data: bytes) -> None:
    bundle = Bundle.build(
        source=node_eid("node-a"),
        destination=inbox("node-b"),
        payload=b"x",
        creation=CreationTimestamp(1, 1),
        lifetime_ms=1,
        extensions=(CanonicalBlock(BlockType.BIB, 2, b"\x81\x01\x20" + data),),
    )
    with contextlib.suppress(BundleError):
        read_signature(bundle)


def test_a_refusal_names_the_bundle_and_bad_destinations_are_refused(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    a, b = nodes
    maker, checker = codec(a, pki.trust()), codec(b, pki.trust())
    (bundle,) = maker.make(inbox("node-b"), b"x", 1_000, T0_MS)
    with pytest.raises(ExpiredMessage) as caught:
        checker.admit(bundle.encode(), T0_MS + 5_000)
    assert caught.value.bundle_id == str(bundle.bundle_id)  # type: ignore[attr-defined]
    for bad in ("NOT A NODE", "dtn://~other/inbox"):
        with pytest.raises(BundleRefused):
            maker.make(maker.destination(bad), b"x", 1_000, T0_MS)
    (ghost,) = maker.make(Eid.dtn("-ghost-", "inbox"), b"x", 60_000, T0_MS)
    with pytest.raises(BundleRefused, match="not a node_id"):
        checker.admit(ghost.encode(), T0_MS)


def test_a_fragment_of_an_oversized_bundle_is_refused_before_its_signature(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    a, b = nodes
    (bundle,) = codec(a, pki.trust()).make(inbox("node-b"), b"x" * 100, 60_000, T0_MS)
    primary = dataclasses.replace(
        bundle.primary, flags=1, fragment_offset=0, total_adu_length=1 << 40
    )
    with pytest.raises(BundleTooLargeError):
        codec(b, pki.trust()).admit(Bundle(primary, bundle.blocks).encode(), T0_MS)
