"""`fluxbot worker`: one resident engine taking jobs from its own arq queue (queue = "redis://...").

The bot admits and orders jobs and picks a worker for each; a worker only renders. It needs no
database and no Discord: the job carries its spec and its LoRAs' files; progress goes
out on a pub/sub channel and the PNGs come back in the arq result (or in a shared data_dir).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker, func

from bot.services.tasks import TaskSet
from bot.services.wire import (
    EVENTS_CHANNEL,
    GENERATE,
    JobPayload,
    RenderedImage,
    WorkerEvent,
    WorkerResult,
    image_key,
    queue_name,
    worker_key,
)
from bot.services.workers import Throughput, WorkerInfo, WorkerState, default_worker_name, describe_engine
from bot.store.files import ImageFiles
from engine.api import StepProgress
from engine.engine import FluxEngine
from engine.errors import EngineError
from engine.png import png_bytes
from engine.spec import PreviewEvery
from engine.whitelist import LoraUse
from fluxbot.settings import Settings

log = logging.getLogger(__name__)
KEEP_RESULT_S = 24 * 3600  # a bot that was down this long still finds what its workers made


class EngineWorker:
    def __init__(
        self, engine: FluxEngine, settings: Settings, redis: ArqRedis, name: str | None = None
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.redis = redis
        self.name = name or settings.workers.name or default_worker_name()
        self.incarnation = uuid.uuid4().hex[:12]
        self.state: WorkerState = "idle"
        self.draining = False
        self.job_id: int | None = None
        self.throughput = Throughput()
        self.started_at = time.time()
        self._resident: list[str] = engine.loras.resident
        self._pending = TaskSet()

    def arq_worker(self) -> Worker:
        options = self.settings.workers
        return Worker(
            # One more run than ours: the job's last try comes to `generate`, which says it is given up
            # (a typed result), instead of arq failing it with an exception the bot must read.
            functions=[func(self.generate, name=GENERATE, max_tries=options.max_tries + 1)],
            redis_settings=RedisSettings.from_dsn(self.settings.queue),
            queue_name=queue_name(self.name),
            max_jobs=1,  # one resident engine: one job at a time
            job_timeout=options.job_timeout_s,
            max_tries=options.max_tries + 1,
            keep_result=KEEP_RESULT_S,
            poll_delay=0.02,  # how soon an idle worker sees a new job (one cheap ZRANGEBYSCORE)
            allow_abort_jobs=True,  # /admin cancel of a running job
            handle_signals=False,  # `serve` asks arq to drain on SIGTERM (after saying it is draining)
            job_completion_wait=int(self.settings.shutdown_grace_s),
            after_job_end=self._after_job_end,
            log_results=False,
        )

    def info(self) -> WorkerInfo:
        return describe_engine(
            self.engine,
            self.name,
            self.incarnation,
            self.state,
            self.job_id,
            self.throughput,
            self.started_at,
            self._resident,
        )

    async def advertise(self) -> None:
        ttl_ms = int(self.settings.workers.dead_after_s * 1000)
        try:
            await self.redis.set(worker_key(self.name), self.info().model_dump_json(), px=ttl_ms)
        except Exception as exc:  # Redis away for a moment: the next heartbeat says it again
            log.warning("worker %s: could not advertise itself: %s", self.name, exc)

    async def generate(self, ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        """The arq job: render one stored job; an engine refusal is a result, not an arq failure."""
        job = JobPayload.model_validate(payload)
        arq_id, job_try = str(ctx["job_id"]), int(ctx["job_try"])
        if job_try > self.settings.workers.max_tries:
            log.warning("job %d: run %d of at most %d; given up", job.job_id, job_try, job_try - 1)
            return WorkerResult(worker=self.name, exhausted=True, tries=job_try - 1).model_dump()
        self.state, self.job_id = "busy", job.job_id
        await self.advertise()
        await self._publish(WorkerEvent(kind="started", job_id=job.job_id, arq_id=arq_id, worker=self.name))
        loop = asyncio.get_running_loop()
        cancel = threading.Event()

        def on_step(progress: StepProgress) -> None:  # the engine's thread
            event = WorkerEvent(
                kind="progress",
                job_id=job.job_id,
                arq_id=arq_id,
                worker=self.name,
                step=progress.step,
                total=progress.total,
                elapsed_s=progress.elapsed_s,
                preview=base64.b64encode(progress.preview).decode() if progress.preview else None,
            )
            loop.call_soon_threadsafe(self._publish_soon, event)

        work = asyncio.ensure_future(asyncio.to_thread(self._render, job, on_step, cancel))
        try:
            result, pngs = await asyncio.shield(work)
            for index, png in pngs.items():  # the PNGs beside arq's result, under our own keys
                await self.redis.set(image_key(arq_id, index), png, ex=KEEP_RESULT_S)
        except asyncio.CancelledError:
            # Aborted, timed out or shutting down: stop at the next step, so the engine is free again
            # before arq hands this worker its next job.
            cancel.set()
            with contextlib.suppress(BaseException):
                await work
            self.throughput.record(False)
            raise
        except EngineError as exc:
            result = WorkerResult(worker=self.name, error=str(exc))
        finally:
            self._resident = self.engine.loras.resident
            self.job_id = None
            if not self.draining:
                self.state = "idle"
        self.throughput.record(result.error is None)
        return result.model_dump()

    def _render(
        self, job: JobPayload, on_step: Callable[[StepProgress], None], cancel: threading.Event
    ) -> tuple[WorkerResult, dict[int, bytes]]:
        """Draw in the engine's thread; the PNGs come back for `generate` to put in Redis."""
        spec = job.spec
        init_image = base64.b64decode(job.init_image) if job.init_image else None
        preview = (
            None
            if job.preview_every_s is None
            else PreviewEvery(job.preview_every_s, job.preview_every_steps)
        )
        loras = [
            LoraUse(lora.name, job.lora_files.get(lora.name, ""), lora.sha256, lora.weight)
            for lora in spec.loras
        ]
        (result,) = self.engine.draw(
            [spec],
            loras,
            on_step=on_step,
            cancel=cancel,
            init_image=init_image,
            preview=preview,
            references=[base64.b64decode(data) for data in job.references],
        )
        images, pngs = [], {}
        for index, (image, recipe) in enumerate(zip(result.images, result.recipes, strict=True)):
            data = png_bytes(image, recipe)
            if self.settings.workers.images == "shared":
                stored = ImageFiles(self.settings.data_dir).save(job.job_id, index, data, recipe)
                images.append(
                    RenderedImage(index=index, recipe=stored.recipe, sha256=stored.sha256, path=stored.path)
                )
            else:
                recipe_json = recipe.model_dump(mode="json")
                sha256 = hashlib.sha256(data).hexdigest()
                images.append(RenderedImage(index=index, recipe=recipe_json, sha256=sha256))
                pngs[index] = data
        result_ = WorkerResult(worker=self.name, images=images, timings=result.timings.model_dump())
        return result_, pngs

    async def _after_job_end(self, ctx: dict[str, Any]) -> None:
        # arq has stored the result by now: tell the bot so it need not wait for its next poll.
        job_id = int(str(ctx["job_id"]).split(":")[2])
        await self._publish(
            WorkerEvent(kind="finished", job_id=job_id, arq_id=ctx["job_id"], worker=self.name)
        )
        await self.advertise()

    async def _publish(self, event: WorkerEvent) -> None:
        try:
            await self.redis.publish(EVENTS_CHANNEL, event.model_dump_json())
        except Exception as exc:  # progress is best effort; the result still goes through arq
            log.warning("could not publish %s for job %d: %s", event.kind, event.job_id, exc)

    def _publish_soon(self, event: WorkerEvent) -> None:
        self._pending.spawn(self._publish(event))

    async def _heartbeat(self) -> None:
        while True:
            await self.advertise()
            await asyncio.sleep(self.settings.workers.heartbeat_s)

    async def serve(self, stop: asyncio.Event) -> None:
        """Take jobs until `stop`; then take no new one and give the running job shutdown_grace_s."""
        arq_worker = self.arq_worker()
        heartbeat = asyncio.create_task(self._heartbeat(), name="fluxbot-worker-heartbeat")
        main = asyncio.create_task(arq_worker.async_run(), name="fluxbot-worker-arq")
        stopping = asyncio.create_task(stop.wait())
        log.info(
            "worker %s serving %s (%s, %s) from %s",
            self.name,
            self.engine.info.model_id,
            self.engine.info.family,
            self.engine.info.plan.transformer,
            queue_name(self.name),
        )
        try:
            await asyncio.wait({main, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if main.done():
                main.result()  # arq stopped by itself: raise what stopped it
            self.state, self.draining = "draining", True
            await self.advertise()
            # arq's own drain: no new job, the running one gets job_completion_wait (shutdown_grace_s)
            # to finish and store its result, then it is cancelled (and kept queued for a retry).
            arq_worker.handle_sig_wait_for_completion(signal.SIGTERM)
            with contextlib.suppress(asyncio.CancelledError):
                await main
            if self.job_id is not None:
                log.info(
                    "worker %s: job %d did not finish in time; it goes to another worker",
                    self.name,
                    self.job_id,
                )
        finally:
            stopping.cancel()
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await arq_worker.close()
                if not main.done():
                    await main
            await self._pending.cancel_all(timeout=2)
            await self.redis.delete(worker_key(self.name))  # the bot moves anything left at once


async def run_worker(settings: Settings, name: str | None = None) -> None:
    """Reach Redis (fail fast, before a long model load), load the engine once, serve until SIGTERM."""
    redis = await create_pool(RedisSettings.from_dsn(settings.queue))
    engine = await asyncio.to_thread(FluxEngine.load, settings.engine, settings.data_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await EngineWorker(engine, settings, redis, name).serve(stop)
    finally:
        await redis.aclose()
