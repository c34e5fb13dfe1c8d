"""Properties of the BPv7 codec: every bundle round-trips byte for byte and agrees with
an independent CBOR library, and no input makes the decoder or a parser raise anything
but a BundleError."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.bundle.codec import (
    REPORT_FLAGS,
    BlockFlag,
    BlockType,
    Bundle,
    CanonicalBlock,
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
from trustmesh.bundle.eid import NULL_EID, Eid
from trustmesh.bundle.errors import (
    BadBundleIdError,
    BadEidError,
    BundleError,
    BundleTooLargeError,
    MalformedBundleError,
)
from trustmesh.bundle.ids import BundleId

FUZZ = settings(max_examples=200, deadline=None)
MAX = 1 << 20
UINT64 = st.one_of(st.integers(0, 30), st.integers(0, 70000), st.integers(0, (1 << 64) - 1))
NODE_NAMES = st.from_regex(r"~?[A-Za-z0-9._-]{1,30}", fullmatch=True)
DTN_EIDS = st.builds(Eid.dtn, NODE_NAMES, st.from_regex(r"[\x21-\x7e]{0,30}", fullmatch=True))
IPN_EIDS = st.builds(Eid.ipn, UINT64, UINT64)
EIDS = st.one_of(DTN_EIDS, IPN_EIDS, st.just(NULL_EID))
CRC_TYPES = st.sampled_from(CrcType)
UNKNOWN_TYPES = st.one_of(st.integers(13, 400), st.sampled_from([0, 2, 3, 4, 5, 8, 9]))


@st.composite
def bundles(draw: st.DrawFn, crc_types: st.SearchStrategy[CrcType] = CRC_TYPES) -> Bundle:
    source = draw(EIDS)
    flags = draw(UINT64) & ~1
    if flags & 0x02:  # an administrative record requests no report
        flags &= ~REPORT_FLAGS
    quiet = bool(flags & 0x02) or source.is_null  # then no block asks for a report
    if source.is_null:
        flags = (flags | 0x04) & ~REPORT_FLAGS
    payload = draw(st.binary(max_size=300))
    offset = total = None
    if payload and draw(st.booleans()):
        flags |= 1
        offset = draw(st.integers(0, 1 << 40))
        total = offset + len(payload) + draw(st.integers(0, 1 << 20))
    primary = PrimaryBlock(
        draw(EIDS),
        source,
        draw(EIDS),
        CreationTimestamp(draw(UINT64), draw(UINT64)),
        draw(UINT64),
        flags,
        draw(crc_types),
        offset,
        total,
    )
    kinds = draw(
        st.lists(
            st.sampled_from(["hop", "previous", "age", "bib", "bcb", "unknown"]),
            max_size=5,
        ).filter(lambda k: all(k.count(once) <= 1 for once in ("hop", "previous", "age")))
    )
    numbers = draw(st.lists(st.integers(2, (1 << 64) - 1), min_size=len(kinds), unique=True))
    blocks = []
    for kind, number in zip(kinds, numbers, strict=False):
        block_flags = draw(UINT64) & ~(0x02 if quiet else 0)
        crc_type = draw(crc_types)
        if kind == "hop":
            hop = HopCount(draw(st.integers(1, 255)), draw(UINT64))
            block = hop_count_block(hop, number=number, flags=block_flags, crc_type=crc_type)
        elif kind == "previous":
            eid = draw(EIDS)
            block = previous_node_block(eid, number=number, flags=block_flags, crc_type=crc_type)
        elif kind == "age":
            block = bundle_age_block(
                draw(UINT64), number=number, flags=block_flags, crc_type=crc_type
            )
        else:
            # Unknown blocks keep no "delete bundle" or "discard" flag, so they stay.
            block_type: int
            if kind == "unknown":
                block_type = draw(UNKNOWN_TYPES)
                block_flags &= ~(0x04 | 0x10)
            else:
                block_type = BlockType.BIB if kind == "bib" else BlockType.BCB
            data = draw(st.binary(max_size=40))
            block = CanonicalBlock(block_type, number, data, block_flags, crc_type)
        blocks.append(block)
    payload_flags = draw(UINT64) & ~(0x02 if quiet else 0)
    blocks.append(payload_block(payload, flags=payload_flags, crc_type=draw(crc_types)))
    return Bundle(primary, tuple(blocks))


@FUZZ
@given(bundles())
def test_every_bundle_round_trips_byte_for_byte(bundle: Bundle) -> None:
    raw = bundle.encode()
    assert len(raw) == bundle.encoded_size()
    decoded = decode_bundle(raw, max_size=MAX)
    assert decoded == bundle
    assert decoded.encode() == raw


@FUZZ
@given(bundles())
def test_the_encoding_agrees_with_cbor2(bundle: Bundle) -> None:
    raw = bundle.encode()
    items = cbor2.loads(raw)  # an indefinite array of the blocks
    assert len(items) == 1 + len(bundle.blocks)
    # cbor2's own deterministic encoding of each block gives back our bytes.
    assert b"".join(cbor2.dumps(item, canonical=True) for item in items) == raw[1:-1]
    primary = bundle.primary
    head = [7, primary.flags, primary.crc_type]
    eids = [cbor2.loads(e.to_cbor()) for e in (primary.destination, primary.source)]
    assert items[0][:5] == [*head, *eids]
    assert items[0][6] == [primary.creation.time, primary.creation.sequence]
    for item, block in zip(items[1:], bundle.blocks, strict=True):
        assert item[:5] == [block.block_type, block.number, block.flags, block.crc_type, block.data]


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_raise_only_bundle_errors(data: bytes) -> None:
    for candidate in (data, b"\x9f" + data, b"\x9f\x89\x07" + data):
        try:
            bundle = decode_bundle(candidate, max_size=MAX)
        except BundleError:
            continue
        assert bundle.encode() == candidate


@FUZZ
@given(bundles(), st.data())
def test_a_truncated_bundle_is_malformed(bundle: Bundle, data: st.DataObject) -> None:
    raw = bundle.encode()
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(MalformedBundleError):
        decode_bundle(raw[:cut], max_size=MAX)


@FUZZ
@given(bundles(crc_types=st.just(CrcType.CRC32C)), st.data())
def test_with_crc32c_on_every_block_any_bit_flip_is_caught(
    bundle: Bundle, data: st.DataObject
) -> None:
    raw = bytearray(bundle.encode())
    raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(BundleError):
        decode_bundle(bytes(raw), max_size=MAX)


@FUZZ
@given(bundles(), st.data())
def test_a_changed_byte_is_refused_or_decodes_to_exactly_those_bytes(
    bundle: Bundle, data: st.DataObject
) -> None:
    raw = bytearray(bundle.encode())
    raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        decoded = decode_bundle(bytes(raw), max_size=MAX)
    except BundleError:
        return
    if decoded.discarded:
        # The change made a block of a type we do not know, flagged "discard if
        # unprocessed" (RFC 9171 5.6 step 4): it is dropped, so the bytes differ by it.
        assert all(b.flags & BlockFlag.DISCARD_BLOCK_IF_UNPROCESSED for b in decoded.discarded)
        assert decode_bundle(decoded.encode(), max_size=MAX) == decoded  # what is kept is exact
        return
    assert decoded.encode() == raw  # without CRCs a change can make another bundle


@FUZZ
@given(st.binary(min_size=1, max_size=2000), st.integers(0, 1999))
def test_oversized_input_is_refused_before_parsing(data: bytes, limit: int) -> None:
    if len(data) > limit:
        with pytest.raises(BundleTooLargeError):
            decode_bundle(data, max_size=limit)


@FUZZ
@given(st.integers(1, 100_000), st.sampled_from([b"\x81", b"\x9f", b"\xc1", b"\x5f"]))
def test_deep_nesting_and_bombs_are_refused_fast(depth: int, item: bytes) -> None:
    with pytest.raises(MalformedBundleError):
        decode_bundle(b"\x9f" + item * depth, max_size=MAX)
    with pytest.raises(MalformedBundleError):  # a length of 2**64-1
        decode_bundle(b"\x9f" + item * depth + b"\x5b" + b"\xff" * 8, max_size=MAX)


@FUZZ
@given(EIDS)
def test_every_eid_round_trips(eid: Eid) -> None:
    assert Eid.parse(str(eid)) == eid
    assert Eid.from_cbor(eid.to_cbor()) == eid


@FUZZ
@given(st.one_of(st.text(max_size=60), st.text(max_size=40).map(lambda t: "dtn://" + t)))
def test_random_eid_text_is_refused_or_round_trips(text: str) -> None:
    try:
        eid = Eid.parse(text)
    except BadEidError:
        return
    assert str(eid) == text


@FUZZ
@given(st.binary(max_size=60))
def test_random_eid_cbor_is_refused_or_round_trips(data: bytes) -> None:
    for candidate in (data, b"\x82\x01" + data, b"\x82\x02\x82" + data):
        try:
            eid = Eid.from_cbor(candidate)
        except BadEidError:
            continue
        assert eid.to_cbor() == candidate


@FUZZ
@given(NODE_NAMES, UINT64, UINT64, st.one_of(st.none(), UINT64))
def test_every_bundle_id_round_trips(node: str, ms: int, seq: int, offset: int | None) -> None:
    bid = BundleId(node, ms, seq, offset)
    assert BundleId.parse(str(bid)) == bid


@FUZZ
@given(st.one_of(st.text(max_size=60), st.from_regex(r"[a-z:0-9]{0,30}", fullmatch=True)))
def test_random_bundle_id_text_is_refused_or_round_trips(text: str) -> None:
    try:
        bid = BundleId.parse(text)
    except BadBundleIdError:
        return
    assert str(bid) == text
