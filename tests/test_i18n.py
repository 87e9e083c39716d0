"""The catalogs: every text the code and the slash commands can show has a Spanish translation that keeps
its placeholders and Discord's limits; languages follow Discord locales, numbers the exact locale."""

from __future__ import annotations

import asyncio
import string
from pathlib import Path
from typing import Any

import discord
import pytest
from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po
from discord import app_commands

from bot import locale_tools
from bot.commands.buttons import ACTIONS, EditModal, OutpaintModal, RegionModal, label
from bot.i18n import CommandTranslator, Language, Languages
from bot.services.studio import MAX_JOB_ID
from engine.errors import RequestError
from engine.presets import load_presets
from tests.fake_discord import command_problems

SPANISH = ("es-ES", "es-419")
LOCALE_DIR = Path(locale_tools.__file__).parent / "locale"


@pytest.fixture(scope="module")
def template() -> Catalog:
    return locale_tools.template()


@pytest.fixture(scope="module")
def spanish_po() -> Catalog:
    with (LOCALE_DIR / "es" / "LC_MESSAGES" / "fluxbot.po").open("rb") as source:
        return read_po(source, domain="fluxbot")


@pytest.fixture(scope="module")
def languages() -> Languages:
    return Languages.load()


def _fields(text: str) -> set[tuple[str, str, str]]:
    """The str.format fields of a text: (name, conversion, format spec)."""
    return {(name, conv or "", spec or "") for _, name, spec, conv in string.Formatter().parse(text) if name}


def _key(message: Any) -> tuple[str | None, str]:
    msgid = message.id[0] if isinstance(message.id, tuple) else message.id
    return (message.context, msgid)


def test_the_committed_template_is_what_the_code_and_commands_have(template: Catalog) -> None:
    with (LOCALE_DIR / "fluxbot.pot").open("rb") as source:
        committed = read_po(source, domain="fluxbot")
    fresh = {_key(m) for m in template if m.id}
    stored = {_key(m) for m in committed if m.id}
    assert fresh - stored == set(), "new texts: run `make i18n` and translate them"
    assert stored - fresh == set(), "texts no longer in the code: run `make i18n`"


def test_every_text_has_a_spanish_translation_with_the_same_placeholders(
    template: Catalog, spanish_po: Catalog
) -> None:
    translated = {_key(m): m for m in spanish_po if m.id}
    problems = []
    for message in template:
        if not message.id:
            continue
        found = translated.get(_key(message))
        strings = (
            found.string
            if found is not None and isinstance(found.string, tuple)
            else (found and found.string,)
        )
        if found is None or found.fuzzy or not all(strings):
            problems.append(f"untranslated: {message.id!r}")
            continue
        ids = message.id if isinstance(message.id, tuple) else (message.id,)
        for text in strings:
            if not any(_fields(text) == _fields(source) for source in ids):
                problems.append(f"placeholders differ: {message.id!r} -> {text!r}")
    assert problems == []


def test_command_names_descriptions_and_choices_are_within_discords_limits_in_spanish(
    languages: Languages,
) -> None:
    tree: app_commands.CommandTree[discord.Client] = app_commands.CommandTree(
        discord.Client(intents=discord.Intents.none())
    )
    translator = CommandTranslator(languages)

    async def payloads() -> list[dict[str, Any]]:
        return [await c.get_translated_payload(tree, translator) for c in locale_tools.command_groups()]

    commands = asyncio.run(payloads())

    assert [p for c in commands for p in command_problems(c)] == []
    imagine = next(c for c in commands if c["name"] == "imagine")
    assert {imagine["name_localizations"][locale] for locale in SPANISH} == {"imaginar"}
    assert all(imagine["description_localizations"][locale] for locale in SPANISH)
    options = {o["name"]: o for o in imagine["options"]}
    assert options["size"]["name_localizations"]["es-419"] == "tamaño"
    assert "en-US" not in imagine.get("name_localizations", {}), "English is the default, not a localization"


