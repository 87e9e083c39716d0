"""The real client against the fake Discord when things go wrong: bursts, a slow store, a 502 storm."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot.store.models import Delivery, JobStatus
from engine.engine import FluxEngine
from engine.settings import EngineSettings
from fluxbot.settings import DeliverySettings, LimitSettings
from tests.bot_support import write_lock
from tests.discord_support import (
    ALICE,
    BOB,
    Harness,
    finished_message,
    has_result,
    is_ephemeral_error,
    make_bot_settings,
    opt,
)
from tests.fake_discord import FakeDiscord

LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def answer_of(fake: FakeDiscord, token: str) -> tuple[str, bool]:
    """The first answer's text and whether only the user saw it."""
    response = fake.response_to(token) or {}
    data = response.get("data") or {}
    return data.get("content", ""), bool(data.get("flags", 0) & 64)


@pytest.mark.usefixtures("database_backend")
async def test_twenty_simultaneous_commands_from_one_user_queue_exactly_the_cap(harness: Harness) -> None:
    fake = harness.fake
    harness.app.queue.pause()  # nothing finishes meanwhile and frees a slot
    alice = fake.member(ALICE, "alice")

    tokens = await asyncio.gather(
        *(fake.slash("imagine", [opt("prompt", f"cat {i}")], alice) for i in range(20))
    )
    await fake.wait_for(lambda: all(fake.response_to(t) for t in tokens))

    answers = [answer_of(fake, t) for t in tokens]
    queued = [text for text, private in answers if not private and "job " in text]
    refused = [text for text, private in answers if private and "jobs queued (max 5)" in text]
    assert (len(queued), len(refused)) == (5, 15), answers
    assert len(await harness.app.jobs.unfinished()) == 5


@pytest.mark.usefixtures("database_backend")
async def test_a_slow_store_is_answered_within_three_seconds_and_nothing_is_claimed(harness: Harness) -> None:
    fake = harness.fake
    async with write_lock(harness.settings.resolved_database_url):
        token = await fake.slash("imagine", [opt("prompt", "a patient cat")], fake.member(ALICE, "alice"))
        await fake.wait_for(lambda: fake.response_to(token), timeout=10)
        answered_in = fake.callbacks[token].at - fake.interaction_sent_at[token]
        first, _ = answer_of(fake, token)
        await fake.wait_for(
            lambda: is_ephemeral_error(fake, token, "could not save your request"), timeout=30
        )

    assert answered_in < 3.0 and "Saving your request" in first and "job " not in first
    assert fake.calls_to("DELETE", f"/{token}/messages/@original"), "the public placeholder is removed"
    assert await harness.app.jobs.unfinished() == []


async def test_a_502_storm_on_uploads_is_outlasted_without_a_restart_while_the_engine_keeps_drawing(
    fake: FakeDiscord, tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    delivery = DeliverySettings(retry_first_s=0.5, retry_max_s=2.0)
    limits = LimitSettings(jobs_per_window=50, window_s=60, max_queued_per_user=5, max_queue=50)
    settings = make_bot_settings(tmp_path, make_settings, fake, delivery=delivery, limits=limits)
    harness = Harness(fake, settings, await asyncio.to_thread(FluxEngine.load, settings.engine, data_dir))
    await harness.start()
    try:
        # discord.py itself retries a 5xx five times over 25 s: the storm outlasts one delivery attempt.
        storm_s = 30.0
        fake.storm_uploads(502, storm_s)
        storm_ends = time.monotonic() + storm_s
        tokens = [
            await fake.slash("imagine", [opt("prompt", f"a stormy sea {i}")], fake.member(who, "u"))
            for i, who in enumerate((ALICE, BOB))
        ]
        await fake.wait_for(lambda: all(fake.response_to(t) for t in tokens))

        async def both_drawn() -> list[Delivery]:
            while True:
                jobs = [j for j in await harness.app.jobs.since(LONG_AGO) if j]
                if len(jobs) == 2 and all(j.status == JobStatus.DONE for j in jobs):
                    return [j.delivery for j in jobs]
                await asyncio.sleep(0.1)

        during = await asyncio.wait_for(both_drawn(), 20)
        drawn_at = time.monotonic()
        await fake.wait_for(lambda: all(has_result(fake.original(t)) for t in tokens), 90)
        messages = [await finished_message(fake, t) for t in tokens]
    finally:
        await harness.stop()

    assert drawn_at < storm_ends and during == [Delivery.PENDING, Delivery.PENDING], (
        "the engine drew both jobs while their uploads were failing"
    )
    assert all(m["attachments"] for m in messages), "delivered after the storm, without a restart"
    uploads = [c for c in fake.calls if c.carries_result and c.at >= storm_ends]
    assert len(uploads) == 2, "each result uploaded once it could be"


async def test_ten_refused_reactions_make_at_most_one_public_notice(harness: Harness) -> None:
    fake = harness.fake
    token = await fake.slash("imagine", [opt("prompt", "a blue owl")], fake.member(ALICE, "alice"))
    original = await finished_message(fake, token)
    harness.app.queue.pause()  # bob's rerolls stay queued: his cap of 5 is reached and stays so
    bob = fake.member(BOB, "bob")

    for _ in range(15):
        await fake.react(original["id"], "🔁", bob)
    removed = f"/messages/{original['id']}/reactions/"
    await fake.wait_for(lambda: len(fake.calls_to("DELETE", removed)) >= 10)

    posts = [c.json.get("content", "") for c in fake.calls_to("POST", "/messages") if c.json]
    notices = [text for text in posts if "jobs queued (max 5)" in text]
    assert len(notices) == 1 and f"<@{BOB}>" in notices[0], posts
    assert len(await harness.app.jobs.unfinished()) == 5
