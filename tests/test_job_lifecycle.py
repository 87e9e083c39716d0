"""The job lifecycle under pressure, without Discord: bursts against the limits, store and disk faults.

Each test runs on SQLite and on PostgreSQL, on the tiny engine, through the real App.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.app import App
from bot.services.errors import LimitReached
from bot.services.studio import Requester, Ticket
from bot.store.database import Database
from bot.store.jobs import JobStore, NewJob, Quota
from bot.store.models import Delivery, JobKind, JobStatus
from engine.api import GenerationRequest
from engine.settings import EngineSettings
from fluxbot.settings import LimitSettings, Settings
from tests.bot_support import RecordingEvents, make_app, spec_for, until, write_lock
from tests.bot_support import make_settings as app_settings

pytestmark = pytest.mark.usefixtures("database_backend")

BURST = 20


def user(n: int) -> Requester:
    return Requester(user_id=100 + n, user_name=f"user{n}", guild_id=500, channel_id=600)


async def burst(app: App, requesters: list[Requester]) -> tuple[list[Ticket], list[BaseException]]:
    """All requests at once; what was admitted and what was refused."""
    results = await asyncio.gather(
        *(
            app.studio.imagine(who, GenerationRequest(prompt=f"a burst {i}"))
            for i, who in enumerate(requesters)
        ),
        return_exceptions=True,
    )
    tickets = [r for r in results if isinstance(r, Ticket)]
    refusals = [r for r in results if isinstance(r, BaseException)]
    return tickets, refusals


async def stored_jobs(app: App) -> int:
    return len(await app.jobs.unfinished())


def settings_with(tmp: Path, engine: Callable[..., EngineSettings], **limits: Any) -> Settings:
    values = {"jobs_per_window": 100, "window_s": 60, "max_queued_per_user": 50, "max_queue": 100} | limits
    return app_settings(tmp, engine, limits=LimitSettings(**values))


async def test_twenty_simultaneous_requests_from_one_user_take_exactly_the_per_user_cap(
    tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    app = await make_app(
        settings_with(tmp_path, make_settings, max_queued_per_user=3), RecordingEvents(), data_dir
    )
    try:
        tickets, refusals = await burst(app, [user(1)] * BURST)
        stored = await stored_jobs(app)
    finally:
        await app.close()

    assert (len(tickets), stored) == (3, 3)
    assert len(refusals) == BURST - 3
    assert all(isinstance(r, LimitReached) and "max 3" in str(r) for r in refusals)


async def test_twenty_simultaneous_requests_from_one_user_take_exactly_the_rate_limit(
    tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    app = await make_app(
        settings_with(tmp_path, make_settings, jobs_per_window=5), RecordingEvents(), data_dir
    )
    try:
        tickets, refusals = await burst(app, [user(1)] * BURST)
        stored = await stored_jobs(app)
    finally:
        await app.close()

    assert (len(tickets), stored) == (5, 5)
    assert all(isinstance(r, LimitReached) and "Slow down: at most 5 jobs" in str(r) for r in refusals)


async def test_twenty_users_at_once_fill_the_global_cap_exactly(
    tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    app = await make_app(settings_with(tmp_path, make_settings, max_queue=7), RecordingEvents(), data_dir)
    try:
        tickets, refusals = await burst(app, [user(n) for n in range(BURST)])
        stored = await stored_jobs(app)
    finally:
        await app.close()

    assert (len(tickets), stored) == (7, 7)
    assert all(isinstance(r, LimitReached) and "queue is full (7 jobs)" in str(r) for r in refusals)


async def test_two_bot_processes_admitting_at_once_cannot_both_pass_a_cap(
    tmp_path: Path, make_settings: Callable[..., EngineSettings]
) -> None:
    """Two stores with their own connection pools stand for two bot processes on one database."""
    url = app_settings(tmp_path, make_settings).resolved_database_url
    first = Database(url)
    await first.upgrade()
    second = Database(url)
    quota = Quota(per_user=4, waiting=100, per_window=100, window_s=60)

    def new(i: int) -> NewJob:
        return NewJob(7, "carol", 500, 600, JobKind.IMAGINE, spec_for(f"p{i}"))

    try:
        stores = [JobStore(first), JobStore(second)]
        admissions = await asyncio.gather(*(stores[i % 2].admit(new(i), quota) for i in range(BURST)))
        unfinished = await stores[0].unfinished()
    finally:
        await first.close()
        await second.close()

    assert sum(a.job is not None for a in admissions) == 4 == len(unfinished)
    assert {a.refused for a in admissions if a.job is None} == {"user_cap"}


async def test_one_burst_admitted_in_one_transaction_takes_each_limit_in_arrival_order(
    tmp_path: Path, make_settings: Callable[..., EngineSettings]
) -> None:
    """Group commit: a burst shares one transaction, yet every request is checked as if alone; the
    same interaction twice (a replayed gateway event) is one job, stored before or within the burst."""
    db = Database(app_settings(tmp_path, make_settings).resolved_database_url)
    await db.upgrade()
    quota = Quota(per_user=2, waiting=5, per_window=100, window_s=60)
    store = JobStore(db)

    def new(user_id: int, at: int) -> NewJob:
        return NewJob(user_id, f"u{user_id}", 500, 600, JobKind.IMAGINE, spec_for("p"), interaction_id=at)

    try:
        (earlier,) = await store.admit_many([(new(1, 10), quota)])
        asks = [(1, 10), (1, 11), (1, 12), (2, 20), (2, 20), (3, 30), (3, 31), (4, 40)]
        admissions = await store.admit_many([(new(*ask), quota) for ask in asks])
        unfinished = await store.unfinished()
    finally:
        await db.close()

    assert earlier.job is not None
    outcome = [("replayed" if a.replayed else "stored") if a.job else a.refused for a in admissions]
    # user 1 had one job, takes one more; 2's repeat is the same job; 3 fills the queue at 5; 4 is late.
    assert outcome == [
        *("replayed", "stored", "user_cap"),
        *("stored", "replayed"),
        *("stored", "stored", "queue_full"),
    ]
    assert admissions[0].job is not None and admissions[0].job.id == earlier.job.id
    assert admissions[3].job is admissions[4].job
    assert len(unfinished) == 5


async def test_a_database_write_lock_holds_a_finished_job_back_without_losing_or_sticking_it(
    tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    events = RecordingEvents()
    app = await make_app(settings_with(tmp_path, make_settings), events, data_dir)
    slow = GenerationRequest(prompt="a slow owl", seed=1, steps=40, size="512x512")
    try:
        first = await app.studio.imagine(user(1), slow)
        second = await app.studio.imagine(user(2), GenerationRequest(prompt="a quick owl", seed=2))
        await app.start()
        await until(lambda: first.job_id in events.started_ids)
        async with write_lock(app.settings.resolved_database_url):
            # The engine finishes the first job while nothing can be written: it is held as "saving"
            # (its images are on disk, its row cannot change), never shown as running, never failed.
            await until(lambda: not app.queue.faults.ok("database"), timeout=60)
            await until(lambda: not app.queue.running, timeout=60)  # the engine has nothing left to draw
            entries = {e.job_id: e.state for e in app.queue.snapshot()}
            health = await app.health()
            await asyncio.sleep(1.0)
        await app.queue.wait_idle(60)
        jobs = [await app.jobs.get(t.job_id) for t in (first, second)]
        health_after = await app.health()
    finally:
        await app.close()

    # The second was handed to the engine beside the first (or waits to be marked running): either
    # way nothing is shown as running while the engine is idle.
    assert entries.get(first.job_id) == "saving", entries
    assert set(entries) == {first.job_id, second.job_id} and "running" not in entries.values(), entries
    assert health["database"] is False and health_after["database"] is True
    assert all(j is not None and j.status == JobStatus.DONE and j.delivered for j in jobs)
    assert sorted(j.id for j in events.finished_jobs) == [first.job_id, second.job_id]


async def test_an_unwritable_images_folder_holds_the_job_and_healthz_says_so(
    tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    events = RecordingEvents()
    app = await make_app(settings_with(tmp_path, make_settings), events, data_dir)
    images = app.settings.data_dir / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.write_text("not a folder")  # as root, permissions do not stop writes; a file in the way does
    try:
        ticket = await app.studio.imagine(user(1), GenerationRequest(prompt="a held picture", seed=4))
        # The next two may already be on the engine (one drawing, one handed over beside it) before
        # the first save fails; once the fault is known, nothing more starts.
        later = [
            await app.studio.imagine(
                user(n), GenerationRequest(prompt=f"picture {n}", seed=n, steps=20, size="256x256")
            )
            for n in (2, 3, 4)
        ]
        await app.start()
        await until(lambda: not app.queue.faults.ok("images"), timeout=60)
        await asyncio.sleep(1.0)
        health = await app.health()
        held = await app.jobs.get(ticket.job_id)
        last = await app.jobs.get(later[-1].job_id)

        images.unlink()  # the operator fixes the folder
        await app.queue.wait_idle(60)
        done = [await app.jobs.get(t.job_id) for t in (ticket, *later)]
        health_after = await app.health()
    finally:
        await app.close()

    assert health["images"] is False and health_after["images"] is True
    assert held is not None and held.status == JobStatus.RUNNING and held.error is None
    assert last is not None and last.status == JobStatus.QUEUED, "no new job starts while the folder fails"
    assert all(
        j is not None and j.status == JobStatus.DONE and j.delivery == Delivery.DELIVERED for j in done
    )
    assert all((app.settings.data_dir / j.images[0].path).is_file() for j in done if j is not None)
