"""Wiring: settings -> database, engine, queue, services. The Discord client and the tests both start here.

queue = "local": the engine lives in this process behind a LocalJobQueue.
queue = "redis://...": no engine here; a RedisJobQueue hands jobs to `fluxbot worker` processes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from arq.connections import ArqRedis, RedisSettings, create_pool
from sqlalchemy import text

from bot.observability import Metrics
from bot.services.admin import AdminPolicy, AdminService
from bot.services.events import JobEvents
from bot.services.queue import JobQueue, LocalJobQueue
from bot.services.redis_queue import RedisJobQueue
from bot.services.runner import JobRunner
from bot.services.studio import Studio
from bot.store.admin import AdminStore
from bot.store.database import Database
from bot.store.jobs import JobStore
from engine.engine import FluxEngine, build_resolver
from fluxbot.settings import Settings


@dataclass
class App:
    settings: Settings
    db: Database
    engine: FluxEngine | None  # None in scale-out mode: the workers hold the engines
    jobs: JobStore
    queue: JobQueue
    studio: Studio
    admin: AdminService
    metrics: Metrics
    redis: ArqRedis | None = None
    started_at: float = field(default_factory=time.time)

    async def start(self) -> None:
        await self.queue.start()

    async def close(self) -> None:
        await self.queue.stop()
        await self.db.close()
        if self.redis is not None:
            await self.redis.aclose()

    async def health(self) -> dict[str, bool]:
        """What /healthz reports besides the gateway: the database, and the engine or Redis."""
        checks = {"database": await self.database_ok()}
        if self.redis is None:
            checks["engine"] = self.engine is not None
        else:
            try:
                checks["redis"] = bool(await self.redis.ping())
            except Exception:  # unreachable is what /healthz reports
                checks["redis"] = False
        return checks

    async def database_ok(self) -> bool:
        try:
            async with self.db.session() as session:
                await session.execute(text("SELECT 1"))
        except Exception:  # any failure means "not reachable" to /healthz
            return False
        return True


async def build_app(settings: Settings, events: JobEvents, engine: FluxEngine | None = None) -> App:
    """Migrate the database, load the engine (once, off the loop) or reach Redis, restore admin changes."""
    db = Database(settings.resolved_database_url)
    await db.upgrade()
    jobs, admin_store = JobStore(db), AdminStore(db)
    metrics = Metrics()
    redis: ArqRedis | None = None
    queue: JobQueue
    if settings.uses_redis:
        # Requests are checked here against the same presets and whitelist files the workers load.
        resolver = build_resolver(settings.engine, settings.data_dir, settings.workers_family)
        redis = await create_pool(RedisSettings.from_dsn(settings.queue))
        queue = RedisJobQueue(jobs, events, metrics, settings, resolver, redis)
        engine = None
    else:
        if engine is None:
            engine = await asyncio.to_thread(FluxEngine.load, settings.engine, settings.data_dir)
        metrics.watch_engine(engine)
        resolver = engine.resolver
        queue = LocalJobQueue(jobs, JobRunner(engine, settings.data_dir), events, metrics)
    studio = Studio(resolver, jobs, admin_store, queue, settings.limits, metrics)
    policy = AdminPolicy(frozenset(settings.admin_user_ids), frozenset(settings.admin_role_ids))
    admin = AdminService(studio, admin_store, policy)
    await admin.load_overrides()
    return App(settings, db, engine, jobs, queue, studio, admin, metrics, redis)
