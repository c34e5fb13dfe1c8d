"""libp2p PublicKey protobuf and peer IDs: encodings, text forms, ordering, bad input."""

from __future__ import annotations

import base64
import hashlib
import string

import base58
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
from trustmesh.wire.multihash import Multihash
from trustmesh.wire.peerid import (
    MAX_INLINE_KEY,
    MAX_PUBLIC_KEY_DATA,
    KeyType,
    PeerId,
    decode_public_key,
    encode_public_key,
)
from trustmesh.wire.varint import encode_uvarint

# Modest budgets keep the whole wire suite fast; the fuzzers get the most examples.
PROPERTY = settings(max_examples=100, deadline=None)
FUZZ = settings(max_examples=300, deadline=None)

B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
B32_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"

key_types = st.sampled_from(KeyType)
key_data = st.binary(max_size=120)
public_keys = st.tuples(key_types, key_data)
peer_ids = public_keys.map(lambda k: PeerId.from_public_key(*k))


# --- PublicKey protobuf ----------------------------------------------------------------


@PROPERTY
@given(key_types, key_data)
def test_public_key_round_trip(key_type: KeyType, data: bytes) -> None:
    encoded = encode_public_key(key_type, data)
    assert encoded == b"\x08" + bytes((key_type,)) + b"\x12" + encode_uvarint(len(data)) + data
    assert decode_public_key(encoded) == (key_type, data)
    assert decode_public_key(memoryview(encoded)) == (key_type, data)
    assert decode_public_key(bytearray(encoded)) == (key_type, data)


