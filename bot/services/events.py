"""What the job queue tells the outside world (the Discord delivery, or a test recorder)."""

from __future__ import annotations

from typing import Protocol

from bot.store.models import Job


class JobEvents(Protocol):
    async def started(self, job: Job) -> None: ...

    async def progress(
        self, job: Job, step: int, total: int, eta_s: float, preview: bytes | None = None
    ) -> None: ...

    async def finished(self, job: Job) -> int | None:
        """The job is done, failed or cancelled (job.status says which): deliver it, return the message id.

        Raising leaves the job undelivered; the next start delivers it again.
        """
        ...
