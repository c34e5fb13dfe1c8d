"""The AEAD record layer: round trips, counter nonces, failures, limits, HKDF."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.crypto.aead import (
    DEFAULT_MAX_RECORDS,
    KEY_SIZE,
    MAX_RECORDS,
    NONCE_SIZE,
    TAG_SIZE,
    DirectionalKeys,
    RecordOpener,
    RecordSealer,
    hkdf_sha256,
)
from trustmesh.errors import AuthenticationError, NonceExhaustedError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))

keys = st.binary(min_size=KEY_SIZE, max_size=KEY_SIZE)
plaintexts = st.binary(max_size=2048)
aads = st.one_of(st.none(), st.binary(max_size=64))


def pair(key: bytes = KEY, **kwargs: object) -> tuple[RecordSealer, RecordOpener]:
    return RecordSealer(key, **kwargs), RecordOpener(key, **kwargs)  # type: ignore[arg-type]


def test_constants() -> None:
    assert (KEY_SIZE, NONCE_SIZE, TAG_SIZE) == (32, 12, 16)
    assert MAX_RECORDS == 2**64


# --- round trips ------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(key=keys, plaintext=plaintexts)
def test_round_trip_without_aad(key: bytes, plaintext: bytes) -> None:
    sealer, opener = pair(key)
    record = sealer.seal(plaintext)
    assert len(record) == len(plaintext) + TAG_SIZE
    assert opener.open(record) == plaintext


@settings(max_examples=150, deadline=None)
@given(key=keys, plaintext=plaintexts, aad=st.binary(min_size=1, max_size=64))
def test_round_trip_with_aad(key: bytes, plaintext: bytes, aad: bytes) -> None:
    sealer, opener = pair(key)
    record = sealer.seal(plaintext, aad)
    assert opener.open(record, aad) == plaintext


@settings(max_examples=100, deadline=None)
@given(messages=st.lists(st.tuples(plaintexts, aads), max_size=20))
def test_round_trip_stream(messages: list[tuple[bytes, bytes | None]]) -> None:
    sealer, opener = pair()
    records = [sealer.seal(p, a) for p, a in messages]
    assert [opener.open(r, a) for r, (_, a) in zip(records, messages, strict=True)] == [
        p for p, _ in messages
    ]
    assert sealer.sequence == opener.sequence == len(messages)


# --- nonces ------------------------------------------------------------------------------


def test_counter_increments() -> None:
    sealer, opener = pair()
    assert sealer.sequence == opener.sequence == 0
    assert sealer.remaining == DEFAULT_MAX_RECORDS
    records = []
    for i in range(1, 6):
        records.append(sealer.seal(b"x"))
        assert sealer.sequence == i
        assert sealer.remaining == DEFAULT_MAX_RECORDS - i
    for i, record in enumerate(records, start=1):
        assert opener.open(record) == b"x"
        assert opener.sequence == i
        assert opener.remaining == DEFAULT_MAX_RECORDS - i


def test_same_plaintext_gives_different_records() -> None:
    sealer, _ = pair()
    records = [sealer.seal(b"same plaintext") for _ in range(50)]
    assert len(set(records)) == 50
    empties = [sealer.seal(b"") for _ in range(10)]
    assert len(set(empties)) == 10  # even the bare tags differ


def test_nonce_layout_known_answer() -> None:
    key = bytes(32)
    sealer = RecordSealer(key, nonce_prefix=bytes(4))
    aesgcm = AESGCM(key)
    assert sealer.seal(b"") == aesgcm.encrypt(bytes(12), b"", None)
    assert sealer.seal(b"") == aesgcm.encrypt(bytes(11) + b"\x01", b"", None)
    assert sealer.seal(b"abc", b"hdr") == aesgcm.encrypt(bytes(11) + b"\x02", b"abc", b"hdr")
    for counter in range(3, 300):  # the counter is big-endian, past one byte
        record = sealer.seal(b"p")
        assert record == aesgcm.encrypt(bytes(4) + counter.to_bytes(8, "big"), b"p", None)


def test_nonce_layout_default_prefix_is_zero() -> None:
    sealer = RecordSealer(bytes(32))
    assert sealer.seal(b"") == AESGCM(bytes(32)).encrypt(bytes(12), b"", None)


def test_nonce_prefix_is_first_four_bytes() -> None:
    prefix = b"\x00\x00\x00\x07"
    sealer, opener = pair(KEY, nonce_prefix=prefix)
    aesgcm = AESGCM(KEY)
    first = sealer.seal(b"hello")
    second = sealer.seal(b"hello")
    assert first == aesgcm.encrypt(prefix + bytes(8), b"hello", None)
    assert second == aesgcm.encrypt(prefix + (1).to_bytes(8, "big"), b"hello", None)
    # an opener with another prefix cannot open it; the right one can
    with pytest.raises(AuthenticationError):
        RecordOpener(KEY).open(first)
    assert opener.open(first) == b"hello"
    assert opener.open(second) == b"hello"


def test_last_counter_value_is_packed() -> None:
    # The nonce of the very last record carries counter 2**64 - 1 in its last 8 bytes.
    sealer = RecordSealer(KEY, nonce_prefix=b"\xaa\xbb\xcc\xdd", max_records=MAX_RECORDS)
    sealer._counter = MAX_RECORDS - 1  # jump to the end of the nonce space
    record = sealer.seal(b"last")
    assert record == AESGCM(KEY).encrypt(b"\xaa\xbb\xcc\xdd" + b"\xff" * 8, b"last", None)
    assert sealer.remaining == 0
    with pytest.raises(NonceExhaustedError):
        sealer.seal(b"one too many")


# --- failures ----------------------------------------------------------------------------


def test_replayed_record_is_rejected() -> None:
    sealer, opener = pair()
    first, second = sealer.seal(b"one"), sealer.seal(b"two")
    assert opener.open(first) == b"one"
    with pytest.raises(AuthenticationError):
        opener.open(first)
    assert opener.sequence == 1
    assert opener.open(second) == b"two"
    with pytest.raises(AuthenticationError):
        opener.open(second)
    assert opener.sequence == 2


def test_reordered_record_is_rejected() -> None:
    sealer, opener = pair()
    first, second = sealer.seal(b"one"), sealer.seal(b"two")
    with pytest.raises(AuthenticationError):
        opener.open(second)
    assert opener.sequence == 0
    assert opener.open(first) == b"one"
    assert opener.open(second) == b"two"


@settings(max_examples=150, deadline=None)
@given(plaintext=st.binary(max_size=64), data=st.data())
def test_flipped_bit_is_rejected(plaintext: bytes, data: st.DataObject) -> None:
    sealer, opener = pair()
    record = sealer.seal(plaintext, b"aad")
    bit = data.draw(st.integers(0, len(record) * 8 - 1))
    tampered = bytearray(record)
    tampered[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(AuthenticationError):
        opener.open(bytes(tampered), b"aad")
    assert opener.sequence == 0
    assert opener.open(record, b"aad") == plaintext  # the genuine record still opens


def test_truncated_record_is_rejected() -> None:
    sealer, opener = pair()
    record = sealer.seal(b"a record of some length")
    for cut in (1, TAG_SIZE, len(record) - 1):
        with pytest.raises(AuthenticationError):
            opener.open(record[:-cut])
        assert opener.sequence == 0
    with pytest.raises(AuthenticationError):
        opener.open(record + b"\x00")
    assert opener.open(record) == b"a record of some length"


@pytest.mark.parametrize("size", range(TAG_SIZE))
def test_record_shorter_than_tag_is_rejected(size: int) -> None:
    sealer, opener = pair()
    record = sealer.seal(b"")
    assert len(record) == TAG_SIZE
    with pytest.raises(AuthenticationError):
        opener.open(record[:size])
    with pytest.raises(AuthenticationError):
        opener.open(bytes(size))
    assert opener.sequence == 0
    assert opener.open(record) == b""


def test_wrong_aad_is_rejected() -> None:
    sealer, opener = pair()
    record = sealer.seal(b"payload", b"header-1")
    for wrong in (b"header-2", b"header-", None, b""):
        with pytest.raises(AuthenticationError):
            opener.open(record, wrong)
        assert opener.sequence == 0
    assert opener.open(record, b"header-1") == b"payload"


def test_aad_missing_on_seal_but_given_on_open() -> None:
    sealer, opener = pair()
    record = sealer.seal(b"payload")
    with pytest.raises(AuthenticationError):
        opener.open(record, b"unexpected")
    assert opener.open(record) == b"payload"


def test_wrong_key_is_rejected() -> None:
    record = RecordSealer(KEY).seal(b"payload")
    opener = RecordOpener(OTHER_KEY)
    with pytest.raises(AuthenticationError):
        opener.open(record)
    assert opener.sequence == 0


def test_error_names_the_record() -> None:
    sealer, opener = pair()
    opener.open(sealer.seal(b"a"))
    with pytest.raises(AuthenticationError, match="record 1"):
        opener.open(b"\x00" * 20)


# --- limits -------------------------------------------------------------------------------


def test_sealer_exhausts() -> None:
    sealer = RecordSealer(KEY, max_records=3)
    records = [sealer.seal(bytes([i])) for i in range(3)]
    assert sealer.remaining == 0
    with pytest.raises(NonceExhaustedError):
        sealer.seal(b"fourth")
    with pytest.raises(NonceExhaustedError):
        sealer.seal(b"fifth")
    assert sealer.sequence == 3
    opener = RecordOpener(KEY, max_records=3)
    assert [opener.open(r) for r in records] == [b"\x00", b"\x01", b"\x02"]


def test_opener_exhausts() -> None:
    # a genuine fourth record exists (sealed under a larger limit), yet a 3-record opener
    # refuses it
    sealer = RecordSealer(KEY, max_records=4)
    records = [sealer.seal(bytes([i])) for i in range(4)]
    opener = RecordOpener(KEY, max_records=3)
    for record in records[:3]:
        opener.open(record)
    assert opener.remaining == 0
    with pytest.raises(NonceExhaustedError):
        opener.open(records[3])
    assert opener.sequence == 3


def test_max_records_one() -> None:
    sealer, opener = pair(KEY, max_records=1)
    assert opener.open(sealer.seal(b"only")) == b"only"
    with pytest.raises(NonceExhaustedError):
        sealer.seal(b"more")


@pytest.mark.parametrize("cls", [RecordSealer, RecordOpener])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"key": bytes(16)},
        {"key": bytes(31)},
        {"key": bytes(33)},
        {"key": b""},
        {"key": KEY, "nonce_prefix": bytes(3)},
        {"key": KEY, "nonce_prefix": bytes(5)},
        {"key": KEY, "nonce_prefix": b""},
        {"key": KEY, "max_records": 0},
        {"key": KEY, "max_records": -1},
        {"key": KEY, "max_records": MAX_RECORDS + 1},
    ],
)
def test_bad_constructor_arguments(
    cls: type[RecordSealer] | type[RecordOpener], kwargs: dict[str, object]
) -> None:
    kwargs = dict(kwargs)  # parametrize shares the dict between cases
    key = kwargs.pop("key")
    with pytest.raises(ValueError):
        cls(key, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", [RecordSealer, RecordOpener])
def test_limit_bounds_accepted(cls: type[RecordSealer] | type[RecordOpener]) -> None:
    assert cls(KEY, max_records=MAX_RECORDS).remaining == MAX_RECORDS
    assert cls(KEY, max_records=1).remaining == 1


# --- key derivation -----------------------------------------------------------------------


def test_hkdf_rfc5869_test_case_1() -> None:
    okm = hkdf_sha256(
        b"\x0b" * 22,
        salt=bytes(range(0x0D)),
        info=bytes(range(0xF0, 0xFA)),
        length=42,
    )
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_hkdf_rfc5869_test_case_3() -> None:
    # zero-length salt and info
    okm = hkdf_sha256(b"\x0b" * 22, salt=None, info=b"", length=42)
    assert okm.hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )


def test_directional_keys_derive_deterministic() -> None:
    a = DirectionalKeys.derive(b"shared secret", salt=b"salt", info=b"trustmesh test")
    b = DirectionalKeys.derive(b"shared secret", salt=b"salt", info=b"trustmesh test")
    assert a == b
    assert len(a.initiator_to_responder) == len(a.responder_to_initiator) == KEY_SIZE
    assert a.initiator_to_responder != a.responder_to_initiator
    okm = hkdf_sha256(b"shared secret", salt=b"salt", info=b"trustmesh test", length=64)
    assert a.initiator_to_responder + a.responder_to_initiator == okm


def test_directional_keys_depend_on_every_input() -> None:
    base = DirectionalKeys.derive(b"secret", salt=b"salt", info=b"info")
    others = [
        DirectionalKeys.derive(b"secreT", salt=b"salt", info=b"info"),
        DirectionalKeys.derive(b"secret", salt=b"salT", info=b"info"),
        DirectionalKeys.derive(b"secret", salt=b"salt", info=b"infO"),
        DirectionalKeys.derive(b"secret", salt=None, info=b"info"),
    ]
    for other in others:
        assert other.initiator_to_responder != base.initiator_to_responder
        assert other.responder_to_initiator != base.responder_to_initiator


def test_directional_records_pair_up() -> None:
    keys = DirectionalKeys.derive(b"shared secret", salt=None, info=b"records")
    init_seal, init_open = keys.records(initiator=True)
    resp_seal, resp_open = keys.records(initiator=False)
    # initiator -> responder
    assert resp_open.open(init_seal.seal(b"hello responder", b"h"), b"h") == b"hello responder"
    # responder -> initiator
    assert init_open.open(resp_seal.seal(b"hello initiator")) == b"hello initiator"
    # a side cannot open its own records (distinct keys per direction)
    own = init_seal.seal(b"echo")
    with pytest.raises(AuthenticationError):
        init_open.open(own)
    assert resp_open.open(own) == b"echo"
    # the same counter in both directions still yields different records
    assert init_seal.seal(b"same") != resp_seal.seal(b"same")


def test_directional_records_use_the_right_keys() -> None:
    keys = DirectionalKeys.derive(b"s", salt=None, info=b"i")
    sealer, _ = keys.records(initiator=True)
    expected = AESGCM(keys.initiator_to_responder).encrypt(bytes(12), b"m", None)
    assert sealer.seal(b"m") == expected
    sealer, _ = keys.records(initiator=False)
    expected = AESGCM(keys.responder_to_initiator).encrypt(bytes(12), b"m", None)
    assert sealer.seal(b"m") == expected


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=80),
    st.one_of(st.none(), st.binary(max_size=80)),
    st.binary(max_size=40),
    st.integers(1, 255 * 32),
)
def test_hkdf_matches_cryptography(
    secret: bytes, salt: bytes | None, info: bytes, length: int
) -> None:
    # hkdf_sha256 is RFC 5869 written over the stdlib's hashing (for speed); pyca's HKDF is the
    # reference.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    expected = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)
    assert hkdf_sha256(secret, salt=salt, info=info, length=length) == expected


@pytest.mark.parametrize("length", [0, 255 * 32 + 1])
def test_hkdf_refuses_lengths_rfc5869_cannot_give(length: int) -> None:
    with pytest.raises(ValueError, match="HKDF-SHA256 output"):
        hkdf_sha256(b"secret", salt=None, info=b"", length=length)
