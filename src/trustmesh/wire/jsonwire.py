"""JSON on the wire: one canonical encoding (what signatures cover) and one strict parser.

Canonical: keys sorted, no insignificant whitespace, UTF-8 (not ``\\u`` escapes). The
parser refuses duplicate keys, NaN and Infinity, invalid UTF-8 and nesting deep enough to
exhaust the stack, always with a :class:`~trustmesh.errors.DecodeError` (or the subclass
a protocol passes), never a ``ValueError`` or ``RecursionError``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from trustmesh.errors import DecodeError, OversizeError

MAX_DEPTH = 32  # a protocol message never nests deeper than this
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


def canonical_json(value: Any) -> bytes:
    return _CANONICAL.encode(value).encode()


def compact_json(value: Any) -> bytes:
    """Compact, field order kept: for messages whose signature covers something else."""
    return _COMPACT.encode(value).encode()


def strict_loads(
    data: bytes | bytearray | memoryview,
    *,
    max_size: int,
    error: Callable[[str], DecodeError] = DecodeError,
) -> Any:
    """Parse JSON text of at most ``max_size`` bytes, refusing what :mod:`json` lets by."""
    if len(data) > max_size:
        raise OversizeError(f"JSON text of {len(data)} bytes exceeds {max_size}")
    raw = bytes(data)
    if _nesting(raw) > MAX_DEPTH:
        raise error(f"JSON nests deeper than {MAX_DEPTH} levels")
    try:
        value = _DECODER.decode(raw.decode("utf-8"))
        if _SURROGATE_ESCAPE.search(raw):
            _check_text(value)
    except _Refused as exc:
        raise error(str(exc)) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"not JSON: {exc}") from None
    return value


class _Refused(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        keys = [key for key, _ in pairs]
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise _Refused(f"duplicate key {duplicate!r}")
    return result


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Refused(f"{text[:32]} is too large for a double")
    return value


def _check_text(value: Any) -> None:
    """Refuse strings holding a lone UTF-16 surrogate (a ``\\ud800`` escape): no UTF-8
    encoder, ours included, can write them back out."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Refused("a string holds a lone surrogate escape") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key)
            _check_text(item)
    elif isinstance(value, list):
        for item in value:
            _check_text(item)


def _reject_constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON")


# Built once: json.dumps and json.loads with options build a new coder on every call.
# allow_nan=False: NaN and Infinity are not JSON, so they are never written either.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_constant=_reject_constant, parse_float=_finite_float
)


def _nesting(raw: bytes) -> int:
    """How deep brackets outside strings nest (checked before :mod:`json` recurses)."""
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
