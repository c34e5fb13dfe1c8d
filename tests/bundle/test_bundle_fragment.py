"""Fragmentation (RFC 9171 §5.8) and reassembly (§5.9): sizes, offsets, which blocks
go where, any arrival order, overlaps, gaps and fragments that disagree."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.bundle.codec import (
    BlockFlag,
    Bundle,
    BundleFlag,
    CanonicalBlock,
    CrcType,
    CreationTimestamp,
    HopCount,
    decode_bundle,
    hop_count_block,
    previous_node_block,
)
from trustmesh.bundle.eid import NULL_EID, inbox, node_eid
from trustmesh.bundle.errors import BundleTooLargeError, FragmentError
from trustmesh.bundle.fragment import Reassembly, adu_key, fragment, reassemble

PROPERTY = settings(max_examples=100, deadline=None)
ADU = bytes(range(256)) * 40  # 10,240 bytes


def original(payload: bytes = ADU, **changes: object) -> Bundle:
    fields: dict[str, object] = {
        "source": node_eid("node-a"),
        "destination": inbox("node-b"),
        "payload": payload,
        "creation": CreationTimestamp(753_315_200_000, 7),
        "lifetime_ms": 86_400_000,
        "extensions": (
            previous_node_block(node_eid("relay"), number=2),
            hop_count_block(HopCount(16, 3), number=3, flags=BlockFlag.REPLICATE),
        ),
    }
    fields.update(changes)
    return Bundle.build(**fields)  # type: ignore[arg-type]


def test_fragments_fit_and_carry_the_payload_in_order() -> None:
    bundle = original()
    parts = fragment(bundle, 1000)
    assert len(parts) > 10
    assert all(len(part.encode()) <= 1000 for part in parts)
    assert sum(len(part.encode()) == 1000 for part in parts) == len(parts) - 1  # all full
    assert b"".join(part.payload for part in parts) == ADU
    offset = 0
    for part in parts:
        primary = part.primary
        assert primary.flags & BundleFlag.IS_FRAGMENT
        assert (primary.fragment_offset, primary.total_adu_length) == (offset, len(ADU))
        assert replace(primary, flags=0, fragment_offset=None, total_adu_length=None) == replace(
            bundle.primary, flags=0
        )
        assert part.bundle_id.fragment_offset == offset
        assert decode_bundle(part.encode(), max_size=1000) == part
        offset += len(part.payload)


def test_extension_blocks_go_first_and_replicated_ones_everywhere() -> None:
    parts = fragment(original(), 800)
    assert [b.block_type for b in parts[0].blocks] == [6, 10, 1]
    for part in parts[1:]:
        assert [b.block_type for b in part.blocks] == [10, 1]
        assert part.hop_count == HopCount(16, 3)


def test_a_bundle_that_fits_is_left_whole() -> None:
    bundle = original(b"small")
    assert fragment(bundle, bundle.encoded_size()) == [bundle]


def test_must_not_fragment_is_obeyed() -> None:
    with pytest.raises(FragmentError):
        fragment(original(flags=BundleFlag.MUST_NOT_FRAGMENT), 500)
    anonymous = original(source=NULL_EID, flags=BundleFlag.MUST_NOT_FRAGMENT)
    with pytest.raises(FragmentError):
        fragment(anonymous, 500)


def test_a_limit_that_leaves_no_room_for_payload_is_refused() -> None:
    bundle = original()
    with pytest.raises(FragmentError):
        fragment(bundle, 60)


@PROPERTY
@given(st.integers(120, 3000), st.sampled_from(CrcType), st.binary(min_size=2, max_size=4000))
def test_any_limit_splits_any_payload(limit: int, crc_type: CrcType, payload: bytes) -> None:
    bundle = original(payload, crc_type=crc_type)
    parts = fragment(bundle, limit)
    assert all(len(part.encode()) <= limit for part in parts)
    assert all(part.payload for part in parts)
    assert b"".join(part.payload for part in parts) == payload
    if len(parts) == 1:  # it fitted
        assert parts == [bundle]
    else:
        assert reassemble(reversed(parts)) == bundle


def test_a_fragment_can_be_fragmented_again() -> None:
    parts = fragment(original(), 4000)
    middle = parts[1]
    smaller = fragment(middle, 1000)
    assert len(smaller) > 1
    assert smaller[0].primary.fragment_offset == middle.primary.fragment_offset
    assert all(p.primary.total_adu_length == len(ADU) for p in smaller)
    assert b"".join(p.payload for p in smaller) == middle.payload
    # The sub-fragments of a non-first fragment carry its (replicated) blocks only.
    assert all([b.block_type for b in p.blocks] == [10, 1] for p in smaller)
    assert reassemble([parts[0], *smaller, *parts[2:]]) == original()


@PROPERTY
@given(st.permutations(range(12)), st.integers(500, 3000), st.integers(500, 3000))
def test_reassembly_takes_any_order_and_consistent_overlaps(
    order: list[int], first_limit: int, second_limit: int
) -> None:
    bundle = original()
    # Two fragmentation episodes, at different nodes: their fragments overlap.
    pool = fragment(bundle, first_limit) + fragment(bundle, second_limit)
    picked = [pool[i % len(pool)] for i in order] + pool
    reassembly = Reassembly(max_bytes=len(ADU))
    result = None
    for part in picked:
        result = reassembly.add(part)
        if result is not None:
            break
    assert result == bundle
    assert result.encode() == bundle.encode()  # CRCs recomputed for the whole bundle
    assert reassembly.done


def test_gaps_mean_not_yet_complete() -> None:
    parts = fragment(original(), 1000)
    assert reassemble(parts[:-1]) is None
    assert reassemble(parts[1:]) is None
    reassembly = Reassembly(max_bytes=1 << 20)
    for part in parts[:-1]:
        assert reassembly.add(part) is None
    assert not reassembly.complete
    assert reassembly.held_bytes == len(ADU) - len(parts[-1].payload)
    assert reassembly.total_adu_length == len(ADU)
    assert reassembly.add(parts[-1]) == original()
    with pytest.raises(FragmentError):
        reassembly.add(parts[0])  # done


def test_overlaps_hold_each_byte_once() -> None:
    parts = fragment(original(), 1000)
    reassembly = Reassembly(max_bytes=1 << 20)
    for part in (parts[2], parts[2], parts[3]):
        reassembly.add(part)
    assert reassembly.held_bytes == len(parts[2].payload) + len(parts[3].payload)


def test_fragments_that_disagree_are_refused() -> None:
    parts = fragment(original(), 1000)
    other_length = fragment(original(ADU + b"!"), 1000)
    other_life = fragment(original(lifetime_ms=1), 1000)
    changed = replace(
        parts[1],
        blocks=(
            *parts[1].extensions,
            replace(parts[1].payload_block, data=b"\xff" * len(parts[1].payload)),
        ),
    )
    for stranger in (other_length[1], other_life[1], changed):
        with pytest.raises(FragmentError):
            reassemble([parts[0], parts[1], stranger])
    with pytest.raises(FragmentError):
        reassemble([original()])  # not a fragment


def test_the_bound_on_bytes_held() -> None:
    parts = fragment(original(), 1000)
    with pytest.raises(BundleTooLargeError):
        Reassembly(max_bytes=len(ADU) - 1).add(parts[0])
    with pytest.raises(BundleTooLargeError):
        reassemble(parts, max_bytes=100)
    assert reassemble(parts, max_bytes=len(ADU)) == original()


def test_the_key_of_an_adu() -> None:
    parts = fragment(original(), 1000)
    assert {adu_key(part) for part in parts} == {(node_eid("node-a"), 753_315_200_000, 7)}
    assert parts[3].bundle_id.whole == original().bundle_id


def test_unknown_blocks_and_flags_survive_the_round_trip() -> None:
    bundle = original(
        extensions=(CanonicalBlock(200, 9, b"opaque", BlockFlag.REPLICATE | 0x100),),
        flags=BundleFlag.ACK_REQUESTED | 0x1000000,
    )
    parts = fragment(bundle, 700)
    assert all(part.blocks[0].data == b"opaque" for part in parts)
    assert all(part.primary.flags == 0x1000021 for part in parts)
    assert reassemble(parts[::-1]) == bundle
