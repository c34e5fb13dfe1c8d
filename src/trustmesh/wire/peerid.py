"""libp2p peer IDs, exactly per libp2p/specs ``peer-ids/peer-ids.md``.

A public key is wrapped in the protobuf ``PublicKey { required KeyType Type = 1;
required bytes Data = 2; }``. Its canonical encoding is hashed with the identity
multihash when it is at most 42 bytes long, with sha2-256 otherwise. The text form is
base58btc of the multihash; a CIDv1 (``libp2p-key`` codec) in base32 or base58btc is
parsed too, as the spec requires. Only the canonical text of an ID is accepted.

The tiny protobuf is encoded and parsed by hand: a peer ID hashes the *canonical*
bytes, and a general protobuf parser would accept reordered, repeated or unknown
fields that map to a different ID for one key.
"""

from __future__ import annotations

import base64
import binascii
import functools
from enum import IntEnum

import base58

from trustmesh.errors import (
    DecodeError,
    NonCanonicalError,
    TrailingDataError,
    TruncatedError,
    UnsupportedError,
)
from trustmesh.wire.multihash import Multihash, MultihashCode
from trustmesh.wire.varint import decode_uvarint, encode_uvarint

MAX_INLINE_KEY = 42  # protobuf encodings up to this length are inlined (identity multihash)
MAX_PUBLIC_KEY_DATA = 4096  # bounds hostile input; a 16384-bit RSA key still fits
CIDV1 = 0x01
LIBP2P_KEY_CODEC = 0x72

_TAG_TYPE = 0x08  # field 1, wire type 0 (varint)
_TAG_DATA = 0x12  # field 2, wire type 2 (length-delimited)


class KeyType(IntEnum):
    """libp2p's key type numbers."""

    RSA = 0
    ED25519 = 1
    SECP256K1 = 2
    ECDSA = 3


def encode_public_key(key_type: KeyType, data: bytes) -> bytes:
    """The canonical protobuf encoding of ``PublicKey{Type, Data}``."""
    return (
        bytes((_TAG_TYPE,))
        + encode_uvarint(int(key_type))
        + bytes((_TAG_DATA,))
        + encode_uvarint(len(data))
        + data
    )


def decode_public_key(encoded: bytes | bytearray | memoryview) -> tuple[KeyType, bytes]:
    """Parse a canonically encoded ``PublicKey``; return ``(type, data)``."""
    if not encoded:
        raise TruncatedError("empty PublicKey", offset=0)
    if encoded[0] != _TAG_TYPE:
        raise DecodeError(
            f"PublicKey must start with field 1 (tag 0x08), got 0x{encoded[0]:02x}", offset=0
        )
    type_number, pos = decode_uvarint(encoded, 1)
    try:
        key_type = KeyType(type_number)
    except ValueError:
        raise UnsupportedError(f"unknown libp2p key type {type_number}", offset=1) from None
    if pos >= len(encoded):
        raise TruncatedError("PublicKey has no Data field", offset=pos)
    if encoded[pos] != _TAG_DATA:
        raise DecodeError(f"expected field 2 (tag 0x12), got 0x{encoded[pos]:02x}", offset=pos)
    size, pos = decode_uvarint(encoded, pos + 1)
    if size > MAX_PUBLIC_KEY_DATA:
        raise DecodeError(f"PublicKey Data of {size} bytes is too large", offset=pos)
    end = pos + size
    if end > len(encoded):
        raise TruncatedError(f"PublicKey Data needs {size} bytes", offset=pos)
    if end != len(encoded):
        raise TrailingDataError(f"{len(encoded) - end} bytes after PublicKey", offset=end)
    return key_type, bytes(encoded[pos:end])


