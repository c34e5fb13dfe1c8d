"""Unsigned varints exactly as multiformats defines them.

LEB128, least significant group first, at most 9 bytes (so at most 2**63 - 1), and
only the minimal encoding is accepted: a trailing zero group is refused, because two
encodings of one value would let two different byte strings mean the same thing.
"""

from __future__ import annotations

from trustmesh.errors import NonCanonicalError, OversizeError, TrailingDataError, TruncatedError

MAX_VARINT_BYTES = 9
MAX_VARINT_VALUE = (1 << 63) - 1


def encode_uvarint(value: int) -> bytes:
    """Encode ``value`` (0 <= value < 2**63) as a minimal unsigned varint."""
    if value < 0:
        raise ValueError("an unsigned varint cannot be negative")
    if value > MAX_VARINT_VALUE:
        raise OversizeError(f"varint value {value} exceeds 2**63 - 1")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_uvarint(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """Decode one varint starting at ``offset``; return ``(value, offset_after)``.

    Raises :class:`TruncatedError` when the input ends mid-varint,
    :class:`OversizeError` past 9 bytes and :class:`NonCanonicalError` for a padded encoding.
    """
    value = 0
    shift = 0
    end = len(data)
    pos = offset
    while True:
        if pos - offset >= MAX_VARINT_BYTES:
            raise OversizeError("varint is longer than 9 bytes", offset=offset)
        if pos >= end:
            raise TruncatedError("varint is truncated", offset=pos)
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and pos - offset > 1:
                raise NonCanonicalError("varint is not minimally encoded", offset=offset)
            return value, pos
        shift += 7


def decode_uvarint_exact(data: bytes | bytearray | memoryview) -> int:
    """Decode a varint that must fill ``data`` exactly."""
    value, end = decode_uvarint(data)
    if end != len(data):
        raise TrailingDataError(f"{len(data) - end} bytes after the varint", offset=end)
    return value
