"""Multihash: ``uvarint(code) || uvarint(len(digest)) || digest``.

Only the two codes libp2p peer IDs use are supported: identity (0x00) and sha2-256 (0x12).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import IntEnum

from trustmesh.errors import DecodeError, TrailingDataError, TruncatedError, UnsupportedError
from trustmesh.wire.varint import decode_uvarint, encode_uvarint

MAX_IDENTITY_DIGEST = 1 << 16  # no sane identity multihash is larger; bounds hostile input


class MultihashCode(IntEnum):
    IDENTITY = 0x00
    SHA2_256 = 0x12


@dataclass(frozen=True, slots=True)
class Multihash:
    code: MultihashCode
    digest: bytes

    def encode(self) -> bytes:
        return encode_uvarint(self.code) + encode_uvarint(len(self.digest)) + self.digest

    @classmethod
    def identity(cls, data: bytes) -> Multihash:
        return cls(MultihashCode.IDENTITY, bytes(data))

    @classmethod
    def sha2_256(cls, data: bytes) -> Multihash:
        return cls(MultihashCode.SHA2_256, hashlib.sha256(data).digest())

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Multihash:
        """Decode a multihash that fills ``data`` exactly."""
        mh, end = cls.decode_prefix(data)
        if end != len(data):
            raise TrailingDataError(f"{len(data) - end} bytes after the multihash", offset=end)
        return mh

    @classmethod
    def decode_prefix(
        cls, data: bytes | bytearray | memoryview, offset: int = 0
    ) -> tuple[Multihash, int]:
        """Decode a multihash at ``offset``; return it and the offset after it."""
        code, pos = decode_uvarint(data, offset)
        try:
            kind = MultihashCode(code)
        except ValueError:
            raise UnsupportedError(
                f"unsupported multihash code 0x{code:x}", offset=offset
            ) from None
        size, pos = decode_uvarint(data, pos)
        if kind is MultihashCode.SHA2_256 and size != 32:
            raise DecodeError(f"sha2-256 multihash has a {size}-byte digest, not 32", offset=pos)
        if size > MAX_IDENTITY_DIGEST:
            raise DecodeError(f"identity multihash of {size} bytes is too large", offset=pos)
        end = pos + size
        if end > len(data):
            raise TruncatedError(f"multihash digest needs {size} bytes", offset=pos)
        return cls(kind, bytes(data[pos:end])), end
