"""BOTD #2 handshake cryptography: signed digests, the transcript, session keys, rekeying.

Every choice here is written down in docs/protocols/botd.md; change one only together
with that document and a new protocol label.
"""

from __future__ import annotations

import hashlib
import secrets
import struct

from coincurve._libsecp256k1 import ffi, lib
from coincurve.context import GLOBAL_CONTEXT
from coincurve.ecdsa import der_to_cdata, serialize_compact
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from trustmesh.crypto.aead import KEY_SIZE, hkdf_sha256
from trustmesh.crypto.keys import Secp256k1PrivateKey, Secp256k1PublicKey
from trustmesh.errors import AuthenticationError, InvalidKeyError, InvalidSignatureError
from trustmesh.keystore.signer import Signer
from trustmesh.wire.varint import encode_uvarint

_CTX = GLOBAL_CONTEXT.ctx
_COMPRESSED = lib.SECP256K1_EC_COMPRESSED
# Record nonces: 4 zero bytes, then the record counter as 64 bits big-endian.
_nonce = struct.Struct(">4xQ").pack

TRANSCRIPT_LABEL = b"BOTD2/1 transcript"
SESSION_INFO = b"BOTD2/1 session keys"
REKEY_INFO = b"BOTD2/1 rekey"
FINISHED_LABEL = b"BOTD2/1 finished "


def init_digest(sender: bytes, recipient: bytes, sender_ephemeral: bytes) -> bytes:
    """What an Init's signature covers: sha256(sender || recipient || sender ephemeral)."""
    return hashlib.sha256(sender + recipient + sender_ephemeral).digest()


def ack_digest(recipient: bytes, sender: bytes, recipient_ephemeral: bytes) -> bytes:
    """What an Ack's signature covers: sha256(recipient || sender || recipient ephemeral).

    "Recipient" is the side that received the Init, which signs the Ack."""
    return hashlib.sha256(recipient + sender + recipient_ephemeral).digest()


def finished_digest(transcript: bytes, *, initiator: bool) -> bytes:
    """What a Finished signature covers: the label, the signer's role, the transcript."""
    role = b"initiator" if initiator else b"responder"
    return hashlib.sha256(FINISHED_LABEL + role + transcript).digest()


def sign_compact(signer: Signer, digest: bytes) -> bytes:
    """A 64-byte compact (r || s, low-S) signature of ``digest`` by ``signer``."""
    if type(signer) is Secp256k1PrivateKey:  # a key in memory: no DER round trip
        return signer.sign_digest_compact(digest)
    der = signer.sign_digest(digest)
    return bytes(serialize_compact(der_to_cdata(der)))


def verify_compact(key: Secp256k1PublicKey, signature: bytes, digest: bytes, what: str) -> None:
    if len(signature) != 64:
        raise InvalidSignatureError(f"{what} signature must be 64 bytes, got {len(signature)}")
    parsed = ffi.new("secp256k1_ecdsa_signature *")
    if not lib.secp256k1_ecdsa_signature_parse_compact(_CTX, parsed, signature):
        raise InvalidSignatureError(f"{what} signature is not a valid compact signature")
    # Straight to libsecp256k1 (no DER round trip: this is on the handshake's hot path).
    # It refuses high-S signatures itself.
    if not lib.secp256k1_ecdsa_verify(_CTX, parsed, digest, key.coincurve.public_key):
        raise InvalidSignatureError(f"{what} signature does not verify")


def transcript_hash(init_payload: bytes, ack_payload: bytes) -> bytes:
    """SHA-256 over the label and both handshake payloads exactly as they crossed the wire."""
    return hashlib.sha256(
        b"".join(
            (
                TRANSCRIPT_LABEL,
                encode_uvarint(len(init_payload)),
                init_payload,
                encode_uvarint(len(ack_payload)),
                ack_payload,
            )
        )
    ).digest()


def parse_point(data: bytes, what: str) -> object:
    """A 33-byte compressed secp256k1 point, on the curve, as libsecp256k1's parsed
    ``secp256k1_pubkey`` (for ECDH: no key object around it)."""
    if len(data) != 33:
        raise InvalidKeyError(f"{what} must be 33 bytes (compressed), got {len(data)}")
    point = ffi.new("secp256k1_pubkey *")
    if not lib.secp256k1_ec_pubkey_parse(_CTX, point, data, 33):
        raise InvalidKeyError(f"{what}: invalid secp256k1 public key: not a point on the curve")
    return point


