"""The order of certificate field names: JavaScript's ``localeCompare`` (ICU root collation).

The reference sorts field names with ``a.localeCompare(b)`` before it serialises a
certificate, so the signature covers that order (reference notes d.2). ICU compares in
levels: first the base characters of the whole string (punctuation, then symbols, then
digits, then letters without regard to case), then accents, then case (lowercase first).

This is exact for ASCII and for Latin letters with accents, which is what certificates
use. Other scripts fall back to code point order after the Latin letters; a certificate
whose order we get wrong fails its signature check, it is never misread.
"""

from __future__ import annotations

import unicodedata

# CLDR root order of the ASCII characters that are not letters or digits.
_PUNCTUATION = "\t\n\v\f\r _-,;:!?.'\"()[]{}@*/\\&#%`^+<=>|~$"
_DIGIT_BASE = 100
_LETTER_BASE = 200
_OTHER_BASE = 1000


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
                secondary[-1] = secondary[-1] * 0x10000 + ord(char)
            continue
        primary.append(_primary(char))
        secondary.append(0)
        tertiary.append(1 if char != char.lower() else 0)
    return tuple(primary), tuple(secondary), tuple(tertiary)


def locale_sorted(names: list[str] | tuple[str, ...] | set[str]) -> list[str]:
    """``names`` in ``localeCompare`` order (ties, which ICU cannot have, by code point)."""
    return sorted(names, key=lambda name: (sort_key(name), name))
