"""The bot's services without Discord: admission, fairness, durability, reruns, history, admin."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.app import App
from bot.i18n import Languages
from bot.services.admin import AdminPolicy
from bot.services.errors import LimitReached, NotAllowed, NotFound, UserError
from bot.services.studio import Requester
from bot.store.models import Delivery, JobStatus
from engine.api import GenerationRequest
from engine.png import read_recipe
from engine.settings import EngineSettings
from fluxbot.settings import DeliverySettings, LimitSettings, Settings
from tests.bot_support import RecordingEvents, make_app, make_settings, until

ENGLISH = Languages.load().for_locale(None)

pytestmark = pytest.mark.usefixtures("database_backend")  # on SQLite and on PostgreSQL


def in_channel_600(channel_id: int) -> bool:
    """What Discord's permissions say for these members: they can view channel 600 of guild 500."""
    return channel_id == 600


ALICE = Requester(user_id=11, user_name="alice", guild_id=500, channel_id=600, can_view=in_channel_600)
BOB = Requester(user_id=22, user_name="bob", guild_id=500, channel_id=600, can_view=in_channel_600)
ADMIN = Requester(user_id=1, user_name="admin", guild_id=500, channel_id=600, can_view=in_channel_600)


@pytest.fixture
def settings(tmp_path: Path, make_settings: Callable[..., EngineSettings]) -> Settings:
    return make_settings_for(tmp_path, make_settings)


def make_settings_for(tmp: Path, engine_settings: Callable[..., EngineSettings], **kw: object) -> Settings:
    return make_settings(tmp, engine_settings, **kw)


@pytest.fixture
async def app(settings: Settings, data_dir: Path) -> AsyncIterator[tuple[App, RecordingEvents]]:
    events = RecordingEvents()
    built = await make_app(settings, events, data_dir)
    yield built, events
    await built.close()


def pixels_of(app: App, path: str) -> np.ndarray:
    return np.asarray(Image.open(app.settings.data_dir / path), dtype=np.int16)


async def test_imagine_is_stored_before_queued_then_runs_to_a_png(app: tuple[App, RecordingEvents]) -> None:
    studio, events = app[0].studio, app[1]

    ticket = await studio.imagine(ALICE, GenerationRequest(prompt="a red cat", seed=5))
    stored = await app[0].jobs.get(ticket.job_id)
    assert stored is not None and stored.status == JobStatus.QUEUED and ticket.position == 1

    await app[0].start()
    await app[0].queue.wait_idle(60)

    done = await app[0].jobs.get(ticket.job_id)
    assert done is not None and done.status == JobStatus.DONE and done.delivered
    assert events.started_ids == [ticket.job_id]
    assert [p[1] for p in events.progress_seen if p[0] == ticket.job_id][-1] == 4
    image = done.images[0]
    assert read_recipe(app[0].settings.data_dir / image.path).seed == 5
    assert image.path == f"images/0000/{ticket.job_id}-0.png"


async def test_two_users_are_served_round_robin(app: tuple[App, RecordingEvents]) -> None:
    studio = app[0].studio
    alice = [await studio.imagine(ALICE, GenerationRequest(prompt=f"a cat {i}", seed=i)) for i in range(3)]
    bob = [await studio.imagine(BOB, GenerationRequest(prompt=f"a dog {i}", seed=i)) for i in range(2)]

    assert [t.position for t in bob] == [2, 4], "positions shown follow the fair order"
    await app[0].start()
    await app[0].queue.wait_idle(60)

    order = app[1].started_ids
    assert order == [alice[0].job_id, bob[0].job_id, alice[1].job_id, bob[1].job_id, alice[2].job_id]


