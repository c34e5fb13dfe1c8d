"""JSON on the wire: one canonical encoding (what signatures cover) and one strict parser.

Canonical: keys sorted, no insignificant whitespace, UTF-8 (not ``\\u`` escapes). The
parser refuses duplicate keys, NaN and Infinity, invalid UTF-8 and nesting deep enough to
exhaust the stack, always with a :class:`~trustmesh.errors.DecodeError` (or the subclass
a protocol passes), never a ``ValueError`` or ``RecursionError``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from trustmesh.errors import DecodeError, OversizeError

MAX_DEPTH = 32  # a protocol message never nests deeper than this


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def compact_json(value: Any) -> bytes:
    """Compact, field order kept: for messages whose signature covers something else."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def strict_loads(
    data: bytes | bytearray | memoryview,
    *,
    max_size: int,
    error: Callable[[str], DecodeError] = DecodeError,
) -> Any:
    """Parse JSON text of at most ``max_size`` bytes, refusing what :mod:`json` lets by."""
    if len(data) > max_size:
        raise OversizeError(f"JSON text of {len(data)} bytes exceeds {max_size}")
    if _nesting(data) > MAX_DEPTH:
        raise error(f"JSON nests deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(
            bytes(data).decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except _Refused as exc:
        raise error(str(exc)) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"not JSON: {exc}") from None


class _Refused(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Refused(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON")


def _nesting(data: bytes | bytearray | memoryview) -> int:
    """How deep brackets outside strings nest (checked before :mod:`json` recurses)."""
    raw = bytes(data)
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return 0  # the common case: too few brackets to matter
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest
