"""OutcomeRecorder: what an engine's outcome becomes in the store, once per job, whichever executor
ran it: PNGs written, the optional image safety check, the job's final state, then the outcome log
line and metrics. The dispatcher decides when (and delivers after); this module only records.

Store and disk faults are waited out (bot.services.faults): an outcome is held, never lost for them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from bot.observability import Metrics
from bot.services.eta import StepClock
from bot.services.execution import Artifact, ImageMissing, Outcome
from bot.services.faults import Faults, is_disk_fault
from bot.store.files import ImageFiles
from bot.store.jobs import JobStore, StoredImage
from bot.store.models import Job, JobStatus
from engine.messages import N_

if TYPE_CHECKING:
    from bot.services.image_safety import ImageClassifier

log = logging.getLogger(__name__)
# Stored in English like every failure reason, translated where shown (render.py).
ENHANCED_BLOCKED = N_(
    "The enhanced prompt used a blocked term ({term}), so nothing was kept. Try it without enhance."
)
IMAGES_FAULT_S = 10.0  # how long an unwritable image folder may fail before /healthz reports it


class OutcomeRecorder:
    def __init__(
        self,
        store: JobStore,
        files: ImageFiles,
        faults: Faults,
        metrics: Metrics,
        clock: StepClock,
        classifier: ImageClassifier | None = None,
        on_images_written: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.files = files
        self.faults = faults
        self.metrics = metrics
        self.clock = clock  # learns seconds per step from every finished job (ETAs)
        self.classifier = classifier  # the optional image safety check, between storing and delivery
        self.on_images_written = on_images_written
        # The blocked-terms check (Studio.blocked_term: server, text -> term), for what the engine
        # wrote itself: an enhanced prompt is made after admission, so it is checked here.
        self.screen: Callable[[int | None, str], str | None] = lambda guild_id, text: None

    async def record(self, job_id: int, outcome: Outcome, cancelled_by: str | None = None) -> Job | None:
        """The finished job as stored, to deliver; None when there is nothing to deliver: the shutdown
        interrupted it (back in line for the restart) or it had already finished."""
        if outcome.kind == "interrupted":
            await self.faults.persist(lambda: self.store.requeue(job_id))
            log.info("job %d stopped by the shutdown; it runs again after the restart", job_id)
            return None
        status, error = JobStatus.FAILED, outcome.error
        stored: list[StoredImage] = []
        safety: dict[str, Any] | None = None
        if outcome.kind == "cancelled":
            status, error = JobStatus.CANCELLED, f"cancelled by {cancelled_by or 'an admin'}"
        elif outcome.kind == "done" and (term := await self._blocked_enhancement(job_id, outcome)):
            error = ENHANCED_BLOCKED.format(term=repr(term))
            log.info("job %d: its enhanced prompt used a blocked term; nothing kept", job_id)
        elif outcome.kind == "done":
            try:
                stored = await self._save_images(job_id, outcome.images)
                status = JobStatus.DONE
                safety = await self._check_images(stored)
            except ImageMissing as exc:
                error = str(exc)
        job = await self.faults.persist(
            lambda: self.store.finish(
                job_id,
                status,
                images=stored,
                timings=outcome.timings or None,
                error=error,
                worker=outcome.worker,
                safety=safety,
            )
        )
        if job is None:
            log.info("job %d had already finished; this later outcome (%s) is dropped", job_id, outcome.kind)
            return None
        self._count(job)
        return job

    async def _blocked_enhancement(self, job_id: int, outcome: Outcome) -> str | None:
        """A blocked term in the prompt an enhancer wrote for this job, if any (none: not enhanced)."""
        enhanced = outcome.images[0].recipe.enhanced_prompt if outcome.images else None
        if not enhanced:
            return None
        job = await self.store.get(job_id)
        return self.screen(job.guild_id if job is not None else None, enhanced)

    async def cancel_waiting(self, job_id: int, by: str) -> Job | None:
        """A job cancelled before any engine had it; None when it had already finished."""
        job = await self.faults.persist(
            lambda: self.store.finish(job_id, JobStatus.CANCELLED, error=f"cancelled by {by}")
        )
        if job is not None:
            self._count(job)
        return job

    async def _save_images(self, job_id: int, images: Sequence[Artifact]) -> list[StoredImage]:
        """Encode and write the PNGs in a thread. An unwritable folder holds the job (and stops new
        ones starting, see JobDispatcher._launch_ready) until it can be written, as /healthz reports."""

        def write() -> Awaitable[list[StoredImage]]:
            return asyncio.to_thread(lambda: [image.store(self.files, job_id) for image in images])

        saved = await self.faults.persist(write, kind="images", is_fault=is_disk_fault, max_s=IMAGES_FAULT_S)
        self.on_images_written()  # the folder works (again): launches may go on
        return saved

    async def _check_images(self, stored: Sequence[StoredImage]) -> dict[str, Any] | None:
        """The classifier's verdict (in a thread: torch), or None when none is configured."""
        classifier = self.classifier
        if classifier is None or not stored:
            return None

        def check() -> dict[str, Any]:
            try:
                pngs = [self.files.read(image.path) for image in stored]
            except OSError as exc:  # unchecked is flagged, as in ImageClassifier.verdict
                return {
                    "flagged": True,
                    "classifier": classifier.source,
                    "error": str(exc)[:200],
                    "images": [],
                }
            return classifier.verdict(pngs)

        return await asyncio.to_thread(check)

    def _count(self, job: Job) -> None:
        """The outcome log line and metrics, once per job."""
        self.metrics.jobs.labels(job.status.value).inc()
        timings = job.timings or {}
        if job.status == JobStatus.DONE and "total_s" in timings:
            self.metrics.job_seconds.observe(float(timings["total_s"]))
            steps = int(timings.get("steps") or 0)
            full = int(timings.get("computed_steps") or steps)
            self.metrics.steps.labels("full").inc(full)
            self.metrics.steps.labels("cached").inc(max(0, steps - full))
            pixels = job.images[0].width * job.images[0].height if job.images else 0
            self.clock.record_timings(timings, pixels)
        seconds = {k: round(float(v), 3) for k, v in timings.items() if isinstance(v, float)}
        log.info(
            "job %d user %d %s on %s in %.2fs%s",
            job.id,
            job.user_id,
            job.status.value,
            job.worker or "the local engine",
            seconds.get("total_s", 0.0),
            f": {job.error}" if job.error else "",
            extra={
                "job_id": job.id,
                "user_id": job.user_id,
                "outcome": job.status.value,
                "worker": job.worker,
                "timings": seconds,
            },
        )
