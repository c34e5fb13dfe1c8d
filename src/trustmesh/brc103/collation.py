"""The order of certificate field names: JavaScript's ``localeCompare`` (ICU root collation).

The reference sorts field names with ``a.localeCompare(b)`` before it serialises a
certificate, so the signature covers that order (reference notes d.2). ICU compares in
levels: first the base characters of the whole string (punctuation, then symbols, then
digits, then letters without regard to case), then accents, then case (lowercase first).

This is exact for ASCII, for Latin letters with accents, and for the Latin letters
without a decomposition (ß, æ, œ, ø, ł, đ, ð, ħ, ŧ, þ), which is what certificates use.
Other scripts fall back to code point order after the Latin letters; a certificate whose
order we get wrong fails its signature check, it is never misread.
"""

from __future__ import annotations

import unicodedata

# CLDR root order of the ASCII characters that are not letters or digits.
_PUNCTUATION = "\t\n\v\f\r _-,;:!?.'\"()[]{}@*/\\&#%`^+<=>|~$"
_DIGIT_BASE = 100
_LETTER_BASE = 200
_OTHER_BASE = 1000
# CLDR root secondary order of the combining marks Latin letters use (Node 20 / ICU 78.2):
# acute, grave, breve, circumflex, caron, ring, diaeresis, double acute, tilde, dot above,
# long solidus, cedilla, ogonek, macron (a few rarer marks come first).
_ACCENTS = {
    mark: 1 + rank
    for rank, mark in enumerate(
        "\u034f\u0332\u0313\u0343\u0314\u0301\u0341\u0300\u0340\u0306\u0302\u030c\u030a"
        "\u0342\u0308\u0344\u030b\u0303\u0307\u0338\u0327\u0328\u0304"
    )
}


# Latin letters without a Unicode decomposition that ICU sorts as other letters: ß as
# "ss", æ and œ as "ae" and "oe", letters with a stroke as their base letter, each with
# a secondary difference (DUCET); þ is a letter of its own after z.
_STROKE = 0x2000
_EXPANSIONS = {
    "ß": ("ss", 0),
    "æ": ("ae", _STROKE),
    "œ": ("oe", _STROKE),
    "ø": ("o", _STROKE),
    "ł": ("l", _STROKE),
    "đ": ("d", _STROKE),
    "ð": ("d", _STROKE + 1),
    "ħ": ("h", _STROKE),
    "ŧ": ("t", _STROKE),
}
_THORN = _LETTER_BASE + 26


def _primary(char: str) -> int:
    position = _PUNCTUATION.find(char)
    if position >= 0:
        return 1 + position
    if "0" <= char <= "9":
        return _DIGIT_BASE + ord(char) - ord("0")
    lower = char.lower()
    if "a" <= lower <= "z" and len(lower) == 1:
        return _LETTER_BASE + ord(lower) - ord("a")
    if ord(char) < 0x20 or ord(char) == 0x7F:
        return 0  # control characters come first
    return _OTHER_BASE + ord(lower[0])


def sort_key(name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    primary: list[int] = []
    secondary: list[int] = []
    tertiary: list[int] = []
    for char in unicodedata.normalize("NFD", name):
        if unicodedata.combining(char):
            if secondary:
                secondary[-1] = secondary[-1] * 0x10000 + _ACCENTS.get(char, 0x1000 + ord(char))
            continue
        lower = char.lower()
        upper = 1 if char != lower else 0
        expansion = _EXPANSIONS.get(lower)
        if expansion is not None:
            letters, mark = expansion
            for position, letter in enumerate(letters):
                primary.append(_primary(letter))
                secondary.append(mark if position == 0 else 0)
                tertiary.append(upper)
            continue
        primary.append(_THORN if lower == "þ" else _primary(char))
        secondary.append(0)
        tertiary.append(upper)
    return tuple(primary), tuple(secondary), tuple(tertiary)


def locale_sorted(names: list[str] | tuple[str, ...] | set[str]) -> list[str]:
    """``names`` in ``localeCompare`` order (ties, which ICU cannot have, by code point)."""
    return sorted(names, key=lambda name: (sort_key(name), name))
