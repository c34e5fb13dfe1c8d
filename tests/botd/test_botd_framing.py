"""BOTD's hot-path framing (trustmesh.botd.framing) agrees with the generic frame decoder
and with protobuf, for any input and any split of it."""

from __future__ import annotations

import itertools
import tracemalloc

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from trustmesh.botd.framing import (
    MAX_READ,
    MIN_READ,
    FrameReader,
    data_frame_body,
    data_frame_header,
    uvarint,
)
from trustmesh.botd.messages import Frame, Ping
from trustmesh.errors import DecodeError, OversizeError
from trustmesh.wire.frames import FrameDecoder, encode_frame
from trustmesh.wire.varint import encode_uvarint

FUZZ = settings(max_examples=300, deadline=None)
PROPERTY = settings(max_examples=150, deadline=None)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def run(reader: FrameDecoder | FrameReader, chunks: list[bytes]) -> tuple[list[bytes], object]:
    """Every frame out (as bytes, taken at once: views die with their chunk) and the
    error, if any, as (type, frames carried)."""
    out: list[bytes] = []
    for chunk in chunks:
        try:
            out += [bytes(frame) for frame in reader.feed(chunk)]
        except DecodeError as exc:
            out += [bytes(frame) for frame in exc.frames]
            return out, (type(exc), len(exc.frames))
    return out, None


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[int], int]:
    """Well-formed frames (some larger than one chunk), garbage sometimes, cut anywhere."""
    frames = draw(st.lists(st.binary(max_size=300), max_size=6))
    big = draw(st.lists(st.integers(0x4000, 0x5000), max_size=2))
    frames += [bytes([n & 0xFF]) * n for n in big]
    data = b"".join(encode_frame(f) for f in frames) + draw(st.binary(max_size=12))
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=10))
    return data, cuts, draw(st.integers(0, 0x6000))


@FUZZ
@given(streams())
def test_reader_agrees_with_the_generic_decoder(case: tuple[bytes, list[int], int]) -> None:
    data, cuts, max_size = case
    chunks = split(data, cuts)
    ours, ours_error = run(FrameReader(max_size), chunks)
    theirs, their_error = run(FrameDecoder(max_size), chunks)
    assert ours == theirs
    assert ours_error == their_error


def run_buffered(reader: FrameReader, chunks: list[bytes]) -> tuple[list[bytes], object]:
    """:func:`run` through the kept buffer (get_buffer / buffer_updated), as a
    BufferedProtocol transport drives it: each read fills at most the room offered, so a
    chunk may take several reads. The error is given by type only: the frames it
    carries are those of its own read, which need not be the chunk's."""
    out: list[bytes] = []
    for chunk in chunks:
        while chunk:
            room = reader.get_buffer()
            assert len(room) > 0
            take = min(len(room), len(chunk))
            room[:take] = chunk[:take]
            chunk = chunk[take:]
            try:
                out += [bytes(frame) for frame in reader.buffer_updated(take)]
            except DecodeError as exc:
                out += [bytes(frame) for frame in exc.frames]
                return out, type(exc)
    return out, None


def run_generic(max_size: int, chunks: list[bytes]) -> tuple[list[bytes], object]:
    """:func:`run` with FrameDecoder, its error given by type only."""
    out, error = run(FrameDecoder(max_size), chunks)
    return out, error[0] if isinstance(error, tuple) else None


@FUZZ
@given(streams())
def test_buffered_reading_agrees_with_the_generic_decoder(
    case: tuple[bytes, list[int], int],
) -> None:
    data, cuts, max_size = case
    chunks = split(data, cuts)
    assert run_buffered(FrameReader(max_size), chunks) == run_generic(max_size, chunks)


@FUZZ
@given(st.binary(max_size=80), st.lists(st.integers(0, 80), max_size=8), st.integers(0, 80))
def test_buffered_reading_on_garbage_agrees_too(
    data: bytes, cuts: list[int], max_size: int
) -> None:
    chunks = split(data, cuts)
    assert run_buffered(FrameReader(max_size), chunks) == run_generic(max_size, chunks)


