"""RedisJobQueue: the scale-out backend (queue = "redis://..."), built on arq.

The bot still admits jobs, stores them first and decides their fair order (the same FairQueue as the
local backend). It hands a job to arq only when a worker is free, and picks the worker: one with the
job's LoRAs resident if it can, otherwise the one idle longest. So arq's queues stay one job deep and
the fair order is what runs. Each worker takes jobs from its own arq queue.

A worker that stops advertising itself (killed, host lost) has its job moved to another worker as a new
arq job with the next try number (arq's `_job_try`); past `workers.max_tries` the job fails with a
message. Results come back as arq job results; the job id is the key of every step (DB status, the
dispatch record, delivery), so a job is recorded and delivered once however often it is looked at.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arq.connections import ArqRedis
from arq.constants import (
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.jobs import Job as ArqJob
from arq.jobs import JobResult
from arq.utils import timestamp_ms
from arq.worker import JobExecutionFailed

from bot.observability import Metrics
from bot.services.events import JobEvents
from bot.services.fair_queue import FairQueue
from bot.services.queue import INTERNAL_ERROR, QueueEntry, job_cost
from bot.services.runner import StepClock, save_png, stored_image
from bot.services.wire import (
    DISPATCH_KEY,
    EVENTS_CHANNEL,
    GENERATE,
    WORKER_KEY_PREFIX,
    Dispatch,
    JobPayload,
    RenderedImage,
    WorkerEvent,
    WorkerResult,
    arq_job_id,
    queue_name,
)
from bot.services.workers import WorkerInfo
from bot.store.jobs import JobStore, StoredImage
from bot.store.models import Job, JobStatus
from engine.api import Recipe
from engine.resolve import RequestResolver
from fluxbot.settings import Settings

log = logging.getLogger(__name__)
WORKERS_DIED = "The worker drawing this stopped {tries} times, so fluxbot gave up on it. Try again."
TIMED_OUT = (
    "This took longer than a worker may spend on one job, so it was stopped. "
    "Try fewer steps or a smaller size."
)
SHARED_IMAGE_MISSING = (
    "The worker saved the image where the bot cannot read it: workers.images = 'shared' needs one "
    "data_dir shared by the bot and every worker."
)
POLL_S = 0.2


@dataclass
class Flight:
    """A job handed to a worker and not yet finished."""

    dispatch: Dispatch
    job: Job
    estimate_s: float
    started: float | None = None  # monotonic, when the worker said it started
    cancelled_by: str | None = None
    finishing: bool = False

    def remaining_s(self) -> float:
        if self.started is None:
            return self.estimate_s
        return max(0.0, self.estimate_s - (time.monotonic() - self.started))


@dataclass
class Retry:
    job_try: int
    dispatch_no: int
    user_id: int


@dataclass
class _Loops:
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            _, stuck = await asyncio.wait(self.tasks, timeout=5)
            for task in stuck:  # a Redis call that ignores cancellation must not hold up shutdown
                log.warning("%s did not stop within 5 s", task.get_name())
        self.tasks.clear()


class RedisJobQueue:
    def __init__(
        self,
        store: JobStore,
        events: JobEvents,
        metrics: Metrics,
        settings: Settings,
        resolver: RequestResolver,
        redis: ArqRedis,
    ) -> None:
        self.store = store
        self.events = events
        self.metrics = metrics
        self.settings = settings
        self.resolver = resolver
        self.redis = redis
        self.data_dir: Path = settings.data_dir
        self.fair = FairQueue()
        self.paused = False
        self.clock = StepClock()
        self.inflight: dict[int, Flight] = {}
        self.retries: dict[int, Retry] = {}  # jobs taken off a dead worker: dispatched before new ones
        self.worker_table: dict[str, WorkerInfo] = {}
        self._cost: dict[int, tuple[int, int]] = {}
        self._owner: dict[int, int] = {}
        self._family_by_job: dict[int, str] = {}  # which workers can run it
        self._handing_out: set[int] = set()
        self._last_assigned: dict[str, float] = {}
        self._wake = asyncio.Event()  # dispatcher: a job or a worker became available
        self._poke = asyncio.Event()  # watcher: a worker says a job finished
        self._loops = _Loops()

    # lifecycle

    async def start(self) -> None:
        """Find again what was dispatched before a restart; queue the rest; deliver what is undelivered."""
        await self.refresh_workers()
        records = {
            int(k): Dispatch.model_validate_json(v)
            for k, v in (await self.redis.hgetall(DISPATCH_KEY)).items()
        }
        restored = 0
        for job in await self.store.unfinished():
            record = records.pop(job.id, None)
            if record is not None and record.worker:
                started = time.monotonic() if job.status == JobStatus.RUNNING else None
                self.inflight[job.id] = Flight(record, job, self._estimate(job), started)
            elif record is not None:  # it was waiting for another worker after one died
                self._note(job)
                self.retries[job.id] = Retry(record.job_try, record.dispatch_no + 1, job.user_id)
            else:
                if job.status == JobStatus.RUNNING:
                    await self.store.requeue(job.id)
                self._push(job)
            restored += 1
        for stale in records:  # finished while the bot was away and already recorded
            await self.redis.hdel(DISPATCH_KEY, str(stale))
        if restored:
            log.info("restart: %d unfinished jobs restored (%d on workers)", restored, len(self.inflight))
        for job in await self.store.undelivered():
            await self._deliver(job)
        self._update_depth()
        self._loops.tasks = [
            asyncio.create_task(self._dispatch_loop(), name="fluxbot-dispatch"),
            asyncio.create_task(self._watch_loop(), name="fluxbot-watch"),
            asyncio.create_task(self._listen_loop(), name="fluxbot-events"),
        ]

    async def stop(self) -> None:
        await self._loops.stop()

    async def drain(self, grace_s: float) -> None:
        """Shutdown: dispatch nothing new; deliver what finishes within `grace_s`. Jobs still on workers
        keep running there, and their results wait in Redis for the next start."""
        self.pause()
        deadline = time.monotonic() + grace_s
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.inflight:
            log.info("%d jobs still on workers; the next start delivers them", len(self.inflight))
        await self.stop()

    # what Studio and admins see

    def push(self, job: Job) -> QueueEntry:
        self._push(job)
        self._wake.set()
        entry = self.entry(job.id)
        assert entry is not None
        return entry

    def _push(self, job: Job) -> None:
        self._note(job)
        self.fair.push(job.user_id, job.id)
        self._update_depth()

    def _note(self, job: Job) -> None:
        self._owner[job.id] = job.user_id
        self._cost[job.id] = job_cost(job.request)
        self._family_by_job[job.id] = self._family(job)

    def _forget(self, job_id: int) -> None:
        self._owner.pop(job_id, None)
        self._cost.pop(job_id, None)
        self._family_by_job.pop(job_id, None)

    def __len__(self) -> int:
        return len(self.fair) + len(self.retries) + len(self._handing_out)

    @property
    def busy(self) -> int:
        return len(self.inflight)

    def queued_for(self, user_id: int) -> int:
        running = sum(1 for f in self.inflight.values() if f.job.user_id == user_id)
        retrying = sum(1 for r in self.retries.values() if r.user_id == user_id)
        return self.fair.count(user_id) + running + retrying

    def entry(self, job_id: int) -> QueueEntry | None:
        return next((e for e in self.snapshot() if e.job_id == job_id), None)

    def snapshot(self) -> list[QueueEntry]:
        """Jobs on workers first (position 0), then the waiting ones in the order they will be handed out;
        ETAs assume each goes to whichever worker frees up first."""
        entries = [
            QueueEntry(0, job_id, flight.job.user_id, flight.remaining_s())
            for job_id, flight in self.inflight.items()
        ]
        busy = {f.dispatch.worker: f.remaining_s() for f in self.inflight.values()}
        live = [w for w in self.worker_table.values() if w.state != "draining"]
        slots = [busy.get(w.name, 0.0) for w in live] or [0.0]  # no worker up yet: count as one
        heapq.heapify(slots)
        for position, job_id in enumerate([*self.retries, *self.fair.order()], start=1):
            steps, pixels = self._cost.get(job_id, (28, 1024 * 1024))
            eta = heapq.heappop(slots) + self.clock.estimate(steps, pixels)
            heapq.heappush(slots, eta)
            entries.append(QueueEntry(position, job_id, self._owner.get(job_id, 0), eta))
        return entries

    async def cancel(self, job_id: int, by: str) -> bool:
        if self.fair.remove(job_id) or self.retries.pop(job_id, None) is not None:
            self._forget(job_id)
            self._update_depth()
            await self.redis.hdel(DISPATCH_KEY, str(job_id))
            await self._deliver(await self.store.mark_cancelled(job_id, by))
            return True
        flight = self.inflight.get(job_id)
        if flight is None:
            return False
        flight.cancelled_by = by
        # arq's abort: the worker cancels the task, the engine stops between two steps.
        await self.redis.zadd(abort_jobs_ss, {flight.dispatch.arq_id: timestamp_ms()})
        return True

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._wake.set()

    async def wait_idle(self, timeout: float) -> None:
        async def idle() -> None:
            while self.fair or self.retries or self._handing_out or self.inflight:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(idle(), timeout)

    async def workers(self) -> list[WorkerInfo]:
        await self.refresh_workers()
        return sorted(self.worker_table.values(), key=lambda w: w.name)

    async def refresh_workers(self) -> None:
        keys = [key async for key in self.redis.scan_iter(match=WORKER_KEY_PREFIX + "*", count=200)]
        values = await self.redis.mget(keys) if keys else []
        table = {}
        for raw in values:
            if raw is None:  # expired between SCAN and MGET
                continue
            try:
                info = WorkerInfo.model_validate_json(raw)
            except ValueError:
                log.warning("ignoring a worker entry this bot cannot read (a different fluxbot version?)")
                continue
            table[info.name] = info
        appeared = table.keys() - self.worker_table.keys()
        self.worker_table = table
        if appeared:
            log.info("workers up: %s", ", ".join(sorted(appeared)))
            for name in sorted(appeared):
                if table[name].family != self.resolver.family:
                    log.warning(
                        "worker %s serves %s models but this bot admits %s jobs: it gets none "
                        "(set workers.family, or point the worker at a %s model)",
                        name,
                        table[name].family,
                        self.resolver.family,
                        self.resolver.family,
                    )
            self._wake.set()

    # handing jobs to workers

    async def _dispatch_loop(self) -> None:
        while True:
            try:
                await self._dispatch_ready()
            except Exception:  # Redis away for a moment: keep the loop, try again shortly
                log.exception("dispatch failed; retrying")
                await asyncio.sleep(1.0)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.5)

    async def _dispatch_ready(self) -> None:
        while not self.paused:
            busy = {f.dispatch.worker for f in self.inflight.values()}
            free = [w for w in self.worker_table.values() if w.state != "draining" and w.name not in busy]
            if not free:
                return
            families = {w.family for w in free}
            picked = self._next_job(families)
            if picked is None:
                return
            job_id, retry = picked
            self._handing_out.add(job_id)  # neither waiting nor running for these few awaits
            try:
                job = await self.store.get(job_id)
                if job is None or job.status.finished:
                    self._forget(job_id)
                    continue  # cancelled or recorded meanwhile
                family = self._family_of(job_id)
                await self._send(job, self._choose([w for w in free if w.family == family], job), retry)
            except Exception:
                # Database or Redis away: the job goes back to the head of the line, nothing is lost.
                self.inflight.pop(job_id, None)
                job_try, dispatch_no = (1, 1) if retry is None else (retry.job_try, retry.dispatch_no)
                self.retries[job_id] = Retry(job_try, dispatch_no + 1, self._owner.get(job_id, 0))
                raise
            finally:
                self._handing_out.discard(job_id)

    def _next_job(self, families: set[str]) -> tuple[int, Retry | None] | None:
        for job_id, retry in self.retries.items():
            if self._family_of(job_id) in families:
                del self.retries[job_id]
                return job_id, retry
        popped = self.fair.pop(lambda job_id: self._family_of(job_id) in families)
        self._update_depth()
        return None if popped is None else (popped[1], None)

    def _family_of(self, job_id: int) -> str:
        return self._family_by_job.get(job_id, self.resolver.family)

    def _family(self, job: Job) -> str:
        preset = self.resolver.presets.get(str(job.request.get("preset")))
        return preset.family if preset is not None else self.resolver.family

    def _choose(self, free: list[WorkerInfo], job: Job) -> WorkerInfo:
        """Affinity: the worker holding most of the job's LoRAs; on a tie, the one idle longest.

        `free` is never empty: the job was picked because a free worker serves its family."""
        wanted = {str(lora["name"]) for lora in job.request.get("loras") or ()}
        return max(
            free,
            key=lambda w: (len(wanted & set(w.resident_loras)), -self._last_assigned.get(w.name, 0.0)),
        )

    def _payload(self, job: Job) -> JobPayload:
        preset = self.resolver.presets[str(job.request["preset"])]
        entries = self.resolver.whitelist.entries
        names = [str(lora["name"]) for lora in job.request.get("loras") or ()]
        return JobPayload(
            job_id=job.id,
            request=job.request,
            preset=preset.model_dump(mode="json"),
            loras=[entries[name].model_dump(mode="json") for name in names if name in entries],
        )

    async def _send(self, job: Job, worker: WorkerInfo, retry: Retry | None) -> None:
        job_try, dispatch_no = (1, 1) if retry is None else (retry.job_try, retry.dispatch_no)
        if str(job.request.get("preset")) not in self.resolver.presets:
            self._forget(job.id)
            failed = await self.store.mark_failed(job.id, "Its preset was removed before it could run.")
            await self._deliver(failed)
            return
        dispatch = Dispatch(
            job_id=job.id,
            arq_id=arq_job_id(job.id, dispatch_no),
            worker=worker.name,
            incarnation=worker.incarnation,
            job_try=job_try,
            dispatch_no=dispatch_no,
        )
        self.inflight[job.id] = Flight(dispatch, job, self._estimate(job))
        self._last_assigned[worker.name] = time.monotonic()
        self._update_depth()
        # The record first: a bot that dies right after the enqueue still finds the job on restart.
        await self.redis.hset(DISPATCH_KEY, str(job.id), dispatch.model_dump_json())
        await self.redis.enqueue_job(
            GENERATE,
            self._payload(job).model_dump(mode="json"),
            _job_id=dispatch.arq_id,
            _queue_name=queue_name(worker.name),
            _job_try=job_try if job_try > 1 else None,
        )
        self._forget(job.id)
        log.debug("job %d -> worker %s (try %d)", job.id, worker.name, job_try)

    # watching jobs on workers

    async def _watch_loop(self) -> None:
        while True:
            try:
                await self.refresh_workers()
                for flight in list(self.inflight.values()):
                    if not flight.finishing:
                        await self._check(flight)
            except Exception:
                log.exception("watching workers failed; retrying")
                await asyncio.sleep(1.0)
            self._poke.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), POLL_S)

    async def _check(self, flight: Flight) -> None:
        arq_id = flight.dispatch.arq_id
        # arq deletes the job key and writes the result in one transaction: read them in this order,
        # and "no job, no result" can only mean the job was lost before a worker saw it.
        if await self.redis.exists(job_key_prefix + arq_id):
            if not self._alive(flight.dispatch):
                await self._take_back(flight)
            return
        info = await ArqJob(arq_id, self.redis).result_info()
        if info is not None:
            await self._finish(flight, info)
        else:
            log.warning("job %d: its arq job vanished before it ran; dispatching it again", flight.job.id)
            await self._take_back(flight, ran=False)

    def _alive(self, dispatch: Dispatch) -> bool:
        worker = self.worker_table.get(dispatch.worker)
        return worker is not None and worker.incarnation == dispatch.incarnation

    async def _take_back(self, flight: Flight, ran: bool | None = None) -> None:
        """The worker holding this job is gone: give the job to another, or fail it past max_tries."""
        flight.finishing = True  # it leaves `inflight` last, so wait_idle never sees a gap
        try:
            await self._move_or_fail(flight, ran)
        except Exception:
            flight.finishing = False  # Redis or the database was away: look again at the next poll
            raise
        del self.inflight[flight.dispatch.job_id]
        self._update_depth()
        self._wake.set()

    async def _move_or_fail(self, flight: Flight, ran: bool | None) -> None:
        dispatch = flight.dispatch
        job_id = dispatch.job_id
        arq_id = dispatch.arq_id
        if ran is None:
            ran = flight.started is not None or bool(await self.redis.exists(retry_key_prefix + arq_id))
        # Nobody may start the old arq job later (a worker that was only cut off, say).
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(job_key_prefix + arq_id, in_progress_key_prefix + arq_id, retry_key_prefix + arq_id)
            pipe.zrem(queue_name(dispatch.worker), arq_id)
            await pipe.execute()
        next_try = dispatch.job_try + 1 if ran else dispatch.job_try
        max_tries = self.settings.workers.max_tries
        if flight.cancelled_by is not None:
            await self.redis.hdel(DISPATCH_KEY, str(job_id))
            await self._deliver(await self.store.mark_cancelled(job_id, flight.cancelled_by))
        elif next_try > max_tries:
            log.warning("job %d: worker %s stopped; no tries left (%d)", job_id, dispatch.worker, max_tries)
            await self.redis.hdel(DISPATCH_KEY, str(job_id))
            failed = await self.store.mark_failed(job_id, WORKERS_DIED.format(tries=dispatch.job_try))
            self._count(failed)
            await self._deliver(failed)
        else:
            log.warning(
                "job %d: worker %s stopped; job goes to another worker (try %d of %d)",
                job_id,
                dispatch.worker,
                next_try,
                max_tries,
            )
            waiting = dispatch.model_copy(update={"worker": "", "incarnation": "", "job_try": next_try})
            await self.redis.hset(DISPATCH_KEY, str(job_id), waiting.model_dump_json())
            if ran:
                await self.store.requeue(job_id)
            self._note(flight.job)
            self.retries[job_id] = Retry(next_try, dispatch.dispatch_no + 1, flight.job.user_id)

    async def _finish(self, flight: Flight, info: JobResult) -> None:
        flight.finishing = True
        job_id = flight.dispatch.job_id
        try:
            job = await self._record(flight, info)
        except Exception:
            flight.finishing = False  # the database was away: look again at the next poll
            raise
        try:
            # The database is the record now: drop the result (it may hold megabytes of PNG).
            await self.redis.delete(result_key_prefix + flight.dispatch.arq_id)
            await self.redis.hdel(DISPATCH_KEY, str(job_id))
            self._count(job)
            await self._deliver(job)
        finally:
            # Last, after delivery: until then the job counts as running (caps, wait_idle, drain).
            self.inflight.pop(job_id, None)
            self._update_depth()
            self._wake.set()

    async def _record(self, flight: Flight, info: JobResult) -> Job:
        """Store the outcome once: a job already finished in the DB (a restart, a late look) stays as is."""
        job_id = flight.dispatch.job_id
        current = await self.store.get(job_id)
        assert current is not None
        if current.status.finished:
            return current
        if not info.success:
            return await self._record_failure(flight, info.result)
        result = WorkerResult.model_validate(info.result)
        if result.error is not None:
            return await self.store.mark_failed(job_id, result.error)
        try:
            images = [self._keep(job_id, image) for image in result.images]
        except FileNotFoundError:
            return await self.store.mark_failed(job_id, SHARED_IMAGE_MISSING)
        job = await self.store.mark_done(job_id, images, result.timings, worker=result.worker)
        timings = result.timings
        if images and "denoise_s" in timings:
            self.clock.record(
                int(timings.get("steps", 1)),
                images[0].width * images[0].height,
                float(timings["denoise_s"]),
                float(timings.get("total_s", 0.0)) - float(timings["denoise_s"]),
            )
            self.metrics.job_seconds.observe(float(timings.get("total_s", 0.0)))
        return job

    async def _record_failure(self, flight: Flight, error: Any) -> Job:
        job_id = flight.dispatch.job_id
        if isinstance(error, asyncio.CancelledError):
            return await self.store.mark_cancelled(job_id, flight.cancelled_by or "an admin")
        if isinstance(error, TimeoutError):  # arq's job_timeout, set on the worker (workers.job_timeout_s)
            return await self.store.mark_failed(job_id, TIMED_OUT)
        if isinstance(error, JobExecutionFailed) and "retries" in str(error):
            return await self.store.mark_failed(
                job_id, WORKERS_DIED.format(tries=flight.dispatch.job_try - 1)
            )
        log.error("job %d failed on worker %s: %r", job_id, flight.dispatch.worker, error)
        return await self.store.mark_failed(job_id, INTERNAL_ERROR)

    def _keep(self, job_id: int, image: RenderedImage) -> StoredImage:
        recipe = Recipe.model_validate(image.recipe)
        if image.png is not None:
            return save_png(self.data_dir, job_id, image.index, image.png, recipe)
        assert image.path is not None
        data = (self.data_dir / image.path).read_bytes()  # FileNotFoundError: not actually shared
        return stored_image(image.index, image.path, data, recipe)

    # progress from workers

    async def _listen_loop(self) -> None:
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(EVENTS_CHANNEL)
                    while True:
                        # A bounded wait rather than listen(): stopping never waits on a silent channel.
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if message is not None:
                            await self._on_event(WorkerEvent.model_validate_json(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("worker events: connection lost; resubscribing")
                await asyncio.sleep(1.0)

    async def _on_event(self, event: WorkerEvent) -> None:
        flight = self.inflight.get(event.job_id)
        if event.kind == "finished" or flight is None or flight.dispatch.arq_id != event.arq_id:
            self._poke.set()  # a result to pick up, or news of a job this bot no longer tracks
            return
        if event.kind == "started":
            flight.started = time.monotonic()
            await self.store.mark_running(event.job_id, event.worker)
            job = await self.store.get(event.job_id)
            if job is not None and not job.status.finished:
                flight.job = job
                await self.events.started(job)
        elif flight.started is not None:
            await self.events.progress(flight.job, event.step, event.total, flight.remaining_s())

    # shared tail

    def _estimate(self, job: Job) -> float:
        steps, pixels = job_cost(job.request)
        return self.clock.estimate(steps, pixels)

    def _update_depth(self) -> None:
        self.metrics.queue_depth.labels("queued").set(len(self))
        self.metrics.queue_depth.labels("running").set(len(self.inflight))

    def _count(self, job: Job) -> None:
        self.metrics.jobs.labels(job.status.value).inc()
        log.info(
            "job %d user %d %s on %s%s",
            job.id,
            job.user_id,
            job.status.value,
            job.worker or "no worker",
            f": {job.error}" if job.error else "",
            extra={
                "job_id": job.id,
                "user_id": job.user_id,
                "outcome": job.status.value,
                "worker": job.worker,
            },
        )

    async def _deliver(self, job: Job) -> None:
        """Delivery is keyed by job id: a job the DB marks delivered is never sent again."""
        fresh = await self.store.get(job.id)
        if fresh is None or fresh.delivered:
            return
        try:
            message_id = await self.events.finished(fresh)
            await self.store.mark_delivered(job.id, message_id)
        except Exception:  # stays undelivered in the DB; the next start tries again
            log.exception("job %d: delivery failed", job.id)
