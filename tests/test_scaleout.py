"""Scale-out: one bot, two `fluxbot worker` processes, real Redis (arq) and real PostgreSQL.

The bot runs in this process (as a service, or as the real discord.py client against the fake
Discord); the workers are real processes on the tiny model, so "kill a worker" is a real kill -9.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bot.app import App, build_app
from bot.render import workers as render_workers
from bot.services.redis_executor import SHARED_IMAGE_MISSING, TIMED_OUT, WORKERS_DIED
from bot.services.studio import JobPicture, Requester
from bot.store.models import Job, JobStatus
from engine.api import GenerationRequest, LoraChoice
from engine.settings import EngineSettings
from fluxbot.settings import DeliverySettings, Settings, WorkerSettings
from tests.bot_support import RecordingEvents, make_settings, until, write_lock
from tests.discord_support import ADMIN, ALICE, BOB, Harness, has_result, make_bot_settings, opt
from tests.fake_discord import FakeDiscord
from tests.lora_support import make_lora, sha, whitelist_toml
from tests.scaleout_support import DEAD_AFTER_S, HEARTBEAT_S, WorkerProcess, worker_env
from tests.services import REDIS_URL, create_postgres_database, flush_redis, require_postgres, require_redis

CAROL = 111000000000000004
SLOW = {"size": "512x512", "steps": 50}  # about 1.5 s on one core: long enough to kill a worker mid-job
Workers = dict[str, WorkerProcess]


@pytest.fixture(scope="module")
def services() -> None:
    require_redis()
    require_postgres()


@pytest.fixture(scope="module")
def lora_setup(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A whitelist with one tiny LoRA, shared by the bot and both workers."""
    root = tmp_path_factory.mktemp("scaleout-loras")
    inky = make_lora(tiny_dir, root / "Lora", "inky", 1)
    whitelist = root / "loras.toml"
    whitelist.write_text(whitelist_toml({"inky": {"file": "inky.safetensors", "sha256": sha(inky)}}))
    return whitelist, root / "Lora"


@pytest.fixture(scope="module")
async def worker_pool(
    services: None,
    tmp_path_factory: pytest.TempPathFactory,
    presets_file: Path,
    tiny_dir: Path,
    lora_setup: tuple[Path, Path],
) -> AsyncIterator[Workers]:
    whitelist, lora_dir = lora_setup
    base = tmp_path_factory.mktemp("workers")
    pool = {
        name: WorkerProcess(
            name,
            worker_env(
                base / name,
                presets_file,
                whitelist,
                tiny_dir,
                FLUXBOT_ENGINE__LORA_DIR=str(lora_dir),
                # FLUX.1 Fill and an upscaler model beside the model: /inpaint and Upscale on workers.
                FLUXBOT_ENGINE__FILL="tiny",
                FLUXBOT_ENGINE__UPSCALER="tiny",
            ),
            base,
        )
        for name in ("w1", "w2")
    }
    yield pool
    for worker in pool.values():
        await worker.reap()


@pytest.fixture
async def workers(worker_pool: Workers) -> Workers:
    """Both workers up (a test that killed one gets it back) on an empty Redis."""
    flush_redis()
    for worker in worker_pool.values():
        if not worker.running:
            await worker.start()
    await asyncio.gather(*(worker.wait_ready() for worker in worker_pool.values()))
    return worker_pool


def scaleout_values(
    engine_settings: Callable[..., EngineSettings], lora_setup: tuple[Path, Path]
) -> dict[str, Any]:
    """The bot's side: the test Redis, a fresh Postgres database, fast heartbeats, the LoRA whitelist."""
    whitelist, lora_dir = lora_setup
    return {
        "queue": REDIS_URL,
        "database_url": create_postgres_database(),
        "workers": WorkerSettings(heartbeat_s=HEARTBEAT_S, dead_after_s=DEAD_AFTER_S),
        "engine": engine_settings(loras_file=whitelist, lora_dir=lora_dir),
    }


def scaleout_settings(
    tmp: Path, engine_settings: Callable[..., EngineSettings], lora_setup: tuple[Path, Path]
) -> Settings:
    return make_settings(tmp, engine_settings, **scaleout_values(engine_settings, lora_setup))