@functools.total_ordering
class PeerId:
    """A libp2p peer ID: a multihash of a public key.

    Peer IDs order as big unsigned integers of their multihash bytes (PSEC uses this
    to decide which side of a negotiation leads).
    """

    __slots__ = ("_bytes", "_int")

    def __init__(self, multihash_bytes: bytes) -> None:
        mh = Multihash.decode(multihash_bytes)
        if mh.code is MultihashCode.IDENTITY:
            if len(mh.digest) > MAX_INLINE_KEY:
                raise DecodeError("identity peer ID inlines more than 42 bytes")
            decode_public_key(mh.digest)  # an inlined key must itself be well formed
        self._bytes = bytes(multihash_bytes)
        self._int = int.from_bytes(self._bytes, "big")

    @classmethod
    def from_public_key(cls, key_type: KeyType, data: bytes) -> PeerId:
        encoded = encode_public_key(key_type, data)
        if len(encoded) <= MAX_INLINE_KEY:
            return cls(Multihash.identity(encoded).encode())
        return cls(Multihash.sha2_256(encoded).encode())

    @classmethod
    def parse(cls, text: str) -> PeerId:
        """Parse the base58btc form (``Qm...``, ``1...``) or a CIDv1 form (``bafz...``)."""
        if not text or not text.isascii():
            raise DecodeError("peer ID text is empty or not ASCII")
        prefix = text[0]
        bare = prefix in "1Q"  # a bare base58btc multihash, else a CIDv1
        peer_id = cls(_b58decode(text) if bare else _cid_multihash(prefix, text[1:]))
        # One ID, one text: refuse padding, stray whitespace, mixed case, unused bits.
        if text != peer_id._text_like(prefix):
            raise NonCanonicalError("peer ID text is not in its canonical form")
        return peer_id

    def _text_like(self, prefix: str) -> str:
        """The canonical text of this ID in the encoding ``prefix`` selects."""
        if prefix in "1Q":
            return self.to_base58()
        if prefix == "z":
            return "z" + _b58encode(_cid_bytes(self._bytes))
        lower = self.to_cid()
        return lower if prefix == "b" else "B" + lower[1:].upper()

    def to_bytes(self) -> bytes:
        return self._bytes

    def to_base58(self) -> str:
        return _b58encode(self._bytes)

    def to_cid(self) -> str:
        """The CIDv1 text form, base32 lower-case without padding."""
        cid = _cid_bytes(self._bytes)
        return "b" + base64.b32encode(cid).decode("ascii").lower().rstrip("=")

    def public_key(self) -> tuple[KeyType, bytes] | None:
        """The inlined public key of an identity peer ID, else ``None``."""
        mh = Multihash.decode(self._bytes)
        return decode_public_key(mh.digest) if mh.code is MultihashCode.IDENTITY else None

    def __int__(self) -> int:
        return self._int

    def __str__(self) -> str:
        return self.to_base58()

    def __repr__(self) -> str:
        return f"PeerId({self.to_base58()!r})"

    def __hash__(self) -> int:
        return hash(self._bytes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PeerId) and self._bytes == other._bytes

    def __lt__(self, other: PeerId) -> bool:
        if not isinstance(other, PeerId):
            return NotImplemented
        return self._int < other._int


def _cid_bytes(multihash: bytes) -> bytes:
    return encode_uvarint(CIDV1) + encode_uvarint(LIBP2P_KEY_CODEC) + multihash


def _cid_multihash(prefix: str, body: str) -> bytes:
    """The multihash inside a CIDv1 ``libp2p-key`` text (multibase prefix removed)."""
    if prefix in "bB":  # base32 / base32upper multibase
        cid = _b32decode(body)
    elif prefix == "z":
        cid = _b58decode(body)
    else:
        raise UnsupportedError(f"peer ID text starts with unsupported prefix {prefix!r}")
    version, pos = decode_uvarint(cid)
    if version != CIDV1:
        raise UnsupportedError(f"CID version {version} is not 1")
    codec, pos = decode_uvarint(cid, pos)
    if codec != LIBP2P_KEY_CODEC:
        raise DecodeError(f"CID codec 0x{codec:x} is not libp2p-key (0x72)")
    return cid[pos:]


def _b58encode(data: bytes) -> str:
    return str(base58.b58encode(data).decode("ascii"))


def _b58decode(text: str) -> bytes:
    try:
        return bytes(base58.b58decode(text))
    except ValueError as exc:
        raise DecodeError(f"invalid base58btc: {exc}") from None


def _b32decode(text: str) -> bytes:
    padded = text.upper() + "=" * (-len(text) % 8)  # the canonical check refuses upper case
    try:
        return base64.b32decode(padded)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError(f"invalid base32: {exc}") from None
