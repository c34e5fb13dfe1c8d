"""The pinned BOTD #2 handshake vector (vectors/botd_handshake.json).

The core recomputes every value from fixed secrets and ids; independently of trustmesh,
the keys, signatures, transcript hash, ECDH, HKDF and the AES-256-GCM records are
recomputed with ``cryptography``, ``coincurve``, ``hashlib`` and ``hmac`` alone, so the
vector checks our code against a second implementation, not only against itself.
The vector was generated once with the same steps as ``run_core`` below: Init, Ack, the
responder's Finished, the initiator's Finished, then one message from the initiator.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import coincurve
import pytest
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from trustmesh.botd import BotdConnection, HandshakeComplete, MessageReceived
from trustmesh.botd.keyschedule import EphemeralKey, SessionKeys
from trustmesh.botd.messages import parse_pubkey
from trustmesh.crypto.keys import Secp256k1PrivateKey
from trustmesh.wire.pb.botd_pb2 import Frame
from trustmesh.wire.varint import decode_uvarint

SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

VECTOR: dict[str, object] = json.loads(
    (Path(__file__).parent / "vectors" / "botd_handshake.json").read_text(encoding="utf-8")
)


def text(name: str) -> str:
    value = VECTOR[name]
    assert isinstance(value, str)
    return value


def hexval(name: str) -> bytes:
    return bytes.fromhex(text(name))


# --- independent primitives (no trustmesh code) -----------------------------------------


def uvarint(n: int) -> bytes:
    """Unsigned LEB128, as protobuf's varint."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def split_frame(frame: bytes) -> bytes:
    """The payload of ``uvarint(len) || payload``, checking the prefix."""
    length, pos = 0, 0
    for shift in range(0, 64, 7):
        byte = frame[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    assert len(frame) - pos == length, "length prefix does not match the payload"
    return frame[pos:]


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869, section 2.2 (extract) and 2.3 (expand), with HMAC-SHA256."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def compressed_pubkey(secret: bytes) -> bytes:
    """The compressed SEC1 public key, computed by ``cryptography`` (OpenSSL)."""
    key = ec.derive_private_key(int.from_bytes(secret, "big"), ec.SECP256K1())
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)


def verify_compact(pubkey: bytes, signature: bytes, digest: bytes) -> None:
    """Verify a 64-byte r || s signature over a SHA-256 digest with ``cryptography``."""
    assert len(signature) == 64
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), pubkey)
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    key.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def gcm_nonce(counter: int) -> bytes:
    return bytes(4) + counter.to_bytes(8, "big")


def finished_digest(role: bytes) -> bytes:
    """Docs 4.4: sha256("BOTD2/1 finished " || role || transcript_hash)."""
    return hashlib.sha256(b"BOTD2/1 finished " + role + hexval("transcript_hash")).digest()


def open_finished(frame_name: str, key_name: str) -> bytes:
    """The Finished signature inside a Finished record, decrypted with plain AESGCM at
    counter 0 and parsed both by hand and with the generated protobuf class."""
    plaintext = AESGCM(hexval(key_name)).decrypt(
        gcm_nonce(0), split_frame(hexval(frame_name)), None
    )
    # Frame field 3 (finished, 66 bytes) holding Finished field 1 (signature, 64 bytes).
    assert plaintext[:4] == b"\x1a\x42\x0a\x40"
    assert len(plaintext) == 4 + 64
    frame = Frame.FromString(plaintext)
    assert frame.WhichOneof("body") == "finished"
    signature = frame.finished.signature
    assert signature == plaintext[4:]
    return signature


# --- the core's run -----------------------------------------------------------------------