@pytest.fixture
async def harness(
    workers: Workers,
    fake: FakeDiscord,
    tmp_path: Path,
    make_settings: Callable[..., EngineSettings],
    lora_setup: tuple[Path, Path],
) -> AsyncIterator[Harness]:
    """The real discord.py client in scale-out mode (no engine in this process) and both workers."""
    values = scaleout_values(make_settings, lora_setup)
    bot = Harness(fake, make_bot_settings(tmp_path, make_settings, fake, **values), None)
    await bot.start()
    yield bot
    await bot.stop()


@pytest.fixture
async def events() -> RecordingEvents:
    return RecordingEvents()


@pytest.fixture
async def app(
    workers: Workers,
    tmp_path: Path,
    make_settings: Callable[..., EngineSettings],
    lora_setup: tuple[Path, Path],
    events: RecordingEvents,
) -> AsyncIterator[App]:
    app = await build_app(scaleout_settings(tmp_path, make_settings, lora_setup), events)
    await app.start()
    yield app
    await app.close()


def who(user_id: int) -> Requester:
    return Requester(user_id=user_id, user_name=f"user{user_id}")


async def running_on(app: App, job_id: int, timeout: float = 60) -> Job:
    async with asyncio.timeout(timeout):
        while True:
            job = await app.jobs.get(job_id)  # None until the command has stored it
            if job is not None and job.status == JobStatus.RUNNING and job.worker:
                return job
            await asyncio.sleep(0.05)


def deliveries(fake: FakeDiscord) -> Counter[str]:
    """Result deliveries per interaction token: webhook edits or channel posts that carry a PNG."""
    sent: Counter[str] = Counter()
    for call in fake.calls:
        if call.carries_result and "/webhooks/" in call.path:
            sent[call.path.split("/webhooks/")[1].split("/")[1]] += 1
    return sent


async def test_two_workers_serve_a_burst_from_several_users_through_discord(
    harness: Harness, fake: FakeDiscord, workers: Workers
) -> None:
    users = [(ALICE, "alice"), (BOB, "bob"), (CAROL, "carol")]
    tokens = [
        await fake.slash(
            "imagine",
            [opt("prompt", f"{name}'s fox {i}"), opt("steps", 24, 4), opt("size", "384x384")],
            fake.member(user, name),
        )
        for i in range(3)
        for user, name in users
    ]
    await fake.wait_for(lambda: all(has_result(fake.original(t)) for t in tokens), timeout=120)
    await harness.app.queue.wait_idle(30)
    jobs = [await harness.app.jobs.get(i) for i in range(1, len(tokens) + 1)]

    assert all(job is not None and job.status == JobStatus.DONE for job in jobs)
    assert {job.worker for job in jobs if job is not None} == {"w1", "w2"}
    assert deliveries(fake) == Counter({token: 1 for token in tokens})
    edits = [c.json.get("content", "") for c in fake.calls if c.method == "PATCH" and c.json]
    answers = [(fake.response_to(t) or {}).get("data", {}).get("content", "") for t in tokens]
    assert any("in the queue" in a for a in answers), "queue positions while waiting"
    assert any("steps" in e and "█" in e for e in edits), "progress bars from the workers"


async def test_fair_order_holds_across_workers(app: App, events: RecordingEvents) -> None:
    app.queue.pause()
    alice = [
        await app.studio.imagine(who(ALICE), GenerationRequest(prompt=f"a{i}", **SLOW)) for i in range(4)
    ]
    bob = [await app.studio.imagine(who(BOB), GenerationRequest(prompt=f"b{i}", **SLOW)) for i in range(2)]
    assert [e.job_id for e in app.queue.snapshot()] == [
        alice[0].job_id,
        bob[0].job_id,
        alice[1].job_id,
        bob[1].job_id,
        alice[2].job_id,
        alice[3].job_id,
    ]
    app.queue.resume()
    await app.queue.wait_idle(120)

    order = events.started_ids
    # Two at a time: each pair of starts is one round of the rotation; Bob is never behind Alice's third.
    assert set(order[:2]) == {alice[0].job_id, bob[0].job_id}
    assert set(order[2:4]) == {alice[1].job_id, bob[1].job_id}
    assert set(order[4:]) == {alice[2].job_id, alice[3].job_id}
    jobs = [await app.jobs.get(t.job_id) for t in alice + bob]
    assert {job.worker for job in jobs if job is not None} == {"w1", "w2"}


