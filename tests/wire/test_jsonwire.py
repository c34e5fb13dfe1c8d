"""JSON on the wire: the canonical encoding signatures cover, and the strict parser that
refuses what :mod:`json` lets by, always with a DecodeError."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.errors import DecodeError, OversizeError
from trustmesh.wire.jsonwire import MAX_DEPTH, canonical_json, compact_json, strict_loads

PROPERTY = settings(max_examples=200, deadline=None)
FUZZ = settings(max_examples=400, deadline=None)
BIG = 1 << 20

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=25,
)


class Refused(DecodeError):
    """A protocol's own error type, passed as ``error=``."""


# --- the encodings -----------------------------------------------------------------------


def test_canonical_json_sorts_keys_without_whitespace_in_utf8() -> None:
    value = {"b": [1, 2.5, None, True], "a": {"z": "é✓", "y": ""}}
    assert canonical_json(value) == '{"a":{"y":"","z":"é✓"},"b":[1,2.5,null,true]}'.encode()


def test_canonical_json_is_independent_of_insertion_order() -> None:
    assert canonical_json({"x": 1, "y": {"q": 1, "p": 2}}) == canonical_json(
        {"y": {"p": 2, "q": 1}, "x": 1}
    )


def test_compact_json_keeps_field_order() -> None:
    assert compact_json({"b": 1, "a": [1, "é"]}) == '{"b":1,"a":[1,"é"]}'.encode()


@PROPERTY
@given(json_values)
def test_canonical_json_round_trips_through_strict_loads(value: Any) -> None:
    encoded = canonical_json(value)
    assert strict_loads(encoded, max_size=BIG) == value
    # The canonical form is a fixed point: encoding what was parsed gives the same bytes.
    assert canonical_json(strict_loads(encoded, max_size=BIG)) == encoded


# --- what the parser refuses -------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        b'{"a":1,"a":2}',
        b'{"x":{"k":true,"k":true}}',
        b'[{"a":1},{"b":{"c":1,"c":1}}]',
    ],
)
def test_strict_loads_refuses_duplicate_keys(text: bytes) -> None:
    with pytest.raises(DecodeError, match="duplicate key"):
        strict_loads(text, max_size=BIG)


@pytest.mark.parametrize("text", [b"NaN", b"[Infinity]", b'{"r":-Infinity}', b'{"r":NaN}'])
def test_strict_loads_refuses_nan_and_infinity(text: bytes) -> None:
    with pytest.raises(DecodeError):
        strict_loads(text, max_size=BIG)


def test_strict_loads_refuses_deep_nesting_without_recursion_error() -> None:
    with pytest.raises(DecodeError, match="nests deeper"):
        strict_loads(b"[" * 1000, max_size=BIG)
    with pytest.raises(DecodeError, match="nests deeper"):
        strict_loads(b'{"a":' * 100_000, max_size=BIG)


def test_strict_loads_nesting_limit_is_exact() -> None:
    deepest = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    assert strict_loads(deepest, max_size=BIG) is not None
    with pytest.raises(DecodeError):
        strict_loads(b"[" + deepest + b"]", max_size=BIG)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = json.dumps({"s": "[" * 100 + '\\"{' * 50, "t": ["{[" * 40]}).encode()
    assert strict_loads(text, max_size=BIG)["s"].startswith("[[[")


def test_an_escaped_quote_does_not_end_the_string_for_the_nesting_count() -> None:
    # If \" ended the string, the brackets after it would count as 40 levels.
    text = b'["\\"' + b"[" * 40 + b'"]'
    assert strict_loads(text, max_size=BIG) == ['"' + "[" * 40]


def test_strict_loads_refuses_oversize_before_parsing() -> None:
    text = json.dumps({"pad": "x" * 100}).encode()
    assert strict_loads(text, max_size=len(text)) == {"pad": "x" * 100}
    with pytest.raises(OversizeError):
        strict_loads(text, max_size=len(text) - 1)
    # Oversize wins even over text that would not parse.
    with pytest.raises(OversizeError):
        strict_loads(b"\xff" * 10, max_size=9)


@pytest.mark.parametrize(
    "text", [b"", b"{", b'{"a":}', b"\xff\xfe", b'"\xc3"', b"[1,]", b"{} {}", b"'a'"]
)
def test_strict_loads_refuses_what_is_not_json(text: bytes) -> None:
    with pytest.raises(DecodeError):
        strict_loads(text, max_size=BIG)


