"""LocalExecutor: runs jobs on the resident engine in this process (queue = "local"), one at a time.

The engine draws in a thread of its own, fed through a hand-off one job deep: the dispatcher hands
the next job over while the current one is still drawing, so the engine begins it the moment it is
free, without waiting for the event loop (bench/bot.py measures that duty cycle). Images go back to
the dispatcher as PIL images, so PNG encoding, writing and delivery happen off the engine's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.services.execution import INTERNAL_ERROR, CannotRun, EngineImage, Outcome, Report, Restored
from bot.services.faults import Stopping
from bot.services.rules import LiveRules
from bot.services.tasks import TaskSet
from bot.services.workers import Throughput, WorkerInfo, describe_engine
from bot.store.files import ImageFiles
from bot.store.models import Job
from engine.api import StepProgress
from engine.engine import FluxEngine
from engine.errors import EngineError, GenerationCancelled, RequestError
from engine.spec import DrawSpec, PreviewEvery
from engine.whitelist import LoraUse

log = logging.getLogger(__name__)
HANDOFF_DEPTH = 2  # the job drawing and the one waiting beside it
ENGINE_NICE = 10  # the engine thread's nice value: the event loop (0) gets ~10x its share when both run
THREAD_JOIN_S = 15.0  # on stop: how long the engine thread may take to notice


@dataclass
class _Handed:
    """A job handed to the engine thread."""

    job: Job
    loras: list[LoraUse]  # the files of its LoRAs, looked up when it was handed out
    cancel: threading.Event = field(default_factory=threading.Event)
    interrupted: bool = False  # stopped by a shutdown, not by a person
    began: bool = False
    # Enhanced ahead of its turn (an endpoint's enhancer): the spec with its expansion, and the note
    # of a failed enhancement, for the recipe.
    spec: DrawSpec | None = None
    enhance_note: str | None = None


def lower_own_priority() -> None:
    """The drawing thread (and the compute threads torch starts from it) yields the CPU to the event
    loop when both want it: on a host where torch's threads fill every core, a burst of interactions
    otherwise waits for the scheduler behind the engine (bench/bot.py's ack latency). It costs the
    engine nothing when the loop is idle. Linux sets a nice value per thread; elsewhere, nothing."""
    if hasattr(os, "setpriority") and sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ENGINE_NICE)


class LocalExecutor:
    def __init__(
        self,
        engine: FluxEngine,
        rules: LiveRules,
        files: ImageFiles | None = None,
        preview: PreviewEvery | None = None,
    ) -> None:
        self.engine = engine
        self.rules = rules  # where a job's LoRA files are looked up when it is handed out
        self.files = files  # where the input images of img2img jobs are
        self.preview = preview
        self.family = engine.info.family
        self.throughput = Throughput()
        self._started_at = time.time()
        self._resident: list[str] = engine.loras.resident
        self._handed: list[_Handed] = []  # in the order the thread takes them; only the loop changes it
        self._handoff: queue.SimpleQueue[_Handed | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._report: Report | None = None
        self._tasks = TaskSet()

    async def start(self, report: Report, unfinished: Sequence[Job]) -> Restored:
        self._report = report
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._engine_thread, name="fluxbot-engine", daemon=True)
        self._thread.start()
        return Restored()  # nothing survives a restart in this process

    async def stop(self) -> None:
        self.interrupt()
        if self._thread is not None:
            self._handoff.put(None)
            await asyncio.to_thread(self._thread.join, THREAD_JOIN_S)
            self._thread = None
        await self._tasks.cancel_all()

    def free_families(self) -> set[str]:
        return set() if len(self._handed) >= HANDOFF_DEPTH else {self.family}

    def engines(self) -> int:
        return 1

    def swaps_extra_models(self) -> bool:
        return self.engine.swap is not None

    async def launch(self, job: Job) -> str | None:
        try:
            loras = self.rules.lora_uses(job.spec)
        except EngineError as exc:
            raise CannotRun(f"It can't run: {exc}.") from exc
        handed = _Handed(job, loras)
        self._handed.append(handed)
        if job.spec.needs_enhancement and job.spec.mode != "edit" and self.engine.enhances_ahead:
            # The endpoint's seconds pass in another thread: the engine draws the job beside this
            # one meanwhile, and takes this one when its expansion is back.
            self._tasks.spawn(self._enhance_then_hand(handed), f"fluxbot-enhance-{job.id}")
        else:
            self._handoff.put(handed)
        return None  # in-process: no worker name

    async def _enhance_then_hand(self, handed: _Handed) -> None:
        # Whatever happens the job goes on to the engine: after a failure here the engine enhances
        # it itself, and says what failed. (A stop cancels this: the job stays running in the store
        # and runs again after the restart; the thread it would go to is gone.)
        try:
            handed.spec, handed.enhance_note = await asyncio.to_thread(
                self.engine.enhance_ahead, handed.job.spec
            )
        except Exception:
            log.exception("job %d: enhancing ahead failed; the engine tries when it draws", handed.job.id)
        finally:
            self._handoff.put(handed)

    async def cancel(self, job_id: int) -> None:
        for handed in self._handed:
            if handed.job.id == job_id:
                handed.cancel.set()

    def interrupt(self) -> bool:
        for handed in self._handed:
            handed.interrupted = True
            handed.cancel.set()
        return True

    async def workers(self) -> list[WorkerInfo]:
        """The one in-process engine, described like a scale-out worker."""
        drawing = next((h for h in self._handed if h.began), None)
        return [
            describe_engine(
                self.engine,
                "local",
                "local",
                "idle" if drawing is None else "busy",
                None if drawing is None else drawing.job.id,
                self.throughput,
                self._started_at,
                self._resident,
            )
        ]

    async def health(self) -> dict[str, bool]:
        return {"engine": self._thread is not None and self._thread.is_alive()}

    # the engine's thread

    def _engine_thread(self) -> None:
        lower_own_priority()
        while (handed := self._handoff.get()) is not None:
            self._to_loop(self._began, handed)
            outcome = self._draw(handed)
            self._to_loop(self._ended, handed, outcome)

    def _draw(self, handed: _Handed) -> Outcome:
        job = handed.job

        def on_step(progress: StepProgress) -> None:
            self._to_loop(self._step, job.id, progress)

        if handed.cancel.is_set():  # cancelled or stopped while it waited beside the last one
            return Outcome.interrupted() if handed.interrupted else Outcome.cancelled()
        try:
            spec = handed.spec or job.spec
            inputs: list[bytes] = []
            if spec.inputs:
                if self.files is None:
                    raise RequestError("this fluxbot keeps no input images")
                inputs = [self.files.read_input(sha) for sha in spec.inputs]  # the engine thread: may block
            (result,) = self.engine.draw(
                [spec],
                handed.loras,
                on_step,
                handed.cancel,
                init_image=inputs[0] if inputs else None,
                preview=self.preview,
                references=inputs[1:],
                enhance_notes=[handed.enhance_note] if handed.spec is not None else [],
            )
            images = [
                EngineImage(index, image, recipe)
                for index, (image, recipe) in enumerate(zip(result.images, result.recipes, strict=True))
            ]
        except GenerationCancelled:
            return Outcome.interrupted() if handed.interrupted else Outcome.cancelled()
        except EngineError as exc:
            return Outcome.failed(str(exc))
        except Exception:  # the engine thread outlives any one job
            log.exception("job %d: the engine failed", job.id)
            return Outcome.failed(INTERNAL_ERROR)
        return Outcome.done(images, result.timings.model_dump())

    def _to_loop(self, callback: Any, *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed under a job that outlived the shutdown
            log.info("engine thread: the event loop is gone; dropping a report")

    # back on the event loop

    def _began(self, handed: _Handed) -> None:
        handed.began = True
        assert self._report is not None
        self._report.started(handed.job.id, None)

    def _step(self, job_id: int, progress: StepProgress) -> None:
        assert self._report is not None
        self._report.progress(job_id, progress.step, progress.total, progress.elapsed_s, progress.preview)

    def _ended(self, handed: _Handed, outcome: Outcome) -> None:
        assert self._report is not None
        self._handed.remove(handed)
        self._resident = self.engine.loras.resident
        self.throughput.record(outcome.kind == "done")
        self._report.engine_free()
        self._tasks.spawn(self._record(handed.job.id, outcome), f"fluxbot-record-{handed.job.id}")

    async def _record(self, job_id: int, outcome: Outcome) -> None:
        assert self._report is not None
        try:
            await self._report.finished(job_id, outcome)
        except Stopping:
            log.info(
                "job %d: shutting down before its outcome was saved; it runs again after the restart", job_id
            )