async def test_killing_a_worker_mid_job_still_delivers_every_job_exactly_once(
    harness: Harness, fake: FakeDiscord, workers: Workers
) -> None:
    tokens = [
        await fake.slash(
            "imagine",
            [opt("prompt", f"an owl {i}"), opt("steps", SLOW["steps"], 4), opt("size", SLOW["size"])],
            fake.member(ALICE if i % 2 else BOB, "u"),
        )
        for i in range(4)
    ]
    victim = await running_on(harness.app, 1)
    workers[str(victim.worker)].kill()

    await fake.wait_for(lambda: all(has_result(fake.original(t)) for t in tokens), timeout=120)
    await harness.app.queue.wait_idle(30)
    retried = await harness.app.jobs.get(1)
    statuses = [(await harness.app.jobs.get(i)).status for i in range(1, 5)]  # type: ignore[union-attr]

    assert statuses == [JobStatus.DONE] * 4
    assert retried is not None and retried.attempts == 2
    assert retried.worker != victim.worker  # the retry ran on the other worker
    assert deliveries(fake) == Counter({token: 1 for token in tokens})


async def test_a_job_whose_workers_keep_dying_fails_with_a_message(
    app: App, workers: Workers, events: RecordingEvents
) -> None:
    ticket = await app.studio.imagine(who(ALICE), GenerationRequest(prompt="cursed", **SLOW))

    first = await running_on(app, ticket.job_id)
    workers[str(first.worker)].kill()
    async with asyncio.timeout(60):
        while (second := await running_on(app, ticket.job_id)).worker == first.worker:
            await asyncio.sleep(0.05)
    workers[str(second.worker)].kill()
    await app.queue.wait_idle(60)

    job = await app.jobs.get(ticket.job_id)
    assert job is not None and job.status == JobStatus.FAILED
    assert job.error == WORKERS_DIED.format(tries=2)
    assert [j.id for j in events.finished_jobs] == [ticket.job_id]  # told once


async def test_a_job_goes_to_the_worker_that_has_its_lora_resident(app: App, events: RecordingEvents) -> None:
    inky = GenerationRequest(prompt="inkstyle cat", loras=(LoraChoice(name="inky"),), size="64x64")
    first = await app.studio.imagine(who(ALICE), inky)
    await app.queue.wait_idle(60)
    holder = (await app.jobs.get(first.job_id)).worker  # type: ignore[union-attr]
    await _until_advertised(app, holder, "inky")

    # Both workers are free; the other one has waited longer, yet the LoRA decides.
    again = await app.studio.imagine(who(BOB), inky.model_copy(update={"prompt": "inkstyle dog"}))
    await app.queue.wait_idle(60)
    plain = await app.studio.imagine(who(BOB), GenerationRequest(prompt="no lora", size="64x64"))
    await app.queue.wait_idle(60)

    assert (await app.jobs.get(again.job_id)).worker == holder  # type: ignore[union-attr]
    # Without a LoRA to prefer, the worker idle longest gets it.
    assert (await app.jobs.get(plain.job_id)).worker != holder  # type: ignore[union-attr]


async def _until_advertised(app: App, worker: str | None, lora: str) -> None:
    async with asyncio.timeout(10):
        while True:
            table = {w.name: w for w in await app.queue.workers()}
            if worker in table and lora in table[worker].resident_loras:
                return
            await asyncio.sleep(0.05)


async def test_cancelling_a_job_running_on_a_worker_stops_it(app: App, events: RecordingEvents) -> None:
    ticket = await app.studio.imagine(
        who(ALICE), GenerationRequest(prompt="long", size="1024x1024", steps=50)
    )
    await running_on(app, ticket.job_id)

    await app.studio.cancel(who(ALICE), ticket.job_id)
    await app.queue.wait_idle(30)

    job = await app.jobs.get(ticket.job_id)
    assert job is not None and job.status == JobStatus.CANCELLED and job.error == "cancelled by its owner"
    assert [j.id for j in events.finished_jobs] == [ticket.job_id]


