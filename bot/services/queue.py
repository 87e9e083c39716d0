"""JobQueue: what Studio needs from a queue backend; LocalJobQueue, the in-process one (queue = "local").

The scale-out backend (queue = "redis://...") is bot.services.redis_queue.RedisJobQueue: same order,
same durability, the engine runs in `fluxbot worker` processes instead of this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from bot.observability import Metrics
from bot.services.events import JobEvents
from bot.services.fair_queue import FairQueue
from bot.services.runner import JobRunner
from bot.services.workers import Throughput, WorkerInfo, WorkerState, describe_engine
from bot.store.jobs import JobStore
from bot.store.models import Job, JobStatus
from engine.api import GenerationRequest, StepProgress
from engine.errors import EngineError, GenerationCancelled

log = logging.getLogger(__name__)
INTERNAL_ERROR = "Something went wrong on our side while drawing this; it has been logged. Try again."


@dataclass
class RunningJob:
    job_id: int
    user_id: int
    estimate_s: float
    started: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    cancelled_by: str = "its owner"
    requeue: bool = False  # stopped by a shutdown, not by a person: run it again after the restart

    def remaining_s(self) -> float:
        return max(0.0, self.estimate_s - (time.monotonic() - self.started))


@dataclass(frozen=True)
class QueueEntry:
    position: int  # 0 = running now
    job_id: int
    user_id: int
    eta_s: float


class JobQueue(Protocol):
    """The database is the record (every job is stored before it is queued); a queue holds the order."""

    paused: bool

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def push(self, job: Job) -> QueueEntry: ...
    def queued_for(self, user_id: int) -> int:
        """Waiting plus running jobs of this user (the per-user cap counts both)."""
        ...

    def __len__(self) -> int:
        """Jobs waiting (not running)."""
        ...

    @property
    def busy(self) -> int:
        """Jobs running now."""
        ...

    def entry(self, job_id: int) -> QueueEntry | None: ...
    def snapshot(self) -> list[QueueEntry]: ...
    async def cancel(self, job_id: int, by: str) -> bool: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    async def drain(self, grace_s: float) -> None: ...
    async def wait_idle(self, timeout: float) -> None: ...
    async def workers(self) -> list[WorkerInfo]: ...


class LocalJobQueue:
    """The database is the record (every job is stored before it is queued); this holds the order."""

    def __init__(self, store: JobStore, runner: JobRunner, events: JobEvents, metrics: Metrics) -> None:
        self.store = store
        self.runner = runner
        self.events = events
        self.metrics = metrics
        self.fair = FairQueue()
        self.paused = False
        self.running: RunningJob | None = None
        self._cost: dict[int, tuple[int, int]] = {}  # job id -> (steps, pixels), for ETAs
        self._owner: dict[int, int] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.throughput = Throughput()
        self._started_at = time.time()
        self._resident: list[str] = runner.engine.loras.resident

    @property
    def busy(self) -> int:
        return 0 if self.running is None else 1

    async def workers(self) -> list[WorkerInfo]:
        """The one in-process engine, described like a scale-out worker."""
        state: WorkerState = "idle" if self.running is None else "busy"
        job_id = None if self.running is None else self.running.job_id
        return [
            describe_engine(
                self.runner.engine,
                "local",
                "local",
                state,
                job_id,
                self.throughput,
                self._started_at,
                self._resident,
            )
        ]

    async def start(self) -> None:
        """Re-queue what a crash interrupted, deliver what was finished but not delivered, then serve."""
        interrupted = await self.store.requeue_interrupted()
        pending = await self.store.unfinished()
        for job in pending:
            self._push(job)
        if pending:
            log.info("restart: %d queued jobs restored (%d were interrupted)", len(pending), interrupted)
        for job in await self.store.undelivered():
            await self._deliver(job)
        self._task = asyncio.create_task(self._serve(), name="fluxbot-job-queue")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def push(self, job: Job) -> QueueEntry:
        self._push(job)
        self._wake.set()
        entry = self.entry(job.id)
        assert entry is not None
        return entry

    def _push(self, job: Job) -> None:
        self.fair.push(job.user_id, job.id)
        self._owner[job.id] = job.user_id
        self._cost[job.id] = job_cost(job.request)
        self._idle.clear()
        self._update_depth()

    def _update_depth(self) -> None:
        self.metrics.queue_depth.labels("queued").set(len(self.fair))
        self.metrics.queue_depth.labels("running").set(0 if self.running is None else 1)

    def queued_for(self, user_id: int) -> int:
        running = 1 if self.running is not None and self.running.user_id == user_id else 0
        return self.fair.count(user_id) + running

    def __len__(self) -> int:
        return len(self.fair)

    def entry(self, job_id: int) -> QueueEntry | None:
        for entry in self.snapshot():
            if entry.job_id == job_id:
                return entry
        return None

    def snapshot(self) -> list[QueueEntry]:
        """Running job first (position 0), then waiting jobs in the order they will run, with ETAs."""
        entries = []
        eta = 0.0
        if self.running is not None:
            eta = self.running.remaining_s()
            entries.append(QueueEntry(0, self.running.job_id, self.running.user_id, eta))
        for position, job_id in enumerate(self.fair.order(), start=1):
            steps, pixels = self._cost.get(job_id, (28, 1024 * 1024))
            eta += self.runner.clock.estimate(steps, pixels)
            entries.append(QueueEntry(position, job_id, self._owner.get(job_id, 0), eta))
        return entries

    async def cancel(self, job_id: int, by: str) -> bool:
        """Cancel a waiting job at once, or the running one between two steps."""
        if self.fair.remove(job_id):
            self._update_depth()
            job = await self.store.mark_cancelled(job_id, by)
            await self._deliver(job)
            return True
        if self.running is not None and self.running.job_id == job_id:
            self.running.cancelled_by = by
            self.running.cancel.set()
            return True
        return False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._wake.set()

    async def drain(self, grace_s: float) -> None:
        """Shutdown: start nothing new, let the running job finish within `grace_s`, else put it back."""
        self.pause()
        running = self.running
        if running is not None:
            deadline = time.monotonic() + grace_s
            while self.running is running and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.running is running:
                log.info(
                    "job %d did not finish within %.0fs: re-queued for the next start",
                    running.job_id,
                    grace_s,
                )
                running.requeue = True
                running.cancel.set()
                while self.running is running:
                    await asyncio.sleep(0.05)
        await self.stop()

    async def wait_idle(self, timeout: float) -> None:
        """For tests and shutdown: until nothing is queued or running."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    async def _serve(self) -> None:
        while True:
            if self.paused or not self.fair:
                if not self.fair and self.running is None:
                    self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            popped = self.fair.pop()
            self._update_depth()
            if popped is None:
                continue
            _, job_id = popped
            try:
                await self._run(job_id)
            except Exception:  # the queue must outlive any one job
                log.exception("job %d: unexpected error in the queue", job_id)

    async def _run(self, job_id: int) -> None:
        job = await self.store.get(job_id)
        if job is None or job.status != JobStatus.QUEUED:
            return
        steps, pixels = self._cost.pop(job_id, (28, 1024 * 1024))
        self._owner.pop(job_id, None)
        self.running = running = RunningJob(job_id, job.user_id, self.runner.clock.estimate(steps, pixels))
        self._update_depth()
        await self.store.mark_running(job_id)
        job = await self.store.get(job_id)
        assert job is not None
        await self.events.started(job)
        loop = asyncio.get_running_loop()
        started_job = job
        last = [0.0]

        def on_step(progress: StepProgress) -> None:  # runs in the engine's thread
            self.metrics.step_seconds.observe(progress.elapsed_s - last[0])
            last[0] = progress.elapsed_s
            remaining = running.remaining_s()
            asyncio.run_coroutine_threadsafe(
                self.events.progress(started_job, progress.step, progress.total, remaining), loop
            )

        try:
            request = GenerationRequest.model_validate(job.request)
            images, timings = await self.runner.run(job_id, request, on_step, running.cancel)
            job = await self.store.mark_done(job_id, images, timings)
            self.metrics.job_seconds.observe(timings["total_s"])
        except GenerationCancelled:
            if running.requeue:
                await self.store.requeue(job_id)
                self.running = None
                return
            job = await self.store.mark_cancelled(job_id, running.cancelled_by)
        except EngineError as exc:
            job = await self.store.mark_failed(job_id, str(exc))
        except Exception:
            log.exception("job %d failed", job_id)
            job = await self.store.mark_failed(job_id, INTERNAL_ERROR)
        finally:
            self.running = None
            self._resident = self.runner.engine.loras.resident
            self._update_depth()
        self.metrics.jobs.labels(job.status.value).inc()
        self.throughput.record(job.status == JobStatus.DONE)
        timings = {k: round(float(v), 3) for k, v in (job.timings or {}).items() if isinstance(v, float)}
        log.info(
            "job %d user %d %s in %.2fs%s",
            job.id,
            job.user_id,
            job.status.value,
            timings.get("total_s", 0.0),
            f": {job.error}" if job.error else "",
            extra={"job_id": job.id, "user_id": job.user_id, "outcome": job.status.value, "timings": timings},
        )
        await self._deliver(job)

    async def _deliver(self, job: Job) -> None:
        try:
            message_id = await self.events.finished(job)
            await self.store.mark_delivered(job.id, message_id)
        except Exception:  # stays undelivered in the DB; the next start tries again
            log.exception("job %d: delivery failed", job.id)


def job_cost(request: dict[str, Any]) -> tuple[int, int]:
    """(steps, pixels) of a stored request, for ETAs."""
    steps = int(request.get("steps") or 28)
    size = str(request.get("size") or "1024x1024")
    try:
        width, height = (int(x) for x in size.lower().split("x"))
    except ValueError:
        width, height = 1024, 1024
    return steps * int(request.get("batch_size") or 1), width * height
