"""Length-prefixed frames: one-shot and incremental decoding, size limits, bad input."""

from __future__ import annotations

import itertools

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
from trustmesh.wire.frames import DEFAULT_MAX_FRAME, FrameDecoder, decode_frame, encode_frame
from trustmesh.wire.varint import MAX_VARINT_VALUE, encode_uvarint

# Modest budgets keep the whole wire suite fast; the fuzzers get the most examples.
PROPERTY = settings(max_examples=100, deadline=None)
FUZZ = settings(max_examples=300, deadline=None)

payloads = st.binary(max_size=600)


@st.composite
def payload_and_limit(draw: st.DrawFn) -> tuple[bytes, int]:
    payload = draw(payloads)
    return payload, len(payload) + draw(st.integers(0, 1 << 20))


@st.composite
def stream_and_cuts(draw: st.DrawFn) -> tuple[list[bytes], bytes, list[int]]:
    """Frames, their concatenated encoding, and sorted cut points splitting it."""
    frames = draw(st.lists(st.binary(max_size=300), max_size=8))
    stream = b"".join(encode_frame(f) for f in frames)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    return frames, stream, cuts


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def frame_ends(frames: list[bytes]) -> list[int]:
    ends, pos = [], 0
    for f in frames:
        pos += len(encode_frame(f))
        ends.append(pos)
    return ends


# --- encode / decode_frame -------------------------------------------------------------


@PROPERTY
@given(payload_and_limit())
def test_round_trip(case: tuple[bytes, int]) -> None:
    payload, max_size = case
    frame = encode_frame(payload, max_size)
    assert frame == encode_uvarint(len(payload)) + payload
    assert decode_frame(frame, max_size) == payload
    assert decode_frame(bytearray(frame), max_size) == payload
    assert decode_frame(memoryview(frame), max_size) == payload
    assert encode_frame(memoryview(payload), max_size) == frame


def test_empty_frame() -> None:
    assert encode_frame(b"") == b"\x00"
    assert decode_frame(b"\x00") == b""
    assert decode_frame(b"\x00", max_size=0) == b""


def test_default_limit_is_one_mebibyte() -> None:
    payload = bytes(DEFAULT_MAX_FRAME)
    assert decode_frame(encode_frame(payload)) == payload
    with pytest.raises(OversizeError):
        encode_frame(payload + b"x")


@PROPERTY
@given(st.binary(min_size=1, max_size=600), st.data())
def test_encode_refuses_payload_over_limit(payload: bytes, data: st.DataObject) -> None:
    max_size = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(OversizeError):
        encode_frame(payload, max_size)
    assert encode_frame(payload, len(payload))  # exactly at the limit is fine


@PROPERTY
@given(st.binary(min_size=1, max_size=600), st.data())
def test_decode_refuses_frame_over_limit(payload: bytes, data: st.DataObject) -> None:
    max_size = data.draw(st.integers(0, len(payload) - 1))
    frame = encode_frame(payload, len(payload))
    with pytest.raises(OversizeError):
        decode_frame(frame, max_size)


@pytest.mark.parametrize("size", [1 << 21, 1 << 40, MAX_VARINT_VALUE])
def test_decode_frame_checks_the_limit_before_the_body(size: int) -> None:
    # Only the prefix is present: a huge declared size must be OversizeError, not Truncated.
    with pytest.raises(OversizeError):
        decode_frame(encode_uvarint(size))


@PROPERTY
@given(payloads)
def test_every_proper_prefix_is_truncated(payload: bytes) -> None:
    frame = encode_frame(payload)
    for cut in range(len(frame)):
        with pytest.raises(TruncatedError):
            decode_frame(frame[:cut])


@PROPERTY
@given(payloads, st.binary(min_size=1, max_size=32))
def test_trailing_bytes_are_refused(payload: bytes, extra: bytes) -> None:
    frame = encode_frame(payload)
    with pytest.raises(TrailingDataError) as info:
        decode_frame(frame + extra)
    assert info.value.offset == len(frame)


@pytest.mark.parametrize("prefix_hex", ["8000", "8100", "808000"])
def test_non_canonical_length_prefix(prefix_hex: str) -> None:
    with pytest.raises(NonCanonicalError):
        decode_frame(bytes.fromhex(prefix_hex) + b"\x00" * 8)
    with pytest.raises(NonCanonicalError):
        FrameDecoder().feed(bytes.fromhex(prefix_hex))


# --- FrameDecoder ----------------------------------------------------------------------


@PROPERTY
@given(stream_and_cuts())
def test_decoder_reassembles_any_split(case: tuple[list[bytes], bytes, list[int]]) -> None:
    frames, stream, cuts = case
    decoder = FrameDecoder()
    out: list[bytes] = []
    fed = 0
    ends = frame_ends(frames)
    for chunk in split(stream, cuts):
        out += decoder.feed(chunk)
        fed += len(chunk)
        # A frame comes out as soon as its last byte arrives, never later.
        complete = sum(1 for e in ends if e <= fed)
        assert out == frames[:complete]
        # Only the unfinished frame is held back.
        last_end = ends[complete - 1] if complete else 0
        assert decoder.buffered <= fed - last_end
    assert out == frames
    assert decoder.buffered == 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=5))
def test_decoder_byte_at_a_time(frames: list[bytes]) -> None:
    stream = b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder()
    out: list[bytes] = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
    assert out == frames
    assert decoder.buffered == 0