def test_public_key_largest_data() -> None:
    data = bytes(range(256)) * (MAX_PUBLIC_KEY_DATA // 256)
    assert len(data) == MAX_PUBLIC_KEY_DATA
    assert decode_public_key(encode_public_key(KeyType.RSA, data)) == (KeyType.RSA, data)
    with pytest.raises(DecodeError):
        decode_public_key(encode_public_key(KeyType.RSA, data + b"\x00"))


@PROPERTY
@given(key_types, key_data)
def test_public_key_every_proper_prefix_is_truncated(key_type: KeyType, data: bytes) -> None:
    encoded = encode_public_key(key_type, data)
    for cut in range(len(encoded)):
        with pytest.raises(TruncatedError):
            decode_public_key(encoded[:cut])


@PROPERTY
@given(key_types, key_data, st.binary(min_size=1, max_size=16))
def test_public_key_trailing_bytes(key_type: KeyType, data: bytes, extra: bytes) -> None:
    encoded = encode_public_key(key_type, data)
    with pytest.raises(TrailingDataError) as info:
        decode_public_key(encoded + extra)
    assert info.value.offset == len(encoded)


@pytest.mark.parametrize(
    ("encoded_hex", "error"),
    [
        ("1200" + "0801", DecodeError),  # fields in the wrong order
        ("0801" + "0801" + "1200", DecodeError),  # repeated Type
        ("1a00" + "0801" + "1200", DecodeError),  # unknown field first
        ("0801" + "1a00", DecodeError),  # unknown field instead of Data
        ("0801" + "1200" + "1a00", TrailingDataError),  # unknown field after Data
        ("0804" + "1200", UnsupportedError),  # key type 4 does not exist
        ("08ff01" + "1200", UnsupportedError),
        ("088100" + "1200", NonCanonicalError),  # padded type varint
        ("0801" + "128000", NonCanonicalError),  # padded length varint
        ("0801", TruncatedError),
    ],
)
def test_public_key_non_canonical_protobuf_is_refused(
    encoded_hex: str, error: type[DecodeError]
) -> None:
    with pytest.raises(error):
        decode_public_key(bytes.fromhex(encoded_hex))


def test_public_key_hostile_length_is_refused_from_the_header() -> None:
    header = b"\x08\x00\x12" + encode_uvarint(1 << 40)
    with pytest.raises(DecodeError) as info:
        decode_public_key(header)
    assert not isinstance(info.value, TruncatedError)


# --- peer IDs from keys ----------------------------------------------------------------


@PROPERTY
@given(key_types, key_data)
def test_identity_iff_encoding_at_most_42_bytes(key_type: KeyType, data: bytes) -> None:
    encoded = encode_public_key(key_type, data)
    pid = PeerId.from_public_key(key_type, data)
    if len(encoded) <= MAX_INLINE_KEY:
        assert pid.to_bytes() == b"\x00" + bytes((len(encoded),)) + encoded
        assert pid.to_bytes() == pymh.encode(encoded, pymh.Func.identity)
        assert pid.public_key() == (key_type, data)
    else:
        assert pid.to_bytes() == b"\x12\x20" + hashlib.sha256(encoded).digest()
        assert pid.to_bytes() == pymh.digest(encoded, pymh.Func.sha2_256).encode()
        assert pid.public_key() is None


@pytest.mark.parametrize(("data_len", "inline"), [(37, True), (38, True), (39, False)])
def test_inline_boundary(data_len: int, inline: bool) -> None:
    # 4 bytes of protobuf framing + 38 bytes of Data = 42: the last inlined size.
    pid = PeerId.from_public_key(KeyType.ECDSA, bytes(data_len))
    assert (pid.to_bytes()[0] == 0x00) is inline
    assert (pid.public_key() is not None) is inline


@PROPERTY
@given(peer_ids)
def test_bytes_round_trip(pid: PeerId) -> None:
    assert PeerId(pid.to_bytes()) == pid
    assert PeerId(pid.to_bytes()).to_bytes() == pid.to_bytes()
    assert Multihash.decode(pid.to_bytes()).encode() == pid.to_bytes()


@PROPERTY
@given(peer_ids)
def test_base58_round_trip(pid: PeerId) -> None:
    text = pid.to_base58()
    assert text == str(pid) == base58.b58encode(pid.to_bytes()).decode()
    assert text == pymh.to_b58_string(pid.to_bytes())
    assert text[0] in "1Q"  # identity (0x00) -> "1...", sha2-256 (0x12 0x20) -> "Qm..."
    assert text.startswith("Qm") or text.startswith("1")
    assert PeerId.parse(text) == pid
    assert repr(pid) == f"PeerId({text!r})"


@PROPERTY
@given(peer_ids)
def test_cid_round_trip(pid: PeerId) -> None:
    text = pid.to_cid()
    assert text.startswith("bafz")  # CIDv1, libp2p-key, in base32
    assert set(text[1:]) <= set(B32_ALPHABET)  # lower case, no padding
    body = text[1:].upper() + "=" * (-len(text[1:]) % 8)
    assert base64.b32decode(body) == b"\x01\x72" + pid.to_bytes()
    assert PeerId.parse(text) == pid
    assert PeerId.parse("B" + text[1:].upper()) == pid  # base32upper multibase
    z = "z" + base58.b58encode(b"\x01\x72" + pid.to_bytes()).decode()
    assert PeerId.parse(z) == pid  # base58btc multibase


@PROPERTY
@given(peer_ids)
def test_int_is_big_endian_bytes(pid: PeerId) -> None:
    assert int(pid) == int.from_bytes(pid.to_bytes(), "big")


# --- ordering, equality, hashing -------------------------------------------------------


@PROPERTY
@given(st.lists(peer_ids, max_size=12))
def test_sorting_matches_big_endian_integers(pids: list[PeerId]) -> None:
    by_int = sorted(pids, key=lambda p: int.from_bytes(p.to_bytes(), "big"))
    assert [p.to_bytes() for p in sorted(pids)] == [p.to_bytes() for p in by_int]


@PROPERTY
@given(peer_ids, peer_ids)
def test_comparisons_agree_with_integers(a: PeerId, b: PeerId) -> None:
    x, y = int.from_bytes(a.to_bytes(), "big"), int.from_bytes(b.to_bytes(), "big")
    assert (a < b) == (x < y)
    assert (a <= b) == (x <= y)
    assert (a > b) == (x > y)
    assert (a >= b) == (x >= y)
    # Equality, ordering and hashing tell the same story.
    assert (a == b) == (x == y) == (a.to_bytes() == b.to_bytes())
    assert (a != b) == (x != y)
    if a == b:
        assert hash(a) == hash(b)


def test_ordering_is_numeric_not_lexicographic() -> None:
    identity = PeerId.from_public_key(KeyType.ED25519, bytes(32))  # 00 24 ...: 38 bytes
    hashed = PeerId.from_public_key(KeyType.RSA, bytes(100))  # 12 20 ...: 34 bytes
    assert identity.to_bytes() < hashed.to_bytes()  # as byte strings
    assert identity > hashed  # as big integers, the longer one wins
    assert sorted([identity, hashed]) == [hashed, identity]


@PROPERTY
@given(peer_ids)
def test_equality_and_hash(pid: PeerId) -> None:
    copy = PeerId(bytes(bytearray(pid.to_bytes())))
    assert copy == pid
    assert copy is not pid
    assert hash(copy) == hash(pid)
    assert len({pid, copy, PeerId.parse(pid.to_cid())}) == 1
    assert {pid: 1}[copy] == 1
    assert pid != pid.to_bytes()
    assert pid != str(pid)
    with pytest.raises(TypeError):
        _ = pid < pid.to_bytes()  # type: ignore[operator]


@PROPERTY
@given(st.lists(public_keys, min_size=2, max_size=8, unique=True))
def test_distinct_keys_give_distinct_ids(keys: list[tuple[KeyType, bytes]]) -> None:
    pids = [PeerId.from_public_key(*k) for k in keys]
    assert len(set(pids)) == len(keys)
    assert len({int(p) for p in pids}) == len(keys)


# --- rejection -------------------------------------------------------------------------


def test_identity_peer_id_inlining_more_than_42_bytes_is_refused() -> None:
    encoded = encode_public_key(KeyType.ECDSA, bytes(39))  # 43 bytes
    with pytest.raises(DecodeError):
        PeerId(Multihash.identity(encoded).encode())


@pytest.mark.parametrize(
    "inline", [b"", b"\x00", b"\x08\x01", b"\x12\x00\x08\x01", b"\x08\x09\x12\x00"]
)
def test_identity_peer_id_must_inline_a_valid_public_key(inline: bytes) -> None:
    with pytest.raises(DecodeError):
        PeerId(Multihash.identity(inline).encode())


def test_peer_id_with_unsupported_multihash() -> None:
    with pytest.raises(UnsupportedError):
        PeerId(b"\x13\x40" + bytes(64))  # sha2-512


@PROPERTY
@given(peer_ids, st.binary(min_size=1, max_size=8))
def test_peer_id_trailing_bytes(pid: PeerId, extra: bytes) -> None:
    with pytest.raises(TrailingDataError):
        PeerId(pid.to_bytes() + extra)


@PROPERTY
@given(peer_ids)
def test_peer_id_every_proper_prefix_is_refused(pid: PeerId) -> None:
    raw = pid.to_bytes()
    for cut in range(len(raw)):
        with pytest.raises(DecodeError):
            PeerId(raw[:cut])


def _cid(version: int, codec: int, mh: bytes) -> str:
    raw = encode_uvarint(version) + encode_uvarint(codec) + mh
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


SHA_MH = Multihash.sha2_256(b"key").encode()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", DecodeError),
        ("Qmé", DecodeError),  # not ASCII
        ("12D3KooW\u0430", DecodeError),
        ("Qm0OIl", DecodeError),  # not base58btc
        ("x" + "a" * 10, UnsupportedError),  # no such multibase prefix here
        ("f0172", UnsupportedError),  # base16 multibase is not supported
        ("b1", DecodeError),  # not base32
        ("b" + "a" * 9, DecodeError),  # impossible base32 length
        ("b", TruncatedError),  # empty CID
        (_cid(0, 0x72, SHA_MH), UnsupportedError),  # CID version 0
        (_cid(2, 0x72, SHA_MH), UnsupportedError),
        (_cid(1, 0x55, SHA_MH), DecodeError),  # raw codec, not libp2p-key
        (_cid(1, 0x70, SHA_MH), DecodeError),  # dag-pb
        (_cid(1, 0x72, SHA_MH[:-1]), TruncatedError),
        (_cid(1, 0x72, SHA_MH + b"\x00"), TrailingDataError),
    ],
)
def test_parse_rejects(text: str, error: type[DecodeError]) -> None:
    with pytest.raises(error):
        PeerId.parse(text)


