"""Key types behind one interface: secp256k1 (coincurve), Ed25519 and P-256 (cryptography).

Every key can be generated, give its public bytes (compressed SEC1 for the two ECDSA
curves, raw 32 bytes for Ed25519), sign and verify. ECDSA signatures are DER, over
SHA-256 of the message, deterministic where the library allows, and always low-S:
verification refuses a high-S signature, so a signature has one valid encoding.
ECDH returns the shared point's x-coordinate (SEC1), for the two ECDSA curves only.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from enum import StrEnum
from typing import ClassVar

import coincurve
from coincurve._libsecp256k1 import ffi as _ffi
from coincurve._libsecp256k1 import lib as _lib
from coincurve.context import GLOBAL_CONTEXT
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

from trustmesh.errors import (
    InvalidKeyError,
    InvalidSignatureError,
    UnsupportedOperationError,
)
from trustmesh.wire.peerid import KeyType as Libp2pKeyType
from trustmesh.wire.peerid import PeerId

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_SECP_CTX = GLOBAL_CONTEXT.ctx
_ED25519_P = 2**255 - 19
_ED25519_D = (-121665 * pow(121666, -1, _ED25519_P)) % _ED25519_P


def _ed25519_point_decodes(data: bytes) -> bool:
    """RFC 8032 section 5.1.3: is ``data`` the canonical encoding of a curve point?

    ``cryptography`` accepts any 32 bytes as an Ed25519 public key; check it here.
    """
    p = _ED25519_P
    y = int.from_bytes(data, "little") & ((1 << 255) - 1)
    if y >= p:
        return False
    x2 = (y * y - 1) * pow(_ED25519_D * y * y + 1, -1, p) % p
    if x2 == 0:
        return not data[31] & 0x80  # x = 0 has no negative sign
    return pow(x2, (p - 1) // 2, p) == 1


class KeyKind(StrEnum):
    """The key types trustmesh supports, by their CLI names."""

    SECP256K1 = "secp256k1"
    ED25519 = "ed25519"
    P256 = "p256"


class PublicKey(ABC):
    """A public key of one of the supported kinds."""

    kind: ClassVar[KeyKind]
    libp2p_type: ClassVar[Libp2pKeyType]

    @classmethod
    @abstractmethod
    def _parse(cls, data: bytes) -> PublicKey:
        """Parse public key bytes of this kind."""

    @abstractmethod
    def to_bytes(self) -> bytes:
        """Compressed SEC1 point (secp256k1, P-256) or raw 32 bytes (Ed25519)."""

    @abstractmethod
    def verify(self, signature: bytes, data: bytes) -> None:
        """Raise :class:`InvalidSignatureError` unless ``signature`` signs ``data``."""

    @abstractmethod
    def libp2p_data(self) -> bytes:
        """The key as libp2p encodes it in ``PublicKey.Data``."""

    def peer_id(self) -> PeerId:
        return PeerId.from_public_key(self.libp2p_type, self.libp2p_data())

    def hex(self) -> str:
        return self.to_bytes().hex()

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PublicKey)
            and other.kind is self.kind
            and other.to_bytes() == self.to_bytes()
        )

    def __hash__(self) -> int:
        return hash((self.kind, self.to_bytes()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hex()})"

    @staticmethod
    def from_bytes(kind: KeyKind, data: bytes) -> PublicKey:
        """Parse public key bytes of ``kind``; raise :class:`InvalidKeyError` if malformed."""
        return _PUBLIC_CLASSES[KeyKind(kind)]._parse(bytes(data))

    @staticmethod
    def from_cryptography(key: object) -> PublicKey:
        """Wrap a public key of the ``cryptography`` package (a certificate's, say)."""
        if isinstance(key, ed25519.Ed25519PublicKey):
            return Ed25519PublicKey(key)
        if isinstance(key, ec.EllipticCurvePublicKey):
            point = key.public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
            )
            if isinstance(key.curve, ec.SECP256K1):
                return PublicKey.from_bytes(KeyKind.SECP256K1, point)
            if isinstance(key.curve, ec.SECP256R1):
                return P256PublicKey(key)
            raise InvalidKeyError(f"unsupported elliptic curve {key.curve.name}")
        raise InvalidKeyError(f"unsupported public key type {type(key).__name__}")


