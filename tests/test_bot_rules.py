"""Community rules through the real discord.py client and the fake Discord: a server admin (Manage Server
in a server the operator listed) changes that server's role and channel rules and nothing else, in no
other server; drawing outside the drawing channels is a private one-liner naming where to go."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from engine.settings import EngineSettings
from tests.discord_support import ALICE, BOB, Harness, finished_message, make_bot_settings, opt, running_bot
from tests.fake_discord import (
    BOOSTER_ROLE,
    CHANNEL_ID,
    GUILD_ID,
    OTHER_CHANNEL_ID,
    OTHER_GUILD_ID,
    PRIVATE_CHANNEL_ID,
    FakeDiscord,
)

pytestmark = pytest.mark.usefixtures("database_backend")  # on SQLite and on PostgreSQL

GLOBAL_ONLY = "Only fluxbot admins can do that."
SERVER_REFUSAL = "Only fluxbot admins (or this server's admins, where allowed) can do that."


@pytest.fixture
async def harness(
    fake: FakeDiscord, tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> AsyncIterator[Harness]:
    """The bot where the first fake server's own admins may set its rules (the second's may not)."""
    settings = make_bot_settings(tmp_path, make_settings, fake, server_admin_guilds=[GUILD_ID])
    async with running_bot(fake, settings, data_dir) as started:
        yield started


def sub(name: str, *options: dict[str, Any]) -> dict[str, Any]:
    kind = 2 if options and options[0].get("type") == 1 else 1
    return {"name": name, "type": kind, "options": list(options)}


def answer(fake: FakeDiscord, token: str) -> str:
    """Every private text sent for one interaction (a refusal, or the edited deferred answer)."""
    texts = []
    for call in fake.calls:
        body = call.json if isinstance(call.json, dict) else {}
        data = body.get("data", body)
        if token in call.path and isinstance(data, dict) and data.get("content"):
            texts.append(str(data["content"]))
    return "\n".join(texts)


async def said(fake: FakeDiscord, token: str, text: str) -> str:
    try:
        await fake.wait_for(lambda: text in answer(fake, token), timeout=10)
    except TimeoutError:
        raise AssertionError(f"waited for {text!r}; the answers were {answer(fake, token)!r}") from None
    return answer(fake, token)


# Every /admin subcommand that changes or shows the global scope, with options that would work.
GLOBAL_COMMANDS: list[dict[str, Any]] = [
    sub("presets"),
    sub("preset-set", opt("name", "dev"), opt("field", "steps"), opt("value", "7")),
    sub("loras"),
    sub("lora-add", opt("name", "x"), opt("file", "x.safetensors"), opt("sha256", "0" * 64)),
    sub("lora-remove", opt("name", "x")),
    sub("limits", opt("field", "max_queue"), opt("value", 5, 10)),
    sub("unban", {"name": "user", "type": 6, "value": str(BOB)}),
    sub("stats"),
    sub("queue"),
    sub("workers"),
    sub("cancel", opt("job_id", 1, 4)),
    sub("pause"),
    sub("resume"),
    sub("blocklist", sub("add", opt("term", "kitten"))),
    sub("blocklist", sub("remove", opt("term", "kitten"))),
    sub("blocklist", sub("list")),
    sub("server-weight", {"name": "weight", "type": 10, "value": 5}),
]


async def test_a_server_admin_changes_their_servers_rules_and_nothing_else(harness: Harness) -> None:
    fake, app = harness.fake, harness.app
    alice = fake.member(ALICE, "alice", admin=True)  # Manage Server, not one of the operator's admins
    bob = fake.member(BOB, "bob")
    role_set = sub(
        "role",
        sub(
            "set",
            {"name": "role", "type": 8, "value": str(BOOSTER_ROLE)},
            opt("field", "jobs_per_window"),
            opt("value", "9"),
        ),
    )

    here = await fake.slash("admin", [role_set], alice, roles=[BOOSTER_ROLE])
    assert "jobs_per_window = 9" in await said(fake, here, "jobs_per_window")
    assert app.studio.community.roles_of(GUILD_ID)[BOOSTER_ROLE].jobs_per_window == 9

    # the same admin in the other server (not listed by the operator): refused, nothing stored there
    there = await fake.slash("admin", [role_set], alice, channel_id=OTHER_CHANNEL_ID, roles=[BOOSTER_ROLE])
    await said(fake, there, SERVER_REFUSAL)
    assert app.studio.community.roles_of(OTHER_GUILD_ID) == {}
    # without Manage Server: refused
    plain = await fake.slash("admin", [role_set], bob, roles=[BOOSTER_ROLE])
    await said(fake, plain, SERVER_REFUSAL)

    # every global /admin subcommand: refused, with nothing changed
    for command in GLOBAL_COMMANDS:
        token = await fake.slash("admin", [command], alice, users=[bob])
        await said(fake, token, GLOBAL_ONLY)
    assert not app.queue.paused and app.studio.limits.max_queue != 5
    assert app.studio.rules.catalog.presets["dev"].steps != 7 and app.studio.community.server_weights == {}
    audit = {entry.action for entry in await app.admin.store.audit(50)}
    assert audit == {"role.set"}

    # /admin rules: what Bob (no role) and a booster may do here, and why
    rules = await fake.slash(
        "admin", [sub("rules", {"name": "member", "type": 6, "value": str(BOB)})], alice, users=[bob]
    )
    text = await said(fake, rules, "Rules for")
    assert "jobs per window: 50 (global default)" in text and "draws here: yes" in text


async def test_drawing_outside_the_drawing_channels_is_a_private_one_liner(harness: Harness) -> None:
    fake = harness.fake
    alice = fake.member(ALICE, "alice", admin=True)
    draw_here = sub(
        "channel",
        sub(
            "draw",
            {"name": "channel", "type": 7, "value": str(CHANNEL_ID)},
            {"name": "allowed", "type": 5, "value": True},
        ),
    )
    token = await fake.slash("admin", [draw_here], alice, channels=[CHANNEL_ID])
    await said(fake, token, f"<#{CHANNEL_ID}>")

    elsewhere = await fake.slash(
        "imagine", [opt("prompt", "a cat")], fake.member(BOB, "bob", roles=[]), channel_id=PRIVATE_CHANNEL_ID
    )
    refusal = await said(fake, elsewhere, "Drawing happens in")
    assert refusal.strip() == f"Drawing happens in <#{CHANNEL_ID}> on this server."
    assert fake.response_to(elsewhere)["data"]["flags"] & 64  # type: ignore[index]

    here = await fake.slash("imagine", [opt("prompt", "a cat")], fake.member(BOB, "bob"))
    assert await finished_message(fake, here)
    other_server = await fake.slash(
        "imagine", [opt("prompt", "a cat")], fake.member(BOB, "bob"), channel_id=OTHER_CHANNEL_ID
    )
    assert await finished_message(fake, other_server), "another server's channels are not this one's rules"


async def test_a_server_admin_sets_their_servers_own_limits_and_blocked_terms(harness: Harness) -> None:
    fake, app = harness.fake, harness.app
    alice = fake.member(ALICE, "alice", admin=True)
    scope = {"name": "scope", "type": 3, "value": "server"}
    limit = sub("limits", opt("field", "jobs_per_window"), opt("value", 3, 10), scope)
    block = sub("blocklist", sub("add", opt("term", "dragon"), scope))

    token = await fake.slash("admin", [limit], alice)
    text = await said(fake, token, "jobs_per_window = 3 (this server)")
    assert "max_queue = " in text and "(global)" in text
    await said(fake, await fake.slash("admin", [block], alice), "Blocked: dragon")
    # the same in a server the operator did not list: refused, nothing changed there
    await said(fake, await fake.slash("admin", [limit], alice, channel_id=OTHER_CHANNEL_ID), SERVER_REFUSAL)
    await said(fake, await fake.slash("admin", [block], alice, channel_id=OTHER_CHANNEL_ID), SERVER_REFUSAL)

    assert app.studio.limits_for(GUILD_ID).jobs_per_window == 3 and app.studio.limits.jobs_per_window != 3
    assert app.studio.limits_for(OTHER_GUILD_ID).jobs_per_window == app.studio.limits.jobs_per_window
    refused = await fake.slash("imagine", [opt("prompt", "a red dragon")], fake.member(BOB, "bob"))
    await said(fake, refused, "blocked here")
    elsewhere = await fake.slash(
        "imagine", [opt("prompt", "a red dragon")], fake.member(BOB, "bob"), channel_id=OTHER_CHANNEL_ID
    )
    assert await finished_message(fake, elsewhere)
