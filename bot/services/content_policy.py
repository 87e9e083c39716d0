"""The blocked-terms list: prompts containing an admin's blocked term are refused.

Matching is on words after the usual disguises are undone, so `N U D E`, `n.u.d.e`, `nüde`, `ｎｕｄｅ`,
`nuuude`, `n0de`... all match "nude", while "grapefruit" never matches "rape": a term matches whole
words (a run of words for a multi-word term), never the inside of a longer word.

1. Unicode NFKC (full-width and styled letters become plain ones), case folding, accents dropped,
   invisible format characters removed, common Cyrillic/Greek look-alikes mapped to Latin.
2. Leetspeak: digits always (0->o, 1->i, 3->e, ...); symbols ($, @, !, |, +) are read three ways, and a
   match in any counts: as letters before a letter ("$ex"), dropped ("$nude"), and all as letters
   ("a$$"), so "wow!" still reads as "wow".
3. Words are runs of letters and digits; runs of single letters ("n u d e") are joined into one word.
4. A term's letter may repeat ("nuuude"): each letter of the term matches one or more of itself.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

_LOOKALIKES = str.maketrans(
    {
        "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
        "т": "t", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ɡ": "g", "α": "a",
        "β": "b", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u",
        "χ": "x",
    }
)  # fmt: skip
_LEET_DIGITS = str.maketrans(
    {"0": "o", "1": "i", "2": "z", "3": "e", "4": "a", "5": "s", "6": "g", "7": "t", "8": "b", "9": "g"}
)
_LEET_SYMBOLS = {"$": "s", "@": "a", "!": "i", "|": "l", "+": "t", "€": "e", "£": "l"}
_SYMBOL_BEFORE_LETTER = re.compile(r"[$@!|+€£](?=\w)")
_ANY_SYMBOL = re.compile(r"[$@!|+€£]")
_WORD = re.compile(r"[^\W_]+")


SymbolReading = Literal["before_letters", "dropped", "all"]


def words(text: str, symbols: SymbolReading = "before_letters") -> list[str]:
    """`text` as the list of plain lower-case words the matcher compares (steps 1-3 above), with leet
    symbols read as letters before a letter, dropped, or all read as letters."""
    text = unicodedata.normalize("NFKC", text).casefold().translate(_LOOKALIKES)
    text = "".join(
        ch
        for ch in unicodedata.normalize("NFKD", text)
        if not unicodedata.combining(ch) and unicodedata.category(ch) != "Cf"
    )
    if symbols == "all":
        text = _ANY_SYMBOL.sub(lambda m: _LEET_SYMBOLS[m.group()], text)
    else:
        as_letter = symbols == "before_letters"
        text = _SYMBOL_BEFORE_LETTER.sub(lambda m: _LEET_SYMBOLS[m.group()] if as_letter else "", text)
    text = text.translate(_LEET_DIGITS)
    joined: list[str] = []
    letters: list[str] = []
    for word in _WORD.findall(text):
        if len(word) == 1:
            letters.append(word)
            continue
        if letters:
            joined.append("".join(letters))
            letters = []
        joined.append(word)
    if letters:
        joined.append("".join(letters))
    return joined


def normalize_term(term: str) -> str:
    """How a term is stored and listed: its words, single-spaced (empty: not a usable term)."""
    return " ".join(words(term))


@dataclass(frozen=True)
class BlockedTerms:
    terms: tuple[str, ...] = ()  # normalized (normalize_term), sorted, unique

    @classmethod
    def of(cls, terms: Iterable[str]) -> BlockedTerms:
        return cls(tuple(sorted({t for t in (normalize_term(term) for term in terms) if t})))

    @cached_property
    def _patterns(self) -> list[tuple[str, re.Pattern[str]]]:
        # Each term as one regex over the prompt's words joined by single spaces: whole words only,
        # every letter may repeat; a multi-word term also matches its words written together.
        def letters(word: str) -> str:
            return "".join(f"{re.escape(ch)}+" for ch in word)

        patterns = []
        for term in self.terms:
            parts = term.split()
            body = " ".join(letters(word) for word in parts)
            if len(parts) > 1:
                body = f"(?:{body}|{letters(''.join(parts))})"
            patterns.append((term, re.compile(rf"(?:^| ){body}(?= |$)")))
        return patterns

    def find(self, text: str) -> str | None:
        """The first blocked term `text` contains, or None."""
        if not self.terms:
            return None
        readings: tuple[SymbolReading, ...] = ("before_letters", "dropped", "all")
        haystacks = {" ".join(words(text, reading)) for reading in readings}
        return next(
            (term for term, pattern in self._patterns if any(pattern.search(h) for h in haystacks)), None
        )

    def with_term(self, term: str) -> BlockedTerms:
        return BlockedTerms.of([*self.terms, term])

    def without(self, term: str) -> BlockedTerms:
        gone = normalize_term(term)
        return BlockedTerms(tuple(t for t in self.terms if t != gone))
