"""BRC-2 symmetric encryption: AES-256-GCM with a 32-byte IV, ``IV || ciphertext || tag``.

The 32-byte IV (not GCM's usual 12) is the reference SDKs' choice; SP 800-38D derives
the pre-counter block from it with GHASH, which ``cryptography`` does for any IV length.
There is no associated data. Keys shorter than 32 bytes are left-padded with zeros,
because the reference writes keys in their minimal big-endian form (31 bytes in about one
case in 256).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from trustmesh.errors import AuthenticationError, DecodeError, InvalidKeyError

IV_SIZE = 32
TAG_SIZE = 16
KEY_SIZE = 32


def _cipher(key: bytes) -> AESGCM:
    if not 0 < len(key) <= KEY_SIZE:
        raise InvalidKeyError(f"a BRC-2 key has 1 to 32 bytes, not {len(key)}")
    return AESGCM(key.rjust(KEY_SIZE, b"\0"))


def encrypt(key: bytes, plaintext: bytes, *, iv: bytes | None = None) -> bytes:
    """Seal ``plaintext``; ``iv`` is for test vectors only (a fresh random one otherwise)."""
    if iv is None:
        iv = os.urandom(IV_SIZE)
    elif len(iv) != IV_SIZE:
        raise ValueError(f"the IV must be {IV_SIZE} bytes")
    return iv + _cipher(key).encrypt(iv, plaintext, None)


def decrypt(key: bytes, sealed: bytes) -> bytes:
    """Open ``IV || ciphertext || tag``; :class:`AuthenticationError` if it was altered."""
    if len(sealed) < IV_SIZE + TAG_SIZE:
        raise DecodeError(
            f"BRC-2 ciphertext of {len(sealed)} bytes is shorter than IV and tag "
            f"({IV_SIZE + TAG_SIZE})"
        )
    try:
        return _cipher(key).decrypt(sealed[:IV_SIZE], sealed[IV_SIZE:], None)
    except InvalidTag:
        raise AuthenticationError("BRC-2 ciphertext does not authenticate under this key") from None
