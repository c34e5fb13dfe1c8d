"""The bracket-depth pre-check of strict_loads: its fast path (no backslash: split on
quotes, walk only brackets) agrees with a byte-by-byte walk on any input."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trustmesh.wire import jsonwire


def walk(raw: bytes) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


@given(st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"a", b",", b"\\"]), max_size=400))
def test_the_fast_depth_agrees_with_a_byte_walk(pieces: list[bytes]) -> None:
    raw = b"[" * (jsonwire.MAX_DEPTH + 1) + b"".join(pieces)  # past the cheap count
    assert jsonwire._nesting(raw) == walk(raw)


def test_brackets_inside_strings_do_not_count() -> None:
    raw = b'["' + b"[" * 500 + b'"]' + b"{}" * 40
    assert jsonwire._nesting(raw) == 1
