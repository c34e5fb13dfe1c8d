"""Our BPv7 bundles against pyd3tn's (the µD3TN project's Python BPv7 implementation,
written independently of ours): what we encode pyd3tn parses to the same fields and
re-serializes to the same bytes, and what pyd3tn builds (every CRC type, fragments,
hop count, previous node and bundle age blocks) we decode to the same fields and
re-encode to the same bytes."""

from __future__ import annotations

import itertools
from typing import Any

import pyd3tn.bundle7 as b7  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.bundle.codec import (
    BlockFlag,
    BlockType,
    Bundle,
    BundleFlag,
    CrcType,
    CreationTimestamp,
    HopCount,
    PrimaryBlock,
    bundle_age_block,
    decode_bundle,
    hop_count_block,
    payload_block,
    previous_node_block,
)
from trustmesh.bundle.eid import Eid, inbox, node_eid
from trustmesh.bundle.fragment import fragment, reassemble
from trustmesh.bundle.ids import unix_ms_to_dtn_ms

MAX = 1 << 24
UNIX_S = 1_700_000_000  # pyd3tn takes creation times in Unix seconds
DTN_MS = unix_ms_to_dtn_ms(UNIX_S * 1000)
CRCS = [CrcType.NONE, CrcType.CRC16, CrcType.CRC32C]  # pyd3tn's CRCType has the same codes


def crc_value(raw: bytes, block_end: int, crc_type: CrcType) -> int:
    """The CRC a block ending at ``block_end`` carries, as an integer."""
    size = {CrcType.CRC16: 2, CrcType.CRC32C: 4}[crc_type]
    return int.from_bytes(raw[block_end - size : block_end], "big")


def assert_same(ours: Bundle, theirs: Any) -> None:
    """Field by field: our Bundle and a pyd3tn Bundle."""
    primary, their_primary = ours.primary, theirs.primary_block
    assert int(their_primary.bundle_proc_flags) == primary.flags
    assert int(their_primary.crc_type) == primary.crc_type
    assert str(their_primary.destination) == str(primary.destination)
    assert str(their_primary.source) == str(primary.source)
    assert str(their_primary.report_to) == str(primary.report_to)
    assert list(their_primary.creation_time) == [primary.creation.time, primary.creation.sequence]
    assert their_primary.lifetime == primary.lifetime
    assert their_primary.fragment_offset == primary.fragment_offset
    assert their_primary.total_payload_length == primary.total_adu_length
    theirs_blocks = [*theirs.blocks, theirs.payload_block]
    assert len(theirs_blocks) == len(ours.blocks)
    by_number = {block.block_number: block for block in theirs_blocks}
    for block in ours.blocks:
        their = by_number[block.number]
        assert int(their.block_type) == block.block_type
        assert int(their.block_proc_flags) == block.flags
        assert int(their.crc_type) == block.crc_type
        assert their.data == block.data


# --- ours, read by pyd3tn -------------------------------------------------------------


