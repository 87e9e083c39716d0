"""Message: a sentence a user reads, kept as its English template and its values until it is shown.

The template is the message id of the bot's translation catalogs (bot/locale): the bot shows it in the
reader's language (bot/i18n.py), everything else (logs, the database, the CLI) uses `str()`, which is
the English text. Templates use `str.format` fields (`{size}`, `{mp:.2f}`); a value may itself be a
Message, translated with its parent. The engine only builds these; it never translates.
"""

from __future__ import annotations

from collections.abc import Mapping


def N_(template: str) -> str:
    """Marks a template kept as data (a table of them) for the catalog's extractor; returns it as is."""
    return template


class Message:
    __slots__ = ("template", "values")

    def __init__(self, template: str, /, **values: object) -> None:
        self.template = template
        self.values: Mapping[str, object] = values

    def __str__(self) -> str:
        if not self.values:
            return self.template  # a plain sentence: braces in it are text, not fields
        return self.template.format(
            **{k: str(v) if isinstance(v, Message) else v for k, v in self.values.items()}
        )

    def __repr__(self) -> str:
        return f"Message({self.template!r}, {dict(self.values)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Message) and (self.template, dict(self.values)) == (
            other.template,
            dict(other.values),
        )

    def __hash__(self) -> int:
        return hash(self.template)
