"""Deliveries: each finished job's outcome reaches its user once, in a task of its own.

A slow or failing Discord never holds up the engine: the dispatcher hands the job id over and moves
on. A failed delivery is retried with growing pauses, without a restart, until it lands or the
outcome is older than `delivery.horizon_s` (then it is marked expired and logged). The store's
`delivery` state makes it once: a job marked delivered is never sent again, here or after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from bot.services.events import JobEvents
from bot.services.faults import Faults, Stopping
from bot.store.jobs import JobStore
from bot.store.models import Delivery, Job
from fluxbot.settings import DeliverySettings

log = logging.getLogger(__name__)


class Deliveries:
    def __init__(
        self,
        store: JobStore,
        events: JobEvents,
        faults: Faults,
        settings: DeliverySettings,
        on_change: Callable[[], None],
    ) -> None:
        self.store = store
        self.events = events
        self.faults = faults
        self.settings = settings
        self._on_change = on_change
        self._tasks: dict[int, asyncio.Task[None]] = {}

    @property
    def active(self) -> int:
        """Deliveries under way or waiting to retry."""
        return len(self._tasks)

    def submit(self, job_id: int) -> None:
        if job_id in self._tasks:
            return
        task = asyncio.create_task(self._deliver(job_id), name=f"fluxbot-deliver-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda done: self._done(job_id, done))
        self._on_change()

    async def restore(self) -> None:
        """After a restart: everything finished but not yet delivered."""
        for job in await self.faults.persist(self.store.undelivered):
            self.submit(job.id)

    async def stop(self) -> None:
        """Whatever is still undelivered stays `pending` in the store: the next start delivers it."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _done(self, job_id: int, task: asyncio.Task[None]) -> None:
        self._tasks.pop(job_id, None)
        if not task.cancelled() and (exc := task.exception()) is not None and not isinstance(exc, Stopping):
            log.error("job %d: delivery stopped by an unexpected error", job_id, exc_info=exc)
        self._on_change()

    async def _deliver(self, job_id: int) -> None:
        failures = 0
        while True:
            job = await self.faults.persist(lambda: self.store.get(job_id))
            if job is None or job.delivery != Delivery.PENDING:
                return
            if self._past_horizon(job):
                await self.faults.persist(lambda: self.store.expire_delivery(job_id))
                log.warning(
                    "job %d: not delivered within %.0f s after it finished; giving up on it",
                    job_id,
                    self.settings.horizon_s,
                )
                return
            try:
                message_id = await self.events.finished(job)
            except Exception as exc:  # Discord away, slow or refusing: keep the outcome, try again later
                failures += 1
                pause = min(self.settings.retry_max_s, self.settings.retry_first_s * 2 ** (failures - 1))
                log.warning(
                    "job %d: delivery failed (%s); try %d again in %.1f s",
                    job_id,
                    f"{type(exc).__name__}: {exc}"[:200],
                    failures + 1,
                    pause,
                )
                with contextlib.suppress(Exception):  # the count is for operators; the retry matters
                    await self.store.count_delivery_failure(job_id)
                await asyncio.sleep(pause)
                continue
            # Sent: from here only the mark is retried, never the message.
            await self.faults.persist(functools.partial(self.store.mark_delivered, job_id, message_id))
            return

    def _past_horizon(self, job: Job) -> bool:
        finished = job.finished_at or job.created_at
        if finished.tzinfo is None:
            finished = finished.replace(tzinfo=UTC)
        return (datetime.now(UTC) - finished).total_seconds() > self.settings.horizon_s