async def test_a_restarted_bot_collects_what_its_workers_finished_meanwhile(
    workers: Workers,
    tmp_path: Path,
    make_settings: Callable[..., EngineSettings],
    lora_setup: tuple[Path, Path],
) -> None:
    settings = scaleout_settings(tmp_path, make_settings, lora_setup)
    before = RecordingEvents()
    app = await build_app(settings, before)
    await app.start()
    tickets = [
        await app.studio.imagine(who(ALICE if i % 2 else BOB), GenerationRequest(prompt=f"p{i}", **SLOW))
        for i in range(4)
    ]
    await running_on(app, tickets[0].job_id)
    await app.close()  # the bot goes away; both workers go on with what they hold
    await asyncio.sleep(3)

    after = RecordingEvents()
    app = await build_app(settings, after)
    await app.start()
    try:
        await app.queue.wait_idle(120)
        jobs = [await app.jobs.get(t.job_id) for t in tickets]
    finally:
        await app.close()

    assert all(job is not None and job.status == JobStatus.DONE and job.delivered for job in jobs)
    told = [j.id for j in before.finished_jobs + after.finished_jobs]
    assert sorted(told) == sorted(t.job_id for t in tickets)  # each exactly once, across both runs


async def test_a_worker_stopped_with_sigterm_finishes_its_job_first(app: App, workers: Workers) -> None:
    ticket = await app.studio.imagine(who(ALICE), GenerationRequest(prompt="last one", **SLOW))
    job = await running_on(app, ticket.job_id)

    assert await workers[str(job.worker)].terminate() == 0
    await app.queue.wait_idle(60)

    done = await app.jobs.get(ticket.job_id)
    assert done is not None and done.status == JobStatus.DONE and done.attempts == 1


async def test_admin_workers_lists_each_worker_with_state_and_throughput(
    harness: Harness, fake: FakeDiscord, workers: Workers
) -> None:
    token = await fake.slash("imagine", [opt("prompt", "a fox")], fake.member(ALICE, "alice"))
    await fake.wait_for(lambda: has_result(fake.original(token)), timeout=60)
    listing = await fake.slash("admin", [_sub("workers")], fake.member(ADMIN, "admin"))
    reply = await fake.wait_for(lambda: (m := fake.original(listing)) and m["content"] and m)
    refused = await fake.slash("admin", [_sub("workers")], fake.member(BOB, "bob"))
    refusal = await fake.wait_for(lambda: fake.response_to(refused))
    listed = await harness.app.queue.workers()

    text = reply["content"]
    assert reply["flags"] & 64 and "w1" in text and "w2" in text and "tiny-flux1" in text and "idle" in text
    assert "jobs/min" in text
    assert refusal["data"]["flags"] & 64 and "admin" in refusal["data"]["content"]
    english = harness.bot.languages.for_locale("en-US")  # type: ignore[union-attr]
    assert render_workers(english, listed).splitlines()[0] == text.splitlines()[0] == "**2 workers** (0 busy)"


def _sub(name: str) -> dict[str, Any]:
    return {"name": name, "type": 1, "options": []}


async def test_shared_images_reach_the_bot_through_the_shared_data_dir(
    workers: Workers,
    tmp_path: Path,
    presets_file: Path,
    tiny_dir: Path,
    make_settings: Callable[..., EngineSettings],
    lora_setup: tuple[Path, Path],
) -> None:
    shared = tmp_path / "shared"
    env = worker_env(shared, presets_file, lora_setup[0], tiny_dir, FLUXBOT_WORKERS__IMAGES="shared")
    async with solo_worker(workers, WorkerProcess("sharer", env, tmp_path)):
        job, png = await _one_job(scaleout_settings(shared, make_settings, lora_setup), "shared")
        # A bot that does not share the folder gets a clear failure, not a broken message later.
        failed, _ = await _one_job(
            scaleout_settings(tmp_path / "elsewhere", make_settings, lora_setup), "lost"
        )

    assert job.status == JobStatus.DONE and job.worker == "sharer"
    assert png is not None and hashlib.sha256(png).hexdigest() == job.images[0].sha256
    assert failed.status == JobStatus.FAILED and failed.error == SHARED_IMAGE_MISSING


async def test_a_job_past_the_workers_time_limit_fails_with_a_message(
    workers: Workers,
    tmp_path: Path,
    presets_file: Path,
    tiny_dir: Path,
    make_settings: Callable[..., EngineSettings],
    lora_setup: tuple[Path, Path],
) -> None:
    env = worker_env(
        tmp_path / "w", presets_file, lora_setup[0], tiny_dir, FLUXBOT_WORKERS__JOB_TIMEOUT_S="0.5"
    )
    async with solo_worker(workers, WorkerProcess("hasty", env, tmp_path)):
        job, _ = await _one_job(scaleout_settings(tmp_path, make_settings, lora_setup), "slow", **SLOW)

    assert job.status == JobStatus.FAILED and job.error == TIMED_OUT and job.attempts == 1


