"""Languages through the real discord.py client and the fake Discord: a Spanish server, Spanish and English
members. Public messages (queued, progress, result, buttons) follow the server's locale; private answers
(errors, /history, /admin) the member's own; a locale without a catalog is English."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from PIL import Image

from engine.settings import EngineSettings
from tests.discord_support import (
    ADMIN,
    ALICE,
    BOB,
    Harness,
    finished_message,
    job_id_of,
    make_bot_settings,
    opt,
    png_of,
    running_bot,
)
from tests.fake_discord import FakeDiscord

pytestmark = pytest.mark.usefixtures("database_backend")  # on SQLite and on PostgreSQL


@pytest.fixture
async def spanish_server(
    fake: FakeDiscord, tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> AsyncIterator[Harness]:
    """The bot in servers whose language is Spanish (Spain)."""
    fake.guild_locale = "es-ES"
    async with running_bot(fake, make_bot_settings(tmp_path, make_settings, fake), data_dir) as started:
        yield started


def _private_text(fake: FakeDiscord, token: str) -> str:
    """The content of the ephemeral answers to one interaction, joined."""
    texts = []
    for call in fake.calls:
        body = call.json if isinstance(call.json, dict) else {}
        data = body.get("data", body)
        if token in call.path and isinstance(data, dict) and data.get("flags", 0) & 64:
            texts.append(str(data.get("content", "")))
    return "\n".join(texts)


async def _private(fake: FakeDiscord, token: str, text: str) -> str:
    await fake.wait_for(lambda: text in _private_text(fake, token))
    return _private_text(fake, token)


async def test_synced_commands_carry_spanish_names_and_descriptions(spanish_server: Harness) -> None:
    commands = {c["name"]: c for c in spanish_server.fake.commands}

    imagine = commands["imagine"]
    assert imagine["name_localizations"]["es-ES"] == imagine["name_localizations"]["es-419"] == "imaginar"
    assert (
        imagine["description_localizations"]["es-ES"]
        and imagine["description"] == "Draw a picture from a prompt"
    )
    seed = next(o for o in imagine["options"] if o["name"] == "seed")
    assert seed["name_localizations"]["es-419"] == "semilla"
    limits = next(o for o in commands["admin"]["options"] if o["name"] == "limits")
    field = next(o for o in limits["options"] if o["name"] == "field")
    assert all(choice["name_localizations"]["es-ES"] for choice in field["choices"])


async def test_a_job_in_a_spanish_server_is_public_in_spanish_and_private_in_each_members_language(
    spanish_server: Harness,
) -> None:
    fake = spanish_server.fake
    token = await fake.slash(
        "imagine",
        [opt("prompt", "un gato rojo"), opt("seed", 7, 4), opt("steps", 24, 4), opt("size", "512x512")],
        fake.member(ALICE, "alice"),
        locale="es-ES",
    )
    message = await finished_message(fake, token)

    first = fake.response_to(token)
    assert first is not None and "trabajo" in first["data"]["content"] and "ETA" in first["data"]["content"]
    edits = [
        c.json.get("content", "") for c in fake.calls if c.method == "PATCH" and token in c.path and c.json
    ]
    assert any("pasos" in e and "quedan" in e for e in edits), "the progress bar in Spanish"
    assert "semilla 7" in message["content"] and "trabajo" in message["content"]
    labels = [c.get("label") for row in message["components"] for c in row["components"]]
    assert {"Otra tirada", "Variar (sutil)", "Ampliar"} <= set(labels)

    with Image.open(io.BytesIO(png_of(fake, message))) as png:
        parameters = png.text["parameters"]  # type: ignore[attr-defined]
    assert parameters.startswith("un gato rojo\nSteps: 24"), "recipes stay English (A1111 reads them)"
    job_id = job_id_of(message)
    pressed = await fake.click(
        message["id"], f"fluxbot:subtle:{job_id}", fake.member(BOB, "bob"), locale="en-US"
    )
    varied = await fake.wait_for(lambda: fake.response_to(pressed))
    assert "trabajo" in varied["data"]["content"], "a Vary press's queued message is public: Spanish"
    assert "variar (sutil) del trabajo" in (await finished_message(fake, pressed))["content"]

    spanish = await fake.slash("history", [], fake.member(ALICE, "alice"), locale="es-419")
    english = await fake.slash("history", [], fake.member(ALICE, "alice"), locale="en-US")

    assert "un gato rojo" in await _private(fake, spanish, "Trabajos de")
    assert "hecho" in _private_text(fake, spanish)
    assert "done" in await _private(fake, english, "Jobs of")


async def test_a_result_posted_by_another_member_is_in_the_servers_language(spanish_server: Harness) -> None:
    # An English member's job in the Spanish server: its public messages are Spanish (the channel reads
    # them), their own refusal is English.
    fake = spanish_server.fake
    token = await fake.slash("imagine", [opt("prompt", "a cat")], fake.member(BOB, "bob"), locale="en-US")
    message = await finished_message(fake, token)
    assert "semilla" in message["content"]

    refused = await fake.slash(
        "imagine", [opt("prompt", "a cat"), opt("size", "123x77")], fake.member(BOB, "bob"), locale="en-US"
    )
    assert "multiples of 16" in await _private(fake, refused, "multiples")


@pytest.mark.parametrize(
    ("locale", "expected"),
    [
        ("es-ES", "el ancho y el alto deben ser múltiplos de 16"),
        ("es-419", "el ancho y el alto deben ser múltiplos de 16"),
        ("en-US", "width and height must be multiples of 16"),
        ("ja", "width and height must be multiples of 16"),
    ],
)
async def test_a_refused_size_is_answered_in_the_members_language(
    spanish_server: Harness, locale: str, expected: str
) -> None:
    fake = spanish_server.fake
    token = await fake.slash(
        "imagine", [opt("prompt", "a cat"), opt("size", "123x77")], fake.member(ALICE, "alice"), locale=locale
    )

    await _private(fake, token, expected)


async def test_a_blocked_term_and_an_admin_view_in_spanish(spanish_server: Harness) -> None:
    fake = spanish_server.fake
    admin = fake.member(ADMIN, "admin", admin=True)
    added = await fake.slash(
        "admin", [_sub("blocklist", _sub("add", opt("term", "dragon")))], admin, locale="es-ES"
    )
    await _admin_answer(fake, added, "Bloqueado")

    spanish = await fake.slash(
        "imagine", [opt("prompt", "a red dragon")], fake.member(ALICE, "a"), locale="es-ES"
    )
    english = await fake.slash(
        "imagine", [opt("prompt", "a red dragon")], fake.member(BOB, "b"), locale="en-US"
    )
    await _private(fake, spanish, "término bloqueado")
    await _private(fake, english, "term that is blocked")

    stats = await fake.slash("admin", [_sub("stats")], admin, locale="es-419")
    text = await _admin_answer(fake, stats, "Estadísticas de fluxbot")
    assert "trabajos hoy" in text and "tiempo activo" in text


def _sub(name: str, *options: dict[str, object]) -> dict[str, object]:
    """A subcommand (or subcommand group, when its option is a subcommand) option."""
    kind = 2 if options and options[0].get("type") == 1 else 1
    return {"name": name, "type": kind, "options": list(options)}


async def _admin_answer(fake: FakeDiscord, token: str, text: str) -> str:
    """/admin answers by deferring privately and editing that answer."""

    def edited() -> str | None:
        for call in fake.calls:
            if call.method == "PATCH" and token in call.path and isinstance(call.json, dict):
                content = str(call.json.get("content", ""))
                if text in content:
                    return content
        return None

    found: str = await fake.wait_for(edited)
    return found
