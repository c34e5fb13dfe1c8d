"""Unsigned varints: known answers, round trips, and every way a decoder must say no."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.errors import (
    DecodeError,
    NonCanonicalError,
    OversizeError,
    TrailingDataError,
    TruncatedError,
)
from trustmesh.wire.varint import (
    MAX_VARINT_BYTES,
    MAX_VARINT_VALUE,
    decode_uvarint,
    decode_uvarint_exact,
    encode_uvarint,
)

# Modest budgets keep the whole wire suite fast; the fuzzers get the most examples.
PROPERTY = settings(max_examples=100, deadline=None)
FUZZ = settings(max_examples=300, deadline=None)

values = st.integers(min_value=0, max_value=MAX_VARINT_VALUE)
# Bias towards the byte-length boundaries (2**7k - 1, 2**7k) where off-by-ones live.
boundary_values = st.integers(min_value=1, max_value=9).flatmap(
    lambda k: st.sampled_from([(1 << (7 * k)) - 1, min(1 << (7 * k), MAX_VARINT_VALUE)])
)
any_value = st.one_of(values, boundary_values)

# From the multiformats unsigned-varint spec ("Examples"), plus the two extremes.
KNOWN_ANSWERS = [
    (1, "01"),
    (127, "7f"),
    (128, "8001"),
    (255, "ff01"),
    (300, "ac02"),
    (16384, "808001"),
    (0, "00"),
    (MAX_VARINT_VALUE, "ffffffffffffffff7f"),
]


@pytest.mark.parametrize(("value", "encoded_hex"), KNOWN_ANSWERS)
def test_known_answers_encode(value: int, encoded_hex: str) -> None:
    assert encode_uvarint(value).hex() == encoded_hex


@pytest.mark.parametrize(("value", "encoded_hex"), KNOWN_ANSWERS)
def test_known_answers_decode(value: int, encoded_hex: str) -> None:
    encoded = bytes.fromhex(encoded_hex)
    assert decode_uvarint(encoded) == (value, len(encoded))
    assert decode_uvarint_exact(encoded) == value


@PROPERTY
@given(any_value)
def test_round_trip(value: int) -> None:
    encoded = encode_uvarint(value)
    assert decode_uvarint(encoded) == (value, len(encoded))
    assert decode_uvarint_exact(encoded) == value
    assert decode_uvarint_exact(bytearray(encoded)) == value
    assert decode_uvarint_exact(memoryview(encoded)) == value


@PROPERTY
@given(any_value)
def test_encoding_is_minimal_leb128(value: int) -> None:
    encoded = encode_uvarint(value)
    assert len(encoded) == max(1, -(-value.bit_length() // 7))
    assert len(encoded) <= MAX_VARINT_BYTES
    assert all(b & 0x80 for b in encoded[:-1])
    assert not encoded[-1] & 0x80
    assert encoded[-1] != 0 or value == 0
    assert sum((b & 0x7F) << (7 * i) for i, b in enumerate(encoded)) == value


@PROPERTY
@given(any_value, st.binary(max_size=16), st.binary(max_size=16))
def test_decode_at_offset_stops_after_the_varint(value: int, before: bytes, after: bytes) -> None:
    encoded = encode_uvarint(value)
    data = before + encoded + after
    assert decode_uvarint(data, len(before)) == (value, len(before) + len(encoded))


@PROPERTY
@given(any_value)
def test_every_proper_prefix_is_truncated(value: int) -> None:
    encoded = encode_uvarint(value)
    for cut in range(len(encoded)):
        with pytest.raises(TruncatedError) as info:
            decode_uvarint(encoded[:cut])
        assert info.value.offset == cut
        with pytest.raises(TruncatedError):
            decode_uvarint_exact(encoded[:cut])


@pytest.mark.parametrize(
    "encoded_hex",
    ["8000", "8100", "ff00", "808000", "ff8000", "ffffffffffffff8000", "8080808080808000"],
)
def test_padded_encodings_are_non_canonical(encoded_hex: str) -> None:
    encoded = bytes.fromhex(encoded_hex)
    with pytest.raises(NonCanonicalError):
        decode_uvarint(encoded)
    with pytest.raises(NonCanonicalError):
        decode_uvarint_exact(encoded)


@PROPERTY
@given(any_value)
def test_padding_any_value_is_non_canonical(value: int) -> None:
    encoded = encode_uvarint(value)
    padded = encoded[:-1] + bytes((encoded[-1] | 0x80, 0x00))
    if len(padded) <= MAX_VARINT_BYTES:
        with pytest.raises(NonCanonicalError):
            decode_uvarint(padded)
    else:
        with pytest.raises(OversizeError):
            decode_uvarint(padded)


@pytest.mark.parametrize(
    "encoded_hex",
    [
        "80808080808080808001",  # 2**63: ten bytes
        "ffffffffffffffffff01",  # 2**64 - 1: ten bytes
        "ffffffffffffffffff",  # nine bytes, all with the continuation bit
        "808080808080808080",
    ],
)
def test_longer_than_nine_bytes_is_oversize(encoded_hex: str) -> None:
    with pytest.raises(OversizeError) as info:
        decode_uvarint(bytes.fromhex(encoded_hex))
    assert info.value.offset == 0


@PROPERTY
@given(
    st.lists(st.integers(0x80, 0xFF), min_size=MAX_VARINT_BYTES, max_size=MAX_VARINT_BYTES),
    st.binary(max_size=8),
)
def test_nine_continuation_bytes_are_oversize(head: list[int], tail: bytes) -> None:
    with pytest.raises(OversizeError):
        decode_uvarint(bytes(head) + tail)


def test_encode_refuses_two_to_the_63() -> None:
    with pytest.raises(OversizeError):
        encode_uvarint(MAX_VARINT_VALUE + 1)
    with pytest.raises(OversizeError):
        encode_uvarint(1 << 64)


def test_encode_refuses_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        encode_uvarint(-1)


@PROPERTY
@given(any_value, st.binary(min_size=1, max_size=16))
def test_exact_refuses_trailing_bytes(value: int, extra: bytes) -> None:
    encoded = encode_uvarint(value)
    with pytest.raises(TrailingDataError) as info:
        decode_uvarint_exact(encoded + extra)
    assert info.value.offset == len(encoded)


@FUZZ
@given(st.binary(max_size=12))
def test_fuzz_decode_only_raises_decode_errors(data: bytes) -> None:
    # A clean refusal is a DecodeError; IndexError, ValueError and the like fail the test.
    with contextlib.suppress(DecodeError):
        value, end = decode_uvarint(data)
        # Accepting input means it was the one canonical encoding of the value.
        assert 0 <= value <= MAX_VARINT_VALUE
        assert data[:end] == encode_uvarint(value)
    with contextlib.suppress(DecodeError):
        assert encode_uvarint(decode_uvarint_exact(data)) == data