@PROPERTY
@given(payloads, st.sampled_from([bytes, bytearray, memoryview]))
def test_decoder_accepts_buffer_types(payload: bytes, kind: type) -> None:
    decoder = FrameDecoder()
    assert decoder.feed(kind(encode_frame(payload))) == [payload]


def test_decoder_empty_feed() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.buffered == 0


@PROPERTY
@given(st.binary(min_size=1, max_size=600))
def test_decoder_never_yields_a_partial_frame(payload: bytes) -> None:
    frame = encode_frame(payload)
    decoder = FrameDecoder()
    assert decoder.feed(frame[:-1]) == []
    assert decoder.feed(frame[-1:]) == [payload]


@PROPERTY
@given(st.integers(0, 4096), st.integers(1, MAX_VARINT_VALUE), st.data())
def test_decoder_refuses_oversize_as_soon_as_the_prefix_is_read(
    max_size: int, excess: int, data: st.DataObject
) -> None:
    size = min(max_size + excess, MAX_VARINT_VALUE)
    prefix = encode_uvarint(size)
    good = data.draw(st.lists(st.binary(max_size=min(max_size, 64)), max_size=3))
    decoder = FrameDecoder(max_size=max_size)
    head = b"".join(encode_frame(f) for f in good)
    # Every byte of the prefix but the last: no error yet, nothing but the prefix held.
    assert decoder.feed(head + prefix[:-1]) == good
    assert decoder.buffered == len(prefix) - 1
    # The prefix's last byte alone triggers the refusal; no body byte was needed.
    with pytest.raises(OversizeError):
        decoder.feed(prefix[-1:])


def test_decoder_refuses_huge_declared_size_without_body() -> None:
    decoder = FrameDecoder(max_size=1024)
    with pytest.raises(OversizeError):
        decoder.feed(encode_uvarint(MAX_VARINT_VALUE))


def test_decoder_accepts_exactly_max_size() -> None:
    decoder = FrameDecoder(max_size=10)
    assert decoder.feed(encode_frame(b"0123456789")) == [b"0123456789"]
    with pytest.raises(OversizeError):
        decoder.feed(encode_uvarint(11))


def test_decoder_max_size_zero_allows_only_empty_frames() -> None:
    decoder = FrameDecoder(max_size=0)
    assert decoder.feed(b"\x00\x00\x00") == [b"", b"", b""]
    with pytest.raises(OversizeError):
        decoder.feed(b"\x01")


def test_decoder_refuses_overlong_prefix_at_the_ninth_byte() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x80" * 8) == []
    with pytest.raises(OversizeError):
        decoder.feed(b"\x80")


def test_decoder_negative_limit_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="max_size"):
        FrameDecoder(max_size=-1)


# --- fuzz ------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=64), st.integers(0, 64))
def test_fuzz_decode_frame(data: bytes, max_size: int) -> None:
    try:
        payload = decode_frame(data, max_size)
    except DecodeError:
        return  # a clean refusal; IndexError, ValueError and the like fail the test
    assert len(payload) <= max_size
    assert encode_frame(payload, max_size) == data


@FUZZ
@given(st.binary(max_size=64), st.lists(st.integers(0, 64), max_size=6), st.integers(0, 64))
def test_fuzz_frame_decoder(data: bytes, cuts: list[int], max_size: int) -> None:
    decoder = FrameDecoder(max_size)
    out: list[bytes] = []
    try:
        for chunk in split(data, sorted(min(c, len(data)) for c in cuts)):
            out += decoder.feed(chunk)
    except DecodeError:
        return  # a clean refusal; IndexError, ValueError and the like fail the test
    # What came out re-encodes to a prefix of the input; the rest is buffered or prefix.
    consumed = b"".join(encode_frame(f, max_size) for f in out)
    assert data.startswith(consumed)
    assert decoder.buffered <= len(data) - len(consumed)


@FUZZ
@given(st.binary(max_size=64), st.integers(0, 64))
def test_fuzz_decoder_agrees_with_decode_frame(data: bytes, max_size: int) -> None:
    try:
        payload = decode_frame(data, max_size)
    except DecodeError:
        return
    decoder = FrameDecoder(max_size)
    assert decoder.feed(data) == [payload]
    assert decoder.buffered == 0


def test_error_carries_the_frames_completed_before_it() -> None:
    decoder = FrameDecoder(max_size=100)
    stream = encode_frame(b"one") + encode_frame(b"two") + encode_frame(b"x" * 200, 1000)
    with pytest.raises(OversizeError) as info:
        decoder.feed(stream)
    assert info.value.frames == (b"one", b"two")


def test_error_without_earlier_frames_carries_none() -> None:
    with pytest.raises(NonCanonicalError) as info:
        FrameDecoder().feed(b"\x80\x00")
    assert info.value.frames == ()


def test_decoder_idle_counts_a_length_prefix_without_its_body() -> None:
    decoder = FrameDecoder(16)
    assert decoder.idle
    assert decoder.feed(b"\x05") == []
    assert decoder.buffered == 0  # the prefix is consumed...
    assert not decoder.idle  # ...but a frame is still pending
    assert decoder.feed(b"abcde") == [b"abcde"]
    assert decoder.idle


def test_decoder_limit_can_grow_without_losing_a_pending_frame() -> None:
    decoder = FrameDecoder(4)
    assert decoder.feed(encode_frame(b"ab") + b"\x03x") == [b"ab"]
    decoder.max_size = 100
    assert decoder.max_size == 100
    assert decoder.feed(b"yz" + encode_frame(bytes(50))) == [b"xyz", bytes(50)]
    with pytest.raises(ValueError):
        decoder.max_size = -1
