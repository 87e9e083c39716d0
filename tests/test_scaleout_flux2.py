"""A FLUX.2 klein `fluxbot worker` on Redis: multi-reference edits travel with their PNGs, an
enhanced prompt made in the worker is stored with the job, so a rerun asks the enhancer nothing, and
Upscale is the worker's upscaler model alone (FLUX.2 has no image-to-image), pinned once drawn."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.app import App, build_app
from bot.services.studio import JobPicture, Requester
from bot.store.models import JobStatus
from engine.api import GenerationRequest
from engine.settings import EngineSettings
from engine.tiny import ensure_tiny_model
from fluxbot.settings import WorkerSettings
from tests.bot_support import RecordingEvents
from tests.bot_support import make_settings as bot_settings
from tests.chat_server import ChatServer, chat_server, expansion_of
from tests.discord_support import ALICE
from tests.scaleout_support import DEAD_AFTER_S, HEARTBEAT_S, WorkerProcess, worker_env
from tests.services import REDIS_URL, create_postgres_database, flush_redis, require_postgres, require_redis


@pytest.fixture(scope="module")
def chat() -> Iterator[ChatServer]:
    with chat_server() as running:
        yield running


@pytest.fixture(scope="module")
async def klein_worker(
    tmp_path_factory: pytest.TempPathFactory,
    presets_file: Path,
    tiny_dir: Path,
    data_dir: Path,
    chat: ChatServer,
) -> AsyncIterator[WorkerProcess]:
    require_redis()
    require_postgres()
    flush_redis()
    base = tmp_path_factory.mktemp("klein-worker")
    empty = base / "loras.toml"
    empty.write_text("")
    env = worker_env(
        base / "k1",
        presets_file,
        empty,
        tiny_dir,
        FLUXBOT_MODEL="tiny-flux2",
        FLUXBOT_ENGINE__PROMPT_ENHANCER=chat.url,
        FLUXBOT_ENGINE__PROMPT_ENHANCER_MODEL="tiny-llm",
        FLUXBOT_ENGINE__UPSCALER="tiny",
    )
    flux2 = ensure_tiny_model(data_dir / "models" / "tiny-flux2", "flux2")
    (base / "k1" / "models" / "tiny-flux2").symlink_to(flux2)  # the session's tiny klein, not a rebuild
    worker = WorkerProcess("k1", env, base)
    await worker.start()
    await worker.wait_ready()
    yield worker
    await worker.reap()


@pytest.fixture
async def app(
    klein_worker: WorkerProcess,
    tmp_path: Path,
    make_settings: Callable[..., EngineSettings],
    chat: ChatServer,
) -> AsyncIterator[App]:
    def engine(**kw: object) -> EngineSettings:
        return make_settings(model="tiny-flux2", prompt_enhancer=chat.url, upscaler="tiny", **kw)

    # Each test has a fresh database, so job ids start again at 1: an empty Redis keeps arq from
    # taking a new job for the last test's job of the same id (the worker re-registers itself).
    flush_redis()
    await klein_worker.wait_ready()

    settings = bot_settings(
        tmp_path,
        engine,
        queue=REDIS_URL,
        database_url=create_postgres_database(),
        workers=WorkerSettings(heartbeat_s=HEARTBEAT_S, dead_after_s=DEAD_AFTER_S),
    )
    built = await build_app(settings, RecordingEvents())
    await built.start()
    yield built
    await built.close()


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


ALICE_HERE = Requester(user_id=ALICE, user_name="alice")


async def test_a_three_reference_edit_runs_on_a_klein_worker(app: App) -> None:
    base = await app.studio.imagine(ALICE_HERE, GenerationRequest(prompt="a cat", seed=1))
    await app.queue.wait_idle(60)
    hat, sofa = (
        await app.studio.image_prompt(_png((200, 40, 40))),
        await app.studio.image_prompt(_png((0, 90, 200))),
    )

    ticket = await app.studio.edit(
        ALICE_HERE, "the cat in the hat on the sofa", [JobPicture(base.job_id), hat, sofa]
    )
    await app.queue.wait_idle(60)

    job = await app.jobs.get(ticket.job_id)
    assert job is not None and job.status == JobStatus.DONE, job and job.error
    recipe = job.images[0].recipe
    assert recipe["family"] == "flux2" and recipe["reference_sha256s"] == [hat.sha256, sofa.sha256]
    assert job.worker == "k1"


async def test_an_enhancement_made_in_the_worker_is_stored_and_reused(app: App, chat: ChatServer) -> None:
    chat.requests.clear()
    ticket = await app.studio.imagine(
        ALICE_HERE, GenerationRequest(prompt="a lighthouse", seed=2, enhance=True)
    )
    await app.queue.wait_idle(60)
    first = await app.jobs.get(ticket.job_id)
    assert first is not None and first.status == JobStatus.DONE, first and first.error
    assert first.spec.enhanced_prompt == expansion_of("a lighthouse") and len(chat.requests) == 1

    again = await app.studio.rerun(ALICE_HERE, ticket.job_id)
    await app.queue.wait_idle(60)

    rerun = await app.jobs.get(again.job_id)
    assert rerun is not None and rerun.status == JobStatus.DONE
    assert len(chat.requests) == 1, "the rerun drew the stored enhancement"
    first_png = Image.open(app.settings.data_dir / first.images[0].path)
    rerun_png = Image.open(app.settings.data_dir / rerun.images[0].path)
    assert np.array_equal(np.asarray(first_png), np.asarray(rerun_png))


async def test_upscale_on_a_klein_worker_is_the_upscaler_model_alone(app: App) -> None:
    base = await app.studio.imagine(ALICE_HERE, GenerationRequest(prompt="a harbour", seed=5))
    await app.queue.wait_idle(60)

    ticket = await app.studio.upscale(ALICE_HERE, base.job_id)
    await app.queue.wait_idle(60)

    job = await app.jobs.get(ticket.job_id)
    assert job is not None and job.status == JobStatus.DONE, job and job.error
    assert (job.spec.mode, job.spec.width, job.spec.height) == ("upscale", 256, 256), "4x: the cap allows it"
    recipe = job.images[0].recipe
    assert recipe["upscaler"].startswith("ESRGAN x4 (8nf, 1nb)") and job.worker == "k1"
    assert job.spec.upscaler == next(iter(recipe["upscaler_files"].values())), "pinned once drawn"
    assert Image.open(app.settings.data_dir / job.images[0].path).size == (256, 256)

    again = await app.studio.rerun(ALICE_HERE, ticket.job_id)
    await app.queue.wait_idle(60)
    rerun = await app.jobs.get(again.job_id)
    assert rerun is not None and rerun.status == JobStatus.DONE, rerun and rerun.error
    first_png = Image.open(app.settings.data_dir / job.images[0].path)
    rerun_png = Image.open(app.settings.data_dir / rerun.images[0].path)
    assert np.array_equal(np.asarray(first_png), np.asarray(rerun_png))
