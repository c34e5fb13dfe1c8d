"""A BRC-100 "proto wallet": BRC-42/43 derived keys for signatures, HMACs and encryption.

Every operation names a protocol ID ``(security level, protocol name)``, a key ID and a
counterparty; together they give the invoice number ``"<level>-<name>-<keyID>"`` from
which BRC-42 derives the keys (:mod:`trustmesh.crypto.brc42`). The counterparty is a
public key, ``"self"`` (our own identity key) or ``"anyone"`` (the public key of private
key 1, so anyone can derive the same keys).

Names, defaults and byte layouts follow the TypeScript reference ``ProtoWallet``
(``@bsv/sdk`` 2.1.0) exactly, so that signatures, HMACs and ciphertexts interoperate;
``docs/protocols/brc103.md`` lists them. The wallet keeps the root private key in
memory: BRC-42 child keys are ``root + h``, which no PKCS#11 token or TPM computes.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections import OrderedDict
from typing import Final, Literal

import coincurve

from trustmesh.brc103.errors import InvalidProtocolIdError
from trustmesh.crypto import brc2, brc42
from trustmesh.crypto.keys import Secp256k1PrivateKey
from trustmesh.errors import InvalidKeyError, InvalidSignatureError

SELF: Final = "self"
ANYONE: Final = "anyone"
Counterparty = Literal["self", "anyone"] | str | bytes  # a public key as hex or 33 bytes
ProtocolId = tuple[int, str]

_NAME_CHARS = re.compile(r"[a-z0-9 ]+")
_LINKAGE_PREFIX = "specific linkage revelation "
_SHARED_CACHE = 4096  # counterparties whose ECDH point we keep


def invoice_number(protocol: ProtocolId, key_id: str) -> str:
    """``"<level>-<name>-<keyID>"`` after the reference's validation (BRC-43)."""
    prefix = _protocol_prefix(*protocol)
    # The reference counts JavaScript string length: UTF-16 code units.
    units = (
        len(key_id) if key_id.isascii() else len(key_id.encode("utf-16-le", "surrogatepass")) // 2
    )
    if units < 1:
        raise InvalidProtocolIdError("Key IDs must be 1 character or more")
    if units > 800:
        raise InvalidProtocolIdError("Key IDs must be 800 characters or less")
    return prefix + key_id


@functools.lru_cache(maxsize=256, typed=True)
def _protocol_prefix(level: int, raw_name: str) -> str:
    """``"<level>-<name>-"``, validated once per protocol ID (they are few)."""
    if isinstance(level, bool) or level not in (0, 1, 2):
        raise InvalidProtocolIdError("Protocol security level must be 0, 1, or 2")
    name = raw_name.lower().strip()
    limit = 430 if name.startswith(_LINKAGE_PREFIX) else 400
    if len(name) > limit:
        raise InvalidProtocolIdError(f"Protocol names must be {limit} characters or less")
    if len(name) < 5:
        raise InvalidProtocolIdError("Protocol names must be 5 characters or more")
    if "  " in name:
        raise InvalidProtocolIdError(
            'Protocol names cannot contain multiple consecutive spaces ("  ")'
        )
    if not _NAME_CHARS.fullmatch(name):
        raise InvalidProtocolIdError("Protocol names can only contain letters, numbers and spaces")
    if name.endswith(" protocol"):
        raise InvalidProtocolIdError('No need to end your protocol name with " protocol"')
    return f"{level}-{name}-"


def minimal_bytes(value: bytes) -> bytes:
    """A big-endian number without its leading zero bytes, as the reference writes keys."""
    return value.lstrip(b"\0") or b"\0"