def run_core() -> dict[str, bytes]:
    """Run a handshake and one message through two cores with the vector's inputs."""
    i_key = Secp256k1PrivateKey.from_secret(hexval("initiator_identity_secret"))
    r_key = Secp256k1PrivateKey.from_secret(hexval("responder_identity_secret"))
    initiator = BotdConnection(
        i_key,
        peer_key=r_key.public_key(),
        ephemeral_secret=hexval("initiator_ephemeral_secret"),
        new_id=iter([text("init_id")]).__next__,
    )
    responder = BotdConnection(
        r_key,
        ephemeral_secret=hexval("responder_ephemeral_secret"),
        new_id=iter([text("ack_id")]).__next__,
    )
    assert initiator.start(0.0) == []
    assert responder.start(0.0) == []
    init_frame = initiator.data_to_send()
    assert responder.receive_data(init_frame, 0.0) == []
    answer = responder.data_to_send()  # the Ack, then the responder's Finished record
    ack_length, pos = decode_uvarint(answer)
    ack_frame, responder_finished_frame = answer[: pos + ack_length], answer[pos + ack_length :]
    assert initiator.receive_data(ack_frame, 0.0) == []
    assert initiator.data_to_send() == b"", "the initiator waits for the responder's Finished"
    assert initiator.receive_data(responder_finished_frame, 0.0) == [
        HandshakeComplete(r_key.public_key())
    ]
    initiator_finished_frame = initiator.data_to_send()
    assert responder.receive_data(initiator_finished_frame, 0.0) == [
        HandshakeComplete(i_key.public_key())
    ]
    assert responder.data_to_send() == b""
    initiator.send(hexval("data_message"))
    data_frame = initiator.data_to_send()
    assert responder.receive_data(data_frame, 0.0) == [MessageReceived(hexval("data_message"))]

    assert initiator.transcript_hash is not None
    assert initiator.transcript_hash == responder.transcript_hash
    r_eph = Frame.FromString(split_frame(ack_frame)).ack.ephemeral_pubkey
    i_eph = Frame.FromString(split_frame(init_frame)).init.ephemeral_pubkey
    shared = EphemeralKey(hexval("initiator_ephemeral_secret")).ecdh(
        parse_pubkey(r_eph, "responder ephemeral")
    )
    keys = SessionKeys(shared, initiator.transcript_hash)
    return {
        "initiator_identity_pubkey": i_key.public_key().to_bytes(),
        "responder_identity_pubkey": r_key.public_key().to_bytes(),
        "initiator_ephemeral_pubkey": i_eph,
        "responder_ephemeral_pubkey": r_eph,
        "init_frame": init_frame,
        "ack_frame": ack_frame,
        "shared_secret": shared,
        "transcript_hash": initiator.transcript_hash,
        "ck_i2r": keys.ck_i2r,
        "k_i2r": keys.k_i2r,
        "ck_r2i": keys.ck_r2i,
        "k_r2i": keys.k_r2i,
        "responder_finished_frame": responder_finished_frame,
        "initiator_finished_frame": initiator_finished_frame,
        "data_frame": data_frame,
    }


COMPUTED = [
    "initiator_identity_pubkey",
    "responder_identity_pubkey",
    "initiator_ephemeral_pubkey",
    "responder_ephemeral_pubkey",
    "init_frame",
    "ack_frame",
    "shared_secret",
    "transcript_hash",
    "ck_i2r",
    "k_i2r",
    "ck_r2i",
    "k_r2i",
    "responder_finished_frame",
    "initiator_finished_frame",
    "data_frame",
]


def test_core_reproduces_every_vector_value() -> None:
    computed = run_core()
    assert sorted(computed) == sorted(COMPUTED)
    for name in COMPUTED:
        assert computed[name].hex() == text(name), name


def test_core_run_is_deterministic() -> None:
    """RFC 6979 signatures and pinned ephemerals and ids: two runs give identical bytes."""
    assert run_core() == run_core()


def test_description_explains_every_field() -> None:
    description = VECTOR["description"]
    assert isinstance(description, dict)
    fields = set(VECTOR) - {"description"}
    assert set(description) - {"_"} == fields
    assert all(isinstance(v, str) and v for v in description.values())


