"""JobDispatcher: the one owner of a stored job's lifecycle (the states are JobStatus and Delivery).

    admitted (stored) -> fair order -> handed to an engine -> outcome recorded -> delivered once

An Executor (the engine thread in this process, or arq workers) only runs jobs and reports back; the
dispatcher does the rest once for both: round-robin order, restore on start, having outcomes recorded
(bot.services.outcomes), deliveries, cancel, pause and the drain on shutdown. Store and
disk faults are waited out (bot.services.faults): a job is put back or held, never failed for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from bot.observability import Metrics
from bot.services.deliveries import Deliveries
from bot.services.eta import StepClock, etas, job_cost
from bot.services.events import JobEvents
from bot.services.execution import CannotRun, Executor, Outcome
from bot.services.fair_queue import FairQueue
from bot.services.faults import Faults, Stopping
from bot.services.outcomes import OutcomeRecorder
from bot.services.tasks import TaskSet
from bot.services.workers import WorkerInfo
from bot.store.files import ImageFiles
from bot.store.jobs import JobStore
from bot.store.models import Job, JobStatus
from fluxbot.settings import DeliverySettings

if TYPE_CHECKING:
    from bot.services.image_safety import ImageClassifier

log = logging.getLogger(__name__)
INTERRUPT_S = 10.0  # after the grace period: how long a stopped engine may take to reach its next step
RELAUNCH_PAUSE_S = 1.0  # an executor that could not take a job (Redis away) is asked again after this


@dataclass(frozen=True)
class Waiting:
    """What ordering and ETAs need of a job in line."""

    user_id: int
    steps: int
    pixels: int
    family: str
    guild_id: int | None = None  # where it was asked (None: a DM); admin views show their guild's
    weight: float = 1.0  # the asker's fair-share weight (their roles' rule when it was stored)
    extra: str | None = None  # the extra transformer it runs on (Kontext, Fill), if any

    @property
    def cost(self) -> float:
        """What the GPU spends on it, for fair shares: steps (x images) x megapixels."""
        return self.steps * self.pixels / 1e6


@dataclass
class Running:
    job: Job
    waiting: Waiting
    estimate_s: float
    worker: str | None = None
    started: float | None = None  # monotonic; None until its engine says it began
    cancelled_by: str | None = None
    last_step_s: float = 0.0

    def remaining_s(self) -> float:
        if self.started is None:
            return self.estimate_s
        return max(0.0, self.estimate_s - (time.monotonic() - self.started))


@dataclass(frozen=True)
class QueueEntry:
    position: int  # 0: on an engine now (or its outcome being saved); then 1 = next in line
    job_id: int
    user_id: int
    eta_s: float
    state: Literal["running", "saving", "waiting"] = "waiting"
    guild_id: int | None = None


class JobDispatcher:
    def __init__(
        self,
        store: JobStore,
        files: ImageFiles,
        executor: Executor,
        events: JobEvents,
        metrics: Metrics,
        faults: Faults,
        delivery: DeliverySettings,
        classifier: ImageClassifier | None = None,
        server_weight: Callable[[int | None], float] = lambda guild_id: 1.0,
    ) -> None:
        self.store = store
        self.server_weight = server_weight  # fair share between servers (community rules)
        self.executor = executor
        self.events = events
        self.metrics = metrics
        self.faults = faults
        self.deliveries = Deliveries(store, events, faults, delivery, self._changed)
        self.clock = StepClock()
        self.fair = FairQueue()
        self.paused = False  # by an admin; AdminService keeps it across restarts
        self.running: dict[int, Running] = {}
        self._waiting: dict[int, Waiting] = {}  # every job in `fair`
        self._extra_last: str | None = None  # the extra transformer the last job that used one ran on
        self._recording: dict[int, Waiting | None] = {}  # outcome being saved
        self._handing_out: tuple[int, Waiting] | None = None
        self._cancel_on_start: dict[int, str] = {}
        self._draining = False
        self._wake = asyncio.Event()  # something to launch, or an engine free
        self._change = asyncio.Event()  # any state change (drain and wait_idle watch it)
        self.outcomes = OutcomeRecorder(store, files, faults, metrics, self.clock, classifier, self._wake.set)
        self._tasks = TaskSet()
        self._loop: asyncio.Task[None] | None = None

    # start and stop

    async def start(self) -> None:
        """Restore: what an executor still holds stays with it, the rest goes back in line (interrupted
        jobs first among their user's), and every undelivered outcome is delivered."""
        unfinished = await self.faults.persist(self.store.unfinished)
        restored = await self.executor.start(self, unfinished)
        interrupted = await self.faults.persist(
            lambda: self.store.requeue_interrupted(keep=list(restored.running))
        )
        by_id = {job.id: job for job in unfinished}
        for job in unfinished:
            if job.id in self._waiting:  # admitted before start(): already in line
                continue
            waiting = self._describe(job)
            if job.id in restored.running:
                running = Running(job, waiting, self._estimate(waiting), restored.running[job.id])
                running.started = time.monotonic() if job.status == JobStatus.RUNNING else None
                self.running[job.id] = running
            elif job.id not in restored.front:
                self._push(job.id, waiting)
        for job_id in reversed(restored.front):
            if job_id in by_id:
                self._put_back(job_id, self._describe(by_id[job_id]))
        if unfinished:
            log.info(
                "restart: %d unfinished jobs restored (%d still on engines, %d were interrupted)",
                len(unfinished),
                len(restored.running),
                interrupted,
            )
        await self.deliveries.restore()
        self._changed()
        self._loop = asyncio.create_task(self._dispatch_loop(), name="fluxbot-dispatch")

    async def drain(self, grace_s: float) -> None:
        """Shutdown: start nothing new; give running jobs, recordings and deliveries `grace_s` in all.
        A job still on this process's engine then goes back in line for the next start; jobs on workers
        go on there, and the next start collects them. Undelivered outcomes stay pending in the store."""
        self._draining = True
        deadline = time.monotonic() + grace_s
        if not await self._wait_until(lambda: not self.running, deadline) and self.executor.interrupt():
            log.info(
                "%d jobs still running after %.0f s: they run again after the restart",
                len(self.running),
                grace_s,
            )
            await self._wait_until(lambda: not self.running, time.monotonic() + INTERRUPT_S)
        if not await self._wait_until(lambda: not self._recording and not self.deliveries.active, deadline):
            log.info(
                "shutdown: %d outcomes still being saved and %d deliveries under way; the next start "
                "finishes them",
                len(self._recording),
                self.deliveries.active,
            )
        await self.stop()

    async def stop(self) -> None:
        self._draining = True
        self.faults.stopping.set()
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
            self._loop = None
        await self.deliveries.stop()
        await self.executor.stop()
        await self._tasks.cancel_all()

    # admission's side

    def push(self, job: Job) -> QueueEntry:
        """A newly stored job joins the line; returns its place and ETA."""
        self._push(job.id, self._describe(job))
        self._wake.set()
        entry = self.entry(job.id)
        assert entry is not None
        return entry

    def _push(self, job_id: int, waiting: Waiting) -> None:
        self.fair.push(
            waiting.user_id,
            job_id,
            cost=waiting.cost,
            weight=waiting.weight,
            group=waiting.guild_id,
            group_weight=self.server_weight(waiting.guild_id),
        )
        self._waiting[job_id] = waiting
        self._changed()

    def _put_back(self, job_id: int, waiting: Waiting) -> None:
        self.fair.push_front(waiting.user_id, job_id, waiting.cost, waiting.guild_id)
        self._waiting[job_id] = waiting
        self._changed()

    def _describe(self, job: Job) -> Waiting:
        steps, pixels = job_cost(job.spec)
        return Waiting(
            job.user_id,
            steps,
            pixels,
            job.spec.family,
            job.guild_id,
            job.weight or 1.0,
            job.spec.extra_model,
        )

    def _estimate(self, waiting: Waiting) -> float:
        return self.clock.estimate(waiting.steps, waiting.pixels)

    # what people see

    def __len__(self) -> int:
        """Jobs waiting for an engine."""
        return len(self.fair) + (self._handing_out is not None)

    @property
    def busy(self) -> int:
        """Jobs on engines now."""
        return len(self.running)

    def entry(self, job_id: int) -> QueueEntry | None:
        """One job's place and ETA (what each admission answers with): the line up to that job only,
        not a snapshot of all of it: under a burst of N requests that is N small walks, not N²."""
        running = self.running.get(job_id)
        if running is not None and running.started is not None:
            return QueueEntry(
                0, job_id, running.job.user_id, running.remaining_s(), "running", running.job.guild_id
            )
        if job_id in self._recording:
            return next((e for e in self.snapshot() if e.job_id == job_id), None)
        drawing, line = self._line()
        for position, (candidate, _) in enumerate(line, start=1):
            if candidate == job_id:
                ahead = [self._estimate(waiting) for _, waiting in line[:position]]
                eta = etas([r.remaining_s() for r in drawing], self.executor.engines(), ahead)[-1]
                waiting = line[position - 1][1]
                return QueueEntry(position, job_id, waiting.user_id, eta, guild_id=waiting.guild_id)
        return None

    def _line(self) -> tuple[list[Running], list[tuple[int, Waiting]]]:
        """Jobs drawing now, and the line in the order it will run."""
        drawing = [r for r in self.running.values() if r.started is not None]
        line = [(r.job.id, r.waiting) for r in self.running.values() if r.started is None]
        line += [self._handing_out] if self._handing_out is not None else []
        line += [(job_id, self._waiting[job_id]) for job_id in self.fair.order()]
        return drawing, line

    def snapshot(self) -> list[QueueEntry]:
        """Drawing now first, then outcomes being saved, then the line in the order it will run: jobs
        handed to an engine that has not begun them yet (the next one waits beside the current one)
        stand first in line, not as running."""
        drawing, line = self._line()
        entries = [
            QueueEntry(0, r.job.id, r.job.user_id, r.remaining_s(), "running", r.job.guild_id)
            for r in drawing
        ]
        entries += [
            QueueEntry(0, j, w.user_id if w else 0, 0.0, "saving", w.guild_id if w else None)
            for j, w in self._recording.items()
        ]
        finish = etas(
            [r.remaining_s() for r in drawing],
            self.executor.engines(),
            [self._estimate(waiting) for _, waiting in line],
        )
        entries += [
            QueueEntry(position, job_id, waiting.user_id, eta, guild_id=waiting.guild_id)
            for position, ((job_id, waiting), eta) in enumerate(zip(line, finish, strict=True), start=1)
        ]
        return entries

    async def workers(self) -> list[WorkerInfo]:
        return await self.executor.workers()

    async def health(self) -> dict[str, bool]:
        return {
            **await self.executor.health(),
            "database": self.faults.ok("database"),
            "images": self.faults.ok("images"),
        }

    def idle(self) -> bool:
        """Nothing waiting, running, being saved or being delivered."""
        busy = self.fair or self._handing_out or self.running or self._recording or self.deliveries.active
        return not busy

    async def wait_idle(self, timeout: float) -> None:
        if not await self._wait_until(self.idle, time.monotonic() + timeout):
            raise TimeoutError(f"still busy after {timeout} s: {self.snapshot()}")

    # admin

    def pause(self) -> None:
        self.paused = True
        self._changed()

    def resume(self) -> None:
        self.paused = False
        self._wake.set()
        self._changed()

    async def cancel(self, job_id: int, by: str) -> bool:
        """A waiting job is cancelled at once; a running one stops between two steps. The user is told
        in the background: this returns as soon as the store has it."""
        waiting = self._waiting.pop(job_id, None)
        if waiting is not None:
            self.fair.remove(job_id)
            self._changed()
            if await self.outcomes.cancel_waiting(job_id, by) is not None:
                self.deliveries.submit(job_id)
            return True
        running = self.running.get(job_id)
        if running is not None:
            running.cancelled_by = by
            await self.executor.cancel(job_id)
            return True
        if self._handing_out is not None and self._handing_out[0] == job_id:
            self._cancel_on_start[job_id] = by
            return True
        return False

    # handing jobs to engines

    async def _dispatch_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._launch_ready()
            except Stopping:
                return
            except Exception:  # the loop must outlive any one job
                log.exception("dispatch failed; trying again shortly")
                await asyncio.sleep(RELAUNCH_PAUSE_S)
                continue
            await self._wake.wait()

    async def _launch_ready(self) -> None:
        while not (self.paused or self._draining or not self.faults.ok("images")):
            free = self.executor.free_families()
            avoid = self._would_swap if self.executor.swaps_extra_models() else None
            popped = self.fair.pop(functools.partial(self._fits, free), avoid) if free else None
            if popped is None:
                return
            job_id = popped[1]
            waiting = self._waiting.pop(job_id)
            if waiting.extra is not None:
                self._extra_last = waiting.extra
            if not await self._launch(job_id, waiting):
                return

    def _fits(self, families: set[str], job_id: int) -> bool:
        return self._waiting[job_id].family in families

    def _would_swap(self, job_id: int) -> bool:
        """The job needs the other extra transformer than the one the last such job ran on (which is
        on the GPU when the engine swaps them): the fair order may run its neighbours first."""
        extra = self._waiting[job_id].extra
        return extra is not None and self._extra_last is not None and extra != self._extra_last

    async def _launch(self, job_id: int, waiting: Waiting) -> bool:
        """Mark it running, then hand it over. False: stop launching for now (it is back in line)."""
        self._handing_out = (job_id, waiting)
        try:
            job = await self.faults.persist(lambda: self.store.start(job_id))
        except Stopping:
            self._put_back(job_id, waiting)
            raise
        finally:
            self._handing_out = None
        if job is None:  # cancelled or failed while it waited
            return True
        running = Running(job, waiting, self._estimate(waiting))
        self.running[job_id] = running
        if (by := self._cancel_on_start.pop(job_id, None)) is not None:
            running.cancelled_by = by
        self._changed()
        try:
            running.worker = await self.executor.launch(job)
        except CannotRun as exc:
            await self.finished(job_id, Outcome.failed(str(exc)))
            return True
        except Exception as exc:  # Redis away for a moment: back to the head of the line
            log.warning("job %d: no engine could take it (%s); it stays first in line", job_id, exc)
            del self.running[job_id]
            await self.faults.persist(lambda: self.store.requeue(job_id))
            self._put_back(job_id, waiting)
            await asyncio.sleep(RELAUNCH_PAUSE_S)
            self._wake.set()
            return False
        if running.cancelled_by is not None:
            await self.executor.cancel(job_id)
        return True

    # what executors report (execution.Report)

    def started(self, job_id: int, worker: str | None) -> None:
        running = self.running.get(job_id)
        if running is None:
            return
        running.started = time.monotonic()
        if worker is not None:
            running.worker = worker
            self._spawn(self.store.set_worker(job_id, worker), f"job {job_id}: recording its worker")
        self._spawn(self.events.started(running.job), f"job {job_id}: showing its start")

    def progress(
        self, job_id: int, step: int, total: int, elapsed_s: float | None, preview: bytes | None = None
    ) -> None:
        running = self.running.get(job_id)
        if running is None:
            return
        if elapsed_s is not None:
            self.metrics.step_seconds.observe(max(0.0, elapsed_s - running.last_step_s))
            running.last_step_s = elapsed_s
        self._spawn(
            self.events.progress(running.job, step, total, running.remaining_s(), preview),
            f"job {job_id}: showing progress",
        )

    def engine_free(self) -> None:
        self._wake.set()

    async def finished(self, job_id: int, outcome: Outcome) -> None:
        running = self.running.pop(job_id, None)
        self._wake.set()
        self._recording[job_id] = running.waiting if running is not None else None
        self._changed()
        try:
            await self._record(job_id, running, outcome)
        finally:
            self._recording.pop(job_id, None)
            self._changed()

    async def lost(self, job_id: int) -> None:
        running = self.running.pop(job_id, None)
        if running is None:
            return
        self._changed()
        # In the store first: a stale "queued" must never land after it was handed out again.
        await self.faults.persist(lambda: self.store.requeue(job_id))
        self._put_back(job_id, running.waiting)
        self._wake.set()

    # recording outcomes

    async def _record(self, job_id: int, running: Running | None, outcome: Outcome) -> None:
        by = running.cancelled_by if running is not None else None
        if await self.outcomes.record(job_id, outcome, cancelled_by=by) is not None:
            self.deliveries.submit(job_id)

    # plumbing

    def _changed(self) -> None:
        self._change.set()
        depth = self.metrics.queue_depth
        depth.labels("queued").set(len(self))
        depth.labels("running").set(len(self.running))
        depth.labels("saving").set(len(self._recording))
        depth.labels("delivering").set(self.deliveries.active)

    async def _wait_until(self, done: Callable[[], Any], deadline: float) -> bool:
        """Event-driven wait for a condition on the dispatcher's state, with a deadline."""
        while True:
            self._change.clear()  # before the check: a change after it sets the event again
            if done():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._change.wait(), remaining)

    def _spawn(self, work: Awaitable[Any], what: str) -> None:
        """Discord I/O and small bookkeeping in their own tasks: never on the engine's path."""

        async def guarded() -> None:
            try:
                await work
            except Exception as exc:  # best effort: progress and worker names are not the outcome
                log.info("%s failed: %s", what, exc)

        self._tasks.spawn(guarded())
