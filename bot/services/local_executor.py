"""LocalExecutor: runs jobs on the resident engine in this process (queue = "local"), one at a time.

The engine works in a thread; its images go back to the dispatcher as PIL images, so PNG encoding,
writing and delivery happen off the engine's thread while it already draws the next job.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.services.execution import INTERNAL_ERROR, EngineImage, Outcome, Report, Restored
from bot.services.faults import Stopping
from bot.services.workers import Throughput, WorkerInfo, describe_engine
from bot.store.models import Job
from engine.api import GenerationRequest, StepProgress
from engine.engine import FluxEngine
from engine.errors import EngineError, GenerationCancelled

log = logging.getLogger(__name__)


@dataclass
class _Current:
    job_id: int
    cancel: threading.Event = field(default_factory=threading.Event)
    interrupted: bool = False  # stopped by a shutdown, not by a person


class LocalExecutor:
    def __init__(self, engine: FluxEngine) -> None:
        self.engine = engine
        self.family = engine.info.family
        self.throughput = Throughput()
        self._started_at = time.time()
        self._resident: list[str] = engine.loras.resident
        self._current: _Current | None = None
        self._report: Report | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, report: Report, unfinished: Sequence[Job]) -> Restored:
        self._report = report
        return Restored()  # nothing survives a restart in this process

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def free_families(self) -> set[str]:
        return set() if self._current is not None else {self.family}

    def engines(self) -> int:
        return 1

    async def launch(self, job: Job) -> str | None:
        current = self._current = _Current(job.id)
        task = asyncio.create_task(self._run(job, current), name=f"fluxbot-job-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return None  # in-process: no worker name

    async def cancel(self, job_id: int) -> None:
        if self._current is not None and self._current.job_id == job_id:
            self._current.cancel.set()

    def interrupt(self) -> bool:
        if self._current is not None:
            self._current.interrupted = True
            self._current.cancel.set()
        return True

    async def workers(self) -> list[WorkerInfo]:
        """The one in-process engine, described like a scale-out worker."""
        current = self._current
        return [
            describe_engine(
                self.engine,
                "local",
                "local",
                "idle" if current is None else "busy",
                None if current is None else current.job_id,
                self.throughput,
                self._started_at,
                self._resident,
            )
        ]

    async def health(self) -> dict[str, bool]:
        return {"engine": True}

    async def _run(self, job: Job, current: _Current) -> None:
        report = self._report
        assert report is not None
        loop = asyncio.get_running_loop()

        def on_step(progress: StepProgress) -> None:  # the engine's thread
            loop.call_soon_threadsafe(
                report.progress, job.id, progress.step, progress.total, progress.elapsed_s
            )

        report.started(job.id, None)
        try:
            request = GenerationRequest.model_validate(job.request)
            result = await asyncio.to_thread(self.engine.generate, request, on_step, current.cancel)
            images = [
                EngineImage(index, image, recipe)
                for index, (image, recipe) in enumerate(zip(result.images, result.recipes, strict=True))
            ]
            outcome = Outcome.done(images, result.timings.model_dump())
        except GenerationCancelled:
            outcome = Outcome.interrupted() if current.interrupted else Outcome.cancelled()
        except EngineError as exc:
            outcome = Outcome.failed(str(exc))
        except Exception:
            log.exception("job %d: the engine failed", job.id)
            outcome = Outcome.failed(INTERNAL_ERROR)
        finally:
            self._current = None
            self._resident = self.engine.loras.resident
            report.engine_free()
        self.throughput.record(outcome.kind == "done")
        try:
            await report.finished(job.id, outcome)
        except Stopping:
            log.info(
                "job %d: shutting down before its outcome was saved; it runs again after the restart", job.id
            )