def test_button_labels_and_the_edit_form_fit_discords_limits_in_every_language(languages: Languages) -> None:
    for code in ("en-US", *SPANISH):
        tr = languages.for_locale(code)
        assert all(1 <= len(label(tr, action)) <= 80 for action in ACTIONS)
        modal = EditModal(MAX_JOB_ID, tr)
        assert len(modal.title) <= 45 and len(modal.instruction.label or "") <= 45
        assert len(modal.instruction.placeholder or "") <= 100
        for form in (RegionModal(MAX_JOB_ID, tr), OutpaintModal(MAX_JOB_ID, "zoom15", tr)):
            assert len(form.title) <= 45 and len(form.custom_id) <= 100
            for field in form.children:
                assert isinstance(field, discord.ui.TextInput)
                assert len(field.label or "") <= 45 and len(field.placeholder or "") <= 100


@pytest.mark.parametrize(
    ("locale", "code", "number"),
    [
        ("es-ES", "es", "1,2 MB"),
        ("es-419", "es", "1.2 MB"),
        ("en-US", "en", "1.2 MB"),
        ("ja", "en", "1.2 MB"),
    ],
)
def test_a_discord_locale_picks_the_catalog_and_its_own_numbers(
    languages: Languages, locale: str, code: str, number: str
) -> None:
    tr = languages.for_locale(locale)
    text = tr.tr("That image is {mb:.1f} MB; the limit is {limit:g} MB.", mb=1.25, limit=10.0)

    assert tr.code == code and number in text
    assert ("Esa imagen" in text) == (code == "es")


def test_unknown_and_missing_locales_are_english(languages: Languages) -> None:
    for locale in (None, "", "xx-XX", "fr", discord.Locale.japanese):
        assert languages.for_locale(locale).code == "en"
    assert languages.translated("en-GB") is None and languages.translated("es-419") is not None


def test_an_engine_refusal_is_translated_with_the_messages_inside_it(languages: Languages) -> None:
    presets = load_presets(Path(__file__).parent.parent / "config" / "presets.toml")
    with pytest.raises(RequestError) as caught:
        presets["dev"].parse_size("123x77")

    spanish: Language = languages.for_locale("es-ES")
    assert str(caught.value).startswith("size 123x77 for preset dev: width and height must be multiples")
    assert spanish.message(caught.value.message) == (
        "tamaño 123x77 para el preset dev: el ancho y el alto deben ser múltiplos de 16"
    )


def test_the_english_default_is_the_template_itself(languages: Languages) -> None:
    english = languages.for_locale("en-US")

    assert english.tr("job {job}", job=7) == "job 7"
    assert english.name("imagine") == "imagine" and languages.for_locale("es-ES").name("admin") is None
    assert english.duration(65) == "65 s" and english.duration(125) == "2 min 05 s"


def test_a_stored_failure_reason_is_shown_in_the_readers_language(languages: Languages) -> None:
    from bot.render import stored_reason
    from bot.services.redis_executor import TIMED_OUT, WORKERS_DIED

    spanish = languages.for_locale("es-ES")

    assert stored_reason(spanish, WORKERS_DIED.format(tries=3)).startswith(
        "El worker que dibujaba esto se detuvo 3"
    )
    assert stored_reason(spanish, TIMED_OUT).startswith("Esto tardó más")
    assert stored_reason(spanish, "CUDA out of memory") == "CUDA out of memory", "others stay as stored"


def test_a_long_stored_error_or_answer_stays_inside_discords_message_limit(languages: Languages) -> None:
    from bot import render
    from bot.store.models import Job, JobKind, JobStatus
    from tests.bot_support import spec_for

    job = Job(id=7, user_id=1, kind=JobKind.IMAGINE, spec=spec_for("x" * 2000), status=JobStatus.FAILED)
    job.error = "e" * 2000  # what the store keeps at most
    for locale in ("en-US", "es-ES"):
        text = render.final(languages.for_locale(locale), job)
        assert len(text) == render.MESSAGE_LIMIT and text.endswith("…")
    assert render.fit("short") == "short"
