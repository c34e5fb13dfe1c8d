"""Key types, signatures, ECDH, and the AEAD record layer."""

from trustmesh.crypto.aead import (
    DEFAULT_MAX_RECORDS,
    KEY_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    DirectionalKeys,
    RecordOpener,
    RecordSealer,
    hkdf_sha256,
)
from trustmesh.crypto.keys import (
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

__all__ = [
    "DEFAULT_MAX_RECORDS",
    "KEY_SIZE",
    "NONCE_SIZE",
    "TAG_SIZE",
    "DirectionalKeys",
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "KeyKind",
    "P256PrivateKey",
    "P256PublicKey",
    "PrivateKey",
    "PublicKey",
    "RecordOpener",
    "RecordSealer",
    "Secp256k1PrivateKey",
    "Secp256k1PublicKey",
    "hkdf_sha256",
]