def test_hand_written_hkdf_matches_rfc5869_test_case_1() -> None:
    """The independent HKDF below is itself checked against RFC 5869 A.1."""
    okm = hkdf_sha256(
        bytes.fromhex("0b" * 22),
        bytes.fromhex("000102030405060708090a0b0c"),
        bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
        42,
    )
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


@pytest.mark.parametrize(
    ("secret", "pubkey"),
    [
        ("initiator_identity_secret", "initiator_identity_pubkey"),
        ("responder_identity_secret", "responder_identity_pubkey"),
        ("initiator_ephemeral_secret", "initiator_ephemeral_pubkey"),
        ("responder_ephemeral_secret", "responder_ephemeral_pubkey"),
    ],
)
def test_public_keys_independently(secret: str, pubkey: str) -> None:
    assert compressed_pubkey(hexval(secret)) == hexval(pubkey)


def test_init_frame_fields_and_signature_independently() -> None:
    init = Frame.FromString(split_frame(hexval("init_frame"))).init
    assert init.id == text("init_id")
    assert init.sender_pubkey == hexval("initiator_identity_pubkey")
    assert init.recipient_pubkey == hexval("responder_identity_pubkey")
    assert init.ephemeral_pubkey == hexval("initiator_ephemeral_pubkey")
    digest = hashlib.sha256(
        hexval("initiator_identity_pubkey")
        + hexval("responder_identity_pubkey")
        + hexval("initiator_ephemeral_pubkey")
    ).digest()
    verify_compact(hexval("initiator_identity_pubkey"), init.signature, digest)
    # The same signature must not verify under the other identity key.
    with pytest.raises(InvalidSignature):
        verify_compact(hexval("responder_identity_pubkey"), init.signature, digest)


def test_ack_frame_fields_and_signature_independently() -> None:
    ack = Frame.FromString(split_frame(hexval("ack_frame"))).ack
    assert ack.id == text("ack_id")
    assert ack.init_id == text("init_id")
    assert ack.ephemeral_pubkey == hexval("responder_ephemeral_pubkey")
    digest = hashlib.sha256(
        hexval("responder_identity_pubkey")
        + hexval("initiator_identity_pubkey")
        + hexval("responder_ephemeral_pubkey")
    ).digest()
    verify_compact(hexval("responder_identity_pubkey"), ack.signature, digest)
    with pytest.raises(InvalidSignature):
        verify_compact(hexval("initiator_identity_pubkey"), ack.signature, digest)


def test_ecdh_independently_from_both_sides() -> None:
    """sha256 of the compressed shared point, computed with coincurve point arithmetic."""
    i_view = coincurve.PublicKey(hexval("responder_ephemeral_pubkey")).multiply(
        hexval("initiator_ephemeral_secret")
    )
    r_view = coincurve.PublicKey(hexval("initiator_ephemeral_pubkey")).multiply(
        hexval("responder_ephemeral_secret")
    )
    point = i_view.format(compressed=True)
    assert point == r_view.format(compressed=True)
    assert hashlib.sha256(point).digest() == hexval("shared_secret")


def test_transcript_hash_independently() -> None:
    init_payload = split_frame(hexval("init_frame"))
    ack_payload = split_frame(hexval("ack_frame"))
    assert len(init_payload) > 127  # the two-byte length prefix is exercised
    expected = hashlib.sha256(
        b"BOTD2/1 transcript"
        + uvarint(len(init_payload))
        + init_payload
        + uvarint(len(ack_payload))
        + ack_payload
    ).digest()
    assert expected == hexval("transcript_hash")


def test_session_keys_independently() -> None:
    okm = hkdf_sha256(
        hexval("shared_secret"), hexval("transcript_hash"), b"BOTD2/1 session keys", 128
    )
    assert okm[0:32] == hexval("ck_i2r")
    assert okm[32:64] == hexval("k_i2r")
    assert okm[64:96] == hexval("ck_r2i")
    assert okm[96:128] == hexval("k_r2i")


