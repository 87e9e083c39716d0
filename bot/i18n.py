"""Languages: every text a Discord user reads, from one gettext catalog per language (bot/locale).

English is the message id itself (the templates in the code); Spanish is `bot/locale/es/LC_MESSAGES/
fluxbot.po`, compiled to `.mo` into the wheel at build time (build_hooks.py), read from the `.po` in a
source checkout. Which language: private answers follow the asker's Discord locale
(`interaction.locale`), public messages the server's (`guild_locale`; the asker's in a DM); a locale
without a catalog gets English. Numbers follow the exact Discord locale (es-ES writes 1,5 MB, es-419
1.5 MB). Recipes, logs, the database and the CLI stay English.

Adding a language: `make i18n` (extract the templates into bot/locale/fluxbot.pot), copy it to
`bot/locale/<code>/LC_MESSAGES/fluxbot.po`, translate, `make i18n` again; tests/test_i18n.py checks it.
"""

from __future__ import annotations

import gettext
import io
import string
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from typing import Any

import discord
from babel import Locale, UnknownLocaleError
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from discord import app_commands

from engine.messages import Message

DOMAIN = "fluxbot"
ENGLISH = "en"
# Where command *names* are looked up (msgctxt): a name is one lowercase word, the same English word in
# a sentence is not (the "edit" command, the "Edit" button).
NAME_CONTEXT = "name"
NAME_LOCATIONS = {
    app_commands.TranslationContextLocation.command_name,
    app_commands.TranslationContextLocation.group_name,
    app_commands.TranslationContextLocation.parameter_name,
}
# What `make i18n` extracts from the code (babel keyword specs): the Language methods, user errors and
# the engine's refusals, whose first argument is a template.
EXTRACT_KEYWORDS: dict[str, Any] = {
    "tr": None,
    "plural": (1, 2),
    "ctext": ((1, "c"), 2),
    "Message": None,
    "N_": None,
    "UserError": None,
    "NotAllowed": None,
    "LimitReached": None,
    "NotFound": None,
    "StoreBusy": None,
    "RequestError": None,
    "LoraError": None,
}


class _LocaleFormatter(string.Formatter):
    """str.format with the reader's decimal mark for floats, and nested Messages translated."""

    def __init__(self, language: Language) -> None:
        self.language = language

    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, Message):
            return format(self.language.message(value), format_spec)
        if isinstance(value, float):
            return format(value, format_spec).replace(".", self.language.decimal)
        return str(format(value, format_spec))


@dataclass(frozen=True)
class Language:
    """One reader's language: translations of the catalog, numbers of their exact locale."""

    code: str  # the catalog: "en", "es"
    locale: Locale  # the reader's exact locale: es_ES, es_419, en_US
    translations: gettext.NullTranslations

    @cached_property
    def decimal(self) -> str:
        return str(self.locale.number_symbols.get("latn", {}).get("decimal", "."))

    def tr(self, template: str, /, **values: object) -> str:
        """The template translated, then filled in (`tr("job {job}", job=7)`)."""
        return self._fill(self.translations.gettext(template), values)

    def ctext(self, context: str, template: str, /, **values: object) -> str:
        """Like `tr`, for a template with a context (a button label, a modal title)."""
        return self._fill(self.translations.pgettext(context, template), values)

    def plural(self, singular: str, plural: str, n: int, /, **values: object) -> str:
        """`n` of something, in the language's plural form; `n` is passed as the value `n` too."""
        return self._fill(self.translations.ngettext(singular, plural, n), {"n": n, **values})

    def message(self, message: Message) -> str:
        """A Message (an error, a warning) in this language."""
        return self._fill(self.translations.gettext(message.template), message.values)

    def name(self, english: str) -> str | None:
        """A command, group or option name, or None where this language has none."""
        translated = self.translations.pgettext(NAME_CONTEXT, english)
        return translated if translated != english or self.code == ENGLISH else None

    def duration(self, seconds: float) -> str:
        seconds = max(0, round(seconds))
        if seconds < 90:
            return self.tr("{seconds} s", seconds=seconds)
        return self.tr("{minutes} min {seconds:02d} s", minutes=seconds // 60, seconds=seconds % 60)

    def _fill(self, template: str, values: Mapping[str, object]) -> str:
        if not values:
            return template  # a plain sentence: braces in it are text
        return _LocaleFormatter(self).vformat(template, (), dict(values))


class Languages:
    """The catalogs the package ships (read once at start, then only read)."""

    def __init__(self, catalogs: Mapping[str, gettext.NullTranslations]) -> None:
        self._catalogs = {ENGLISH: gettext.NullTranslations(), **catalogs}

    @classmethod
    def load(cls) -> Languages:
        """Every `bot/locale/<code>/LC_MESSAGES/fluxbot.mo` (or `.po` in a source checkout). Blocking."""
        root = resources.files("bot") / "locale"
        catalogs: dict[str, gettext.NullTranslations] = {}
        if root.is_dir():
            for folder in root.iterdir():
                messages = folder / "LC_MESSAGES"
                compiled, source = messages / f"{DOMAIN}.mo", messages / f"{DOMAIN}.po"
                if compiled.is_file():
                    catalogs[folder.name] = gettext.GNUTranslations(io.BytesIO(compiled.read_bytes()))
                elif source.is_file():
                    catalogs[folder.name] = gettext.GNUTranslations(
                        io.BytesIO(compile_po(source.read_bytes()))
                    )
        return cls(catalogs)

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(sorted(self._catalogs))

    def for_locale(self, locale: str | discord.Locale | None) -> Language:
        """The language for a Discord locale ("es-ES", "es-419", "en-US"); English when unknown."""
        tag = str(locale.value if isinstance(locale, discord.Locale) else locale or "")
        code = tag.split("-")[0].lower()
        if code not in self._catalogs:
            code, tag = ENGLISH, "en-US"
        try:
            parsed = Locale.parse(tag, sep="-")
        except (UnknownLocaleError, ValueError):
            parsed = Locale.parse(code)
        return Language(code, parsed, self._catalogs[code])

    def translated(self, locale: str | discord.Locale | None) -> Language | None:
        """The language for a locale only where a catalog translates it (not English, not unknown)."""
        language = self.for_locale(locale)
        return None if language.code == ENGLISH else language


def compile_po(po: bytes) -> bytes:
    """A `.po` file as `.mo` bytes (fuzzy entries left out, as msgfmt does)."""
    out = io.BytesIO()
    write_mo(out, read_po(io.BytesIO(po), domain=DOMAIN))
    return out.getvalue()


class CommandTranslator(app_commands.Translator):
    """Slash command names, descriptions, option names and choices for Discord's localization fields,
    from the same catalogs."""

    def __init__(self, languages: Languages) -> None:
        self.languages = languages

    async def translate(
        self,
        string: app_commands.locale_str,
        locale: discord.Locale,
        context: app_commands.TranslationContextTypes,
    ) -> str | None:
        language = self.languages.translated(locale)
        if language is None:
            return None
        if context.location in NAME_LOCATIONS:
            return language.name(string.message)
        translated = language.translations.gettext(string.message)
        return translated if translated != string.message else None
