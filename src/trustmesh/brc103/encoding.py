"""Small codecs the BRC-103 and BRC-104 wire formats share.

- Bitcoin CompactSize varints (``fd``/``fe``/``ff`` prefixes, little-endian), with the
  reference's "-1" (``ff`` and eight ``ff`` bytes) for an absent value.
- ``JSON.stringify``-identical text, which the signatures over ``requestedCertificates``
  and ``certificates`` cover (reference notes b.2).
- Strict base64 and key text.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any

from trustmesh.errors import DecodeError, ProtocolError, TruncatedError
from trustmesh.wire.jsonwire import compact_json

MINUS_ONE = b"\xff" * 9
_U64 = (1 << 64) - 1
_HEX_KEY = re.compile(r"0[23][0-9a-f]{64}")
_INDEX_KEY = re.compile(r"0|[1-9][0-9]{0,9}")


def write_varint(value: int) -> bytes:
    """CompactSize; ``-1`` is the reference's nine ``ff`` bytes."""
    if value == -1:
        return MINUS_ONE
    if value < 0 or value > _U64:
        raise ValueError(f"{value} does not fit a CompactSize varint")
    if value < 0xFD:
        return bytes((value,))
    if value <= 0xFFFF:
        return b"\xfd" + value.to_bytes(2, "little")
    if value <= 0xFFFFFFFF:
        return b"\xfe" + value.to_bytes(4, "little")
    return b"\xff" + value.to_bytes(8, "little")


def read_varint(data: bytes, offset: int) -> tuple[int, int]:
    """One CompactSize at ``offset``: ``(value, next offset)``; ``-1`` for nine ``ff``.

    Non-minimal encodings are accepted, as the references accept them."""
    if offset >= len(data):
        raise TruncatedError("varint expected", offset=offset)
    first = data[offset]
    if first < 0xFD:
        return first, offset + 1
    size = {0xFD: 2, 0xFE: 4, 0xFF: 8}[first]
    end = offset + 1 + size
    if end > len(data):
        raise TruncatedError("varint cut short", offset=offset)
    value = int.from_bytes(data[offset + 1 : end], "little")
    if size == 8 and value == _U64:
        return -1, end
    return value, end


def read_bytes(data: bytes, offset: int, size: int, what: str) -> tuple[bytes, int]:
    end = offset + size
    if size < 0 or end > len(data):
        raise TruncatedError(
            f"{what}: {size} bytes needed, {len(data) - offset} left", offset=offset
        )
    return data[offset:end], end


def js_stringify(value: Any) -> bytes:
    """The UTF-8 of JavaScript's ``JSON.stringify(value)`` for strings, lists and objects.

    Objects keep their key order, except that JavaScript puts array-index keys (``"0"``,
    ``"17"``) first in numeric order. Numbers other than small integers are not needed
    (and are refused by the message parser before this is called)."""
    return compact_json(_js_order(value))


def _js_order(value: Any) -> Any:
    if isinstance(value, dict):
        keys = list(value)
        index = sorted(
            (k for k in keys if _INDEX_KEY.fullmatch(k) and int(k) < 0xFFFFFFFF), key=int
        )
        if index:
            first = set(index)
            keys = index + [k for k in keys if k not in first]
        return {k: _js_order(value[k]) for k in keys}
    if isinstance(value, list):
        return [_js_order(item) for item in value]
    return value


def b64decode(text: str, what: str, error: Callable[[str], ProtocolError] = DecodeError) -> bytes:
    """Standard base64 with padding; anything else is ``error``."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise error(f"{what} is not base64") from None


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def is_public_key_hex(text: object) -> bool:
    """A compressed secp256k1 key as 66 lowercase hex digits (the point is checked on use)."""
    return isinstance(text, str) and _HEX_KEY.fullmatch(text) is not None
