"""The libp2p/specs peer-ids.md test vectors, cross-checked with py-multihash and base58."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import base58
import multihash as pymh
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from trustmesh.crypto import (
    Ed25519PublicKey,
    KeyKind,
    PrivateKey,
    PublicKey,
    Secp256k1PrivateKey,
)
from trustmesh.wire import KeyType, Multihash, MultihashCode, PeerId
from trustmesh.wire.peerid import decode_public_key, encode_public_key

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "libp2p_peer_ids.json").read_text(encoding="utf-8")
)
KEYS: dict[str, dict[str, Any]] = VECTORS["keys"]
TEXT: dict[str, str] = VECTORS["text_examples"]
DERIVED: dict[str, dict[str, str]] = {k: v for k, v in VECTORS["derived"].items() if k != "note"}


def public_protobuf(name: str) -> bytes:
    return bytes.fromhex(KEYS[name]["public"])


def private_data(name: str) -> bytes:
    """``PrivateKey.Data`` of a private-key vector (the protobuf has the same shape)."""
    key_type, data = decode_public_key(bytes.fromhex(KEYS[name]["private"]))
    assert key_type == KEYS[name]["type"]
    return data


def test_vector_file_names_its_source() -> None:
    assert "libp2p/specs" in VECTORS["source"]
    assert "peer-ids/peer-ids.md" in VECTORS["source"]
    assert set(KEYS) == {"ecdsa", "ed25519", "secp256k1"}


@pytest.mark.parametrize("name", sorted(KEYS))
def test_public_key_protobuf_decodes_and_reencodes_byte_for_byte(name: str) -> None:
    encoded = public_protobuf(name)
    key_type, data = decode_public_key(encoded)
    assert key_type == KeyType(KEYS[name]["type"])
    assert encode_public_key(key_type, data) == encoded


def test_key_data_shapes() -> None:
    assert decode_public_key(public_protobuf("ed25519"))[1].hex() == (
        "1ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
    )
    secp = decode_public_key(public_protobuf("secp256k1"))[1]
    assert len(secp) == 33
    assert secp[0] in (2, 3)  # compressed SEC1 point
    ecdsa = decode_public_key(public_protobuf("ecdsa"))[1]
    assert len(ecdsa) == 91  # DER SubjectPublicKeyInfo of a P-256 point
    spki = serialization.load_der_public_key(ecdsa)
    assert isinstance(spki, ec.EllipticCurvePublicKey)
    assert isinstance(spki.curve, ec.SECP256R1)


# --- peer IDs of the three public keys -------------------------------------------------


def peer_id_of(name: str) -> PeerId:
    return PeerId.from_public_key(*decode_public_key(public_protobuf(name)))


def test_secp256k1_peer_id() -> None:
    encoded = public_protobuf("secp256k1")
    assert len(encoded) == 37
    pid = peer_id_of("secp256k1")
    assert pid.to_bytes() == b"\x00\x25" + encoded
    assert str(pid) == "16Uiu2HAmLhLvBoYaoZfaMUKuibM6ac163GwKY74c5kiSLg5KvLpY"
    assert str(pid) == DERIVED["secp256k1"]["peer_id"]
    assert pid.public_key() == (KeyType.SECP256K1, encoded[4:])


def test_ed25519_peer_id_is_identity() -> None:
    encoded = public_protobuf("ed25519")
    assert len(encoded) == 36
    pid = peer_id_of("ed25519")
    assert pid.to_bytes() == b"\x00\x24" + encoded
    assert str(pid).startswith("12D3KooW")
    assert str(pid) == DERIVED["ed25519"]["peer_id"]
    assert pid.public_key() == (KeyType.ED25519, encoded[4:])


def test_ecdsa_peer_id_is_sha2_256() -> None:
    encoded = public_protobuf("ecdsa")
    assert len(encoded) == 95  # over 42 bytes: hashed, not inlined
    pid = peer_id_of("ecdsa")
    assert pid.to_bytes() == b"\x12\x20" + hashlib.sha256(encoded).digest()
    assert str(pid).startswith("Qm")
    assert str(pid) == DERIVED["ecdsa"]["peer_id"]
    assert pid.public_key() is None


@pytest.mark.parametrize("name", sorted(KEYS))
def test_multihash_and_base58_agree_with_independent_libraries(name: str) -> None:
    encoded = public_protobuf(name)
    pid = peer_id_of(name)
    inline = len(encoded) <= 42
    if inline:
        expected = pymh.encode(encoded, pymh.Func.identity)
        code = MultihashCode.IDENTITY
    else:
        expected = pymh.digest(encoded, pymh.Func.sha2_256).encode()
        code = MultihashCode.SHA2_256
    assert pid.to_bytes() == expected
    theirs = pymh.decode(pid.to_bytes())
    ours = Multihash.decode(pid.to_bytes())
    assert (theirs.code, theirs.digest) == (int(ours.code), ours.digest)
    assert ours.code is code
    assert pymh.is_valid(pid.to_bytes())
    text = pid.to_base58()
    assert text == base58.b58encode(pid.to_bytes()).decode("ascii")
    assert text == pymh.to_b58_string(pid.to_bytes())
    assert base58.b58decode(text) == pid.to_bytes()
    assert pymh.from_b58_string(text) == pid.to_bytes()
    assert PeerId.parse(text) == pid


@pytest.mark.parametrize("name", sorted(DERIVED))
def test_cid_forms(name: str) -> None:
    pid = peer_id_of(name)
    assert pid.to_cid() == DERIVED[name]["cid"]
    assert PeerId.parse(DERIVED[name]["cid"]) == pid
    assert PeerId.parse(DERIVED[name]["peer_id"]) == pid


# --- private keys derive the public keys -----------------------------------------------


def test_secp256k1_private_key_derives_public_key() -> None:
    secret = private_data("secp256k1")
    assert len(secret) == 32
    public = Secp256k1PrivateKey.from_secret(secret).public_key()
    _, expected = decode_public_key(public_protobuf("secp256k1"))
    assert public.libp2p_data() == expected
    assert public.peer_id() == peer_id_of("secp256k1")
    assert str(public.peer_id()) == "16Uiu2HAmLhLvBoYaoZfaMUKuibM6ac163GwKY74c5kiSLg5KvLpY"


def test_ed25519_private_key_derives_public_key() -> None:
    data = private_data("ed25519")
    assert len(data) == 64  # [private key][public key]
    _, expected = decode_public_key(public_protobuf("ed25519"))
    assert data[32:] == expected
    key = PrivateKey.from_cryptography(ed25519.Ed25519PrivateKey.from_private_bytes(data[:32]))
    public = key.public_key()
    assert isinstance(public, Ed25519PublicKey)
    assert public.libp2p_data() == expected
    assert public.peer_id() == peer_id_of("ed25519")


def test_ecdsa_public_key_matches_trustmesh_p256_encoding() -> None:
    _, data = decode_public_key(public_protobuf("ecdsa"))
    point = data[-65:]  # the uncompressed SEC1 point closes the SubjectPublicKeyInfo
    assert point[0] == 0x04
    public = PublicKey.from_bytes(KeyKind.P256, point)
    assert public.libp2p_data() == data
    assert public.peer_id() == peer_id_of("ecdsa")


# --- the spec's text examples ----------------------------------------------------------


def test_sha256_example_in_both_text_forms() -> None:
    from_cid = PeerId.parse(TEXT["sha256_cid"])
    from_b58 = PeerId.parse(TEXT["sha256_base58"])
    assert from_cid == from_b58
    assert from_cid.to_cid() == TEXT["sha256_cid"]
    assert from_b58.to_cid() == TEXT["sha256_cid"]
    assert from_cid.to_base58() == TEXT["sha256_base58"]
    mh = Multihash.decode(from_cid.to_bytes())
    assert mh.code is MultihashCode.SHA2_256
    assert from_cid.to_bytes() == base58.b58decode(TEXT["sha256_base58"])
    assert pymh.decode(from_cid.to_bytes()).code == 0x12


def test_ed25519_identity_example() -> None:
    text = TEXT["ed25519_identity_base58"]
    pid = PeerId.parse(text)
    raw = base58.b58decode(text)
    assert pid.to_bytes() == raw
    assert raw[:2] == b"\x00\x24"
    assert Multihash.decode(raw).code is MultihashCode.IDENTITY
    key = pid.public_key()
    assert key is not None
    key_type, data = key
    assert key_type is KeyType.ED25519
    assert len(data) == 32
    assert encode_public_key(key_type, data) == raw[2:]
    public = PublicKey.from_bytes(KeyKind.ED25519, data)
    assert public.peer_id() == pid
    assert str(pid) == text
    assert PeerId.parse(pid.to_cid()) == pid
