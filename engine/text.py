"""Text a user typed, made safe to store, to write into a PNG and to echo: no control characters.

Stripped, not refused: they are invisible, so a user cannot see what to fix. Removed are C0/C1
controls (NUL included; tab and newlines become spaces), bidirectional overrides and isolates (U+202E
turns the text around whatever follows it on screen) and invisible separators that hide a word from
a filter. ZWJ/ZWNJ stay: emoji sequences and several scripts need them.
"""

from __future__ import annotations

import re
import unicodedata

_BIDI_AND_INVISIBLE = frozenset(
    "\u061c\u200b\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2060\u2061\u2062\u2063\u2064"
    "\u2066\u2067\u2068\u2069\ufeff\u00ad"
)
_WHITESPACE_CONTROLS = re.compile(r"[\t\n\r\v\f\x85\u2028\u2029]")


def clean_text(text: str) -> str:
    """`text` without control, bidi or invisible characters; line breaks and tabs become spaces."""
    text = _WHITESPACE_CONTROLS.sub(" ", text)
    return "".join(
        ch for ch in text if ch not in _BIDI_AND_INVISIBLE and unicodedata.category(ch) not in ("Cc", "Cs")
    )