class Wallet:
    """BRC-42 derivations from one secp256k1 root key."""

    __slots__ = ("_public", "_public_bytes", "_secret", "_shared", "identity_key")

    def __init__(self, key: Secp256k1PrivateKey | bytes) -> None:
        secret = key.secret() if isinstance(key, Secp256k1PrivateKey) else key
        if len(secret) != 32:
            raise InvalidKeyError("a secp256k1 private key is 32 bytes")
        value = int.from_bytes(secret, "big")
        if not 0 < value < brc42.CURVE_ORDER:
            raise InvalidKeyError("the private key is outside 1..n-1")
        self._secret = value
        self._public = coincurve.PublicKey.from_secret(secret)
        self._public_bytes: bytes = self._public.format(compressed=True)
        self.identity_key: str = self._public_bytes.hex()
        self._shared: OrderedDict[bytes, tuple[coincurve.PublicKey, bytes]] = OrderedDict()

    @classmethod
    def generate(cls) -> Wallet:
        return cls(coincurve.PrivateKey().secret)

    @classmethod
    def from_hex(cls, secret_hex: str) -> Wallet:
        try:
            return cls(bytes.fromhex(secret_hex))
        except ValueError:
            raise InvalidKeyError("a private key in hex has 64 hex digits") from None

    @property
    def public_key(self) -> bytes:
        """The identity key, 33 compressed bytes."""
        return self._public_bytes

    def secret_bytes(self) -> bytes:
        return self._secret.to_bytes(32, "big")

    # --- derivation -------------------------------------------------------------------

    def _counterparty(self, counterparty: Counterparty) -> tuple[coincurve.PublicKey, bytes]:
        """The counterparty's root public key and our shared point with it (cached)."""
        if counterparty == SELF:
            key = self._public_bytes
        elif counterparty == ANYONE:
            key = brc42.ANYONE_PUBLIC_KEY
        elif isinstance(counterparty, bytes):
            key = counterparty
        else:
            try:
                key = bytes.fromhex(counterparty)
            except ValueError:
                raise InvalidKeyError(f"counterparty {counterparty[:70]!r} is not hex") from None
        cached = self._shared.get(key)
        if cached is not None:
            self._shared.move_to_end(key)
            return cached
        public = brc42.parse_public_key(key)
        entry = (public, brc42.shared_point(self._secret, public))
        self._shared[key] = entry
        if len(self._shared) > _SHARED_CACHE:
            self._shared.popitem(last=False)
        return entry

    def _derive(
        self, protocol: ProtocolId, key_id: str, counterparty: Counterparty
    ) -> tuple[int, coincurve.PublicKey]:
        public, shared = self._counterparty(counterparty)
        text = invoice_number(protocol, key_id)
        if not text.isascii():  # lone surrogates become U+FFFD, as JavaScript's UTF-8 does
            text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        invoice = text.encode("utf-8")
        return brc42.invoice_scalar(shared, invoice), public

    def derive_private_key(
        self, protocol: ProtocolId, key_id: str, counterparty: Counterparty
    ) -> bytes:
        h, _ = self._derive(protocol, key_id, counterparty)
        return brc42.child_secret(self._secret, h).to_bytes(32, "big")

    def derive_public_key(
        self,
        protocol: ProtocolId,
        key_id: str,
        counterparty: Counterparty,
        *,
        for_self: bool = False,
    ) -> bytes:
        """Our child public key (``for_self``) or the counterparty's, for this invoice."""
        h, public = self._derive(protocol, key_id, counterparty)
        if for_self:
            child = coincurve.PublicKey.from_secret(
                brc42.child_secret(self._secret, h).to_bytes(32, "big")
            )
        else:
            child = brc42.child_public(public, h)
        return bytes(child.format(compressed=True))

    def symmetric_key(self, protocol: ProtocolId, key_id: str, counterparty: Counterparty) -> bytes:
        """BRC-2: the x-coordinate of our child private key times their child public key."""
        h, public = self._derive(protocol, key_id, counterparty)
        own = brc42.child_secret(self._secret, h)
        if counterparty == SELF:
            # Their child key is ours: (a+h)·(a+h)·G costs one fixed-base multiplication.
            square = own * own % brc42.CURVE_ORDER
            point = coincurve.PublicKey.from_secret(square.to_bytes(32, "big"))
            return bytes(point.format(compressed=True)[1:])
        return brc42.x_coordinate(own, brc42.child_public(public, h))

    # --- signatures -------------------------------------------------------------------

    def create_signature(
        self,
        data: bytes,
        protocol: ProtocolId,
        key_id: str,
        counterparty: Counterparty = ANYONE,
    ) -> bytes:
        """DER ECDSA over SHA-256(data), RFC 6979 nonce, low-S, with the child key."""
        h, _ = self._derive(protocol, key_id, counterparty)
        child = brc42.child_secret(self._secret, h)
        return brc42.sign_digest(child, hashlib.sha256(data).digest())

    def verify_signature(
        self,
        data: bytes,
        signature: bytes,
        protocol: ProtocolId,
        key_id: str,
        counterparty: Counterparty = SELF,
    ) -> None:
        """Raise :class:`InvalidSignatureError` unless the counterparty's child key signed.

        High-S signatures are refused (libsecp256k1), which no reference emits."""
        h, public = self._derive(protocol, key_id, counterparty)
        child = brc42.child_public(public, h)
        try:
            ok = child.verify(signature, hashlib.sha256(data).digest(), hasher=None)
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise InvalidSignatureError("Signature is not valid")

    # --- HMAC -------------------------------------------------------------------------

    def create_hmac(
        self,
        data: bytes,
        protocol: ProtocolId,
        key_id: str,
        counterparty: Counterparty = SELF,
    ) -> bytes:
        """HMAC-SHA256 keyed with the symmetric key in minimal form, as the reference does."""
        key = minimal_bytes(self.symmetric_key(protocol, key_id, counterparty))
        return hmac.digest(key, data, hashlib.sha256)

    def verify_hmac(
        self,
        data: bytes,
        mac: bytes,
        protocol: ProtocolId,
        key_id: str,
        counterparty: Counterparty = SELF,
    ) -> bool:
        return hmac.compare_digest(self.create_hmac(data, protocol, key_id, counterparty), mac)

    # --- encryption -------------------------------------------------------------------

    def encrypt(
        self,
        plaintext: bytes,
        protocol: ProtocolId,
        key_id: str,
        counterparty: Counterparty = SELF,
        *,
        iv: bytes | None = None,
    ) -> bytes:
        return brc2.encrypt(self.symmetric_key(protocol, key_id, counterparty), plaintext, iv=iv)

    def decrypt(
        self,
        sealed: bytes,
        protocol: ProtocolId,
        key_id: str,
        counterparty: Counterparty = SELF,
    ) -> bytes:
        return brc2.decrypt(self.symmetric_key(protocol, key_id, counterparty), sealed)
