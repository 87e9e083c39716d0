"""Hostile members of a public server, through the real client and the fake Discord: whose jobs they can
reach, what echoed text can do, the nsfw rule, blocked terms and the image classifier."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bot.store.models import Job
from engine.engine import FluxEngine
from engine.png import read_recipe
from engine.settings import EngineSettings
from fluxbot.settings import SafetySettings
from tests.conftest import FAST_PRESETS
from tests.discord_support import (
    ADMIN,
    ALICE,
    BOB,
    Harness,
    finished_message,
    is_ephemeral_error,
    make_bot_settings,
    make_tiny_classifier,
    opt,
    png_of,
)
from tests.fake_discord import (
    ADMIN_ROLE,
    CHANNEL_ID,
    NSFW_CHANNEL_ID,
    OTHER_CHANNEL_ID,
    PRIVATE_CHANNEL_ID,
    FakeDiscord,
)
from tests.lora_support import make_lora, sha, whitelist_toml

pytestmark = pytest.mark.usefixtures("database_backend")  # on SQLite and on PostgreSQL

CAROL = 111000000000000004  # a moderator: her role can view the private channel
NOT_FOUND = "There is no job"


def alice(fake: FakeDiscord) -> dict[str, Any]:
    return fake.member(ALICE, "alice", roles=[ADMIN_ROLE])  # may post in every channel


def bob(fake: FakeDiscord) -> dict[str, Any]:
    return fake.member(BOB, "bob")  # @everyone only: cannot view the private channel


async def draw(fake: FakeDiscord, member: dict[str, Any], channel: int, prompt: str) -> dict[str, Any]:
    token = await fake.slash(
        "imagine", [opt("prompt", prompt), opt("seed", 7, 4)], member, channel_id=channel
    )
    return await finished_message(fake, token)


async def job_of(harness: Harness, message: dict[str, Any]) -> Job:
    job = await harness.app.jobs.by_message(int(message["id"]))
    assert job is not None
    return job  # type: ignore[no-any-return]


async def refused(fake: FakeDiscord, token: str, text: str = NOT_FOUND) -> bool:
    return bool(await fake.wait_for(lambda: is_ephemeral_error(fake, token, text)))


async def test_rerun_reaches_only_jobs_the_asker_may_see(harness: Harness) -> None:
    fake = harness.fake
    public = await job_of(harness, await draw(fake, alice(fake), CHANNEL_ID, "public owl"))
    private = await job_of(harness, await draw(fake, alice(fake), PRIVATE_CHANNEL_ID, "mods owl"))
    elsewhere = await job_of(harness, await draw(fake, alice(fake), OTHER_CHANNEL_ID, "other guild owl"))
    in_dm = await job_of(harness, await draw(fake, alice(fake), fake.dm_channel(ALICE), "dm owl"))

    async def rerun(member: dict[str, Any], job_id: int, channel: int = CHANNEL_ID) -> str:
        return await fake.slash("rerun", [opt("job_id", job_id, 4)], member, channel_id=channel)

    # Bob in the public channel: the public job only. Hidden channel, other guild, DM, and an id that
    # never existed all get the same "not found".
    assert (await finished_message(fake, await rerun(bob(fake), public.id)))["attachments"]
    # (2**64 and -1: Discord sends no such integers, but nothing may depend on that.)
    for job_id in (private.id, elsewhere.id, in_dm.id, 987654, 2**64, -1):
        assert await refused(fake, await rerun(bob(fake), job_id))
    # From another guild the public job of this guild is not found either; from a DM neither.
    assert await refused(fake, await rerun(bob(fake), public.id, OTHER_CHANNEL_ID))
    assert await refused(fake, await rerun(bob(fake), public.id, fake.dm_channel(BOB)))
    # Carol's role views the private channel: she may rerun that one.
    carol = fake.member(CAROL, "carol", roles=[ADMIN_ROLE])
    assert (await finished_message(fake, await rerun(carol, private.id)))["attachments"]
    # The owner reaches every job of her own, her DM job included, from anywhere.
    assert (await finished_message(fake, await rerun(alice(fake), in_dm.id)))["attachments"]
    assert (await finished_message(fake, await rerun(alice(fake), elsewhere.id)))["attachments"]


async def test_history_of_someone_else_lists_only_what_the_asker_may_see(harness: Harness) -> None:
    fake = harness.fake
    for channel, prompt in [
        (CHANNEL_ID, "public fox"),
        (PRIVATE_CHANNEL_ID, "mods fox"),
        (OTHER_CHANNEL_ID, "other guild fox"),
        (fake.dm_channel(ALICE), "dm fox"),
    ]:
        await draw(fake, alice(fake), channel, prompt)

    async def history(member: dict[str, Any], channel: int) -> str:
        token = await fake.slash(
            "history", [opt("user", str(ALICE), 6)], member, channel_id=channel, users=[alice(fake)]
        )
        message = await fake.wait_for(lambda: fake.original(token))
        assert message["flags"] & 64  # private to the asker
        return str(message["content"])

    by_bob = await history(bob(fake), CHANNEL_ID)
    by_carol = await history(fake.member(CAROL, "carol", roles=[ADMIN_ROLE]), CHANNEL_ID)
    from_a_dm = await history(bob(fake), fake.dm_channel(BOB))
    own = await fake.slash("history", [], alice(fake), channel_id=CHANNEL_ID)
    mine = str((await fake.wait_for(lambda: fake.original(own)))["content"])

    assert "public fox" in by_bob and not {"mods fox", "other guild fox", "dm fox"} & set(_prompts(by_bob))
    assert {"public fox", "mods fox"} == set(_prompts(by_carol))
    assert "No jobs" in from_a_dm and "fox" not in from_a_dm
    assert {"public fox", "mods fox", "other guild fox", "dm fox"} == set(_prompts(mine))


def _prompts(history_text: str) -> list[str]:
    return [line.rsplit("· ", 1)[-1] for line in history_text.splitlines()[1:]]


async def test_buttons_and_reactions_follow_the_same_rule(harness: Harness) -> None:
    fake = harness.fake
    public = await draw(fake, alice(fake), CHANNEL_ID, "public heron")
    private = await draw(fake, alice(fake), PRIVATE_CHANNEL_ID, "mods heron")
    private_job = await job_of(harness, private)

    # A member who cannot view the channel (a stale client, a forged event) gets "not found".
    token = await fake.click(private["id"], f"fluxbot:reroll:{private_job.id}", bob(fake))
    assert await refused(fake, token)
    await fake.react(private["id"], "🔁", bob(fake))
    # ... while the same actions on the public result work, as Bob's own jobs.
    clicked = await fake.click(public["id"], f"fluxbot:vary:{(await job_of(harness, public)).id}", bob(fake))
    assert (await finished_message(fake, clicked))["attachments"]
    await fake.react(public["id"], "🔁", bob(fake))
    await fake.wait_for(lambda: len(_posted_rerolls(fake)) == 1)
    await harness.app.queue.wait_idle(30)

    bobs, _ = await harness.app.jobs.history(BOB, 1, 20)
    assert sorted(job.kind.value for job in bobs) == ["reroll", "variation"]
    assert all(job.parent_id != private_job.id for job in bobs)


def _posted_rerolls(fake: FakeDiscord) -> list[Any]:
    """Channel posts answering Bob's 🔁 reactions (their content changes later, the post stays)."""
    posts = fake.calls_to("POST", "/channels/")
    return [c for c in posts if str((c.json or {}).get("content", "")).startswith(f"<@{BOB}> 🔁")]


