"""The real discord.py client against the fake Discord server, on the tiny model, end to end."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bot.store.models import JobStatus
from engine.engine import FluxEngine
from engine.png import read_recipe
from engine.settings import EngineSettings
from fluxbot.settings import LimitSettings
from tests.discord_support import (
    ADMIN,
    ALICE,
    BOB,
    Harness,
    finished_message,
    has_result,
    is_ephemeral_error,
    job_id_of,
    make_bot_settings,
    opt,
    png_of,
)
from tests.fake_discord import ADMIN_ROLE, CHANNEL_ID, FakeDiscord

pytestmark = pytest.mark.usefixtures("database_backend")  # on SQLite and on PostgreSQL


async def test_commands_are_synced_on_start(harness: Harness) -> None:
    names = {c["name"] for c in harness.fake.commands}

    assert {"imagine", "history", "rerun", "admin"} <= names
    imagine = next(c for c in harness.fake.commands if c["name"] == "imagine")
    assert imagine["options"][0]["name"] == "prompt" and imagine["options"][0]["required"]
    admin = next(c for c in harness.fake.commands if c["name"] == "admin")
    assert int(admin["default_member_permissions"]) == 1 << 5  # manage_guild


async def test_imagine_goes_from_interaction_to_png_with_progress(harness: Harness) -> None:
    fake = harness.fake
    token = await fake.slash(
        "imagine",
        [opt("prompt", "a red cat"), opt("seed", 7, 4), opt("steps", 24, 4), opt("size", "512x512")],
        fake.member(ALICE, "alice"),
    )

    message = await finished_message(fake, token)

    first = fake.response_to(token)
    assert first is not None and first["type"] == 4, "the first answer is the queued message itself"
    assert "job " in first["data"]["content"] and not first["data"].get("flags", 0) & 64
    edits = [
        c.json.get("content", "") for c in fake.calls if c.method == "PATCH" and token in c.path and c.json
    ]
    assert any("steps" in e and "█" in e for e in edits), "a progress bar while it runs"
    recipe = read_recipe(png_of(fake, message))
    assert (recipe.prompt, recipe.seed, recipe.steps) == ("a red cat", 7, 24)
    assert "seed 7" in message["content"] and f"<@{ALICE}>" in message["content"]
    custom_ids = [c["custom_id"] for row in message["components"] for c in row["components"]]
    assert any(cid.startswith("fluxbot:reroll:") for cid in custom_ids)
    await fake.wait_for(lambda: fake.calls_to("PUT", f"/messages/{message['id']}/reactions/"))


async def test_reroll_reaction_makes_a_new_job_for_the_reacting_user(harness: Harness) -> None:
    fake = harness.fake
    token = await fake.slash(
        "imagine", [opt("prompt", "a blue owl"), opt("seed", 3, 4)], fake.member(ALICE, "alice")
    )
    original = await finished_message(fake, token)
    before = len(fake.calls_to("POST", f"/channels/{CHANNEL_ID}/messages"))

    await fake.react(original["id"], "🔁", fake.member(BOB, "bob"))

    posted = await fake.wait_for(
        lambda: [m for m in fake.messages.values() if has_result(m) and m["id"] != original["id"]]
    )
    assert len(fake.calls_to("POST", f"/channels/{CHANNEL_ID}/messages")) > before
    recipe = read_recipe(png_of(fake, posted[0]))
    assert recipe.prompt == "a blue owl" and recipe.seed != 3
    assert f"<@{BOB}>" in posted[0]["content"]
    jobs, _ = await harness.app.jobs.history(BOB, 1, 10)
    assert jobs and jobs[0].kind.value == "reroll"


async def test_buttons_work_after_a_bot_restart(harness: Harness) -> None:
    fake = harness.fake
    token = await fake.slash(
        "imagine", [opt("prompt", "a castle"), opt("seed", 10, 4)], fake.member(ALICE, "alice")
    )
    original = await finished_message(fake, token)
    job_id = original["components"][0]["components"][0]["custom_id"].split(":")[-1]

    await harness.stop()
    await harness.start()
    click = await fake.click(original["id"], f"fluxbot:vary:{job_id}", fake.member(BOB, "bob"))

    message = await finished_message(fake, click)
    seeds = sorted(read_recipe(fake.attachment_bytes[a["id"]]).seed for a in message["attachments"])
    assert seeds == [11, 12, 13, 14]


async def test_history_lists_the_callers_jobs_ephemerally(harness: Harness) -> None:
    fake = harness.fake
    token = await fake.slash("imagine", [opt("prompt", "a snowy forest")], fake.member(ALICE, "alice"))
    await finished_message(fake, token)

    history = await fake.slash("history", [], fake.member(ALICE, "alice"))

    reply = await fake.wait_for(lambda: fake.response_to(history))
    assert reply["type"] == 4 and reply["data"]["flags"] & 64
    assert "a snowy forest" in reply["data"]["content"] and "done" in reply["data"]["content"]


async def test_rerun_without_seed_gives_identical_pixels(harness: Harness) -> None:
    fake = harness.fake
    token = await fake.slash("imagine", [opt("prompt", "a neon city at night")], fake.member(ALICE, "alice"))
    first = await finished_message(fake, token)
    job_id = job_id_of(first)

    again = await fake.slash("rerun", [opt("job_id", job_id, 4)], fake.member(BOB, "bob"))
    second = await finished_message(fake, again)

    a = np.asarray(Image.open(io.BytesIO(png_of(fake, first))))
    b = np.asarray(Image.open(io.BytesIO(png_of(fake, second))))
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ([opt("prompt", "   ")], "the prompt is empty"),
        ([opt("prompt", "x" * 5000)], "at most 2000 characters"),
        ([opt("prompt", "a cat"), opt("size", "123x77")], "multiples of 16"),
        ([opt("prompt", "a cat"), opt("lora", "../../etc/passwd")], "not on the whitelist"),
        ([opt("prompt", "a cat"), opt("seed", -5, 4)], "greater than or equal to 0"),
        ([opt("prompt", "a cat"), opt("lora", "x"), opt("lora_weight", 10, 10)], "lora_weight: Input"),
        ([opt("prompt", "a cat"), opt("lora", "x" * 65)], "not on the whitelist"),
        ([opt("prompt", "a cat <lora:nope:0.5>")], "<lora:nope:0.5>: no LoRA called 'nope'"),
        ([opt("prompt", "<lora:" + "x" * 1990 + ">")], "<lora:xxxxxxxx"),
    ],
)
async def test_bad_input_gets_an_ephemeral_error_and_the_bot_keeps_serving(
    harness: Harness, options: list[dict[str, Any]], message: str
) -> None:
    fake = harness.fake
    token = await fake.slash("imagine", options, fake.member(ALICE, "alice"))

    await fake.wait_for(lambda: is_ephemeral_error(fake, token, message))
    good = await fake.slash("imagine", [opt("prompt", "a cat")], fake.member(ALICE, "alice"))
    assert await finished_message(fake, good)


async def test_queue_cap_is_an_ephemeral_refusal(
    fake: FakeDiscord, tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    limits = LimitSettings(jobs_per_window=50, window_s=60, max_queued_per_user=1, max_queue=50)
    settings = make_bot_settings(tmp_path, make_settings, fake, limits=limits)
    engine = await asyncio.to_thread(FluxEngine.load, settings.engine, data_dir)
    h = Harness(fake, settings, engine)
    await h.start()
    try:
        await h.app.admin.pause(_admin_requester(), True)
        await fake.slash("imagine", [opt("prompt", "a cat")], fake.member(ALICE, "alice"))
        await fake.wait_for(lambda: len(h.app.queue) == 1)
        token = await fake.slash("imagine", [opt("prompt", "a dog")], fake.member(ALICE, "alice"))

        await fake.wait_for(lambda: is_ephemeral_error(fake, token, "You have 1 jobs queued (max 1)"))
        assert fake.response_to(token)["data"]["flags"] & 64, "refused before any public answer"
        assert not fake.calls_to("DELETE", f"/{token}/messages/@original")
    finally:
        await h.stop()


def _admin_requester() -> Any:
    from bot.services.studio import Requester

    return Requester(user_id=ADMIN)


async def test_fair_order_with_two_users(harness: Harness) -> None:
    fake, app = harness.fake, harness.app
    await app.admin.pause(_admin_requester(), True)

    async def queue_one(user: int, name: str, prompt: str) -> str:
        # One after another, as people type: each is admitted before the next arrives.
        token = await fake.slash("imagine", [opt("prompt", prompt)], fake.member(user, name))
        await fake.wait_for(
            lambda: (m := fake.original(token)) and ("queue" in m["content"] or "line" in m["content"])
        )
        return token

    alice = [await queue_one(ALICE, "alice", f"cat {i}") for i in range(3)]
    bob = [await queue_one(BOB, "bob", f"dog {i}") for i in range(2)]

    bob_queued = await fake.wait_for(
        lambda: (m := fake.original(bob[0])) and "#2 in the queue" in m["content"] and m
    )
    await app.admin.pause(_admin_requester(), False)
    messages = [await finished_message(fake, t) for t in alice + bob]

    finished_order = sorted(range(5), key=lambda i: messages[i]["edited_timestamp"])
    assert [(["a"] * 3 + ["b"] * 2)[i] for i in finished_order] == ["a", "b", "a", "b", "a"]
    assert bob_queued


async def test_admin_commands_refuse_non_admins_even_if_discord_shows_them(harness: Harness) -> None:
    fake = harness.fake
    sub = {"name": "pause", "type": 1, "options": []}

    token = await fake.slash("admin", [sub], fake.member(ALICE, "alice", admin=True))

    await fake.wait_for(lambda: is_ephemeral_error(fake, token, "Only fluxbot admins"))
    assert not harness.app.queue.paused


async def test_admin_change_by_role_is_persisted_and_audited(harness: Harness) -> None:
    fake = harness.fake
    sub = {
        "name": "preset-set",
        "type": 1,
        "options": [opt("name", "dev"), opt("field", "steps"), opt("value", "7")],
    }

    token = await fake.slash("admin", [sub], fake.member(BOB, "bob", roles=[ADMIN_ROLE]))

    ack = await fake.wait_for(lambda: fake.response_to(token))
    reply = await fake.wait_for(lambda: (m := fake.original(token)) and m["content"] and m)
    assert ack["type"] == 5 and ack["data"]["flags"] & 64  # private "thinking…" before the work
    assert "steps = 7" in reply["content"] and reply["flags"] & 64
    assert (await harness.app.admin.store.setting("preset:dev"))["steps"] == 7
    audit = await harness.app.admin.store.audit()
    assert audit[0].action == "preset.set" and audit[0].actor_id == BOB


async def test_restart_with_queued_jobs_delivers_them_all(harness: Harness) -> None:
    fake, app = harness.fake, harness.app
    await app.admin.pause(_admin_requester(), True)
    tokens = [
        await fake.slash("imagine", [opt("prompt", f"fox {i}")], fake.member(ALICE if i % 2 else BOB, "u"))
        for i in range(4)
    ]
    await fake.wait_for(lambda: len(app.queue) == 4)

    await harness.stop()
    await harness.start()
    assert harness.app.queue.paused, "a pause survives the restart"
    assert len(harness.app.queue) == 4
    await harness.app.admin.pause(_admin_requester(), False)

    for token in tokens:
        assert await finished_message(fake, token)
    await harness.app.queue.wait_idle(30)  # the DB marks delivery just after the message lands
    jobs = [await harness.app.jobs.get(i) for i in range(1, 5)]
    assert all(j is not None and j.status == JobStatus.DONE and j.delivered for j in jobs)


async def test_result_after_the_token_expired_is_posted_in_the_channel_with_a_mention(
    harness: Harness,
) -> None:
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from bot.store.models import Job

    fake, app = harness.fake, harness.app
    await app.admin.pause(_admin_requester(), True)
    token = await fake.slash("imagine", [opt("prompt", "a late owl")], fake.member(ALICE, "alice"))
    await fake.wait_for(lambda: len(app.queue) == 1)
    async with app.db.session() as session, session.begin():  # 20 minutes pass: the token is dead
        stale = datetime.now(UTC) - timedelta(minutes=20)
        await session.execute(update(Job).values(interaction_at=stale))

    await app.admin.pause(_admin_requester(), False)

    posted = await fake.wait_for(lambda: [m for m in fake.messages.values() if has_result(m)])
    assert f"<@{ALICE}>" in posted[0]["content"] and "a late owl" in posted[0]["content"]
    # The dead token's message kept its progress (a preview of the picture forming, on a slow machine);
    # the result went to the channel.
    assert not has_result(fake.original(token))


async def test_result_arrives_after_the_gateway_drops_mid_job(harness: Harness) -> None:
    fake = harness.fake
    token = await fake.slash(
        "imagine",
        [opt("prompt", "a stormy sea"), opt("steps", 30, 4), opt("size", "512x512")],
        fake.member(ALICE, "alice"),
    )
    await fake.wait_for(lambda: (m := fake.original(token)) and "steps" in m["content"])

    await fake.drop_gateway()

    assert await finished_message(fake, token)
    await asyncio.wait_for(fake.identified.wait(), 30)  # discord.py reconnected (resumed or identified)


async def test_rate_limited_and_failing_rest_calls_are_retried(harness: Harness) -> None:
    fake = harness.fake
    fake.fail_next = [("/messages/", 429), ("/messages/", 502)]
    token = await fake.slash("imagine", [opt("prompt", "a patient fox")], fake.member(ALICE, "alice"))

    message = await finished_message(fake, token)

    assert message["attachments"] and fake.fail_next == []


async def test_the_token_never_reaches_the_logs(
    fake: FakeDiscord,
    tmp_path: Path,
    make_settings: Callable[..., EngineSettings],
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    secret = "MTIzNDU2Nzg5.secret-token-value.xyz"
    settings = make_bot_settings(tmp_path, make_settings, fake, discord_token=secret)
    engine = await asyncio.to_thread(FluxEngine.load, settings.engine, data_dir)
    caplog.set_level(logging.DEBUG)
    h = Harness(fake, settings, engine)
    await h.start(secret)
    try:
        token = await fake.slash("imagine", [opt("prompt", "a secret garden")], fake.member(ALICE, "alice"))
        await finished_message(fake, token)
    finally:
        await h.stop()

    assert secret not in caplog.text
    assert secret not in repr(settings) and secret not in str(settings.model_dump())


async def test_metrics_and_healthz_report_jobs_queue_and_connections(
    fake: FakeDiscord, tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    import aiohttp

    settings = make_bot_settings(tmp_path, make_settings, fake, metrics_port=0)
    engine = await asyncio.to_thread(FluxEngine.load, settings.engine, data_dir)
    h = Harness(fake, settings, engine)
    bot = await h.start()
    try:
        token = await fake.slash("imagine", [opt("prompt", "a measured cat")], fake.member(ALICE, "alice"))
        await finished_message(fake, token)
        bad = await fake.slash(
            "imagine", [opt("prompt", "a cat"), opt("size", "13x13")], fake.member(ALICE, "a")
        )
        await fake.wait_for(lambda: fake.response_to(bad))
        assert bot.metrics_server is not None
        port = bot.metrics_server.addresses[0][1]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                health = (response.status, await response.json())
    finally:
        await h.stop()

    assert 'fluxbot_jobs_total{outcome="done"} 1.0' in text
    assert 'fluxbot_rejections_total{reason="validation"} 1.0' in text
    assert 'fluxbot_queue_jobs{state="queued"} 0.0' in text
    assert "fluxbot_step_seconds_count" in text and 'fluxbot_engine_memory_bytes{kind="rss"}' in text
    assert 'fluxbot_embed_cache_total{result="miss"}' in text
    status, body = health
    engines = body.pop("engines")
    assert (status, body) == (
        200,
        {"process": True, "database": True, "images": True, "engine": True, "gateway": True},
    )
    assert engines == [{"name": "local", "compile": "off", "attention": "native", "warmup_s": None}]


async def test_unknown_interaction_on_delivery_falls_back_to_a_channel_message(harness: Harness) -> None:
    fake, app = harness.fake, harness.app
    await app.admin.pause(_admin_requester(), True)
    token = await fake.slash("imagine", [opt("prompt", "a forgotten fox")], fake.member(ALICE, "alice"))
    await fake.wait_for(lambda: len(app.queue) == 1)
    fake.expired.add(token)  # Discord dropped the token earlier than the bot expected

    await app.admin.pause(_admin_requester(), False)

    posted = await fake.wait_for(lambda: [m for m in fake.messages.values() if has_result(m)])
    assert "a forgotten fox" in posted[0]["content"] and f"<@{ALICE}>" in posted[0]["content"]
