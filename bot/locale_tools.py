"""`make i18n`: the message catalog template from the code, merged into every language's `.po`.

Two sources, one template (bot/locale/fluxbot.pot): babel's extractor (what `pybabel extract` runs) over
bot/ and engine/ with the keywords in bot/i18n.py, and the slash commands' names, descriptions, option
names and choices as discord.py hands them to a Translator (names under the msgctxt "name"). Each
`bot/locale/<code>/LC_MESSAGES/fluxbot.po` is then updated like `pybabel update` does: new templates
come in untranslated, changed ones fuzzy, and tests/test_i18n.py fails until someone translates them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import discord
from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po, write_po
from discord import app_commands

from bot.i18n import DOMAIN, EXTRACT_KEYWORDS, NAME_CONTEXT, NAME_LOCATIONS

ROOT = Path(__file__).resolve().parent.parent
LOCALE_DIR = Path(__file__).resolve().parent / "locale"
TEMPLATE = LOCALE_DIR / f"{DOMAIN}.pot"
SOURCES = ("bot", "engine")


class _Recorder(app_commands.Translator):
    """Notes every string discord.py asks to translate, and translates none."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str | None, str], str] = {}

    async def translate(
        self,
        string: app_commands.locale_str,
        locale: discord.Locale,
        context: app_commands.TranslationContextTypes,
    ) -> str | None:
        key = (NAME_CONTEXT if context.location in NAME_LOCATIONS else None, string.message)
        self.seen.setdefault(key, context.location.name)
        return None


def command_groups() -> list[app_commands.Command[Any, ..., Any] | app_commands.Group]:
    from bot.commands.admin import AdminCommands
    from bot.commands.imagine import COMMANDS

    return [*COMMANDS, AdminCommands("manage_guild")]


async def command_strings() -> dict[tuple[str | None, str], str]:
    """(msgctxt, msgid) -> where discord.py uses it, for every translatable string of the commands."""
    recorder = _Recorder()
    tree: app_commands.CommandTree[discord.Client] = app_commands.CommandTree(
        discord.Client(intents=discord.Intents.none())
    )
    for command in command_groups():
        await command.get_translated_payload(tree, recorder)
    return recorder.seen


def template() -> Catalog:
    """Every message id of the code and of the commands, as a fresh catalog template."""
    catalog = Catalog(project="fluxbot", domain=DOMAIN, fuzzy=False)
    for source in SOURCES:
        python = [("**.py", "python")]
        found = extract_from_dir(
            ROOT / source, method_map=python, keywords=EXTRACT_KEYWORDS, comment_tags=("i18n:",)
        )
        for filename, lineno, message, comments, context in found:
            if not message or (isinstance(message, tuple) and not all(message)):
                continue
            line = [(f"{source}/{filename}", lineno)]
            catalog.add(message, locations=line, auto_comments=comments, context=context)
    for (context, msgid), where in sorted(asyncio.run(command_strings()).items(), key=lambda kv: kv[0][1]):
        catalog.add(msgid, context=context, auto_comments=[f"discord: {where}"])
    return catalog


def write(catalog: Catalog, path: Path) -> None:
    with path.open("wb") as out:
        write_po(out, catalog, width=100, sort_output=True, include_lineno=False, ignore_obsolete=True)


def main() -> None:
    fresh = template()
    write(fresh, TEMPLATE)
    for po in sorted(LOCALE_DIR.glob(f"*/LC_MESSAGES/{DOMAIN}.po")):
        with po.open("rb") as source:
            catalog = read_po(source, domain=DOMAIN)
        catalog.update(fresh, update_header_comment=False)
        write(catalog, po)
        missing = sum(1 for m in catalog if m.id and (not m.string or m.fuzzy))
        print(f"{po.relative_to(ROOT)}: {len(catalog)} messages, {missing} to translate")
    print(f"{TEMPLATE.relative_to(ROOT)}: {len(fresh)} messages")


if __name__ == "__main__":
    main()