# --- fuzz ------------------------------------------------------------------------------


@st.composite
def mutated_peer_id_bytes(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(peer_ids).to_bytes())
    for _ in range(draw(st.integers(1, 3))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw[: draw(st.integers(0, len(raw)))])


@st.composite
def mutated_public_key(draw: st.DrawFn) -> bytes:
    raw = bytearray(encode_public_key(*draw(public_keys)))
    for _ in range(draw(st.integers(1, 3))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw[: draw(st.integers(0, len(raw)))])


@st.composite
def peer_id_like_text(draw: st.DrawFn) -> str:
    """Text that gets past the first checks: a known prefix, then (mostly) alphabet chars."""
    prefix = draw(st.sampled_from(["1", "Qm", "12D3KooW", "16Uiu2HAm", "b", "B", "bafz", "z"]))
    alphabet = draw(
        st.sampled_from([B58_ALPHABET, B32_ALPHABET, B32_ALPHABET.upper(), string.printable])
    )
    return prefix + draw(st.text(alphabet=alphabet, max_size=70))


@st.composite
def mutated_peer_id_text(draw: st.DrawFn) -> str:
    pid = draw(peer_ids)
    text = list(draw(st.sampled_from([pid.to_base58(), pid.to_cid()])))
    for _ in range(draw(st.integers(1, 2))):
        text[draw(st.integers(0, len(text) - 1))] = draw(st.characters(codec="ascii"))
    return "".join(text[: draw(st.integers(0, len(text)))])


