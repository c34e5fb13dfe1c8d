"""The few CBOR shapes a bundle uses, read strictly and written deterministically.

RFC 9171 §4.1 requires the core deterministic encoding of RFC 8949 §4.2.1 (shortest
heads) inside blocks, so the reader refuses any other: then every accepted item has one
encoding, and re-encoding what we decoded gives back the same bytes. Only unsigned
integers, byte and text strings and definite arrays are read; tags, floats, simple
values, maps, negative integers and indefinite lengths are refused where a block could
hold them. The reader never recurses beyond the fixed shapes its callers ask for, so
nesting depth cannot hurt it.
"""

from __future__ import annotations

from trustmesh.bundle.errors import MalformedBundleError

UINT, BYTES, TEXT, ARRAY = 0, 2, 3, 4
MAX_UINT = (1 << 64) - 1
_NAMES = (
    "an unsigned integer",
    "a negative integer",
    "a byte string",
    "a text string",
    "an array",
    "a map",
    "a tag",
    "a float or simple value",
)
_SMALL = tuple(bytes((i,)) for i in range(256))  # one-byte heads, prebuilt


def head(major: int, value: int) -> bytes:
    """The shortest head of a major type with an argument (RFC 8949 §4.2.1)."""
    base = major << 5
    if value < 24:
        return _SMALL[base | value]
    if value < 0x100:
        return bytes((base | 24, value))
    if value < 0x10000:
        return bytes((base | 25,)) + value.to_bytes(2, "big")
    if value < 0x100000000:
        return bytes((base | 26,)) + value.to_bytes(4, "big")
    return bytes((base | 27,)) + value.to_bytes(8, "big")


def uint(value: int) -> bytes:
    return head(UINT, value)


def head_size(value: int) -> int:
    """Length of the head :func:`head` writes for ``value``."""
    if value < 24:
        return 1
    if value < 0x100:
        return 2
    if value < 0x10000:
        return 3
    if value < 0x100000000:
        return 5
    return 9


def read_head(data: bytes, pos: int, major: int) -> tuple[int, int]:
    """Read a head of ``major`` type at ``pos``: (argument, position after the head).

    Refuses another major type, an indefinite length, a reserved additional info and an
    argument not in its shortest form."""
    end = len(data)
    if pos >= end:
        raise MalformedBundleError("the bundle ends in the middle of an item", offset=end)
    first = data[pos]
    if first >> 5 != major:
        raise MalformedBundleError(
            f"expected {_NAMES[major]}, found {_NAMES[first >> 5]}", offset=pos
        )
    info = first & 0x1F
    if info < 24:
        return info, pos + 1
    if info > 27:
        what = "an indefinite length" if info == 31 else "a reserved additional info"
        raise MalformedBundleError(f"{_NAMES[major]} with {what}", offset=pos)
    size = 1 << (info - 24)
    stop = pos + 1 + size
    if stop > end:
        raise MalformedBundleError("the bundle ends in the middle of an item", offset=end)
    value = data[pos + 1] if size == 1 else int.from_bytes(data[pos + 1 : stop], "big")
    if value < (24 if size == 1 else 1 << (4 * size)):
        raise MalformedBundleError("an integer or length not in its shortest form", offset=pos)
    return value, stop


def read_uint(data: bytes, pos: int) -> tuple[int, int]:
    if pos < len(data) and data[pos] < 24:  # the common small integer, inline
        return data[pos], pos + 1
    return read_head(data, pos, UINT)


def read_string(data: bytes, pos: int, major: int) -> tuple[int, int]:
    """Read a definite byte or text string: (start, end) of its content."""
    if pos < len(data) and 0 <= data[pos] - (major << 5) < 24:  # a short string, inline
        stop = pos + 1 + data[pos] - (major << 5)
        if stop <= len(data):
            return pos + 1, stop
    size, start = read_head(data, pos, major)
    stop = start + size
    if stop > len(data):
        raise MalformedBundleError(
            f"a string of {size} bytes runs past the end of the bundle", offset=pos
        )
    return start, stop


def read_array(data: bytes, pos: int) -> tuple[int, int]:
    """Read a definite array head: (number of items, position of the first)."""
    if pos < len(data) and 0x80 <= data[pos] < 0x98:  # up to 23 items, inline
        return data[pos] - 0x80, pos + 1
    return read_head(data, pos, ARRAY)