class EphemeralKey:
    """A one-connection secp256k1 key pair, made and used straight through libsecp256k1
    (``coincurve.PrivateKey`` would also derive a Schnorr key pair we never use)."""

    __slots__ = ("_secret", "public")

    def __init__(self, secret: bytes | None = None) -> None:
        point = ffi.new("secp256k1_pubkey *")
        while True:
            candidate = secret if secret is not None else secrets.token_bytes(32)
            # It refuses zero and scalars >= the group order (2**-128 odds for random bytes).
            if len(candidate) == 32 and lib.secp256k1_ec_pubkey_create(_CTX, point, candidate):
                break
            if secret is not None:
                raise InvalidKeyError("ephemeral secret is not a secp256k1 scalar")
        self._secret = candidate
        out = ffi.new("unsigned char [33]")
        size = ffi.new("size_t *", 33)
        lib.secp256k1_ec_pubkey_serialize(_CTX, out, size, point, _COMPRESSED)
        self.public: bytes = bytes(ffi.buffer(out, 33))

    def ecdh(self, peer: Secp256k1PublicKey | object) -> bytes:
        """SHA-256 of the compressed shared point: libsecp256k1's default ECDH hash, as
        BOLT #8. ``peer`` is a key, or a point from :func:`parse_point`."""
        point = peer.coincurve.public_key if isinstance(peer, Secp256k1PublicKey) else peer
        out = ffi.new("unsigned char [32]")
        if not lib.secp256k1_ecdh(_CTX, out, point, self._secret, ffi.NULL, ffi.NULL):
            raise InvalidKeyError("ECDH failed")  # pragma: no cover - valid inputs only
        return bytes(ffi.buffer(out, 32))


class SessionKeys:
    """The four 32-byte secrets the handshake yields: a chaining key and a record key
    for each direction."""

    __slots__ = ("ck_i2r", "ck_r2i", "k_i2r", "k_r2i")

    def __init__(self, shared_secret: bytes, transcript: bytes) -> None:
        okm = hkdf_sha256(shared_secret, salt=transcript, info=SESSION_INFO, length=4 * KEY_SIZE)
        self.ck_i2r, self.k_i2r = okm[0:32], okm[32:64]
        self.ck_r2i, self.k_r2i = okm[64:96], okm[96:128]

    def ciphers(
        self, *, initiator: bool, rekey_interval: int
    ) -> tuple[RekeyingSealer, RekeyingOpener]:
        if initiator:
            return (
                RekeyingSealer(self.ck_i2r, self.k_i2r, rekey_interval),
                RekeyingOpener(self.ck_r2i, self.k_r2i, rekey_interval),
            )
        return (
            RekeyingSealer(self.ck_r2i, self.k_r2i, rekey_interval),
            RekeyingOpener(self.ck_i2r, self.k_i2r, rekey_interval),
        )


def next_keys(chaining_key: bytes, key: bytes) -> tuple[bytes, bytes]:
    """BOLT #8's rotation with our label: ck', k' = HKDF(salt=ck, ikm=k)."""
    okm = hkdf_sha256(key, salt=chaining_key, info=REKEY_INFO, length=2 * KEY_SIZE)
    return okm[:KEY_SIZE], okm[KEY_SIZE:]


class _Rekeying:
    """One direction's chaining key and record key; after ``interval`` records it rotates
    both (BOLT #8 style) and the counter restarts, so no (key, nonce) pair repeats.

    The AES-GCM record layer of :mod:`trustmesh.crypto.aead` (same nonces: 4 zero bytes
    and a 64-bit big-endian counter), inlined: one call per record on the hot path."""

    __slots__ = ("_aead", "_ck", "_counter", "_interval", "_k", "rekeys")

    def __init__(self, chaining_key: bytes, key: bytes, interval: int) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"AES-256-GCM key must be {KEY_SIZE} bytes, got {len(key)}")
        self._ck, self._k, self._interval = chaining_key, key, interval
        self._aead = AESGCM(key)
        self._counter = 0
        self.rekeys = 0

    @property
    def sequence(self) -> int:
        """The counter of the next record under the current key."""
        return self._counter

    def _rotate(self) -> None:
        self._ck, self._k = next_keys(self._ck, self._k)
        self._aead = AESGCM(self._k)
        self._counter = 0
        self.rekeys += 1


class RekeyingSealer(_Rekeying):
    """Seals one direction's records."""

    __slots__ = ()

    def seal(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        """``ciphertext || tag`` of the next record."""
        counter = self._counter
        self._counter = counter + 1  # spent even if encryption fails: never reuse a nonce
        try:
            return self._aead.encrypt(_nonce(counter), plaintext, None)
        finally:
            if counter + 1 >= self._interval:
                self._rotate()


class RekeyingOpener(_Rekeying):
    """Opens one direction's records, rotating in step with the sender."""

    __slots__ = ()

    def open(self, record: bytes | bytearray | memoryview) -> bytes:
        """Authenticate and decrypt the next record. Raises :class:`AuthenticationError`
        for a forged, corrupted, reordered or replayed one; the counter then stays."""
        counter = self._counter
        try:  # a record shorter than the tag raises InvalidTag too
            plaintext = self._aead.decrypt(_nonce(counter), record, None)
        except InvalidTag:
            raise AuthenticationError(f"record {counter} failed authentication") from None
        if counter + 1 >= self._interval:
            self._rotate()
        else:
            self._counter = counter + 1
        return plaintext