HOSTILE = (
    "@everyone @here <@&{role}> <@{bob}> [free nitro](https://evil.example/claim) **big** \u202eevil\x00 end"
)


async def test_mentions_markdown_and_bidi_in_prompts_are_echoed_inert(harness: Harness) -> None:
    fake = harness.fake
    prompt = HOSTILE.format(role=ADMIN_ROLE, bob=BOB)
    result = await draw(fake, alice(fake), CHANNEL_ID, prompt)
    await fake.react(result["id"], "🔁", bob(fake))  # a channel post that mentions its owner
    clicked = await fake.click(
        result["id"], f"fluxbot:reroll:{(await job_of(harness, result)).id}", bob(fake)
    )
    await finished_message(fake, clicked)
    await fake.wait_for(lambda: len(_posted_rerolls(fake)) == 1)
    await harness.app.queue.wait_idle(30)
    history = await fake.slash("history", [], alice(fake))
    await fake.wait_for(lambda: fake.original(history))

    stored = (await job_of(harness, result)).spec.prompt
    assert "\x00" not in stored and "\u202e" not in stored
    recipe = read_recipe(png_of(fake, result))
    assert recipe.prompt == stored
    bodies = _message_bodies(fake)
    assert len(bodies) >= 8  # queued, progress, results, the reaction's post, history...
    for body in bodies:
        mentions = body.get("allowed_mentions")
        assert mentions is not None, body  # every message says whom it may ping
        assert mentions.get("parse", []) == [] and not mentions.get("roles"), body
        assert {int(user) for user in mentions.get("users", [])} <= {ALICE, BOB}, body
        content = body["content"]
        assert "@everyone" not in content and "@here" not in content
        assert f"<@&{ADMIN_ROLE}>" not in content and f"<@{BOB}> [free" not in content
        assert "](https://" not in content and "https://evil" not in content
        assert "\u202e" not in content and "\x00" not in content
        assert "**big**" not in content
    for body in bodies:  # the one user a message may ping is the one it mentions, if any
        mentioned = set(re.findall(r"<@(\d+)>", body["content"]))
        assert mentioned <= {str(u) for u in body["allowed_mentions"].get("users", [])}, body
        assert len(mentioned) <= 1, body


