"""Wiring: settings -> database, executor, dispatcher, services. The Discord client and the tests start here.

queue = "local": the engine lives in this process; a LocalExecutor runs the dispatcher's jobs on it.
queue = "redis://...": no engine here; a RedisExecutor hands them to `fluxbot worker` processes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from arq.connections import ArqRedis, RedisSettings, create_pool
from sqlalchemy import text

from bot.observability import Metrics
from bot.services.admin import AdminPolicy, AdminService
from bot.services.content_policy import BlockedTerms
from bot.services.dispatcher import JobDispatcher
from bot.services.events import JobEvents
from bot.services.execution import Executor
from bot.services.faults import Faults
from bot.services.redis_executor import RedisExecutor
from bot.services.rules import LiveRules
from bot.services.studio import Studio
from bot.store.admin import AdminStore
from bot.store.database import Database
from bot.store.files import ImageFiles
from bot.store.jobs import JobStore
from engine.catalog import Catalog
from engine.hashing import FileHasher
from engine.resolve import RequestResolver
from engine.spec import PreviewEvery
from engine.whitelist import LoraFiles, bot_lora_dir
from fluxbot.settings import Settings

if TYPE_CHECKING:
    from engine.engine import FluxEngine


@dataclass
class App:
    settings: Settings
    db: Database
    engine: FluxEngine | None  # None in scale-out mode: the workers hold the engines
    jobs: JobStore
    files: ImageFiles
    queue: JobDispatcher
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
        """What /healthz reports besides the gateway: the database (reachable, and writes going
        through), the images folder (writable), and the engine or Redis."""
        checks = await self.queue.health()
        checks["database"] = checks["database"] and await self.database_ok()
        checks["images"] = checks["images"] and await asyncio.to_thread(self.files.writable)
        return checks

    async def database_ok(self) -> bool:
        try:
            async with self.db.session() as session:
                await session.execute(text("SELECT 1"))
        except Exception:  # any failure means "not reachable" to /healthz
            return False
        return True


async def build_app(
    settings: Settings, events: JobEvents, engine: FluxEngine | None = None, metrics: Metrics | None = None
) -> App:
    """Migrate the database, load the engine (once, off the loop) or reach Redis, restore admin changes.
    In scale-out mode nothing here imports torch: the engine modules are imported only for `local`."""
    catalog = await asyncio.to_thread(Catalog.load, settings.engine)
    db = Database(settings.resolved_database_url)
    await db.upgrade(catalog.as_json())
    jobs, admin_store = JobStore(db), AdminStore(db)
    metrics = metrics or Metrics()
    redis: ArqRedis | None = None
    executor: Executor
    files = ImageFiles(settings.data_dir)
    # By default one preview per progress edit: more would never be shown (edits are throttled to this).
    preview = (
        PreviewEvery(settings.progress_interval_s, settings.images.preview_every_steps)
        if settings.images.previews
        else None
    )
    if settings.uses_redis:
        # Requests are resolved here; the workers draw the specs with the LoRA files named in each job.
        rules = LiveRules(RequestResolver.with_settings(catalog, settings.engine, settings.workers_family))
        redis = await create_pool(RedisSettings.from_dsn(settings.queue))
        executor = RedisExecutor(redis, rules, settings.workers, files, preview)
        lora_files: LoraFiles | None = LoraFiles(
            bot_lora_dir(settings.engine, settings.data_dir), FileHasher(settings.data_dir / "hashes.json")
        )
        engine = None
    else:
        from bot.services.local_executor import LocalExecutor
        from engine.engine import FluxEngine

        if engine is None:
            engine = await asyncio.to_thread(FluxEngine.load, settings.engine, settings.data_dir)
        metrics.watch_engine(engine)
        rules = LiveRules(
            RequestResolver.with_settings(catalog, settings.engine, engine.info.family, engine.info.variant)
        )
        executor = LocalExecutor(engine, rules, files, preview)
        lora_files = engine.lora_files
    classifier = None
    if settings.safety.classifier:
        from bot.services.image_safety import ImageClassifier

        classifier = await asyncio.to_thread(ImageClassifier.load, settings.safety)
    dispatcher = JobDispatcher(
        jobs, files, executor, events, metrics, Faults(), settings.delivery, classifier
    )
    blocked = BlockedTerms.of(settings.safety.blocked_terms)
    studio = Studio(
        rules,
        jobs,
        dispatcher,
        settings.limits,
        metrics,
        blocked,
        files,
        settings.images,
        # FLUX.1 edits with Kontext beside the model; FLUX.2 and FLUX.3 klein with the resident model.
        edits=settings.engine.kontext_in_use is not None or rules.resolver.family in ("flux2", "flux3"),
        inpaints=settings.engine.fill_in_use is not None and rules.resolver.family == "flux1",
        upscales=settings.engine.upscaler is not None,
    )
    dispatcher.server_weight = studio.server_weight  # servers share the GPU by the rules admins set
    dispatcher.outcomes.screen = studio.blocked_term  # an enhancer's prompt meets the same blocklists
    if settings.engine.segmenter is not None and studio.inpaints:
        from engine.segmenter import Segmenter

        studio.segmenter = await asyncio.to_thread(
            Segmenter.load, settings.engine.segmenter, settings.data_dir
        )
    studio.flagged_default = settings.safety.flagged_action
    policy = AdminPolicy(
        frozenset(settings.admin_user_ids),
        frozenset(settings.admin_role_ids),
        frozenset(settings.server_admin_guilds),
    )
    admin = AdminService(studio, admin_store, policy, lora_files)
    await admin.load_overrides()
    return App(settings, db, engine, jobs, files, dispatcher, studio, admin, metrics, redis)
