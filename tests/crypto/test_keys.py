"""Key generation, encodings, signatures (low-S, deterministic), ECDH, malformed input."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.crypto.keys import (
    SECP256K1_ORDER,
    Ed25519PrivateKey,
    Ed25519PublicKey,
    KeyKind,
    P256PrivateKey,
    P256PublicKey,
    PrivateKey,
    PublicKey,
    Secp256k1PrivateKey,
    Secp256k1PublicKey,
)
from trustmesh.errors import (
    InvalidKeyError,
    InvalidSignatureError,
    UnsupportedOperationError,
)

ALL_KINDS = list(KeyKind)
EC_KINDS = [KeyKind.SECP256K1, KeyKind.P256]

# Curve constants, independent of the code under test.
SECP256K1_P = 2**256 - 2**32 - 977
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
P256_P = 2**256 - 2**224 + 2**192 + 2**96 - 1
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
ED25519_P = 2**255 - 19
ED25519_D = (-121665 * pow(121666, -1, ED25519_P)) % ED25519_P

ORDER = {KeyKind.SECP256K1: SECP256K1_N, KeyKind.P256: P256_N}
CURVE = {KeyKind.SECP256K1: ec.SECP256K1(), KeyKind.P256: ec.SECP256R1()}
PUBLIC_SIZE = {KeyKind.SECP256K1: 33, KeyKind.P256: 33, KeyKind.ED25519: 32}
PRIVATE_CLASS = {
    KeyKind.SECP256K1: Secp256k1PrivateKey,
    KeyKind.P256: P256PrivateKey,
    KeyKind.ED25519: Ed25519PrivateKey,
}
PUBLIC_CLASS = {
    KeyKind.SECP256K1: Secp256k1PublicKey,
    KeyKind.P256: P256PublicKey,
    KeyKind.ED25519: Ed25519PublicKey,
}

# libp2p's secp256k1 test vector (specs/peer-ids).
LIBP2P_SECRET = "53DADF1D5A164D6B4ACDB15E24AA4C5B1D3461BDBD42ABEDB0A4404D56CED8FB"
LIBP2P_PUBLIC = "037777e994e452c21604f91de093ce415f5432f701dd8cd1a7a6fea0e630bfca99"
LIBP2P_PEER_ID = "16Uiu2HAmLhLvBoYaoZfaMUKuibM6ac163GwKY74c5kiSLg5KvLpY"

MESSAGE = b"trustmesh test message"


def _keys() -> dict[KeyKind, PrivateKey]:
    return {kind: PrivateKey.generate(kind) for kind in KeyKind}


KEYS = _keys()  # generated once: hypothesis tests reuse them
OTHER_KEYS = _keys()


def _uncompressed(public: PublicKey) -> bytes:
    assert public.kind in EC_KINDS
    point = ec.EllipticCurvePublicKey.from_encoded_point(CURVE[public.kind], public.to_bytes())
    return point.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _ec_native(key: PrivateKey) -> ec.EllipticCurvePrivateKey:
    native = key.to_cryptography()
    assert isinstance(native, ec.EllipticCurvePrivateKey)
    return native


def _is_square(value: int, p: int) -> bool:
    value %= p
    return value == 0 or pow(value, (p - 1) // 2, p) == 1


def _off_curve_x(kind: KeyKind) -> int:
    """The smallest x with no point on the curve (so 02||x and 03||x are both invalid)."""
    for x in range(1, 1000):
        if kind is KeyKind.SECP256K1:
            rhs = x**3 + 7
            p = SECP256K1_P
        else:
            rhs = x**3 - 3 * x + P256_B
            p = P256_P
        if not _is_square(rhs, p):
            return x
    raise AssertionError("no off-curve x found")


def _ed25519_off_curve_y() -> int:
    for y in range(2, 1000):
        u = (y * y - 1) % ED25519_P
        v = (ED25519_D * y * y + 1) % ED25519_P
        if not _is_square(u * pow(v, -1, ED25519_P), ED25519_P):
            return y
    raise AssertionError("no off-curve y found")


# --- generation and encodings -----------------------------------------------------------


def test_key_kind_names() -> None:
    assert [k.value for k in KeyKind] == ["secp256k1", "ed25519", "p256"]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_generate(kind: KeyKind) -> None:
    key = PrivateKey.generate(kind)
    assert isinstance(key, PRIVATE_CLASS[kind])
    assert key.kind is kind
    public = key.public_key()
    assert isinstance(public, PUBLIC_CLASS[kind])
    assert public.kind is kind
    # two generated keys differ
    assert PrivateKey.generate(kind).public_key() != public


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_public_bytes_size(kind: KeyKind) -> None:
    public = KEYS[kind].public_key()
    data = public.to_bytes()
    assert len(data) == PUBLIC_SIZE[kind]
    assert public.hex() == data.hex()
    if kind in EC_KINDS:
        assert data[0] in (2, 3)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_public_from_bytes_round_trip(kind: KeyKind) -> None:
    public = KEYS[kind].public_key()
    parsed = PublicKey.from_bytes(kind, public.to_bytes())
    assert isinstance(parsed, PUBLIC_CLASS[kind])
    assert parsed == public
    assert hash(parsed) == hash(public)
    assert parsed.to_bytes() == public.to_bytes()
    assert parsed.peer_id() == public.peer_id()
    # accepts the kind by its string name too
    assert PublicKey.from_bytes(KeyKind(kind.value), bytearray(public.to_bytes())) == public


@pytest.mark.parametrize("kind", EC_KINDS)
def test_public_from_uncompressed(kind: KeyKind) -> None:
    public = KEYS[kind].public_key()
    raw = _uncompressed(public)
    assert len(raw) == 65
    assert raw[0] == 4
    parsed = PublicKey.from_bytes(kind, raw)
    assert parsed == public
    assert parsed.to_bytes() == public.to_bytes()
    assert len(parsed.to_bytes()) == 33


def test_public_keys_of_different_kinds_are_not_equal() -> None:
    secp = KEYS[KeyKind.SECP256K1].public_key()
    assert secp != KEYS[KeyKind.P256].public_key()
    assert secp != secp.to_bytes()
    assert len({secp, PublicKey.from_bytes(KeyKind.SECP256K1, secp.to_bytes())}) == 1


# --- signatures -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_sign_verify(kind: KeyKind) -> None:
    key = KEYS[kind]
    signature = key.sign(MESSAGE)
    key.public_key().verify(signature, MESSAGE)
    # also through a public key parsed from bytes
    PublicKey.from_bytes(kind, key.public_key().to_bytes()).verify(signature, MESSAGE)
    if kind is KeyKind.ED25519:
        assert len(signature) == 64
    else:
        r, s = decode_dss_signature(signature)  # it is DER
        assert 0 < r < ORDER[kind]
        assert 0 < s < ORDER[kind]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_verify_rejects_tampered_message(kind: KeyKind) -> None:
    key = KEYS[kind]
    signature = key.sign(MESSAGE)
    with pytest.raises(InvalidSignatureError):
        key.public_key().verify(signature, MESSAGE + b"!")
    with pytest.raises(InvalidSignatureError):
        key.public_key().verify(signature, b"")


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_verify_rejects_tampered_signature(kind: KeyKind) -> None:
    key = KEYS[kind]
    signature = key.sign(MESSAGE)
    for index in (0, 1, len(signature) // 2, len(signature) - 1):
        tampered = bytearray(signature)
        tampered[index] ^= 0x01
        with pytest.raises(InvalidSignatureError):
            key.public_key().verify(bytes(tampered), MESSAGE)
    with pytest.raises(InvalidSignatureError):
        key.public_key().verify(signature[:-1], MESSAGE)
    with pytest.raises(InvalidSignatureError):
        key.public_key().verify(signature + b"\x00", MESSAGE)
    with pytest.raises(InvalidSignatureError):
        key.public_key().verify(b"", MESSAGE)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_verify_rejects_signature_from_another_key(kind: KeyKind) -> None:
    signature = OTHER_KEYS[kind].sign(MESSAGE)
    OTHER_KEYS[kind].public_key().verify(signature, MESSAGE)
    with pytest.raises(InvalidSignatureError):
        KEYS[kind].public_key().verify(signature, MESSAGE)


@pytest.mark.parametrize("kind", ALL_KINDS)
@settings(max_examples=150, deadline=None)
@given(junk=st.binary(max_size=120))
def test_verify_arbitrary_bytes_raise_invalid_signature_only(kind: KeyKind, junk: bytes) -> None:
    with pytest.raises(InvalidSignatureError):
        KEYS[kind].public_key().verify(junk, MESSAGE)


def _der_signature(r: int, s: int) -> bytes:
    """DER ``SEQUENCE { INTEGER r, INTEGER s }``, negative integers allowed."""

    def integer(value: int) -> bytes:
        body = value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True)
        return bytes((0x02, len(body))) + body

    body = integer(r) + integer(s)
    return bytes((0x30, len(body))) + body


def test_der_signature_helper_matches_cryptography() -> None:
    for r, s in [(1, 1), (127, 128), (2**255, 2**256 - 1), (0, 5)]:
        assert _der_signature(r, s) == encode_dss_signature(r, s)


@pytest.mark.parametrize("kind", EC_KINDS)
@settings(max_examples=100, deadline=None)
@given(r=st.integers(-(2**260), 2**260), s=st.integers(-(2**260), 2**260))
def test_verify_arbitrary_der_integers_raise_invalid_signature_only(
    kind: KeyKind, r: int, s: int
) -> None:
    # well-formed DER whose integers are out of range, zero, negative or just wrong
    with pytest.raises(InvalidSignatureError):
        KEYS[kind].public_key().verify(_der_signature(r, s), MESSAGE)


@pytest.mark.parametrize("kind", EC_KINDS)
def test_signatures_are_low_s(kind: KeyKind) -> None:
    key = KEYS[kind]
    half = ORDER[kind] // 2
    for i in range(200):
        _, s = decode_dss_signature(key.sign(i.to_bytes(4, "big")))
        assert 0 < s <= half


@pytest.mark.parametrize("kind", EC_KINDS)
def test_high_s_signature_is_rejected(kind: KeyKind) -> None:
    key = KEYS[kind]
    n = ORDER[kind]
    for i in range(5):
        message = MESSAGE + bytes([i])
        signature = key.sign(message)
        key.public_key().verify(signature, message)
        r, s = decode_dss_signature(signature)
        high = encode_dss_signature(r, n - s)
        assert high != signature
        # the high-S twin is a mathematically valid ECDSA signature ...
        _ec_native(key).public_key().verify(high, message, ec.ECDSA(hashes.SHA256()))
        # ... which trustmesh refuses
        with pytest.raises(InvalidSignatureError):
            key.public_key().verify(high, message)
        with pytest.raises(InvalidSignatureError):
            key.public_key().verify_digest(high, hashlib.sha256(message).digest())  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", EC_KINDS)
def test_signatures_are_deterministic(kind: KeyKind) -> None:
    key = KEYS[kind]
    assert key.sign(MESSAGE) == key.sign(MESSAGE)
    assert key.sign(MESSAGE) != key.sign(MESSAGE + b"x")
    # the same secret in a fresh object signs identically
    clone = PrivateKey.from_cryptography(key.to_cryptography())
    assert clone.sign(MESSAGE) == key.sign(MESSAGE)


def test_ed25519_signatures_are_deterministic() -> None:
    key = KEYS[KeyKind.ED25519]
    assert key.sign(MESSAGE) == key.sign(MESSAGE)


@pytest.mark.parametrize("kind", EC_KINDS)
def test_sign_digest_agrees_with_sign(kind: KeyKind) -> None:
    key = KEYS[kind]
    public = key.public_key()
    digest = hashlib.sha256(MESSAGE).digest()
    by_digest = key.sign_digest(digest)
    assert by_digest == key.sign(MESSAGE)
    public.verify(by_digest, MESSAGE)
    public.verify_digest(key.sign(MESSAGE), digest)  # type: ignore[attr-defined]
    with pytest.raises(InvalidSignatureError):
        public.verify_digest(by_digest, hashlib.sha256(b"other").digest())  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        key.sign_digest(digest[:31])


def test_ed25519_cannot_sign_digest() -> None:
    with pytest.raises(UnsupportedOperationError):
        KEYS[KeyKind.ED25519].sign_digest(hashlib.sha256(MESSAGE).digest())


@pytest.mark.parametrize("kind", EC_KINDS)
def test_signature_verifies_with_cryptography(kind: KeyKind) -> None:
    key = KEYS[kind]
    signature = key.sign(MESSAGE)
    _ec_native(key).public_key().verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))


def test_ed25519_signature_verifies_with_cryptography() -> None:
    key = KEYS[KeyKind.ED25519]
    public = key.to_cryptography().public_key()
    assert isinstance(public, ed25519.Ed25519PublicKey)
    public.verify(key.sign(MESSAGE), MESSAGE)


# --- ECDH -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", EC_KINDS)
def test_ecdh_agrees(kind: KeyKind) -> None:
    a, b = KEYS[kind], OTHER_KEYS[kind]
    shared = a.ecdh(b.public_key())
    assert len(shared) == 32
    assert shared == b.ecdh(a.public_key())
    assert shared != a.ecdh(PrivateKey.generate(kind).public_key())


@pytest.mark.parametrize("kind", EC_KINDS)
def test_ecdh_equals_cryptography_ecdh(kind: KeyKind) -> None:
    a, b = KEYS[kind], OTHER_KEYS[kind]
    ours = a.ecdh(b.public_key())
    theirs = _ec_native(a).exchange(ec.ECDH(), _ec_native(b).public_key())
    assert ours == theirs


def test_ecdh_with_ed25519_is_unsupported() -> None:
    ed = KEYS[KeyKind.ED25519]
    with pytest.raises(UnsupportedOperationError):
        ed.ecdh(OTHER_KEYS[KeyKind.ED25519].public_key())
    with pytest.raises(UnsupportedOperationError):
        ed.ecdh(OTHER_KEYS[KeyKind.SECP256K1].public_key())


@pytest.mark.parametrize(
    ("kind", "peer_kind"),
    [(k, p) for k in EC_KINDS for p in ALL_KINDS if p is not k],
)
def test_ecdh_with_peer_of_another_kind(kind: KeyKind, peer_kind: KeyKind) -> None:
    with pytest.raises(InvalidKeyError):
        KEYS[kind].ecdh(OTHER_KEYS[peer_kind].public_key())


# --- malformed public keys -------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=80))
def test_arbitrary_public_bytes_raise_invalid_key_only(kind: KeyKind, data: bytes) -> None:
    try:
        public = PublicKey.from_bytes(kind, data)
    except InvalidKeyError:
        return
    # accepted: then it is a real key whose encoding round-trips
    assert public.kind is kind
    assert PublicKey.from_bytes(kind, public.to_bytes()) == public
    assert len(public.to_bytes()) == PUBLIC_SIZE[kind]


@pytest.mark.parametrize("kind", EC_KINDS)
@settings(max_examples=100, deadline=None)
@given(prefix=st.sampled_from([2, 3]), x=st.binary(min_size=32, max_size=32))
def test_compressed_candidates_raise_invalid_key_only(kind: KeyKind, prefix: int, x: bytes) -> None:
    # about half of all x values are on the curve; the rest must fail cleanly
    try:
        public = PublicKey.from_bytes(kind, bytes([prefix]) + x)
    except InvalidKeyError:
        return
    assert public.to_bytes() == bytes([prefix]) + x


VALID_SIZES = {KeyKind.SECP256K1: (33, 65), KeyKind.P256: (33, 65), KeyKind.ED25519: (32,)}


@pytest.mark.parametrize(
    ("kind", "size"),
    [
        (kind, size)
        for kind in ALL_KINDS
        for size in (0, 1, 31, 32, 33, 34, 64, 65, 66, 91)
        if size not in VALID_SIZES[kind]
    ],
)
def test_wrong_length_public_key(kind: KeyKind, size: int) -> None:
    valid = KEYS[kind].public_key().to_bytes()
    data = (valid * 3)[:size]
    with pytest.raises(InvalidKeyError):
        PublicKey.from_bytes(kind, data)


@pytest.mark.parametrize("kind", EC_KINDS)
def test_off_curve_points(kind: KeyKind) -> None:
    p = SECP256K1_P if kind is KeyKind.SECP256K1 else P256_P
    x = _off_curve_x(kind)
    bad = [
        b"\x02" + x.to_bytes(32, "big"),
        b"\x03" + x.to_bytes(32, "big"),
        b"\x02" + p.to_bytes(32, "big"),  # x not below the field prime
        b"\x02" + b"\xff" * 32,
        bytes(33),
        b"\x04" + bytes(64),
        b"\x05" + KEYS[kind].public_key().to_bytes()[1:],  # unknown prefix
    ]
    raw = _uncompressed(KEYS[kind].public_key())
    y = int.from_bytes(raw[33:], "big")
    bad.append(raw[:33] + ((y + 1) % p).to_bytes(32, "big"))  # y moved off the curve
    bad.append(raw[:33] + p.to_bytes(32, "big"))  # y not below the field prime
    # control: the untouched encodings parse
    assert PublicKey.from_bytes(kind, raw) == KEYS[kind].public_key()
    for data in bad:
        with pytest.raises(InvalidKeyError):
            PublicKey.from_bytes(kind, data)


def test_ed25519_off_curve_point() -> None:
    y = _ed25519_off_curve_y()
    with pytest.raises(InvalidKeyError):
        PublicKey.from_bytes(KeyKind.ED25519, y.to_bytes(32, "little"))
    # a non-canonical encoding (y >= p) is refused as well
    with pytest.raises(InvalidKeyError):
        PublicKey.from_bytes(KeyKind.ED25519, (ED25519_P + 1).to_bytes(32, "little"))
    # y = 1 is the neutral point, x = 0: valid, but not with the sign bit of x set
    assert PublicKey.from_bytes(KeyKind.ED25519, (1).to_bytes(32, "little")).kind is KeyKind.ED25519
    with pytest.raises(InvalidKeyError):
        PublicKey.from_bytes(KeyKind.ED25519, (1 | 1 << 255).to_bytes(32, "little"))


@settings(max_examples=100, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), sign=st.booleans())
def test_ed25519_real_public_keys_always_parse(seed: bytes, sign: bool) -> None:
    raw = (
        ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    assert PublicKey.from_bytes(KeyKind.ED25519, raw).to_bytes() == raw
    # the point with the other x (-x) is on the curve too
    flipped = raw[:31] + bytes([raw[31] ^ 0x80])
    assert PublicKey.from_bytes(KeyKind.ED25519, flipped).to_bytes() == flipped


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError):
        PublicKey.from_bytes("rsa", bytes(33))  # type: ignore[arg-type]


# --- cryptography interop ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_from_cryptography_round_trip(kind: KeyKind) -> None:
    key = KEYS[kind]
    native = key.to_cryptography()
    back = PrivateKey.from_cryptography(native)
    assert isinstance(back, PRIVATE_CLASS[kind])
    assert back.kind is kind
    assert back.public_key() == key.public_key()
    key.public_key().verify(back.sign(MESSAGE), MESSAGE)
    # and the cryptography object's public key is the same point
    raw = native.public_key().public_bytes(
        serialization.Encoding.X962 if kind in EC_KINDS else serialization.Encoding.Raw,
        serialization.PublicFormat.CompressedPoint
        if kind in EC_KINDS
        else serialization.PublicFormat.Raw,
    )
    assert raw == key.public_key().to_bytes()


def test_from_cryptography_refuses_other_keys() -> None:
    with pytest.raises(InvalidKeyError):
        PrivateKey.from_cryptography(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(InvalidKeyError):
        PrivateKey.from_cryptography(x25519.X25519PrivateKey.generate())
    with pytest.raises(InvalidKeyError):
        PrivateKey.from_cryptography(b"not a key")


def test_secp256k1_secret_round_trip() -> None:
    key = KEYS[KeyKind.SECP256K1]
    assert isinstance(key, Secp256k1PrivateKey)
    again = Secp256k1PrivateKey.from_secret(key.secret())
    assert again.public_key() == key.public_key()
    for bad in (bytes(32), b"\xff" * 32, SECP256K1_N.to_bytes(32, "big")):
        with pytest.raises(InvalidKeyError):
            Secp256k1PrivateKey.from_secret(bad)


# --- known answer ------------------------------------------------------------------------


def test_libp2p_secp256k1_vector() -> None:
    key = Secp256k1PrivateKey.from_secret(bytes.fromhex(LIBP2P_SECRET))
    public = key.public_key()
    assert public.hex() == LIBP2P_PUBLIC
    assert str(public.peer_id()) == LIBP2P_PEER_ID
    # the same key reached through cryptography gives the same answer
    native = ec.derive_private_key(int(LIBP2P_SECRET, 16), ec.SECP256K1())
    assert str(PrivateKey.from_cryptography(native).public_key().peer_id()) == LIBP2P_PEER_ID
    assert PublicKey.from_bytes(KeyKind.SECP256K1, bytes.fromhex(LIBP2P_PUBLIC)) == public


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_secp256k1_compact_signature_is_the_der_one(digest: bytes) -> None:
    # sign_digest_compact skips the DER encoding; it must be the same (r, s), low-S.
    from coincurve.ecdsa import der_to_cdata, serialize_compact

    key = PrivateKey.generate(KeyKind.SECP256K1)
    assert isinstance(key, Secp256k1PrivateKey)
    compact = key.sign_digest_compact(digest)
    assert compact == bytes(serialize_compact(der_to_cdata(key.sign_digest(digest))))
    assert int.from_bytes(compact[32:], "big") <= SECP256K1_ORDER // 2
    with pytest.raises(ValueError, match="32 bytes"):
        key.sign_digest_compact(digest[:31])
