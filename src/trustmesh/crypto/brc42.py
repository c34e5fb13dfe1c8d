"""BRC-42 key derivation on secp256k1, with coincurve.

Two parties with root keys ``a`` (public ``A``) and ``b`` (public ``B``) share the point
``a·B = b·A``. For an invoice number (any UTF-8 text) each derives

- ``h = HMAC-SHA256(key = compressed(a·B), msg = utf8(invoice))``;
- its own child private key ``(a + h) mod n``;
- the other's child public key ``B + h·G``, which is the public half of the other's
  child private key for the same invoice.

BRC-2 symmetric keys are the x-coordinate of ``child_priv(own) · child_pub(other)``.
This module is the arithmetic only; invoice numbers and counterparties live in
:mod:`trustmesh.brc103.wallet`.
"""

from __future__ import annotations

import hashlib
import hmac

import coincurve
from coincurve.context import GLOBAL_CONTEXT

from trustmesh.errors import InvalidKeyError

CURVE_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
# The public key of private key 1, the generator G: BRC-42's "anyone" counterparty.
ANYONE_PUBLIC_KEY = bytes.fromhex(
    "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
)


def parse_public_key(data: bytes) -> coincurve.PublicKey:
    """A compressed (33-byte) secp256k1 point, or :class:`InvalidKeyError`."""
    if len(data) != 33 or data[0] not in (2, 3):
        raise InvalidKeyError(
            f"a secp256k1 public key must be 33 compressed bytes, not {len(data)}"
        )
    try:
        return coincurve.PublicKey(data)
    except ValueError:
        raise InvalidKeyError("the bytes are not a point on secp256k1") from None


def shared_point(secret: int, public: coincurve.PublicKey) -> bytes:
    """``secret · public``, compressed: BRC-42's HMAC key."""
    return bytes(public.multiply(secret.to_bytes(32, "big")).format(compressed=True))


def invoice_scalar(shared: bytes, invoice: bytes) -> int:
    """``h = HMAC-SHA256(shared, invoice)`` as an integer (not reduced)."""
    return int.from_bytes(hmac.digest(shared, invoice, hashlib.sha256), "big")


def child_secret(secret: int, h: int) -> int:
    """The child private key ``(secret + h) mod n``."""
    child = (secret + h) % CURVE_ORDER
    if child == 0:  # probability 2**-256; a key of zero does not exist
        raise InvalidKeyError("the derived private key is zero")
    return child


def child_public(public: coincurve.PublicKey, h: int) -> coincurve.PublicKey:
    """The child public key ``public + h·G``."""
    tweak = h % CURVE_ORDER
    if tweak == 0:
        return public
    try:
        return public.add(tweak.to_bytes(32, "big"))
    except ValueError:  # the sum is the point at infinity: as unlikely as a zero key
        raise InvalidKeyError("the derived public key is the point at infinity") from None


def x_coordinate(secret: int, public: coincurve.PublicKey) -> bytes:
    """The 32-byte big-endian x-coordinate of ``secret · public``."""
    return bytes(public.multiply(secret.to_bytes(32, "big")).format(compressed=True)[1:])


def sign_digest(secret: int, digest: bytes) -> bytes:
    """DER ECDSA (RFC 6979, low-S) of a 32-byte digest with a derived key.

    ``coincurve.PrivateKey(secret)`` computes two public keys it would not use here
    (a third of a handshake's curve work), so the key object is built bare: signing
    reads only ``secret`` and ``context``."""
    key = coincurve.PrivateKey.__new__(coincurve.PrivateKey)
    key.secret = secret.to_bytes(32, "big")
    key.context = GLOBAL_CONTEXT
    return bytes(key.sign(digest, hasher=None))
