"""BOTD #2 handshake cryptography: signed digests, the transcript, session keys, rekeying.

Every choice here is written down in docs/protocols/botd.md; change one only together
with that document and a new protocol label.
"""

from __future__ import annotations

import hashlib
import secrets

import coincurve
from coincurve._libsecp256k1 import lib
from coincurve.context import GLOBAL_CONTEXT
from coincurve.ecdsa import der_to_cdata, deserialize_compact, serialize_compact

from trustmesh.crypto.aead import KEY_SIZE, RecordOpener, RecordSealer, hkdf_sha256
from trustmesh.crypto.keys import Secp256k1PublicKey
from trustmesh.errors import InvalidKeyError, InvalidSignatureError
from trustmesh.keystore.signer import Signer
from trustmesh.wire.varint import encode_uvarint

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
    der = signer.sign_digest(digest)
    return bytes(serialize_compact(der_to_cdata(der)))


def verify_compact(key: Secp256k1PublicKey, signature: bytes, digest: bytes, what: str) -> None:
    if len(signature) != 64:
        raise InvalidSignatureError(f"{what} signature must be 64 bytes, got {len(signature)}")
    try:
        parsed = deserialize_compact(signature)
    except ValueError:
        raise InvalidSignatureError(f"{what} signature is not a valid compact signature") from None
    # Straight to libsecp256k1 (no DER round trip: this is on the handshake's hot path).
    # It refuses high-S signatures itself.
    if not lib.secp256k1_ecdsa_verify(GLOBAL_CONTEXT.ctx, parsed, digest, key.coincurve.public_key):
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


class EphemeralKey:
    """A one-connection secp256k1 key pair. (Lighter than ``coincurve.PrivateKey``,
    which also derives a Schnorr key pair we never use.)"""

    __slots__ = ("_secret", "public")

    def __init__(self, secret: bytes | None = None) -> None:
        while True:
            candidate = secret if secret is not None else secrets.token_bytes(32)
            try:
                point = coincurve.PublicKey.from_secret(candidate)
                break
            except ValueError:  # zero or >= the group order: 2**-128 odds for random bytes
                if secret is not None:
                    raise InvalidKeyError("ephemeral secret is not a secp256k1 scalar") from None
        self._secret = candidate
        self.public: bytes = point.format(compressed=True)

    def ecdh(self, peer: Secp256k1PublicKey) -> bytes:
        """SHA-256 of the compressed shared point (libsecp256k1's default, as BOLT #8)."""
        shared = peer.coincurve.multiply(self._secret)
        return hashlib.sha256(shared.format(compressed=True)).digest()


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
    both (BOLT #8 style) and the counter restarts, so no (key, nonce) pair repeats."""

    __slots__ = ("_ck", "_interval", "_k", "rekeys")

    def __init__(self, chaining_key: bytes, key: bytes, interval: int) -> None:
        self._ck, self._k, self._interval = chaining_key, key, interval
        self.rekeys = 0

    def _rotate(self) -> bytes:
        self._ck, self._k = next_keys(self._ck, self._k)
        self.rekeys += 1
        return self._k


class RekeyingSealer(_Rekeying):
    """Seals one direction's records."""

    __slots__ = ("_sealer",)

    def __init__(self, chaining_key: bytes, key: bytes, interval: int) -> None:
        super().__init__(chaining_key, key, interval)
        self._sealer = RecordSealer(key, max_records=interval)

    def seal(self, plaintext: bytes) -> bytes:
        record = self._sealer.seal(plaintext)
        if not self._sealer.remaining:
            self._sealer = RecordSealer(self._rotate(), max_records=self._interval)
        return record


class RekeyingOpener(_Rekeying):
    """Opens one direction's records, rotating in step with the sender."""

    __slots__ = ("_opener",)

    def __init__(self, chaining_key: bytes, key: bytes, interval: int) -> None:
        super().__init__(chaining_key, key, interval)
        self._opener = RecordOpener(key, max_records=interval)

    def open(self, record: bytes) -> bytes:
        plaintext = self._opener.open(record)
        if not self._opener.remaining:
            self._opener = RecordOpener(self._rotate(), max_records=self._interval)
        return plaintext