def test_strict_loads_raises_the_protocols_error_type() -> None:
    for text in (b'{"a":1,"a":1}', b"NaN", b"[" * 100, b"{", b"\xff", b"1e999", rb'"\udc00"'):
        with pytest.raises(Refused):
            strict_loads(text, max_size=BIG, error=Refused)


def test_strict_loads_takes_bytearray_and_memoryview() -> None:
    assert strict_loads(bytearray(b'{"a":[1]}'), max_size=BIG) == {"a": [1]}
    assert strict_loads(memoryview(b'{"a":[1]}'), max_size=BIG) == {"a": [1]}


@pytest.mark.parametrize(
    "text",
    [b'{"x":1e400}', b"[-1e400]", b"1E309", b"[0.1e99999]", b'{"a":[1,{"b":-9e999}]}'],
)
def test_numbers_that_overflow_to_infinity_are_refused(text: bytes) -> None:
    with pytest.raises(Refused, match="too large for a double"):
        strict_loads(text, max_size=BIG, error=Refused)


def test_the_largest_doubles_and_tiny_numbers_are_taken() -> None:
    assert strict_loads(b"[1.7976931348623157e308,-1.7976931348623157e308]", max_size=BIG) == [
        1.7976931348623157e308,
        -1.7976931348623157e308,
    ]
    assert strict_loads(b"[1e-400,5e-324]", max_size=BIG) == [0.0, 5e-324]  # underflow is fine
    assert strict_loads(b"[" + b"9" * 400 + b"]", max_size=BIG) == [int("9" * 400)]


@pytest.mark.parametrize(
    "text",
    [
        rb'{"k":"\ud800"}',
        rb'{"\udfff":1}',
        rb'["a\uDC00b"]',
        rb'["\ude00\ud83d"]',  # a pair in the wrong order is two lone halves
        rb'["\ud83d"]',
        rb'["\ud83dx"]',
        rb'{"a":{"b":["ok","\udbff"]}}',
    ],
)
def test_lone_surrogate_escapes_are_refused(text: bytes) -> None:
    with pytest.raises(Refused, match="lone surrogate"):
        strict_loads(text, max_size=BIG, error=Refused)


def test_an_escaped_surrogate_pair_is_one_character() -> None:
    value = strict_loads(rb'{"\ud83d\ude00":"\uD83D\uDE00"}', max_size=BIG)
    assert value == {"\U0001f600": "\U0001f600"}
    assert canonical_json(value) == '{"\U0001f600":"\U0001f600"}'.encode()


def test_an_escaped_backslash_before_u_is_not_a_surrogate_escape() -> None:
    # The text \\ud800 is a backslash then "ud800": no surrogate at all.
    assert strict_loads(rb'["\\ud800"]', max_size=BIG) == ["\\ud800"]


def test_surrogates_encoded_as_utf8_bytes_are_refused() -> None:
    with pytest.raises(Refused):
        strict_loads(b'["\xed\xa0\x80"]', max_size=BIG, error=Refused)


# --- fuzzing -----------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_decode_errors(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        strict_loads(data, max_size=150)


@FUZZ
@given(st.text(alphabet='[]{}"\\:,0123456789.eE-+ntrufalsNI ', max_size=120))
def test_json_like_text_raises_only_decode_errors(text: str) -> None:
    with contextlib.suppress(DecodeError):
        strict_loads(text.encode(), max_size=BIG)


escapes = st.lists(
    st.one_of(
        st.builds("\\u{:04{}}".format, st.integers(0xD7F0, 0xE010), st.sampled_from("xX")),
        st.sampled_from(["a", "\\\\", '\\"', "é", "\\n"]),
    ),
    max_size=6,
)


@FUZZ
@given(parts=escapes, as_key=st.booleans())
def test_what_strict_loads_returns_canonical_json_can_encode(
    parts: list[str], as_key: bool
) -> None:
    text = "".join(parts)
    raw = ('{"' + text + '":1}' if as_key else '["' + text + '"]').encode()
    # The oracle: the standard parser, then a strict UTF-8 encoding of what it gives.
    plain = json.dumps(json.loads(raw), ensure_ascii=False)
    try:
        plain.encode("utf-8")
    except UnicodeEncodeError:
        with pytest.raises(Refused, match="lone surrogate"):
            strict_loads(raw, max_size=BIG, error=Refused)
        return
    value = strict_loads(raw, max_size=BIG, error=Refused)
    assert value == json.loads(raw)
    assert strict_loads(canonical_json(value), max_size=BIG) == value