def test_a_trickled_large_frame_grows_the_buffer_only_with_its_bytes() -> None:
    """A peer that announces a frame at the cap and trickles it: the buffer grows about
    as fast as bytes arrive (at most twice what is held, past one read's room), never
    past the frame itself."""
    cap = 4 << 20
    reader = FrameReader(cap)
    stream = encode_uvarint(cap) + bytes(cap)
    held = 0
    while held < len(stream):
        room = reader.get_buffer()
        assert reader.capacity <= max(MAX_READ + held, 2 * held, MIN_READ)
        assert reader.capacity <= len(stream) + MAX_READ
        take = min(len(room), 4096 if held < 1 << 20 else len(room), len(stream) - held)
        room[:take] = stream[held : held + take]
        held += take
        frames = reader.buffer_updated(take)
    assert [len(f) for f in frames] == [cap]
    assert reader.capacity <= len(stream)


def test_a_quiet_reader_keeps_no_large_buffer() -> None:
    reader = FrameReader(1 << 20)
    frame = encode_frame(bytes(200_000))
    for _ in range(3):  # bulk: reads that fill the room make it grow, and it is kept
        pos = 0
        while pos < len(frame):
            room = reader.get_buffer()
            take = min(len(room), len(frame) - pos)
            room[:take] = frame[pos : pos + take]
            pos += take
            reader.buffer_updated(take)
    assert reader.capacity > MIN_READ
    room = reader.get_buffer()  # then a small read (a ping): back to a small buffer
    room[:3] = encode_frame(b"hi")
    assert [bytes(f) for f in reader.buffer_updated(3)] == [b"hi"]
    assert reader.capacity <= MIN_READ
    reader.get_buffer()[:2] = encode_frame(b"abc")[:2]  # trim keeps only a partial frame
    reader.buffer_updated(2)
    reader.trim()
    assert reader.capacity == 2
    reader.get_buffer()[:2] = encode_frame(b"abc")[2:]
    assert [bytes(f) for f in reader.buffer_updated(2)] == [b"abc"]
    reader.trim()
    assert reader.capacity == 0
    reader.get_buffer()[:1] = b"\x05"
    reader.buffer_updated(1)
    with pytest.raises(RuntimeError):  # one reader is fed one way
        reader.feed(b"x")


@FUZZ
@given(st.binary(max_size=80), st.lists(st.integers(0, 80), max_size=8), st.integers(0, 80))
def test_reader_on_garbage_agrees_too(data: bytes, cuts: list[int], max_size: int) -> None:
    chunks = split(data, cuts)
    assert run(FrameReader(max_size), chunks) == run(FrameDecoder(max_size), chunks)


@PROPERTY
@given(st.lists(st.binary(max_size=200), max_size=5))
def test_reader_byte_at_a_time_counts_as_the_generic_decoder(frames: list[bytes]) -> None:
    data = b"".join(encode_frame(f) for f in frames)
    reader, generic = FrameReader(1000), FrameDecoder(1000)
    out: list[bytes] = []
    for i in range(len(data)):
        out += [bytes(f) for f in reader.feed(data[i : i + 1])]
        generic.feed(data[i : i + 1])
        assert reader.buffered == generic.buffered
        assert reader.idle == generic.idle
    assert out == frames
    assert reader.idle


def test_reader_refuses_an_oversize_prefix_before_its_body() -> None:
    reader = FrameReader(100)
    with pytest.raises(OversizeError) as info:
        reader.feed(encode_frame(b"ok") + encode_uvarint(101))
    assert info.value.frames == (b"ok",)
    reader = FrameReader(100)
    assert reader.feed(encode_uvarint(200)[:1]) == []  # a prefix split across chunks too
    with pytest.raises(OversizeError):
        reader.feed(encode_uvarint(200)[1:])