@contextlib.asynccontextmanager
async def solo_worker(pool: Workers, worker: WorkerProcess) -> AsyncIterator[None]:
    """Only `worker` serves for a while (the pool's workers stop; the next test starts them again)."""
    for member in pool.values():
        await member.terminate()
    await worker.start()
    try:
        await worker.wait_ready()
        yield
    finally:
        await worker.reap()


async def _one_job(settings: Settings, prompt: str, **options: Any) -> tuple[Job, bytes | None]:
    app = await build_app(settings, RecordingEvents())
    await app.start()
    try:
        request = GenerationRequest.model_validate({"prompt": prompt, "size": "64x64", **options})
        ticket = await app.studio.imagine(who(ALICE), request)
        await app.queue.wait_idle(60)
        job = await app.jobs.get(ticket.job_id)
        assert job is not None
        png = (settings.data_dir / job.images[0].path).read_bytes() if job.images else None
        return job, png
    finally:
        await app.close()


# --- faults in scale-out mode: the same lifecycle as in one process ---------------------------------


async def test_a_502_storm_on_uploads_is_outlasted_while_the_workers_keep_drawing(
    workers: Workers,
    fake: FakeDiscord,
    tmp_path: Path,
    make_settings: Callable[..., EngineSettings],
    lora_setup: tuple[Path, Path],
) -> None:
    values = scaleout_values(make_settings, lora_setup) | {
        "delivery": DeliverySettings(retry_first_s=0.5, retry_max_s=2.0)
    }
    harness = Harness(fake, make_bot_settings(tmp_path, make_settings, fake, **values), None)
    await harness.start()
    try:
        storm_s = 30.0  # longer than discord.py's own five retries of one attempt (~25 s)
        fake.storm_uploads(502, storm_s)
        storm_ends = time.monotonic() + storm_s
        tokens = [
            await fake.slash("imagine", [opt("prompt", f"a stormy redis sea {i}")], fake.member(who, "u"))
            for i, who in enumerate((ALICE, BOB, CAROL))
        ]
        await fake.wait_for(lambda: all(fake.response_to(t) for t in tokens))

        async def all_drawn() -> None:
            while True:
                jobs = [await harness.app.jobs.get(i) for i in range(1, len(tokens) + 1)]
                if all(j is not None and j.status == JobStatus.DONE for j in jobs):
                    return
                await asyncio.sleep(0.1)

        await asyncio.wait_for(all_drawn(), 25)
        drawn_at = time.monotonic()
        await fake.wait_for(lambda: all(has_result(fake.original(t)) for t in tokens), 90)
    finally:
        await harness.stop()

    assert drawn_at < storm_ends, "the workers drew every job while their uploads were failing"
    uploads = [c for c in fake.calls if c.carries_result and c.at >= storm_ends]
    assert len(uploads) == len(tokens), "each result uploaded once, after the storm, without a restart"


async def test_a_database_write_lock_holds_a_workers_outcome_without_losing_or_sticking_it(
    app: App, events: RecordingEvents
) -> None:
    ticket = await app.studio.imagine(who(ALICE), GenerationRequest(prompt="a locked fox", **SLOW))
    await running_on(app, ticket.job_id)
    async with write_lock(app.settings.resolved_database_url):
        # The worker finishes while nothing can be written: the outcome is held as "saving" (never shown
        # as running once its worker is done), /healthz says the database is the trouble.
        await until(lambda: not app.queue.faults.ok("database"), timeout=60)
        entries = {e.job_id: e.state for e in app.queue.snapshot()}
        health = await app.health()
        await asyncio.sleep(1.0)
    await app.queue.wait_idle(60)
    job = await app.jobs.get(ticket.job_id)

    assert entries == {ticket.job_id: "saving"}, entries
    assert health["database"] is False and (await app.health())["database"] is True
    assert job is not None and job.status == JobStatus.DONE and job.delivered
    assert [j.id for j in events.finished_jobs] == [ticket.job_id]


