"""AEAD record layer: AES-256-GCM with counter nonces, and HKDF-SHA256 for directional keys.

Nonce layout (96 bits): a 4-byte fixed prefix (zero unless a protocol sets one) followed
by a 64-bit big-endian record counter. The counter starts at 0, increases by one per
record and never wraps: after ``max_records`` records (default 2**24) the sealer refuses
to go on and the protocol must rekey. Each direction has its own key, so the two sides
never share
a (key, nonce) pair. The ``AESGCM`` object is built once per key.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from hmac import digest as _hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from trustmesh.errors import AuthenticationError, NonceExhaustedError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
NONCE_PREFIX_SIZE = 4
MAX_RECORDS = 1 << 64  # counter values 0 .. 2**64 - 1: the nonce space
# The default per-key limit follows RFC 8446 section 5.5: about 2**24.5 full-size
# (16 KiB) records keep AES-GCM's safety margin. Protocols rekey before it.
DEFAULT_MAX_RECORDS = 1 << 24
_pack_nonce = struct.Struct(">IQ").pack  # 4-byte prefix, 8-byte counter
_HASH_LEN = 32
_BLOCK_LEN = 64  # SHA-256's block: HMAC pads its key to it (RFC 2104)
_IPAD = bytes(byte ^ 0x36 for byte in range(256))  # translate() tables: key XOR ipad, opad
_OPAD = bytes(byte ^ 0x5C for byte in range(256))
_COUNTER = [bytes((i,)) for i in range(256)]


def hkdf_sha256(secret: bytes, *, salt: bytes | None, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF with SHA-256.

    Written out over the stdlib's hashing (a few lines of RFC 5869, section 2, and of
    RFC 2104): it runs on every handshake, where building ``cryptography``'s ``HKDF``
    object cost more than the hashing. The expand step keys HMAC once: its inner and
    outer SHA-256 states are made from the PRK (32 bytes, under SHA-256's 64-byte block)
    and copied for each block. tests/crypto/test_aead.py checks it against that ``HKDF``
    and the RFC's vectors."""
    if not 0 < length <= 255 * _HASH_LEN:
        raise ValueError(f"HKDF-SHA256 output must be 1 .. {255 * _HASH_LEN} bytes")
    prk = _hmac(salt or bytes(_HASH_LEN), secret, "sha256").ljust(_BLOCK_LEN, b"\0")
    inner, outer = hashlib.sha256(prk.translate(_IPAD)), hashlib.sha256(prk.translate(_OPAD))
    block = b""
    blocks = []
    for counter in range(1, -(-length // _HASH_LEN) + 1):
        step = inner.copy()
        step.update(block + info + _COUNTER[counter])
        mac = outer.copy()
        mac.update(step.digest())
        block = mac.digest()
        blocks.append(block)
    return b"".join(blocks)[:length]


@dataclass(frozen=True, slots=True)
class DirectionalKeys:
    """One key per direction: initiator to responder, and responder to initiator."""

    initiator_to_responder: bytes
    responder_to_initiator: bytes

    @classmethod
    def derive(cls, secret: bytes, *, salt: bytes | None, info: bytes) -> DirectionalKeys:
        okm = hkdf_sha256(secret, salt=salt, info=info, length=2 * KEY_SIZE)
        return cls(okm[:KEY_SIZE], okm[KEY_SIZE:])

    def records(self, *, initiator: bool) -> tuple[RecordSealer, RecordOpener]:
        """The ``(sealer, opener)`` pair for one side of the connection."""
        if initiator:
            return RecordSealer(self.initiator_to_responder), RecordOpener(
                self.responder_to_initiator
            )
        return RecordSealer(self.responder_to_initiator), RecordOpener(self.initiator_to_responder)


class _CounterNonces:
    __slots__ = ("_aead", "_counter", "_limit", "_prefix")

    # The hot paths (seal/open) inline the counter handling: at 1 KiB records a method
    # call per record is a measurable share of the cost.

    def __init__(self, key: bytes, nonce_prefix: bytes, max_records: int) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"AES-256-GCM key must be {KEY_SIZE} bytes, got {len(key)}")
        if len(nonce_prefix) != NONCE_PREFIX_SIZE:
            raise ValueError(f"nonce prefix must be {NONCE_PREFIX_SIZE} bytes")
        if not 0 < max_records <= MAX_RECORDS:
            raise ValueError("max_records must be in 1 .. 2**64")
        self._aead = AESGCM(key)
        self._prefix = int.from_bytes(nonce_prefix, "big")
        self._counter = 0
        self._limit = max_records

    @property
    def sequence(self) -> int:
        """The counter of the next record."""
        return self._counter

    @property
    def remaining(self) -> int:
        """Records left before this key is exhausted."""
        return self._limit - self._counter

    def _exhausted(self) -> NonceExhaustedError:
        return NonceExhaustedError(f"key has used all {self._limit} nonces; rekey")


class RecordSealer(_CounterNonces):
    """Encrypts records in one direction."""

    __slots__ = ()

    def __init__(
        self, key: bytes, *, nonce_prefix: bytes = bytes(4), max_records: int = DEFAULT_MAX_RECORDS
    ) -> None:
        super().__init__(key, nonce_prefix, max_records)

    def seal(self, plaintext: bytes, aad: bytes | None = None) -> bytes:
        """Return ``ciphertext || tag`` for the next record."""
        counter = self._counter
        if counter >= self._limit:
            raise self._exhausted()
        self._counter = counter + 1  # spent even if encryption fails: never reuse a nonce
        return self._aead.encrypt(_pack_nonce(self._prefix, counter), plaintext, aad)


class RecordOpener(_CounterNonces):
    """Decrypts records in one direction, in order; each record opens at most once."""

    __slots__ = ()

    def __init__(
        self, key: bytes, *, nonce_prefix: bytes = bytes(4), max_records: int = DEFAULT_MAX_RECORDS
    ) -> None:
        super().__init__(key, nonce_prefix, max_records)

    def open(self, record: bytes, aad: bytes | None = None) -> bytes:
        """Authenticate and decrypt the next record.

        Raises :class:`AuthenticationError` for a forged, corrupted, reordered or replayed
        record; the counter then stays where it was.
        """
        counter = self._counter
        if counter >= self._limit:
            raise self._exhausted()
        try:  # a record shorter than the tag raises InvalidTag too
            plaintext = self._aead.decrypt(_pack_nonce(self._prefix, counter), record, aad)
        except InvalidTag:
            raise AuthenticationError(f"record {counter} failed authentication") from None
        self._counter = counter + 1
        return plaintext