async def test_queue_caps_and_rate_limit_refuse_with_a_clear_message(
    tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    limits = LimitSettings(jobs_per_window=3, window_s=60, max_queued_per_user=2, max_queue=3)
    app = await make_app(
        make_settings_for(tmp_path, make_settings, limits=limits), RecordingEvents(), data_dir
    )
    try:
        for _ in range(2):
            await app.studio.imagine(ALICE, GenerationRequest(prompt="a cat"))
        with pytest.raises(
            LimitReached, match=r"You have 2 jobs queued \(max 2\)\. Try again when one finishes\."
        ):
            await app.studio.imagine(ALICE, GenerationRequest(prompt="a cat"))
        await app.studio.imagine(BOB, GenerationRequest(prompt="a dog"))
        with pytest.raises(LimitReached, match=r"The queue is full \(3 jobs\)"):
            await app.studio.imagine(BOB, GenerationRequest(prompt="a dog"))

        app.studio.set_limits(
            LimitSettings(jobs_per_window=3, window_s=60, max_queued_per_user=9, max_queue=99)
        )
        for _ in range(2):  # Bob's first job counts in this window too
            await app.studio.imagine(BOB, GenerationRequest(prompt="a dog"))
        with pytest.raises(LimitReached, match="Slow down: at most 3 jobs per 60 s"):
            await app.studio.imagine(BOB, GenerationRequest(prompt="a dog"))
    finally:
        await app.close()


async def test_restart_runs_queued_and_interrupted_jobs_and_delivers_them(
    settings: Settings, data_dir: Path
) -> None:
    first_events = RecordingEvents()
    first = await make_app(settings, first_events, data_dir)
    tickets = [
        await first.studio.imagine(ALICE, GenerationRequest(prompt=f"a fox {i}", seed=i)) for i in range(3)
    ]
    await first.jobs.start(tickets[0].job_id)  # the process dies while drawing the first
    await first.close()

    events = RecordingEvents()
    second = await make_app(settings, events, data_dir)
    await second.start()
    await second.queue.wait_idle(60)
    await second.close()

    assert sorted(j.id for j in events.finished_jobs) == [t.job_id for t in tickets]
    assert all(j.status == JobStatus.DONE for j in events.finished_jobs)


async def test_finished_but_undelivered_jobs_are_delivered_after_restart(
    settings: Settings, data_dir: Path
) -> None:
    broken = RecordingEvents()
    broken.fail_delivery = True
    first = await make_app(settings, broken, data_dir)
    ticket = await first.studio.imagine(ALICE, GenerationRequest(prompt="a tree", seed=1))
    await first.start()
    await until(lambda: broken.failed_attempts >= 1)
    async with asyncio.timeout(30):  # the failed try is counted in the store right after it fails
        while not ((job := await first.jobs.get(ticket.job_id)) and job.delivery_attempts >= 1):
            await asyncio.sleep(0.05)
    await first.close()

    events = RecordingEvents()
    second = await make_app(settings, events, data_dir)
    await second.start()
    await second.queue.wait_idle(30)
    await second.close()

    assert [j.id for j in events.finished_jobs] == [ticket.job_id]
    job = await second.jobs.get(ticket.job_id)
    assert job is not None and job.delivered and job.delivery_attempts >= 1


async def test_a_failed_delivery_is_retried_in_the_background_without_a_restart(
    tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    delivery = DeliverySettings(retry_first_s=0.05, retry_max_s=0.2)
    events = RecordingEvents()
    events.fail_next = 3  # Discord refuses three times, then works again
    app = await make_app(make_settings_for(tmp_path, make_settings, delivery=delivery), events, data_dir)
    try:
        await app.start()
        ticket = await app.studio.imagine(ALICE, GenerationRequest(prompt="a stubborn cat", seed=2))
        second = await app.studio.imagine(BOB, GenerationRequest(prompt="a patient dog", seed=3))
        await app.queue.wait_idle(30)
        jobs = [await app.jobs.get(t.job_id) for t in (ticket, second)]
    finally:
        await app.close()

    assert all(job is not None and job.delivered for job in jobs)
    assert sum(job.delivery_attempts for job in jobs if job is not None) == 3 == events.failed_attempts
    assert sorted(j.id for j in events.finished_jobs) == [ticket.job_id, second.job_id]


async def test_a_result_older_than_the_horizon_is_given_up_and_logged(
    tmp_path: Path,
    make_settings: Callable[..., EngineSettings],
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    delivery = DeliverySettings(retry_first_s=0.05, retry_max_s=0.1, horizon_s=0.5)
    events = RecordingEvents()
    events.fail_delivery = True
    app = await make_app(make_settings_for(tmp_path, make_settings, delivery=delivery), events, data_dir)
    try:
        await app.start()
        ticket = await app.studio.imagine(ALICE, GenerationRequest(prompt="a lost letter", seed=2))
        await app.queue.wait_idle(30)
        job = await app.jobs.get(ticket.job_id)
    finally:
        await app.close()

    assert job is not None and job.status == JobStatus.DONE and job.delivery == Delivery.EXPIRED
    assert "not delivered within 0 s after it finished; giving up" in caplog.text


async def test_rerun_gives_identical_pixels_and_reroll_a_new_seed(app: tuple[App, RecordingEvents]) -> None:
    the_app = app[0]
    await the_app.start()
    original = await the_app.studio.imagine(ALICE, GenerationRequest(prompt="a castle"))
    await the_app.queue.wait_idle(60)

    rerun = await the_app.studio.rerun(BOB, original.job_id)
    reroll = await the_app.studio.reroll(BOB, original.job_id)
    await the_app.queue.wait_idle(60)

    jobs = {t: await the_app.jobs.get(t.job_id) for t in (original, rerun, reroll)}
    paths = {t: j.images[0].path for t, j in jobs.items() if j is not None}
    assert np.array_equal(pixels_of(the_app, paths[original]), pixels_of(the_app, paths[rerun]))
    assert rerun.seed == original.seed and reroll.seed != original.seed
    assert jobs[reroll] is not None and jobs[reroll].user_id == BOB.user_id


async def test_variations_use_the_next_seeds(app: tuple[App, RecordingEvents]) -> None:
    original = await app[0].studio.imagine(ALICE, GenerationRequest(prompt="an owl", seed=40))
    await app[0].jobs.set_message(original.job_id, 9001)  # its message is in channel 600, BOB's too
    ticket = await app[0].studio.variations(BOB, original.job_id)
    await app[0].start()
    await app[0].queue.wait_idle(60)

    job = await app[0].jobs.get(ticket.job_id)
    assert job is not None and [img.seed for img in job.images] == [41, 42, 43, 44]


async def test_history_is_paged_and_shows_others_only_what_they_can_see(
    app: tuple[App, RecordingEvents],
) -> None:
    studio, jobs = app[0].studio, app[0].jobs
    app[0].studio.set_limits(LimitSettings(jobs_per_window=100, window_s=60, max_queued_per_user=20))
    app[0].queue.pause()
    for i in range(12):
        ticket = await studio.imagine(ALICE, GenerationRequest(prompt=f"cat {i}"))
        if i < 3:  # posted in channel 600, which Bob can view; the rest never reached a channel
            await jobs.set_message(ticket.job_id, 9000 + i)
    hidden = await studio.imagine(replace(ALICE, channel_id=601), GenerationRequest(prompt="in 601"))
    await jobs.set_message(hidden.job_id, 9100)  # posted where Bob cannot look
    await studio.imagine(replace(ALICE, guild_id=999), GenerationRequest(prompt="elsewhere"))
    await studio.imagine(replace(ALICE, guild_id=None, channel_id=700), GenerationRequest(prompt="a DM"))

    first = await studio.history(ALICE, ALICE.user_id, 1)
    second = await studio.history(ALICE, ALICE.user_id, 2)
    bob = BOB
    seen_by_bob = await studio.history(bob, ALICE.user_id, 1)
    seen_from_a_dm = await studio.history(replace(bob, guild_id=None), ALICE.user_id, 1)

    assert (first.total, first.pages, len(first.jobs), len(second.jobs)) == (15, 2, 10, 5)
    assert first.jobs[0].spec.prompt == "a DM"  # the owner sees all of their own
    assert [j.spec.prompt for j in seen_by_bob.jobs] == ["cat 2", "cat 1", "cat 0"]
    assert seen_from_a_dm.total == 0
    with pytest.raises(UserError, match="only 2 pages"):
        await studio.history(ALICE, ALICE.user_id, 5)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": ""}, "prompt: the prompt is empty"),
        ({"prompt": "x" * 3000}, "prompt: String should have at most 2000 characters"),
        ({"prompt": "a cat", "size": "100x77"}, "multiples of 16"),
        ({"prompt": "a cat", "seed": -4}, "seed: Input should be greater than or equal to 0"),
        ({"prompt": "a cat", "loras": [{"name": "nope"}]}, "LoRA 'nope' is not on the whitelist"),
    ],
)
async def test_bad_options_become_user_errors(
    app: tuple[App, RecordingEvents], fields: dict[str, object], message: str
) -> None:
    with pytest.raises(UserError, match=message):
        app[0].studio.validate(**fields)


async def test_banned_user_is_refused_everywhere(app: tuple[App, RecordingEvents]) -> None:
    the_app = app[0]
    original = await the_app.studio.imagine(BOB, GenerationRequest(prompt="a dog"))
    await the_app.jobs.set_message(original.job_id, 9001)  # posted in channel 600: ALICE could see it
    await the_app.admin.ban(ADMIN, ALICE.user_id, "spam")

    for attempt in (
        the_app.studio.imagine(ALICE, GenerationRequest(prompt="a cat")),
        the_app.studio.reroll(ALICE, original.job_id),
        the_app.studio.rerun(ALICE, original.job_id),
    ):
        with pytest.raises(NotAllowed, match="banned"):
            await attempt
    await the_app.admin.unban(ADMIN, ALICE.user_id)
    assert await the_app.studio.imagine(ALICE, GenerationRequest(prompt="a cat"))


async def test_admin_changes_are_persisted_audited_and_survive_a_restart(
    settings: Settings, data_dir: Path
) -> None:
    first = await make_app(settings, RecordingEvents(), data_dir)
    await first.admin.set_preset(ADMIN, "dev", "steps", "6")
    await first.admin.set_limit(ADMIN, "max_queued_per_user", 1)
    entries = await first.admin.store.audit()
    await first.close()

    second = await make_app(settings, RecordingEvents(), data_dir)
    try:
        assert second.studio.rules.catalog.presets["dev"].steps == 6
        assert second.studio.limits.max_queued_per_user == 1
        assert [e.action for e in entries] == ["limits.set", "preset.set"]
        assert entries[1].actor_id == ADMIN.user_id and entries[1].detail["after"]["steps"] == 6
    finally:
        await second.close()


async def test_admin_refuses_invalid_preset_changes_and_non_admins(app: tuple[App, RecordingEvents]) -> None:
    admin = app[0].admin
    with pytest.raises(UserError, match="steps 99 must lie in steps_range"):
        await admin.set_preset(ADMIN, "dev", "steps", "99")
    with pytest.raises(NotAllowed, match="Only fluxbot admins"):
        admin.require(ALICE, role_ids=[])
    admin.require(ADMIN, role_ids=[])  # listed admin user id
    assert AdminPolicy(frozenset(), frozenset({900})).allows(ALICE.user_id, [123, 900])
    with pytest.raises(NotFound):
        await admin.cancel(ADMIN, 424242)


async def test_cancel_queued_job_and_pause_resume(app: tuple[App, RecordingEvents]) -> None:
    the_app, events = app
    await the_app.admin.pause(ADMIN, True)
    await the_app.start()
    keep = await the_app.studio.imagine(ALICE, GenerationRequest(prompt="a cat", seed=1))
    drop = await the_app.studio.imagine(ALICE, GenerationRequest(prompt="a dog", seed=2))

    await the_app.admin.cancel(ADMIN, drop.job_id)
    await asyncio.sleep(0.2)
    assert events.started_ids == [], "paused: nothing runs"
    await the_app.admin.pause(ADMIN, False)
    await the_app.queue.wait_idle(60)

    statuses = {j.id: j.status for j in events.finished_jobs}
    assert statuses == {drop.job_id: JobStatus.CANCELLED, keep.job_id: JobStatus.DONE}


async def test_stats_show_todays_jobs_speed_per_preset_and_uptime(app: tuple[App, RecordingEvents]) -> None:
    from bot import render

    the_app = app[0]
    await the_app.start()
    await the_app.studio.imagine(ALICE, GenerationRequest(prompt="a cat", seed=1))
    await the_app.studio.imagine(ALICE, GenerationRequest(prompt="a dog", seed=2, batch_size=2))
    await the_app.queue.wait_idle(60)

    stats = await the_app.admin.stats(the_app.started_at)

    assert (stats.jobs_today, stats.by_status, stats.queued, stats.running) == (2, {"done": 2}, 0, False)
    assert set(stats.seconds_per_image) == {"dev"} and stats.seconds_per_image["dev"] > 0
    assert "jobs today: 2 (2 done)" in render.stats(ENGLISH, stats)


async def test_each_job_logs_one_structured_line(
    app: tuple[App, RecordingEvents], caplog: pytest.LogCaptureFixture
) -> None:
    import json
    import logging

    from fluxbot.logs import JsonFormatter

    caplog.set_level(logging.INFO, logger="bot.services.outcomes")
    ticket = await app[0].studio.imagine(ALICE, GenerationRequest(prompt="a logged cat", seed=3))
    await app[0].start()
    await app[0].queue.wait_idle(60)

    lines = [r for r in caplog.records if getattr(r, "job_id", None) == ticket.job_id]
    assert len(lines) == 1
    entry = json.loads(JsonFormatter().format(lines[0]))
    assert (entry["job_id"], entry["user_id"], entry["outcome"]) == (ticket.job_id, ALICE.user_id, "done")
    assert entry["timings"]["total_s"] > 0 and entry["msg"].startswith(f"job {ticket.job_id} user")


async def test_admins_see_and_cancel_only_the_jobs_of_their_own_guild(
    app: tuple[App, RecordingEvents],
) -> None:
    studio, admin = app[0].studio, app[0].admin
    app[0].queue.pause()
    here = await studio.imagine(ALICE, GenerationRequest(prompt="a local owl"))
    elsewhere = await studio.imagine(replace(BOB, guild_id=999), GenerationRequest(prompt="a far owl"))
    in_dm = await studio.imagine(replace(BOB, guild_id=None), GenerationRequest(prompt="a private owl"))

    view = admin.queue(ADMIN)
    with pytest.raises(NotFound, match=f"no job {elsewhere.job_id} that you can see"):
        await admin.cancel(ADMIN, elsewhere.job_id)
    with pytest.raises(NotFound):
        await admin.cancel(ADMIN, in_dm.job_id)
    await admin.cancel(ADMIN, here.job_id)

    assert [e.job_id for e in view.entries] == [here.job_id] and view.elsewhere == 2
    job = await app[0].jobs.get(here.job_id)
    assert job is not None and job.status == JobStatus.CANCELLED


async def test_a_step_cache_an_admin_sets_is_pinned_so_reruns_stay_exact_after_it_changes(
    app: tuple[App, RecordingEvents],
) -> None:
    from bot import render

    the_app = app[0]
    await the_app.start()
    with pytest.raises(UserError, match=r"cache 'fbcache:7': threshold: Input should be less than"):
        await the_app.admin.set_preset(ADMIN, "dev", "cache", "fbcache:7")
    await the_app.admin.set_preset(ADMIN, "dev", "cache", "fbcache:0.3")
    cached = await the_app.studio.imagine(ALICE, GenerationRequest(prompt="a fox", seed=5, steps=12))
    await the_app.queue.wait_idle(60)
    await the_app.admin.set_preset(ADMIN, "dev", "cache", "none")

    rerun = await the_app.studio.rerun(ALICE, cached.job_id)
    plain = await the_app.studio.imagine(ALICE, GenerationRequest(prompt="a fox", seed=5, steps=12))
    await the_app.queue.wait_idle(60)

    jobs = {t: await the_app.jobs.get(t.job_id) for t in (cached, rerun, plain)}
    first, again, off = (jobs[t] for t in (cached, rerun, plain))
    assert first is not None and again is not None and off is not None
    assert str(first.spec.cache) == str(again.spec.cache) == "fbcache:0.3"
    assert str(off.spec.cache) == "none"
    recipe = first.images[0].recipe
    assert recipe["cache"] == "fbcache:0.3" and recipe["computed_steps"] < 12
    assert np.array_equal(pixels_of(the_app, first.images[0].path), pixels_of(the_app, again.images[0].path))
    assert not np.array_equal(
        pixels_of(the_app, first.images[0].path), pixels_of(the_app, off.images[0].path)
    )
    skipped = 2 * (12 - recipe["computed_steps"])
    stats = await the_app.admin.stats(the_app.started_at)
    assert (stats.steps, stats.steps_cached) == (36, skipped)
    assert f"steps skipped by step caches today: {skipped} of 36" in render.stats(ENGLISH, stats)
    metrics = the_app.metrics.render().decode()
    assert f'fluxbot_denoise_steps_total{{run="cached"}} {float(skipped)}' in metrics
    assert f'fluxbot_denoise_steps_total{{run="full"}} {float(36 - skipped)}' in metrics