def test_reader_limit_can_change_between_frames() -> None:
    reader = FrameReader(4)
    assert [bytes(f) for f in reader.feed(encode_frame(b"abcd"))] == [b"abcd"]
    reader.max_size = 10
    assert [bytes(f) for f in reader.feed(encode_frame(b"0123456789"))] == [b"0123456789"]
    with pytest.raises(ValueError, match="max_size"):
        FrameReader(-1)


@PROPERTY
@given(st.integers(0, (1 << 63) - 1))
def test_uvarint_is_the_minimal_varint(value: int) -> None:
    assert uvarint(value) == encode_uvarint(value)


@PROPERTY
@given(st.one_of(st.binary(max_size=300), st.integers(0, 3 << 20).map(bytes)))
def test_data_frames_are_protobuf_byte_for_byte(data: bytes) -> None:
    encoded = Frame(data=data).SerializeToString()
    assert data_frame_header(len(data)) + data == encoded
    start = data_frame_body(encoded)
    assert start == len(encoded) - len(data)
    assert encoded[start:] == data


@FUZZ
@given(st.binary(max_size=40))
def test_data_frame_body_never_disagrees_with_protobuf(plaintext: bytes) -> None:
    start = data_frame_body(plaintext)
    if start < 0:
        return  # the caller hands it to protobuf
    frame = Frame.FromString(plaintext)
    assert frame.WhichOneof("body") == "data"
    assert frame.data == plaintext[start:]


def test_other_frames_and_padded_lengths_take_the_protobuf_road() -> None:
    assert data_frame_body(Frame(ping=Ping(id="x")).SerializeToString()) == -1
    assert data_frame_body(b"\x32\x81\x00" + b"a") == -1  # non-minimal length: protobuf's
    assert Frame.FromString(b"\x32\x81\x00" + b"a").data == b"a"
    assert data_frame_body(b"\x32\x02a") == -1  # truncated
    assert data_frame_body(b"\x32\x01ab") == -1  # more fields after it
    assert data_frame_body(b"\x32") == -1


def test_fed_chunks_hold_only_what_arrived_of_an_announced_frame() -> None:
    # feed() allocated the whole announced frame at its prefix: a peer announcing 1 MiB
    # and sending one byte cost 1 MiB here (the kept-buffer path is checked above).
    reader = FrameReader(1 << 20)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert reader.feed(encode_uvarint(1 << 20) + b"x") == []
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 64 * 1024
    assert reader.buffered == 1


@given(st.binary(min_size=64, max_size=64))
def test_the_finished_prefix_is_what_protobuf_writes_and_reads(signature: bytes) -> None:
    """A Finished is written as FINISHED_PREFIX + signature and recognised by it (the
    core skips protobuf for it): both must be protobuf's own encoding and reading."""
    from trustmesh.botd.messages import FINISHED_PREFIX, FINISHED_SIZE, Finished, parse_frame

    encoded = FINISHED_PREFIX + signature
    assert encoded == Frame(finished=Finished(signature=signature)).SerializeToString()
    assert len(encoded) == FINISHED_SIZE
    body, frame = parse_frame(encoded)
    assert (body, frame.finished.signature) == ("finished", signature)


@PROPERTY
@given(st.integers(0, (1 << 22)), st.integers(0, 3), st.integers(-2, 2))
def test_data_frame_body_reads_every_length_form_as_protobuf_does(
    size: int, padding: int, error: int
) -> None:
    """A data header with its varint padded (``padding`` extra bytes) or a body
    ``error`` bytes off its length: ``data_frame_body`` gives the start only for the
    minimal form that protobuf reads to the end, and -1 (protobuf's road) otherwise."""
    varint = bytearray(encode_uvarint(size))
    if padding:
        varint[-1] |= 0x80
        varint += b"\x80" * (padding - 1) + b"\x00"
    assume(size + error >= 0)
    body = bytes(size + error)
    plaintext = bytes((0x32,)) + bytes(varint) + body
    start = data_frame_body(plaintext)
    if padding or error:
        assert start == -1
        return
    assert start == 1 + len(varint)
    assert Frame.FromString(plaintext).data == plaintext[start:]