async def test_an_unwritable_images_folder_holds_a_workers_outcome_and_healthz_says_so(
    app: App, events: RecordingEvents
) -> None:
    images = app.settings.data_dir / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.write_text("not a folder")  # as root, permissions do not stop writes; a file in the way does
    ticket = await app.studio.imagine(who(ALICE), GenerationRequest(prompt="a held redis picture"))
    await until(lambda: not app.queue.faults.ok("images"), timeout=60)
    health = await app.health()
    held = await app.jobs.get(ticket.job_id)

    images.unlink()  # the operator fixes the folder
    await app.queue.wait_idle(60)
    job = await app.jobs.get(ticket.job_id)

    assert health["images"] is False and (await app.health())["images"] is True
    assert held is not None and held.status == JobStatus.RUNNING and held.error is None
    assert job is not None and job.status == JobStatus.DONE and job.delivered
    assert (app.settings.data_dir / job.images[0].path).is_file()


async def test_image_jobs_run_on_workers_with_their_input_and_send_previews(
    app: App, events: RecordingEvents
) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buffer, format="PNG")
    image = await app.studio.image_prompt(buffer.getvalue())
    request = GenerationRequest(
        prompt="a cat", seed=3, steps=12, size="64x64", init_image=image.sha256, strength=0.5
    )

    ticket = await app.studio.imagine(who(ALICE), request)
    await app.queue.wait_idle(60)

    job = await app.jobs.get(ticket.job_id)
    assert job is not None and job.status == JobStatus.DONE, job and job.error
    recipe = job.images[0].recipe
    assert (recipe["kind"], recipe["init_image_sha256"], recipe["strength"]) == ("img2img", image.sha256, 0.5)
    previews = [blob for job_id, blob in events.previews if job_id == ticket.job_id]
    assert previews and Image.open(io.BytesIO(previews[0])).format == "JPEG", "previews cross Redis too"


def _png(picture: Image.Image) -> bytes:
    data = io.BytesIO()
    picture.save(data, "PNG")
    return data.getvalue()


async def test_inpaint_and_model_upscale_run_on_workers_and_rerun_exactly(
    workers: Workers,
    tmp_path: Path,
    make_settings: Callable[..., EngineSettings],
    lora_setup: tuple[Path, Path],
    events: RecordingEvents,
) -> None:
    def engine(**kw: Any) -> EngineSettings:
        return make_settings(fill="tiny", upscaler="tiny", **kw)

    app = await build_app(scaleout_settings(tmp_path, engine, lora_setup), events)
    await app.start()
    try:
        alice = who(ALICE)
        base = await app.studio.imagine(alice, GenerationRequest(prompt="a house", seed=2))
        await app.queue.wait_idle(60)
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (0, 0, 32, 64))
        stored_mask = await app.studio.image_prompt(_png(mask))
        inpaint = await app.studio.inpaint(alice, "a red door", JobPicture(base.job_id), stored_mask)
        upscale = await app.studio.upscale(alice, base.job_id)
        await app.queue.wait_idle(60)

        original = await app.jobs.get(base.job_id)
        repainted = await app.jobs.get(inpaint.job_id)
        upscaled = await app.jobs.get(upscale.job_id)
        assert original is not None and repainted is not None and upscaled is not None
        for job in (repainted, upscaled):
            assert job.status == JobStatus.DONE and job.worker in workers, job.error
        before = np.asarray(Image.open(app.settings.data_dir / original.images[0].path).convert("RGB"))
        after = np.asarray(Image.open(app.settings.data_dir / repainted.images[0].path).convert("RGB"))
        assert np.array_equal(after[:, 32:], before[:, 32:]) and not np.array_equal(after, before)
        assert repainted.images[0].recipe["mask_sha256"] == stored_mask.sha256
        # FLUX.1: the upscaler model's x4, then the light redraw; 256x256 fits the preset's cap.
        spec = upscaled.spec
        assert (spec.mode, spec.width, spec.model_upscale) == ("img2img", 256, True)
        assert upscaled.spec.upscaler == next(iter(upscaled.images[0].recipe["upscaler_files"].values()))

        reruns = [await app.studio.rerun(alice, job.id) for job in (repainted, upscaled)]
        await app.queue.wait_idle(60)
        for ticket, job in zip(reruns, (repainted, upscaled), strict=True):
            again = await app.jobs.get(ticket.job_id)
            assert again is not None and again.status == JobStatus.DONE, again and again.error
            first_png = Image.open(app.settings.data_dir / job.images[0].path)
            rerun_png = Image.open(app.settings.data_dir / again.images[0].path)
            assert np.array_equal(np.asarray(first_png), np.asarray(rerun_png))
    finally:
        await app.close()
