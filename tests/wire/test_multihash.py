"""Multihash (identity and sha2-256), cross-checked against py-multihash."""

from __future__ import annotations

import hashlib

import multihash as pymh
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.errors import (
    DecodeError,
    NonCanonicalError,
    TrailingDataError,
    TruncatedError,
    UnsupportedError,
)
from trustmesh.wire.multihash import MAX_IDENTITY_DIGEST, Multihash, MultihashCode
from trustmesh.wire.varint import encode_uvarint

# Modest budgets keep the whole wire suite fast; the fuzzers get the most examples.
PROPERTY = settings(max_examples=100, deadline=None)
FUZZ = settings(max_examples=300, deadline=None)

data_bytes = st.binary(max_size=300)
multihashes = st.one_of(
    data_bytes.map(Multihash.identity),
    data_bytes.map(Multihash.sha2_256),
    st.binary(min_size=32, max_size=32).map(lambda d: Multihash(MultihashCode.SHA2_256, d)),
)


def test_codes_are_the_multicodec_table_values() -> None:
    assert int(MultihashCode.IDENTITY) == 0x00 == pymh.Func.identity
    assert int(MultihashCode.SHA2_256) == 0x12 == pymh.Func.sha2_256


def test_known_answer_sha2_256_of_empty_string() -> None:
    assert Multihash.sha2_256(b"").encode().hex() == (
        "1220e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


@PROPERTY
@given(multihashes)
def test_round_trip(mh: Multihash) -> None:
    encoded = mh.encode()
    assert Multihash.decode(encoded) == mh
    assert Multihash.decode(bytearray(encoded)) == mh
    assert Multihash.decode(memoryview(encoded)) == mh


@PROPERTY
@given(data_bytes)
def test_identity_layout(data: bytes) -> None:
    mh = Multihash.identity(data)
    assert mh.code is MultihashCode.IDENTITY
    assert mh.digest == data
    assert mh.encode() == b"\x00" + encode_uvarint(len(data)) + data


@PROPERTY
@given(data_bytes)
def test_sha2_256_layout(data: bytes) -> None:
    mh = Multihash.sha2_256(data)
    assert mh.code is MultihashCode.SHA2_256
    assert mh.encode() == b"\x12\x20" + hashlib.sha256(data).digest()


@PROPERTY
@given(data_bytes)
def test_matches_py_multihash(data: bytes) -> None:
    ours_sha = Multihash.sha2_256(data).encode()
    assert ours_sha == pymh.digest(data, pymh.Func.sha2_256).encode()
    assert ours_sha == pymh.encode(hashlib.sha256(data).digest(), "sha2-256")
    ours_id = Multihash.identity(data).encode()
    assert ours_id == pymh.encode(data, pymh.Func.identity)
    theirs = pymh.decode(ours_sha)
    assert (theirs.code, theirs.digest) == (0x12, hashlib.sha256(data).digest())
    if len(ours_id) >= 3:  # py-multihash refuses anything shorter than 3 bytes
        theirs = pymh.decode(ours_id)
        assert (theirs.code, theirs.length, theirs.digest) == (0x00, len(data), data)


@PROPERTY
@given(data_bytes, st.sampled_from([0x00, 0x12]))
def test_decodes_what_py_multihash_encodes(data: bytes, code: int) -> None:
    digest = hashlib.sha256(data).digest() if code == 0x12 else data
    mh = Multihash.decode(pymh.encode(digest, code))
    assert (int(mh.code), mh.digest) == (code, digest)


@PROPERTY
@given(multihashes, st.binary(max_size=8), st.binary(max_size=8))
def test_decode_prefix_at_offset(mh: Multihash, before: bytes, after: bytes) -> None:
    encoded = mh.encode()
    got, end = Multihash.decode_prefix(before + encoded + after, len(before))
    assert got == mh
    assert end == len(before) + len(encoded)


@PROPERTY
@given(multihashes)
def test_every_proper_prefix_is_truncated(mh: Multihash) -> None:
    encoded = mh.encode()
    for cut in range(len(encoded)):
        with pytest.raises(TruncatedError):
            Multihash.decode(encoded[:cut])


@PROPERTY
@given(multihashes, st.binary(min_size=1, max_size=16))
def test_trailing_bytes_are_refused(mh: Multihash, extra: bytes) -> None:
    encoded = mh.encode()
    with pytest.raises(TrailingDataError) as info:
        Multihash.decode(encoded + extra)
    assert info.value.offset == len(encoded)
    # decode_prefix is the one that tolerates a suffix.
    assert Multihash.decode_prefix(encoded + extra) == (mh, len(encoded))


@pytest.mark.parametrize(
    "code",
    [0x11, 0x13, 0x14, 0x16, 0x1B, 0x01, 0x7F, 0xB220, 0x1012],  # sha1, sha2-512, sha3, ...
)
def test_unsupported_codes(code: int) -> None:
    encoded = encode_uvarint(code) + b"\x20" + bytes(32)
    with pytest.raises(UnsupportedError):
        Multihash.decode(encoded)


@pytest.mark.parametrize("size", [0, 1, 20, 31, 33, 64])
def test_sha2_256_digest_must_be_32_bytes(size: int) -> None:
    with pytest.raises(DecodeError):
        Multihash.decode(b"\x12" + encode_uvarint(size) + bytes(size))


def test_identity_digest_size_is_bounded_before_reading_it() -> None:
    # A hostile length is refused from the header alone, not reported as "need more bytes".
    header = b"\x00" + encode_uvarint(MAX_IDENTITY_DIGEST + 1)
    with pytest.raises(DecodeError) as info:
        Multihash.decode(header)
    assert not isinstance(info.value, TruncatedError)
    big = bytes(MAX_IDENTITY_DIGEST)
    assert Multihash.decode(b"\x00" + encode_uvarint(len(big)) + big).digest == big


@pytest.mark.parametrize(
    "encoded_hex",
    [
        "800000",  # code 0 padded
        "92002000",  # code 0x12 padded
        "00800000",  # identity, length 0 padded
        "12a0002000",  # sha2-256, length 32 padded
    ],
)
def test_non_canonical_varints(encoded_hex: str) -> None:
    with pytest.raises(NonCanonicalError):
        Multihash.decode(bytes.fromhex(encoded_hex))


@st.composite
def mutated_multihash(draw: st.DrawFn) -> bytes:
    encoded = bytearray(draw(multihashes).encode())
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(encoded) - 1))
        encoded[i] = draw(st.integers(0, 255))
    return bytes(encoded[: draw(st.integers(0, len(encoded)))])


@FUZZ
@given(st.one_of(st.binary(max_size=64), mutated_multihash()))
def test_fuzz_decode(data: bytes) -> None:
    try:
        mh = Multihash.decode(data)
    except DecodeError:
        return  # a clean refusal; IndexError, ValueError and the like fail the test
    assert mh.encode() == data  # only canonical input is accepted
    if len(data) >= 3:
        theirs = pymh.decode(data)
        assert (theirs.code, theirs.digest) == (int(mh.code), mh.digest)