def _message_bodies(fake: FakeDiscord) -> list[dict[str, Any]]:
    """The JSON of every message the bot sent or edited: channel posts, webhook edits and followups,
    interaction responses; only those that carry text."""
    bodies = []
    for call in fake.calls:
        body = call.json
        if not isinstance(body, dict) or call.method not in ("POST", "PATCH"):
            continue
        if call.path.endswith("/callback"):
            body = body.get("data") or {}
        if body.get("content"):
            bodies.append(body)
    return bodies


# --- the content policy ---------------------------------------------------------------------------


SPICY_PRESET = """
[spicy]
family = "flux1"
steps = 2
steps_range = [1, 8]
width = 64
height = 64
megapixels_range = [0.001, 2.1]
nsfw = true
"""


@pytest.fixture
async def policy_bot(
    fake: FakeDiscord,
    tmp_path: Path,
    make_settings: Callable[..., EngineSettings],
    data_dir: Path,
    tiny_dir: Path,
) -> AsyncIterator[Callable[..., Any]]:
    """Starts the bot with an nsfw preset, an nsfw LoRA and the given safety settings."""
    started: list[Harness] = []
    presets = tmp_path / "presets.toml"
    presets.write_text(FAST_PRESETS + SPICY_PRESET)
    lora_dir = tmp_path / "loras"
    lora = make_lora(tiny_dir, lora_dir, "lewd", seed=3)
    whitelist = tmp_path / "loras.toml"
    whitelist.write_text(whitelist_toml({"lewd": {"file": lora.name, "sha256": sha(lora)}}) + "nsfw = true\n")

    async def start(**safety: Any) -> Harness:
        engine_settings = make_settings(presets_file=presets, loras_file=whitelist, lora_dir=lora_dir)
        settings = make_bot_settings(
            tmp_path, lambda **kw: engine_settings, fake, safety=SafetySettings(**safety)
        )
        engine = await asyncio.to_thread(FluxEngine.load, settings.engine, data_dir)
        harness = Harness(fake, settings, engine)
        await harness.start()
        started.append(harness)
        return harness

    yield start
    for harness in started:
        await harness.stop()


async def test_nsfw_presets_and_loras_only_in_age_restricted_channels_and_dms(
    policy_bot: Callable[..., Any],
) -> None:
    harness = await policy_bot()
    fake = harness.fake

    async def imagine(channel: int, *options: dict[str, Any]) -> str:
        return await fake.slash(
            "imagine", [opt("prompt", "a figure"), *options], alice(fake), channel_id=channel
        )

    spicy, lewd = opt("preset", "spicy"), opt("lora", "lewd")
    assert await refused(fake, await imagine(CHANNEL_ID, spicy), "age-restricted channels")
    assert await refused(fake, await imagine(CHANNEL_ID, lewd), "LoRA 'lewd' can only be used")
    assert (await finished_message(fake, await imagine(NSFW_CHANNEL_ID, spicy)))["attachments"]
    assert (await finished_message(fake, await imagine(NSFW_CHANNEL_ID, lewd)))["attachments"]
    assert (await finished_message(fake, await imagine(fake.dm_channel(ALICE), spicy)))["attachments"]
    # A result from the age-restricted channel cannot be rerun into a normal one, even by its owner.
    result = await finished_message(fake, await imagine(NSFW_CHANNEL_ID, spicy))
    job = await job_of(harness, result)
    rerun = await fake.slash("rerun", [opt("job_id", job.id, 4)], alice(fake), channel_id=CHANNEL_ID)
    assert await refused(fake, rerun, "age-restricted channels")


