"""Session nonces that only their creator can make: ``base64(R || HMAC(R))``.

``R`` is 16 random bytes; the HMAC is the wallet's, protocol ``[2, "server hmac"]``,
counterparty ``self`` and key ID ``R`` decoded as UTF-8 with U+FFFD for invalid bytes
(the reference's ``TextDecoder``). The result is 48 bytes, 64 base64 characters with no
padding, which the initialResponse signature needs (reference notes b.2). Counterparty
``self`` matters: with ``anyone`` the key would follow from the public key alone.
"""

from __future__ import annotations

import os

from trustmesh.brc103.encoding import b64decode, b64encode
from trustmesh.brc103.errors import NonceError
from trustmesh.brc103.wallet import SELF, Wallet

NONCE_PROTOCOL = (2, "server hmac")
RANDOM_SIZE = 16
NONCE_SIZE = 48


def _key_id(random_part: bytes) -> str:
    return random_part.decode("utf-8", "replace")


def create_nonce(wallet: Wallet, *, random_part: bytes | None = None) -> str:
    """A fresh session nonce; ``random_part`` pins ``R`` for test vectors."""
    if random_part is None:
        random_part = os.urandom(RANDOM_SIZE)
    elif len(random_part) != RANDOM_SIZE:
        raise ValueError(f"the random part is {RANDOM_SIZE} bytes")
    mac = wallet.create_hmac(random_part, NONCE_PROTOCOL, _key_id(random_part), SELF)
    return b64encode(random_part + mac)


def verify_nonce(wallet: Wallet, nonce: str) -> None:
    """Raise :class:`NonceError` unless ``wallet`` made ``nonce``."""
    raw = b64decode(nonce, "nonce", NonceError)
    if len(raw) != NONCE_SIZE:
        raise NonceError(f"nonce has {len(raw)} bytes, not {NONCE_SIZE}")
    random_part, mac = raw[:RANDOM_SIZE], raw[RANDOM_SIZE:]
    if not wallet.verify_hmac(random_part, mac, NONCE_PROTOCOL, _key_id(random_part), SELF):
        raise NonceError("HMAC is not valid")
