"""The seam between the JobDispatcher (one lifecycle) and an Executor (where jobs run).

An executor only runs jobs and says what happened: `Report.started/progress/finished/lost`. Everything
else (order, recording, counting, logging, delivery, restore, drain) is the dispatcher's, once, for
both executors: the in-process engine thread (local_executor) and arq workers (redis_executor).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from PIL.Image import Image

from bot.services.workers import WorkerInfo
from bot.store.files import ImageFiles, stored_image
from bot.store.jobs import StoredImage
from bot.store.models import Job
from engine.api import Recipe
from engine.messages import N_
from engine.png import png_bytes

INTERNAL_ERROR = N_("Something went wrong on our side while drawing this; it has been logged. Try again.")


class CannotRun(Exception):
    """This job can never run as stored (its preset was removed, say): the message is the user's."""


class ImageMissing(Exception):
    """An image an engine made is not where the bot can read it (the message says why)."""


class Artifact(Protocol):
    """One image of an outcome, on its way into the images folder."""

    @property
    def index(self) -> int: ...

    @property
    def recipe(self) -> Recipe: ...

    def store(self, files: ImageFiles, job_id: int) -> StoredImage:
        """Blocking (PNG encode, write, hash): the dispatcher calls it in a thread."""
        ...


@dataclass(frozen=True)
class EngineImage:
    """Straight from the in-process engine: encoded here, off the engine's thread."""

    index: int
    image: Image
    recipe: Recipe

    def store(self, files: ImageFiles, job_id: int) -> StoredImage:
        return files.save(job_id, self.index, png_bytes(self.image, self.recipe), self.recipe)


@dataclass(frozen=True)
class EncodedPng:
    """PNG bytes a worker sent back in its arq result."""

    index: int
    png: bytes
    recipe: Recipe

    def store(self, files: ImageFiles, job_id: int) -> StoredImage:
        return files.save(job_id, self.index, self.png, self.recipe)


@dataclass(frozen=True)
class SharedPng:
    """A PNG a worker wrote into a data_dir it shares with the bot."""

    index: int
    path: str
    recipe: Recipe
    missing: str  # what to tell the user when the bot cannot read it

    def store(self, files: ImageFiles, job_id: int) -> StoredImage:
        try:
            data = files.read(self.path)
        except FileNotFoundError as exc:
            raise ImageMissing(self.missing) from exc
        return stored_image(self.index, self.path, data, self.recipe)


OutcomeKind = Literal["done", "failed", "cancelled", "interrupted"]


@dataclass(frozen=True)
class Outcome:
    """How a run ended. `interrupted`: stopped by a shutdown, not by a person; it runs again later."""

    kind: OutcomeKind
    images: tuple[Artifact, ...] = ()
    timings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    worker: str | None = None

    @classmethod
    def done(cls, images: Sequence[Artifact], timings: dict[str, Any], worker: str | None = None) -> Outcome:
        return cls("done", tuple(images), timings, worker=worker)

    @classmethod
    def failed(cls, error: str, worker: str | None = None) -> Outcome:
        return cls("failed", error=error, worker=worker)

    @classmethod
    def cancelled(cls, worker: str | None = None) -> Outcome:
        return cls("cancelled", worker=worker)

    @classmethod
    def interrupted(cls) -> Outcome:
        return cls("interrupted")


class Report(Protocol):
    """The dispatcher, as an executor sees it."""

    def started(self, job_id: int, worker: str | None) -> None: ...

    def progress(
        self, job_id: int, step: int, total: int, elapsed_s: float | None, preview: bytes | None = None
    ) -> None:
        """A step is done; `preview`: a JPEG of the picture forming (engine/preview.py), or None."""
        ...

    def engine_free(self) -> None:
        """An engine can take a job now (the outcome of the last one may still be on its way)."""
        ...

    async def finished(self, job_id: int, outcome: Outcome) -> None:
        """Record the outcome; returns once it is stored (the executor may then drop its copy).
        Raises faults.Stopping when shutdown came first: the job then runs again after the restart."""
        ...

    async def lost(self, job_id: int) -> None:
        """Its engine vanished without an outcome: the job goes back to the head of the line."""
        ...


@dataclass(frozen=True)
class Restored:
    """What an executor still holds after a restart."""

    running: dict[int, str | None] = field(default_factory=dict)  # job id -> engine still running it
    front: tuple[int, ...] = ()  # jobs that were waiting to be handed out again: first in line


class Executor(Protocol):
    async def start(self, report: Report, unfinished: Sequence[Job]) -> Restored: ...

    async def stop(self) -> None: ...

    def free_families(self) -> set[str]:
        """Model families an engine could start now."""
        ...

    def engines(self) -> int:
        """Engines taking jobs (for ETAs)."""
        ...

    def swaps_extra_models(self) -> bool:
        """The engine keeps one extra transformer (Kontext, Fill) on the GPU at a time
        (engine.extra_models = "swap"): the dispatcher runs jobs on the same one together."""
        ...

    async def launch(self, job: Job) -> str | None:
        """Hand the job (already `running` in the store) to an engine; returns the engine's name."""
        ...

    async def cancel(self, job_id: int) -> None: ...

    def interrupt(self) -> bool:
        """Shutdown: stop what runs here so it runs again after the restart. False: jobs keep running
        elsewhere (workers) and no outcome will come to this process."""
        ...

    async def workers(self) -> list[WorkerInfo]: ...

    async def health(self) -> dict[str, bool]: ...
