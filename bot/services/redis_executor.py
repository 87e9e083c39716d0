"""RedisExecutor: runs jobs on `fluxbot worker` processes through arq (queue = "redis://...").

The dispatcher keeps the fair order and asks for a launch only when a worker of the job's family is
free, so each worker's arq queue stays one job deep and the fair order is what runs. This executor
picks the worker (one with the job's LoRAs resident, else the one idle longest), supervises it, and
takes the job back when the worker stops advertising itself (killed, host lost): the next run is a
new arq job with the next try number (arq's `_job_try`); past `workers.max_tries` the job fails.
The job id keys everything (store, dispatch record, delivery), so an outcome is recorded once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from arq.jobs import Job as ArqJob
from arq.jobs import JobResult, JobStatus
from arq.worker import JobExecutionFailed

from bot.services.execution import (
    INTERNAL_ERROR,
    Artifact,
    CannotRun,
    EncodedPng,
    Outcome,
    Report,
    Restored,
    SharedPng,
)
from bot.services.faults import Stopping
from bot.services.rules import LiveRules
from bot.services.tasks import TaskSet
from bot.services.wire import (
    DISPATCH_KEY,
    EVENTS_CHANNEL,
    GENERATE,
    Dispatch,
    JobPayload,
    WorkerEvent,
    WorkerResult,
    arq_job_id,
    image_key,
    queue_name,
)
from bot.services.workers import WorkerInfo, advertised_workers
from bot.store.files import ImageFiles
from bot.store.models import Job
from engine.api import Recipe
from engine.errors import EngineError, RequestError
from engine.messages import N_
from engine.spec import PreviewEvery
from fluxbot.settings import WorkerSettings

log = logging.getLogger(__name__)
# Failure reasons stored with a job (English, like the database) and translated where shown (render.py).
WORKERS_DIED = N_("The worker drawing this stopped {tries} times, so fluxbot gave up on it. Try again.")
TIMED_OUT = N_(
    "This took longer than a worker may spend on one job, so it was stopped. "
    "Try fewer steps or a smaller size."
)
SHARED_IMAGE_MISSING = N_(
    "The worker saved the image where the bot cannot read it: workers.images = 'shared' needs one "
    "data_dir shared by the bot and every worker."
)
WRONG_FAMILY = (
    "worker %s serves %s models but this bot admits %s jobs: it gets none "
    "(set workers.family, or point the worker at a %s model)"
)
IMAGE_EXPIRED = N_("The worker's pictures expired in Redis before the bot collected them. Try again.")
FAILURES = (WORKERS_DIED, TIMED_OUT, SHARED_IMAGE_MISSING, IMAGE_EXPIRED)
POLL_S = 0.2
ABORT_WAIT_S = 5.0  # how long an abort waits for the worker to confirm (the outcome comes anyway)


@dataclass
class Flight:
    """A job handed to a worker, until its outcome is recorded or it is taken back."""

    dispatch: Dispatch
    job: Job
    started: bool = False
    cancelled: bool = False
    settling: bool = False  # an outcome or a take-back is being handled in its own task


class RedisExecutor:
    def __init__(
        self,
        redis: ArqRedis,
        rules: LiveRules,
        settings: WorkerSettings,
        files: ImageFiles | None = None,
        preview: PreviewEvery | None = None,
    ) -> None:
        self.redis = redis
        self.files = files  # the input images of img2img jobs travel in the payload
        self.preview = preview
        self.rules = rules
        self.settings = settings
        self.flights: dict[int, Flight] = {}
        self.worker_table: dict[str, WorkerInfo] = {}
        self._next_try: dict[int, tuple[int, int]] = {}  # taken back: (arq try, dispatch number) next
        self._last_assigned: dict[str, float] = {}
        self._report: Report | None = None
        self._poke = asyncio.Event()  # a worker says a job finished
        self._loops = TaskSet()
        self._tasks = TaskSet()

    # lifecycle

    async def start(self, report: Report, unfinished: Sequence[Job]) -> Restored:
        """Find again what was dispatched before a restart."""
        self._report = report
        await self.refresh_workers()
        records = {
            int(k): Dispatch.model_validate_json(v)
            for k, v in (await self.redis.hgetall(DISPATCH_KEY)).items()
        }
        running: dict[int, str | None] = {}
        front = []
        for job in unfinished:
            record = records.pop(job.id, None)
            if record is not None and record.worker:
                self.flights[job.id] = Flight(record, job)
                running[job.id] = record.worker
            elif record is not None:  # it was waiting for another worker after one died
                self._next_try[job.id] = (record.job_try, record.dispatch_no + 1)
                front.append(job.id)
        for stale in records:  # finished while the bot was away and already recorded
            await self.redis.hdel(DISPATCH_KEY, str(stale))
        self._loops.spawn(self._watch_loop(), "fluxbot-watch")
        self._loops.spawn(self._listen_loop(), "fluxbot-events")
        return Restored(running, tuple(front))

    async def stop(self) -> None:
        # A Redis call that ignores cancellation must not hold up shutdown: 5 s at most.
        await self._loops.cancel_all(timeout=5)
        await self._tasks.cancel_all(timeout=5)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.spawn(work, name)

    # capacity

    def _live(self) -> list[WorkerInfo]:
        return [w for w in self.worker_table.values() if w.state != "draining"]

    def _free(self) -> list[WorkerInfo]:
        busy = {f.dispatch.worker for f in self.flights.values()}
        return [w for w in self._live() if w.name not in busy]

    def free_families(self) -> set[str]:
        return {w.family for w in self._free()}

    def engines(self) -> int:
        return len(self._live())

    def swaps_extra_models(self) -> bool:
        return False  # each worker holds its own; the bot does not know which is on whose GPU

    def interrupt(self) -> bool:
        return False  # jobs go on on their workers; the next start collects the results

    async def health(self) -> dict[str, bool]:
        try:
            return {"redis": bool(await self.redis.ping())}
        except Exception:  # unreachable is what /healthz reports
            return {"redis": False}

    async def workers(self) -> list[WorkerInfo]:
        await self.refresh_workers()
        return sorted(self.worker_table.values(), key=lambda w: w.name)

    async def refresh_workers(self) -> None:
        table = await advertised_workers(self.redis)
        appeared = sorted(table.keys() - self.worker_table.keys())
        self.worker_table = table
        for name in appeared:
            log.info("worker up: %s", name)
            if table[name].family != self.rules.resolver.family:
                family = self.rules.resolver.family
                log.warning(WRONG_FAMILY, name, table[name].family, family, family)
        if appeared and self._report is not None:
            self._report.engine_free()

    # handing a job to a worker

    async def launch(self, job: Job) -> str | None:
        family = job.spec.family
        free = [w for w in self._free() if w.family == family]
        if not free:
            raise RuntimeError(f"no free {family} worker any more")
        worker = self._choose(free, job)
        inputs: list[bytes] = []
        if job.spec.inputs:
            if self.files is None:
                raise CannotRun("This fluxbot keeps no input images.")
            try:
                for sha256 in job.spec.inputs:
                    inputs.append(await asyncio.to_thread(self.files.read_input, sha256))
            except RequestError as exc:
                raise CannotRun(f"It can't run: {exc}.") from exc
        payload = self._payload(job, inputs)
        job_try, dispatch_no = self._next_try.pop(job.id, (1, 1))
        dispatch = Dispatch(
            job_id=job.id,
            arq_id=arq_job_id(job.id, dispatch_no),
            worker=worker.name,
            incarnation=worker.incarnation,
            job_try=job_try,
            dispatch_no=dispatch_no,
        )
        self.flights[job.id] = Flight(dispatch, job)
        self._last_assigned[worker.name] = time.monotonic()
        try:
            # The record first: a bot that dies right after the enqueue still finds the job on restart.
            await self.redis.hset(DISPATCH_KEY, str(job.id), dispatch.model_dump_json())
            await self.redis.enqueue_job(
                GENERATE,
                payload.model_dump(mode="json"),
                _job_id=dispatch.arq_id,
                _queue_name=queue_name(worker.name),
                _job_try=job_try if job_try > 1 else None,
            )
        except Exception:
            del self.flights[job.id]
            self._next_try[job.id] = (job_try, dispatch_no + 1)
            raise
        log.debug("job %d -> worker %s (try %d)", job.id, worker.name, job_try)
        return worker.name

    def _choose(self, free: list[WorkerInfo], job: Job) -> WorkerInfo:
        """Affinity: the worker holding most of the job's LoRAs; on a tie, the one idle longest."""
        wanted = {lora.name for lora in job.spec.loras}
        return max(
            free,
            key=lambda w: (len(wanted & set(w.resident_loras)), -self._last_assigned.get(w.name, 0.0)),
        )

    def _payload(self, job: Job, inputs: Sequence[bytes] = ()) -> JobPayload:
        """Workers never read the bot's database: the spec and its LoRA files travel with the job."""
        try:
            uses = self.rules.lora_uses(job.spec)
        except EngineError as exc:
            raise CannotRun(f"It can't run: {exc}.") from exc
        return JobPayload(
            job_id=job.id,
            spec=job.spec,
            lora_files={use.name: use.file for use in uses},
            init_image=base64.b64encode(inputs[0]).decode() if inputs else None,
            references=[base64.b64encode(data).decode() for data in inputs[1:]],
            preview_every_s=self.preview.seconds if self.preview is not None else None,
            preview_every_steps=self.preview.steps if self.preview is not None else None,
        )

    def _arq_job(self, dispatch: Dispatch) -> ArqJob:
        return ArqJob(dispatch.arq_id, self.redis, _queue_name=queue_name(dispatch.worker))

    async def cancel(self, job_id: int) -> None:
        flight = self.flights.get(job_id)
        if flight is not None:
            flight.cancelled = True
            self._abort(flight.dispatch)

    def _abort(self, dispatch: Dispatch) -> None:
        """arq's abort: a worker cancels the job's task (the engine stops between two steps), or skips
        it when it comes to it. Job.abort waits for the outcome; the watch loop collects that anyway,
        so the wait runs in its own task and ends with the worker's next poll or a few seconds."""

        async def abort() -> None:
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await self._arq_job(dispatch).abort(timeout=ABORT_WAIT_S, poll_delay=POLL_S)

        self._spawn(abort(), f"fluxbot-abort-{dispatch.job_id}")

    # supervising

    async def _watch_loop(self) -> None:
        while True:
            try:
                await self.refresh_workers()
                for flight in list(self.flights.values()):
                    if not flight.settling:
                        await self._check(flight)
            except Exception:
                log.exception("watching workers failed; retrying")
                await asyncio.sleep(1.0)
            self._poke.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), POLL_S)

    async def _check(self, flight: Flight) -> None:
        arq_job = self._arq_job(flight.dispatch)
        status = await arq_job.status()  # one atomic read of arq's own state
        if status == JobStatus.complete:
            info = await arq_job.result_info()
            if info is not None:  # None: the result expired between the two reads; lost, below
                self._settle(flight, self._collect(flight, info))
                return
        if status == JobStatus.not_found or status == JobStatus.complete:
            log.warning("job %d: its arq job vanished before it ran; dispatching it again", flight.job.id)
            self._settle(flight, self._take_back(flight, ran=False))
            return
        worker = self.worker_table.get(flight.dispatch.worker)
        if worker is None or worker.incarnation != flight.dispatch.incarnation:  # died or restarted
            # In progress means a worker had begun it: that run counts as a try.
            ran = flight.started or status == JobStatus.in_progress
            self._settle(flight, self._take_back(flight, ran=ran))

    def _settle(self, flight: Flight, work: Coroutine[Any, Any, None]) -> None:
        """Outcomes and take-backs wait on the store: each in its own task, so watching goes on."""
        flight.settling = True

        async def run() -> None:
            try:
                await work
            except Stopping:
                pass  # the dispatch record stays in Redis: the next start finds the job again
            except Exception:
                log.exception("job %d: handling its outcome failed; looking again shortly", flight.job.id)
                flight.settling = False

        self._spawn(run(), f"fluxbot-settle-{flight.job.id}")

    async def _collect(self, flight: Flight, info: JobResult) -> None:
        job_id = flight.dispatch.job_id
        assert self._report is not None
        del self.flights[job_id]  # the worker is free: the next job need not wait for the recording
        self._report.engine_free()
        outcome = await self._outcome(flight, info)
        await self._report.finished(job_id, outcome)
        # The database is the record now: drop the PNGs the worker left in Redis for it (our keys;
        # arq's own small result expires by itself).
        images = [image_key(flight.dispatch.arq_id, i) for i in range(len(outcome.images))]
        if images:
            await self.redis.delete(*images)
        await self.redis.hdel(DISPATCH_KEY, str(job_id))

    async def _outcome(self, flight: Flight, info: JobResult) -> Outcome:
        worker = flight.dispatch.worker
        if not info.success:
            error = info.result
            if isinstance(error, asyncio.CancelledError):
                return Outcome.cancelled(worker)
            if isinstance(error, TimeoutError):  # arq's job_timeout (workers.job_timeout_s)
                return Outcome.failed(TIMED_OUT, worker)
            if isinstance(error, JobExecutionFailed) and info.job_try > self.settings.max_tries:
                # arq's own limit (a worker's is one more than ours): normally the worker says so first
                return Outcome.failed(WORKERS_DIED.format(tries=self.settings.max_tries), worker)
            log.error("job %d failed on worker %s: %r", flight.job.id, worker, error)
            return Outcome.failed(INTERNAL_ERROR, worker)
        result = WorkerResult.model_validate(info.result)
        if result.exhausted:
            return Outcome.failed(WORKERS_DIED.format(tries=result.tries), result.worker)
        if result.error is not None:
            return Outcome.failed(result.error, result.worker)
        images: list[Artifact] = []
        for image in result.images:
            recipe = Recipe.model_validate(image.recipe)
            if image.path is not None:
                images.append(SharedPng(image.index, image.path, recipe, SHARED_IMAGE_MISSING))
                continue
            png = await self.redis.get(image_key(flight.dispatch.arq_id, image.index))
            if png is None:
                return Outcome.failed(IMAGE_EXPIRED, result.worker)
            images.append(EncodedPng(image.index, bytes(png), recipe))
        return Outcome.done(images, result.timings, result.worker)

    async def _take_back(self, flight: Flight, ran: bool) -> None:
        """The worker holding this job is gone: another one gets it, or it fails past max_tries."""
        assert self._report is not None
        dispatch = flight.dispatch
        job_id = dispatch.job_id
        # Nobody may run the old arq job later (a worker that was only cut off, or one restarted under
        # the same name, finding it in its queue): aborted, it is skipped when a worker comes to it.
        self._abort(dispatch)
        next_try = dispatch.job_try + 1 if ran else dispatch.job_try
        if flight.cancelled or next_try > self.settings.max_tries:
            if not flight.cancelled:
                log.warning("job %d: worker %s stopped; no tries left", job_id, dispatch.worker)
            outcome = (
                Outcome.cancelled()
                if flight.cancelled
                else Outcome.failed(WORKERS_DIED.format(tries=dispatch.job_try))
            )
            del self.flights[job_id]
            await self._report.finished(job_id, outcome)
            await self.redis.hdel(DISPATCH_KEY, str(job_id))
            return
        log.warning(
            "job %d: worker %s stopped; it goes to another worker (try %d of %d)",
            job_id,
            dispatch.worker,
            next_try,
            self.settings.max_tries,
        )
        waiting = dispatch.model_copy(update={"worker": "", "incarnation": "", "job_try": next_try})
        await self.redis.hset(DISPATCH_KEY, str(job_id), waiting.model_dump_json())
        self._next_try[job_id] = (next_try, dispatch.dispatch_no + 1)
        del self.flights[job_id]
        await self._report.lost(job_id)

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
                            self._on_event(WorkerEvent.model_validate_json(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("worker events: connection lost; resubscribing")
                await asyncio.sleep(1.0)

    def _on_event(self, event: WorkerEvent) -> None:
        flight = self.flights.get(event.job_id)
        if event.kind == "finished" or flight is None or flight.dispatch.arq_id != event.arq_id:
            self._poke.set()  # a result to pick up, or news of a job this bot no longer tracks
            return
        assert self._report is not None
        if event.kind == "started":
            flight.started = True
            self._report.started(event.job_id, event.worker)
        elif flight.started:
            preview = base64.b64decode(event.preview) if event.preview else None
            self._report.progress(event.job_id, event.step, event.total, event.elapsed_s, preview)