async def test_blocked_terms_with_obfuscations_are_refused_and_the_list_is_audited(
    harness: Harness,
) -> None:
    fake = harness.fake
    admin = fake.member(ADMIN, "admin")

    async def blocklist(action: str, *options: dict[str, Any]) -> str:
        sub = {
            "name": "blocklist",
            "type": 2,
            "options": [{"name": action, "type": 1, "options": list(options)}],
        }
        token = await fake.slash("admin", [sub], admin)
        return str(
            (await fake.wait_for(lambda: (m := fake.original(token)) and m["content"] and m))["content"]
        )

    assert "Blocked: nude" in await blocklist("add", opt("term", "  NUDE "))
    assert "Blocked: blood bath" in await blocklist("add", opt("term", "Blood-Bath"))
    for prompt in [
        "N U D E portrait",
        "n.u.d.e",
        "nüde",
        "ｎｕｄｅ",
        "nuuude",
        "nud3",
        "$nude",
        "a bloodbath",
    ]:
        token = await fake.slash("imagine", [opt("prompt", prompt)], alice(fake))
        assert await refused(fake, token, "blocked here"), prompt
    token = await fake.slash("imagine", [opt("prompt", "a grapefruit in the nude-colored box")], alice(fake))
    assert await refused(fake, token, "blocked here")  # "nude" is a whole word there
    fine = await fake.slash("imagine", [opt("prompt", "a grapefruit")], alice(fake))
    assert (await finished_message(fake, fine))["attachments"]
    assert "blood bath, nude" in await blocklist("list")
    assert "No longer blocked: nude" in await blocklist("remove", opt("term", "nude"))
    allowed = await fake.slash("imagine", [opt("prompt", "nude sculpture, marble")], alice(fake))
    assert (await finished_message(fake, allowed))["attachments"]

    audit = await harness.app.admin.store.audit()
    assert [e.action for e in audit[:3]] == ["blocklist.remove", "blocklist.add", "blocklist.add"]
    assert audit[0].actor_id == ADMIN
    stored = await harness.app.admin.store.setting("blocklist")
    assert stored is not None and stored["terms"] == ["blood bath"]


async def test_classifier_flag_all_withholds_outside_age_restricted_channels(
    policy_bot: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    classifier = make_tiny_classifier(tmp_path_factory.mktemp("classifier"))
    harness = await policy_bot(classifier=str(classifier), threshold=0.0)  # every image scores >= 0
    fake = harness.fake

    token = await fake.slash("imagine", [opt("prompt", "a lake")], alice(fake))
    withheld = await fake.wait_for(lambda: (m := fake.original(token)) and "withheld" in m["content"] and m)
    shown = await draw(fake, alice(fake), NSFW_CHANNEL_ID, "a lake")

    assert withheld["attachments"] == []
    job = await job_of(harness, withheld)
    assert job.safety is not None and job.safety["flagged"] and job.images  # kept, for the owner's rerun
    assert job.safety["images"][0]["label"] == "nsfw"
    assert shown["attachments"] and (await job_of(harness, shown)).safety["flagged"]


async def test_classifier_flag_all_as_spoiler_and_flag_none(
    policy_bot: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    classifier = str(make_tiny_classifier(tmp_path_factory.mktemp("classifier")))
    spoiler = await policy_bot(classifier=classifier, threshold=0.0, flagged_action="spoiler")
    fake = spoiler.fake
    marked = await draw(fake, alice(fake), CHANNEL_ID, "a hill")
    assert marked["attachments"][0]["filename"].startswith("SPOILER_")
    assert "spoiler" in marked["content"]
    await spoiler.stop()

    passing = await policy_bot(classifier=classifier, threshold=1.0)  # no softmax score reaches 1
    clean = await draw(passing.fake, alice(passing.fake), CHANNEL_ID, "a hill")
    assert not clean["attachments"][0]["filename"].startswith("SPOILER_")
    job = await job_of(passing, clean)
    assert job.safety is not None and job.safety["flagged"] is False
