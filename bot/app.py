"""Wiring: settings -> database, engine, queue, services. The Discord client and the tests both start here."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from sqlalchemy import text

from bot.observability import Metrics
from bot.services.admin import AdminPolicy, AdminService
from bot.services.events import JobEvents
from bot.services.queue import LocalJobQueue
from bot.services.runner import JobRunner
from bot.services.studio import Studio
from bot.store.admin import AdminStore
from bot.store.database import Database
from bot.store.jobs import JobStore
from engine.engine import FluxEngine
from fluxbot.settings import Settings


@dataclass
class App:
    settings: Settings
    db: Database
    engine: FluxEngine
    jobs: JobStore
    queue: LocalJobQueue
    studio: Studio
    admin: AdminService
    metrics: Metrics
    started_at: float = field(default_factory=time.time)

    async def start(self) -> None:
        await self.queue.start()

    async def close(self) -> None:
        await self.queue.stop()
        await self.db.close()

    async def database_ok(self) -> bool:
        try:
            async with self.db.session() as session:
                await session.execute(text("SELECT 1"))
        except Exception:  # any failure means "not reachable" to /healthz
            return False
        return True


async def build_app(settings: Settings, events: JobEvents, engine: FluxEngine | None = None) -> App:
    """Migrate the database, load the engine (once, off the loop) and restore admin changes."""
    db = Database(settings.resolved_database_url)
    await db.upgrade()
    if engine is None:
        engine = await asyncio.to_thread(FluxEngine.load, settings.engine, settings.data_dir)
    jobs, admin_store = JobStore(db), AdminStore(db)
    metrics = Metrics()
    metrics.watch_engine(engine)
    queue = LocalJobQueue(jobs, JobRunner(engine, settings.data_dir), events, metrics)
    studio = Studio(engine.resolver, jobs, admin_store, queue, settings.limits, metrics)
    policy = AdminPolicy(frozenset(settings.admin_user_ids), frozenset(settings.admin_role_ids))
    admin = AdminService(studio, admin_store, policy)
    await admin.load_overrides()
    return App(settings, db, engine, jobs, queue, studio, admin, metrics)