@pytest.mark.parametrize(
    ("role", "name", "signer", "other"),
    [
        (b"responder", "responder_finished", "responder_identity", "initiator_identity"),
        (b"initiator", "initiator_finished", "initiator_identity", "responder_identity"),
    ],
)
def test_finished_digests_and_signatures_independently(
    role: bytes, name: str, signer: str, other: str
) -> None:
    digest = finished_digest(role)
    assert digest == hexval(f"{name}_digest")
    signature = hexval(f"{name}_signature")
    verify_compact(hexval(f"{signer}_pubkey"), signature, digest)
    # Bound to the signer's key, to its role, and to this transcript.
    with pytest.raises(InvalidSignature):
        verify_compact(hexval(f"{other}_pubkey"), signature, digest)
    other_role = b"initiator" if role == b"responder" else b"responder"
    with pytest.raises(InvalidSignature):
        verify_compact(hexval(f"{signer}_pubkey"), signature, finished_digest(other_role))
    with pytest.raises(InvalidSignature):
        verify_compact(
            hexval(f"{signer}_pubkey"),
            signature,
            hashlib.sha256(b"BOTD2/1 finished " + role + bytes(32)).digest(),
        )


def test_every_signature_is_low_s() -> None:
    """Docs 4.1: compact r || s with s in the lower half of the group order."""
    signatures = [
        Frame.FromString(split_frame(hexval("init_frame"))).init.signature,
        Frame.FromString(split_frame(hexval("ack_frame"))).ack.signature,
        hexval("responder_finished_signature"),
        hexval("initiator_finished_signature"),
    ]
    for signature in signatures:
        assert len(signature) == 64
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        assert 0 < r < SECP256K1_ORDER
        assert 0 < s <= SECP256K1_ORDER // 2


def test_responder_finished_record_independently() -> None:
    """The responder's first record: k_r2i, counter 0, carrying its signature over the
    responder-role digest, which verifies under its identity key."""
    signature = open_finished("responder_finished_frame", "k_r2i")
    assert signature == hexval("responder_finished_signature")
    verify_compact(hexval("responder_identity_pubkey"), signature, finished_digest(b"responder"))


def test_initiator_finished_record_independently() -> None:
    """The initiator's first record: k_i2r, counter 0, carrying its signature over the
    initiator-role digest, which verifies under its identity key."""
    signature = open_finished("initiator_finished_frame", "k_i2r")
    assert signature == hexval("initiator_finished_signature")
    verify_compact(hexval("initiator_identity_pubkey"), signature, finished_digest(b"initiator"))


def test_data_record_is_the_initiators_second_record() -> None:
    """After its Finished (counter 0), the initiator's message goes at counter 1."""
    aead = AESGCM(hexval("k_i2r"))
    record = split_frame(hexval("data_frame"))
    data = aead.decrypt(gcm_nonce(1), record, None)
    message = hexval("data_message")
    assert data == b"\x32" + uvarint(len(message)) + message  # Frame field 6 (data)
    with pytest.raises(InvalidTag):
        aead.decrypt(gcm_nonce(0), record, None)


@pytest.mark.parametrize(
    ("frame_name", "key_name", "wrong_key_name"),
    [
        ("responder_finished_frame", "k_r2i", "k_i2r"),
        ("initiator_finished_frame", "k_i2r", "k_r2i"),
    ],
)
def test_finished_records_are_bound_to_direction_key_and_counter(
    frame_name: str, key_name: str, wrong_key_name: str
) -> None:
    """Each Finished opens only under its own direction's key at counter 0: not under
    the other direction's key, not at the next counter."""
    record = split_frame(hexval(frame_name))
    assert AESGCM(hexval(key_name)).decrypt(gcm_nonce(0), record, None)
    with pytest.raises(InvalidTag):
        AESGCM(hexval(wrong_key_name)).decrypt(gcm_nonce(0), record, None)
    with pytest.raises(InvalidTag):
        AESGCM(hexval(key_name)).decrypt(gcm_nonce(1), record, None)
