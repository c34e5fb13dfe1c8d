"""JSON on the wire: one canonical encoding (what signatures cover) and one strict parser.

Canonical: keys sorted, no insignificant whitespace, UTF-8 (not ``\\u`` escapes). The
parser refuses duplicate keys, NaN and Infinity, invalid UTF-8 and nesting deep enough to
exhaust the stack, always with a :class:`~trustmesh.errors.DecodeError` (or the subclass
a protocol passes), never a ``ValueError`` or ``RecursionError``.
"""

from __future__ import annotations

import json
import json.scanner
import math
import re
from collections.abc import Callable
from typing import Any

from trustmesh.errors import DecodeError, OversizeError

MAX_DEPTH = 32  # a protocol message never nests deeper than this
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


def canonical_json(value: Any) -> bytes:
    return _CANONICAL(value).encode()


def compact_json(value: Any) -> bytes:
    """Compact, field order kept: for messages whose signature covers something else."""
    return _COMPACT(value).encode()


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
        text = raw.decode("utf-8").strip(" \t\n\r")  # JSON's whitespace, around the value
        try:
            value, end = _SCAN(text, 0)  # the C scanner, without decode()'s regex passes
        except StopIteration as exc:
            raise _Refused(f"not JSON: no value at character {exc.value}") from None
        if end != len(text):
            raise _Refused(f"not JSON: extra data at character {end}")
        if _SURROGATE_ESCAPE.search(raw):
            _check_text(value)
    except _Refused as exc:
        raise error(str(exc)) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"not JSON: {exc}") from None
    return value


class _Refused(ValueError):
    """Text the json module would take but this parser refuses (said precisely)."""


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


def _encoder(*, sort_keys: bool) -> Callable[[Any], str]:
    """A JSON writer built once. ``json.dumps`` (and ``JSONEncoder.encode``) build a new
    C encoder on every call, which costs more than encoding a gossip message; this one
    is built once (skipping the circular-reference check: a cycle ends in a
    RecursionError, turned into a ValueError). NaN and Infinity are refused: not JSON."""
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:  # not CPython: the pure-Python encoder, per call
        slow = json.JSONEncoder(
            sort_keys=sort_keys, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return slow.encode
    fast = c_make_encoder(
        None, _not_json, json.encoder.encode_basestring, None, ":", ",", sort_keys, False, False
    )

    def encode(value: Any) -> str:
        try:
            return "".join(fast(value, 0))
        except RecursionError:
            raise ValueError("the value is circular or nested too deeply") from None

    return encode


def _not_json(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


_CANONICAL = _encoder(sort_keys=True)
_COMPACT = _encoder(sort_keys=False)
_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_constant=_reject_constant, parse_float=_finite_float
)
# The decoder's scanner (C in CPython): one value from a position, no regex passes.
_SCAN: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(_DECODER)  # type: ignore[arg-type]


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _nesting(raw: bytes) -> int:
    """How deep brackets outside strings nest (checked before :mod:`json` recurses)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return 0  # the common case: too few brackets to matter
    if b"\\" not in raw:
        # No escapes: every quote opens or closes a string, so the even pieces between
        # quotes are what lies outside strings. Only their brackets are walked.
        outside = b"".join(raw.split(b'"')[::2]).translate(None, _NOT_BRACKETS)
        return _depth(outside)
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


def _depth(brackets: bytes) -> int:
    depth = deepest = 0
    for byte in brackets:
        if byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest
