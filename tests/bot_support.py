"""Helpers for the bot's service tests: a real app on a temporary SQLite file and the tiny engine."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from bot.app import App, build_app
from bot.store.models import Job
from engine.engine import FluxEngine
from engine.settings import EngineSettings
from engine.spec import DrawSpec
from fluxbot.settings import LimitSettings, Settings
from tests.services import database_url_for_test


class RecordingEvents:
    """A real JobEvents implementation that keeps what it was told (the tests' stand-in for Discord)."""

    def __init__(self) -> None:
        self.started_ids: list[int] = []
        self.progress_seen: list[tuple[int, int, int]] = []
        self.previews: list[tuple[int, bytes]] = []
        self.finished_jobs: list[Job] = []
        self.fail_delivery = False  # every delivery fails
        self.fail_next = 0  # this many deliveries fail, then they work
        self.failed_attempts = 0
        self._next_message = 1000

    async def started(self, job: Job) -> None:
        self.started_ids.append(job.id)

    async def progress(
        self, job: Job, step: int, total: int, eta_s: float, preview: bytes | None = None
    ) -> None:
        self.progress_seen.append((job.id, step, total))
        if preview is not None:
            self.previews.append((job.id, preview))

    async def finished(self, job: Job) -> int | None:
        if self.fail_delivery or self.fail_next > 0:
            self.fail_next -= 1
            self.failed_attempts += 1
            raise ConnectionError("discord unreachable")
        self.finished_jobs.append(job)
        self._next_message += 1
        return self._next_message


def spec_for(prompt: str, **fields: Any) -> DrawSpec:
    """A small stored job's spec, for tests of the store that never draw it."""
    values: dict[str, Any] = dict(
        family="flux1", preset="dev", prompt=prompt, final_prompt=prompt, width=64, height=64, steps=4, seed=1
    )
    return DrawSpec.model_validate({**values, **fields})


def make_settings(
    tmp: Path, make_engine_settings: Callable[..., EngineSettings], **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp,
        "database_url": database_url_for_test(tmp),
        "engine": make_engine_settings(),
        "limits": LimitSettings(jobs_per_window=100, window_s=60, max_queued_per_user=5, max_queue=50),
        "admin_user_ids": [1],
        "metrics_port": None,
    }
    values.update(overrides)
    return Settings.model_validate(values)


async def make_app(settings: Settings, events: RecordingEvents, data_dir: Path) -> App:
    engine = await asyncio.to_thread(FluxEngine.load, settings.engine, data_dir)
    return await build_app(settings, events, engine)


async def until(condition: Callable[[], Any], timeout: float = 30, every: float = 0.02) -> Any:
    """Poll `condition` until it is truthy (for state that has no event to wait on), with a deadline."""
    async with asyncio.timeout(timeout):
        while not (result := condition()):
            await asyncio.sleep(every)
        return result


@contextlib.asynccontextmanager
async def write_lock(database_url: str) -> AsyncIterator[None]:
    """Another client holds the database's write lock (a backup, a migration, a stuck admin shell):
    SQLite's RESERVED lock, or Postgres's EXCLUSIVE lock on `jobs` (reads still pass on both)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        # Taken in a thread: waiting for the lock on the event loop would stop the bot's own open write
        # transaction (which runs on that loop) from ever committing, a deadlock until the timeout.
        holder = sqlite3.connect(str(url.database), isolation_level=None, timeout=30, check_same_thread=False)
        await asyncio.to_thread(holder.execute, "BEGIN IMMEDIATE")
        try:
            yield
        finally:
            await asyncio.to_thread(holder.rollback)
            holder.close()
        return
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            transaction = await connection.begin()
            await connection.execute(text("LOCK TABLE jobs IN EXCLUSIVE MODE"))
            try:
                yield
            finally:
                await transaction.rollback()
    finally:
        await engine.dispose()