class PrivateKey(ABC):
    """A private key; it satisfies :class:`trustmesh.keystore.Signer`."""

    kind: ClassVar[KeyKind]

    @staticmethod
    def generate(kind: KeyKind) -> PrivateKey:
        if kind is KeyKind.SECP256K1:
            return Secp256k1PrivateKey(coincurve.PrivateKey())
        if kind is KeyKind.ED25519:
            return Ed25519PrivateKey(ed25519.Ed25519PrivateKey.generate())
        if kind is KeyKind.P256:
            return P256PrivateKey(ec.generate_private_key(ec.SECP256R1()))
        raise UnsupportedOperationError(f"unknown key kind {kind!r}")

    @staticmethod
    def from_cryptography(key: object) -> PrivateKey:
        """Wrap a private key object of the ``cryptography`` package (e.g. loaded PKCS#8)."""
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return Ed25519PrivateKey(key)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            if isinstance(key.curve, ec.SECP256K1):
                secret = key.private_numbers().private_value.to_bytes(32, "big")
                return Secp256k1PrivateKey(coincurve.PrivateKey(secret))
            if isinstance(key.curve, ec.SECP256R1):
                return P256PrivateKey(key)
            raise InvalidKeyError(f"unsupported elliptic curve {key.curve.name}")
        raise InvalidKeyError(f"unsupported private key type {type(key).__name__}")

    @abstractmethod
    def to_cryptography(self) -> ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey:
        """The same key as a ``cryptography`` object, for PKCS#8 and X.509."""

    @abstractmethod
    def public_key(self) -> PublicKey: ...

    @abstractmethod
    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` (ECDSA hashes it with SHA-256 first)."""

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a SHA-256 digest directly (ECDSA keys only)."""
        raise UnsupportedOperationError(f"{self.kind} keys cannot sign a bare digest")

    def ecdh(self, peer: PublicKey) -> bytes:
        """The x-coordinate of the shared point with ``peer`` (ECDSA curves only)."""
        raise UnsupportedOperationError(f"{self.kind} keys cannot do ECDH")


# --- secp256k1 ------------------------------------------------------------------------


class Secp256k1PublicKey(PublicKey):
    kind = KeyKind.SECP256K1
    libp2p_type = Libp2pKeyType.SECP256K1
    __slots__ = ("_bytes", "_key")

    def __init__(self, key: coincurve.PublicKey) -> None:
        self._key = key
        self._bytes: bytes = key.format(compressed=True)

    @classmethod
    def _parse(cls, data: bytes) -> Secp256k1PublicKey:
        if len(data) not in (33, 65):
            raise InvalidKeyError(f"secp256k1 public key must be 33 or 65 bytes, got {len(data)}")
        try:
            key = coincurve.PublicKey(data)
        except ValueError as exc:
            raise InvalidKeyError(f"invalid secp256k1 public key: {exc}") from None
        if len(data) == 65:
            return cls(key)
        # A compressed key that parses is already its own canonical form: no re-encoding.
        parsed = cls.__new__(cls)
        parsed._key, parsed._bytes = key, bytes(data)
        return parsed

    @property
    def coincurve(self) -> coincurve.PublicKey:
        return self._key

    def to_bytes(self) -> bytes:
        return self._bytes

    def libp2p_data(self) -> bytes:
        return self._bytes

    def verify(self, signature: bytes, data: bytes) -> None:
        self.verify_digest(signature, hashlib.sha256(data).digest())

    def verify_digest(self, signature: bytes, digest: bytes) -> None:
        # libsecp256k1 refuses high-S signatures itself.
        try:
            ok = self._key.verify(signature, digest, hasher=None)
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise InvalidSignatureError("secp256k1 signature does not verify")


class Secp256k1PrivateKey(PrivateKey):
    kind = KeyKind.SECP256K1
    __slots__ = ("_key", "_public")

    def __init__(self, key: coincurve.PrivateKey) -> None:
        self._key = key
        self._public = Secp256k1PublicKey(key.public_key)

    @classmethod
    def from_secret(cls, secret: bytes) -> Secp256k1PrivateKey:
        try:
            return cls(coincurve.PrivateKey(secret))
        except ValueError as exc:
            raise InvalidKeyError(f"invalid secp256k1 secret: {exc}") from None

    def secret(self) -> bytes:
        return bytes(self._key.secret)

    def to_cryptography(self) -> ec.EllipticCurvePrivateKey:
        return ec.derive_private_key(int.from_bytes(self._key.secret, "big"), ec.SECP256K1())

    def public_key(self) -> Secp256k1PublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        return self.sign_digest(hashlib.sha256(data).digest())

    def sign_digest(self, digest: bytes) -> bytes:
        if len(digest) != 32:
            raise ValueError("digest must be 32 bytes")
        # RFC 6979 nonces; libsecp256k1 always produces low-S.
        return bytes(self._key.sign(digest, hasher=None))

    def sign_digest_compact(self, digest: bytes) -> bytes:
        """Sign a SHA-256 digest; the signature as 64 bytes ``r || s`` (low-S), straight
        from libsecp256k1 without the DER encoding :meth:`sign_digest` returns."""
        if len(digest) != 32:
            raise ValueError("digest must be 32 bytes")
        signature = _ffi.new("secp256k1_ecdsa_signature *")
        if not _lib.secp256k1_ecdsa_sign(
            _SECP_CTX, signature, digest, self._key.secret, _ffi.NULL, _ffi.NULL
        ):
            raise ValueError("secp256k1 signing failed")  # pragma: no cover - valid keys only
        out = _ffi.new("unsigned char [64]")
        _lib.secp256k1_ecdsa_signature_serialize_compact(_SECP_CTX, out, signature)
        return bytes(_ffi.buffer(out, 64))

    def ecdh(self, peer: PublicKey) -> bytes:
        if not isinstance(peer, Secp256k1PublicKey):
            raise InvalidKeyError(f"ECDH needs a secp256k1 peer key, got {peer.kind}")
        point = peer.coincurve.multiply(self._key.secret)
        return bytes(point.format(compressed=True)[1:])


# --- Ed25519 --------------------------------------------------------------------------


class Ed25519PublicKey(PublicKey):
    kind = KeyKind.ED25519
    libp2p_type = Libp2pKeyType.ED25519
    __slots__ = ("_bytes", "_key")

    def __init__(self, key: ed25519.Ed25519PublicKey) -> None:
        self._key = key
        self._bytes = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @classmethod
    def _parse(cls, data: bytes) -> Ed25519PublicKey:
        if len(data) != 32:
            raise InvalidKeyError(f"Ed25519 public key must be 32 bytes, got {len(data)}")
        if not _ed25519_point_decodes(data):
            raise InvalidKeyError("invalid Ed25519 public key: not a point on the curve")
        try:
            return cls(ed25519.Ed25519PublicKey.from_public_bytes(data))
        except ValueError as exc:
            raise InvalidKeyError(f"invalid Ed25519 public key: {exc}") from None

    def to_bytes(self) -> bytes:
        return self._bytes

    def libp2p_data(self) -> bytes:
        return self._bytes

    def verify(self, signature: bytes, data: bytes) -> None:
        try:
            self._key.verify(signature, data)
        except InvalidSignature:
            raise InvalidSignatureError("Ed25519 signature does not verify") from None


class Ed25519PrivateKey(PrivateKey):
    kind = KeyKind.ED25519
    __slots__ = ("_key", "_public")

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key
        self._public = Ed25519PublicKey(key.public_key())

    def to_cryptography(self) -> ed25519.Ed25519PrivateKey:
        return self._key

    def public_key(self) -> Ed25519PublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


# --- P-256 ----------------------------------------------------------------------------


class P256PublicKey(PublicKey):
    kind = KeyKind.P256
    libp2p_type = Libp2pKeyType.ECDSA
    __slots__ = ("_bytes", "_key")

    def __init__(self, key: ec.EllipticCurvePublicKey) -> None:
        self._key = key
        self._bytes = key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )

    @classmethod
    def _parse(cls, data: bytes) -> P256PublicKey:
        if len(data) not in (33, 65):
            raise InvalidKeyError(f"P-256 public key must be 33 or 65 bytes, got {len(data)}")
        try:
            return cls(ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data))
        except ValueError as exc:
            raise InvalidKeyError(f"invalid P-256 public key: {exc}") from None

    @property
    def cryptography(self) -> ec.EllipticCurvePublicKey:
        return self._key

    def to_bytes(self) -> bytes:
        return self._bytes

    def libp2p_data(self) -> bytes:
        # libp2p's ECDSA keys are DER SubjectPublicKeyInfo.
        return self._key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def verify(self, signature: bytes, data: bytes) -> None:
        self.verify_digest(signature, hashlib.sha256(data).digest())

    def verify_digest(self, signature: bytes, digest: bytes) -> None:
        try:
            _, s = decode_dss_signature(signature)
        except ValueError:
            raise InvalidSignatureError("P-256 signature is not valid DER") from None
        if s > P256_ORDER // 2:
            raise InvalidSignatureError("P-256 signature is not low-S")
        try:
            self._key.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        except InvalidSignature:
            raise InvalidSignatureError("P-256 signature does not verify") from None


class P256PrivateKey(PrivateKey):
    kind = KeyKind.P256
    __slots__ = ("_key", "_public")

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key
        self._public = P256PublicKey(key.public_key())

    def to_cryptography(self) -> ec.EllipticCurvePrivateKey:
        return self._key

    def public_key(self) -> P256PublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        return self.sign_digest(hashlib.sha256(data).digest())

    def sign_digest(self, digest: bytes) -> bytes:
        if len(digest) != 32:
            raise ValueError("digest must be 32 bytes")
        der = self._key.sign(
            digest, ec.ECDSA(Prehashed(hashes.SHA256()), deterministic_signing=True)
        )
        r, s = decode_dss_signature(der)
        if s > P256_ORDER // 2:  # OpenSSL does not normalise; we do
            der = encode_dss_signature(r, P256_ORDER - s)
        return der

    def ecdh(self, peer: PublicKey) -> bytes:
        if not isinstance(peer, P256PublicKey):
            raise InvalidKeyError(f"ECDH needs a P-256 peer key, got {peer.kind}")
        return self._key.exchange(ec.ECDH(), peer.cryptography)


_PUBLIC_CLASSES: dict[KeyKind, type[PublicKey]] = {
    KeyKind.SECP256K1: Secp256k1PublicKey,
    KeyKind.ED25519: Ed25519PublicKey,
    KeyKind.P256: P256PublicKey,
}


def low_s_der(kind: KeyKind, r: int, s: int) -> bytes:
    """A device's raw ECDSA (r, s) as every trustmesh key signs: DER with a low S."""
    order = P256_ORDER if kind is KeyKind.P256 else SECP256K1_ORDER
    return encode_dss_signature(r, min(s, order - s))


def uncompressed_point(key: PublicKey) -> bytes:
    """The SEC1 uncompressed point of a P-256 or secp256k1 key (what a token's ECDH and a
    TPM's ECDH_ZGen take)."""
    if key.kind is KeyKind.P256:
        curve: ec.EllipticCurve = ec.SECP256R1()
    elif key.kind is KeyKind.SECP256K1:
        curve = ec.SECP256K1()
    else:
        raise InvalidKeyError(f"a {key.kind} key has no EC point")
    point = ec.EllipticCurvePublicKey.from_encoded_point(curve, key.to_bytes())
    return point.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
