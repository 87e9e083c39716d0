"""Migrations keep what people made: a database the previous schema wrote upgrades, and its jobs
rerun to the pixels they were drawn with.

tests/fixtures/legacy_0006 was written by fluxbot at migration 0006 (commit 8b1f17a, the last one that
stored requests instead of specs): the tiny model, the test presets, a whitelisted LoRA and Kontext,
and a job of every kind (see jobs.json), their PNGs and input images. It is data, not code: the
test upgrades a copy and reruns each job with today's code.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.app import build_app
from bot.services.studio import Requester
from bot.store.database import upgrade_database
from bot.store.models import JobStatus
from engine.engine import FluxEngine
from engine.settings import EngineSettings
from fluxbot.settings import LimitSettings, Settings
from tests.bot_support import RecordingEvents, make_settings

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_0006"
ALICE = Requester(user_id=11, user_name="alice", guild_id=500, channel_id=600, can_view=lambda c: c == 600)


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    """A writable copy of the fixture (the upgrade changes the database in place)."""
    shutil.copytree(FIXTURE, tmp_path / "legacy")
    return tmp_path / "legacy"


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


async def test_jobs_of_every_kind_stored_by_the_previous_schema_rerun_to_identical_pixels(
    legacy: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    ids: dict[str, int] = json.loads((legacy / "jobs.json").read_text())
    engine_settings = make_settings(
        presets_file=legacy / "presets.toml",
        loras_file=legacy / "loras.toml",
        lora_dir=legacy / "Lora",
        kontext="tiny",
    )
    settings = make_settings_for(legacy, engine_settings)
    engine = await asyncio.to_thread(FluxEngine.load, engine_settings, data_dir)
    app = await build_app(settings, RecordingEvents(), engine)
    try:
        originals = {name: await app.jobs.get(job_id) for name, job_id in ids.items()}
        await app.start()
        reruns = {
            name: await app.studio.rerun(ALICE, job.id)
            for name, job in originals.items()
            if job is not None and job.status == JobStatus.DONE
        }
        await app.queue.wait_idle(300)
        again = {name: await app.jobs.get(ticket.job_id) for name, ticket in reruns.items()}
        queued = await app.jobs.get(ids["queued"])
    finally:
        await app.close()

    assert set(reruns) == set(ids) - {"queued"}, "every kind of finished job"
    for name, job in again.items():
        original = originals[name]
        assert job is not None and original is not None and job.status == JobStatus.DONE, name
        assert len(job.images) == len(original.images), name
        for before, after in zip(original.images, job.images, strict=True):
            # The fixture was drawn on another machine: a CPU with other vector units rounds a float sum
            # differently now and then (seen: the LoRA job, 1 of 12,288 values off by one level). Same
            # spec, same machine is bit-exact (tests/test_bot_discord.py); here: the same picture.
            diff = np.abs(pixels(legacy / "data" / before.path) - pixels(legacy / "data" / after.path))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.001, f"{name}: the rerun drew other pixels"
    assert queued is not None and queued.status == JobStatus.DONE, "a job left queued ran after the upgrade"
    specs = {name: job.spec for name, job in originals.items() if job is not None}
    assert specs["imagine_lora"].final_prompt == "inkstyle, a cat"
    assert [(lo.name, lo.weight) for lo in specs["imagine_lora"].loras] == [("inky", 0.7)]
    assert (specs["img2img"].mode, specs["img2img"].strength) == ("img2img", 0.6)
    assert (specs["upscale"].mode, specs["upscale"].width, specs["upscale"].origin) == (
        "img2img",
        128,
        "upscale",
    )
    assert (specs["edit_job"].mode, specs["edit_job"].preset, specs["edit_job"].strength) == (
        "edit",
        "kontext",
        None,
    )
    assert str(specs["imagine_cached"].cache) == "fbcache:0.3" and specs["imagine_schnell"].guidance is None
    assert specs["imagine_schnell"].max_sequence_length == 256 and specs["variation"].batch_size == 4
    assert specs["queued"].mode == "txt2img" and specs["queued"].prompt == "a waiting dog"


def test_the_upgrade_can_be_undone_back_to_stored_requests(legacy: Path) -> None:
    import sqlite3

    url = f"sqlite+aiosqlite:///{legacy / 'data' / 'fluxbot.db'}"
    upgrade_database(url)
    downgrade_database(url, "0006")

    with sqlite3.connect(legacy / "data" / "fluxbot.db") as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
        requests = {row[0]: json.loads(row[1]) for row in db.execute("SELECT id, request FROM jobs")}
    assert "spec" not in columns and "request" in columns
    assert requests[13]["kind"] == "upscale" and requests[13]["size"] == "128x128"
    assert requests[14]["kind"] == "edit" and requests[2]["loras"] == [{"name": "inky", "weight": 0.7}]
    upgrade_database(url)  # and forward again


def downgrade_database(url: str, revision: str) -> None:
    from alembic import command

    from bot.store.database import alembic_config

    command.downgrade(alembic_config(url), revision)


def make_settings_for(legacy: Path, engine_settings: EngineSettings) -> Settings:
    return make_settings(
        legacy / "data",
        lambda: engine_settings,
        database_url=f"sqlite+aiosqlite:///{legacy / 'data' / 'fluxbot.db'}",
        limits=LimitSettings(jobs_per_window=100, window_s=60, max_queued_per_user=50, max_queue=100),
    )