@FUZZ
@given(st.one_of(st.binary(max_size=80), mutated_public_key()))
def test_fuzz_decode_public_key(data: bytes) -> None:
    try:
        key_type, key = decode_public_key(data)
    except DecodeError:
        return  # a clean refusal; IndexError, ValueError and the like fail the test
    assert encode_public_key(key_type, key) == data  # only the canonical form


@FUZZ
@given(st.one_of(st.binary(max_size=80), mutated_peer_id_bytes()))
def test_fuzz_peer_id_from_bytes(data: bytes) -> None:
    try:
        pid = PeerId(data)
    except DecodeError:
        return  # a clean refusal; IndexError, ValueError and the like fail the test
    assert pid.to_bytes() == data
    assert PeerId.parse(pid.to_base58()) == pid
    assert PeerId.parse(pid.to_cid()) == pid


@FUZZ
@given(st.one_of(st.text(max_size=80), peer_id_like_text(), mutated_peer_id_text()))
def test_fuzz_peer_id_parse(text: str) -> None:
    try:
        pid = PeerId.parse(text)
    except DecodeError:
        return  # a clean refusal; UnicodeError, ValueError and the like fail the test
    assert PeerId(pid.to_bytes()) == pid
    assert PeerId.parse(pid.to_base58()) == pid


@pytest.mark.parametrize(
    "text",
    [
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N \n",  # trailing whitespace
        "bafzbeie5745rpv2m6tjyuugywy4d5ewrqgqqhfnf445he3omzpjbx5xqxf",  # unused bits set
        "bAFZbeie5745rpv2m6tjyuugywy4d5ewrqgqqhfnf445he3omzpjbx5xqxe",  # mixed case
        "Bafzbeie5745rpv2m6tjyuugywy4d5ewrqgqqhfnf445he3omzpjbx5xqxe",  # upper prefix, lower body
    ],
)
def test_non_canonical_text_is_refused(text: str) -> None:
    with pytest.raises(NonCanonicalError):
        PeerId.parse(text)