def ours_with_everything(crc_type: CrcType, **changes: object) -> Bundle:
    fields: dict[str, object] = {
        "source": node_eid("node-a.example"),
        "destination": inbox("node-b.example"),
        "report_to": node_eid("node-a.example"),
        "payload": b"anomaly signature " * 20,
        "creation": CreationTimestamp(DTN_MS, 3),
        "lifetime_ms": 3_600_000,
        "crc_type": crc_type,
        # pyd3tn keeps a previous node block first, so ours is first too: then its
        # re-serialization can be compared byte for byte.
        "extensions": (
            previous_node_block(node_eid("relay-1"), number=4, crc_type=crc_type),
            hop_count_block(HopCount(32, 2), number=2, flags=BlockFlag.REPLICATE),
            bundle_age_block(1500, number=3, crc_type=crc_type),
        ),
    }
    fields.update(changes)
    return Bundle.build(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("crc_type", CRCS)
def test_pyd3tn_parses_what_we_encode(crc_type: CrcType) -> None:
    ours = ours_with_everything(crc_type)
    raw = ours.encode()
    theirs = b7.Bundle.parse(raw)
    assert_same(ours, theirs)
    assert bytes(theirs) == raw  # pyd3tn's own serialization of what it parsed
    if crc_type:
        primary_end = 1 + len(ours.primary.encode())
        assert theirs.primary_block.crc_provided == crc_value(raw, primary_end, crc_type)
        assert theirs.primary_block.calculate_crc() == theirs.primary_block.crc_provided


@pytest.mark.parametrize("crc_type", CRCS)
def test_pyd3tn_parses_our_fragments(crc_type: CrcType) -> None:
    ours = ours_with_everything(crc_type)
    parts = fragment(ours, 250)
    assert len(parts) > 2
    for part in parts:
        raw = part.encode()
        theirs = b7.Bundle.parse(raw)
        assert theirs.is_fragmented
        assert_same(part, theirs)
        assert bytes(theirs) == raw


def test_pyd3tn_parses_ipn_eids_and_unknown_flag_bits() -> None:
    primary = PrimaryBlock(
        Eid.ipn(977000, 1),
        Eid.ipn(2, 0),
        Eid.parse("dtn:none"),
        CreationTimestamp(DTN_MS, 0),
        60_000,
        flags=BundleFlag.ACK_REQUESTED | BundleFlag.REPORT_DELIVERY | 0x100000,
    )
    ours = Bundle(primary, (payload_block(b"x", flags=0x41),))
    theirs = b7.Bundle.parse(ours.encode())
    assert_same(ours, theirs)
    assert bytes(theirs) == ours.encode()


@settings(max_examples=100, deadline=None)
@given(
    st.binary(max_size=2000),
    st.from_regex(r"[a-z0-9][a-z0-9.-]{0,40}", fullmatch=True),
    st.from_regex(r"[\x21-\x7e]{0,30}", fullmatch=True),
    st.integers(1, 1 << 47),  # pyd3tn makes a datetime of it: up to the year 6460
    st.integers(0, (1 << 64) - 1),
    st.sampled_from(CRCS),
)
def test_pyd3tn_agrees_on_any_bundle_we_encode(
    payload: bytes, node: str, demux: str, created: int, sequence: int, crc_type: CrcType
) -> None:
    ours = Bundle.build(
        source=Eid.dtn(node),
        destination=Eid.dtn(node, demux),
        payload=payload,
        creation=CreationTimestamp(created, sequence),
        lifetime_ms=sequence,
        crc_type=crc_type,
    )
    raw = ours.encode()
    theirs = b7.Bundle.parse(raw)
    assert theirs.payload_block.data == payload
    assert str(theirs.primary_block.destination) == str(ours.primary.destination)
    assert theirs.primary_block.lifetime == sequence
    assert bytes(theirs) == raw


# --- pyd3tn's, read by us -------------------------------------------------------------


def pyd3tn_bundle(primary_crc: Any, canonical_crc: Any, **extra: Any) -> bytes:
    raw: bytes = b7.serialize_bundle7(
        "dtn://node-a.example/",
        "dtn://node-b.example/inbox",
        b"hello from pyd3tn " * 10,
        report_to_eid="dtn://node-a.example/",
        crc_type_primary=primary_crc,
        crc_type_canonical=canonical_crc,
        creation_timestamp=UNIX_S,
        sequence_number=42,
        lifetime=600,
        **extra,
    )
    return raw


@pytest.mark.parametrize("primary_crc", CRCS)
@pytest.mark.parametrize("canonical_crc", CRCS)
def test_we_decode_what_pyd3tn_builds(primary_crc: CrcType, canonical_crc: CrcType) -> None:
    raw = pyd3tn_bundle(
        b7.CRCType(int(primary_crc)),
        b7.CRCType(int(canonical_crc)),
        hop_limit=30,
        hop_count=4,
        bundle_age=12,
        previous_node_eid="dtn://relay-9/",
    )
    ours = decode_bundle(raw, max_size=MAX)
    assert ours.encode() == raw
    assert_same(ours, b7.Bundle.parse(raw))
    assert ours.primary.crc_type == primary_crc
    assert {block.crc_type for block in ours.blocks} == {canonical_crc}
    assert ours.primary.creation == CreationTimestamp(DTN_MS, 42)
    assert ours.primary.lifetime == 600_000
    assert ours.primary.source == node_eid("node-a.example")
    assert ours.primary.destination == inbox("node-b.example")
    assert ours.hop_count == HopCount(30, 4)
    assert ours.previous_node == node_eid("relay-9")
    assert ours.bundle_age == 12_000
    assert ours.payload == b"hello from pyd3tn " * 10
    assert str(ours.bundle_id) == f"node-a.example:{DTN_MS}:42"


def test_we_decode_and_reassemble_pyd3tn_fragments() -> None:
    adu = bytes(range(256)) * 4
    cuts = [0, 100, 350, 351, 700, len(adu)]
    raws = []
    for start, end in itertools.pairwise(cuts):
        raw: bytes = b7.serialize_bundle7(
            "dtn://node-a.example/",
            "dtn://node-b.example/inbox",
            adu[start:end],
            crc_type_primary=b7.CRCType.CRC32,
            crc_type_canonical=b7.CRCType.CRC16,
            creation_timestamp=UNIX_S,
            sequence_number=5,
            lifetime=600,
            flags=b7.BundleProcFlag.IS_FRAGMENT,
            fragment_offset=start,
            total_adu_length=len(adu),
        )
        raws.append(raw)
    parts = [decode_bundle(raw, max_size=MAX) for raw in raws]
    for raw, part in zip(raws, parts, strict=True):
        assert part.encode() == raw
        assert part.is_fragment and part.adu_length == len(adu)
    whole = reassemble(parts[::-1])
    assert whole is not None
    assert whole.payload == adu
    assert not whole.is_fragment
    assert whole.primary.crc_type == CrcType.CRC32C
    assert whole.payload_block.crc_type == CrcType.CRC16  # kept from the first fragment
    theirs = b7.Bundle.parse(whole.encode())  # and pyd3tn reads the reassembled bundle
    assert theirs.payload_block.data == adu
    assert not theirs.is_fragmented


def test_pyd3tns_deletion_report_bit_is_kept_as_an_unknown_flag() -> None:
    # pyd3tn's REPORT_DELETION is 0x400000; RFC 9171 §4.2.3 puts deletion reports at
    # 0x40000 and leaves 0x400000 unassigned: we keep the bit as it is.
    raw = pyd3tn_bundle(b7.CRCType.CRC32, b7.CRCType.CRC32, flags=b7.BundleProcFlag.REPORT_DELETION)
    ours = decode_bundle(raw, max_size=MAX)
    assert ours.primary.flags == 0x400000
    assert not ours.primary.flags & BundleFlag.REPORT_DELETION
    assert ours.encode() == raw


def test_pyd3tn_blocks_of_a_type_we_do_not_process_are_kept_or_dropped_as_flagged() -> None:
    raw = pyd3tn_bundle(b7.CRCType.CRC32, b7.CRCType.CRC32, hop_limit=9, hop_count=0)
    known = {BlockType.PAYLOAD, BlockType.PREVIOUS_NODE}
    ours = decode_bundle(raw, max_size=MAX, known_types=known)
    assert ours.find(BlockType.HOP_COUNT) is not None  # flags 0: kept as it is
    assert ours.encode() == raw
