"""A node's PSEC peer ID (the libp2p peer ID of its certificate's key), derived
independently with py-multihash and base58 from the libp2p spec's rules: the key's
protobuf PublicKey {Type, Data} (ECDSA: Data is the PKIX DER key), SHA-256 multihash
when the protobuf is over 42 bytes, identity otherwise, base58btc."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import base58
import multihash as pymh
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from trustmesh.psec.identity import peer_id_of

KEY_TYPES = {"ecdsa": 3, "secp256k1": 2, "ed25519": 1}


def certificate(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-x")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


def protobuf(key_type: int, data: bytes) -> bytes:
    """PublicKey { Type = 1 (varint); Data = 2 (bytes) }, as libp2p encodes it."""
    assert len(data) < 128 * 128
    length = (
        bytes([len(data)]) if len(data) < 128 else bytes([0x80 | len(data) & 0x7F, len(data) >> 7])
    )
    return b"\x08" + bytes([key_type]) + b"\x12" + length + data


def independent_peer_id(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ed25519.Ed25519PublicKey):
        encoded = protobuf(
            1, key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
    elif isinstance(key.curve, ec.SECP256K1):  # type: ignore[union-attr]
        point = key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
        encoded = protobuf(2, point)
    else:
        der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        encoded = protobuf(3, der)
    if len(encoded) <= 42:  # the identity multihash (py-multihash has no identity code)
        mh = b"\x00" + bytes([len(encoded)]) + encoded
    else:
        mh = pymh.encode(hashlib.sha256(encoded).digest(), "sha2-256")
    return base58.b58encode(mh).decode()


@pytest.mark.parametrize("kind", ["p256", "secp256k1", "ed25519"])
def test_a_certificates_peer_id_matches_an_independent_derivation(kind: str) -> None:
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    if kind == "p256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif kind == "secp256k1":
        key = ec.generate_private_key(ec.SECP256K1())
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    cert = certificate(key)
    assert peer_id_of(cert).to_base58() == independent_peer_id(cert)
