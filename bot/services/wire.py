"""What crosses Redis between the bot and its engine workers (queue = "redis://..."): key names and payloads.

arq carries the jobs (one arq queue per worker, so the bot picks the worker) and their results; a
pub/sub channel carries progress; each worker keeps a self-expiring entry that says what it serves.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

GENERATE = "generate"  # the arq function every worker registers
EVENTS_CHANNEL = "fluxbot:events"
WORKER_KEY_PREFIX = "fluxbot:worker:"
DISPATCH_KEY = "fluxbot:dispatch"  # hash: job id -> Dispatch, so a restarted bot finds its jobs again


def worker_key(name: str) -> str:
    return WORKER_KEY_PREFIX + name


def queue_name(worker: str) -> str:
    return f"fluxbot:queue:{worker}"


def arq_job_id(job_id: int, dispatch_no: int) -> str:
    """One arq job per dispatch: a job moved off a dead worker is a new arq job with the next try."""
    return f"fluxbot:job:{job_id}:{dispatch_no}"


class JobPayload(BaseModel):
    """Everything a worker needs, so workers never read the bot's database: the pinned request plus
    the preset and LoRA entries as admins have them now."""

    job_id: int
    request: dict[str, Any]
    preset: dict[str, Any]
    loras: list[dict[str, Any]]
    init_image: str | None = None  # base64 of the input PNG (img2img jobs): workers share no files
    preview_every_s: float | None = None  # None: no previews (see engine.preview.PreviewEvery)
    preview_every_steps: int | None = None


class Dispatch(BaseModel):
    job_id: int
    arq_id: str
    worker: str
    incarnation: str
    job_try: int  # arq's try number for this run (2 = the retry after a worker died)
    dispatch_no: int


class WorkerEvent(BaseModel):
    kind: Literal["started", "progress", "finished"]
    job_id: int
    arq_id: str
    worker: str
    step: int = 0
    total: int = 0
    elapsed_s: float | None = None  # progress: seconds since the job's first step began
    preview: str | None = None  # progress: base64 of a small JPEG of the picture forming


class RenderedImage(BaseModel):
    index: int
    recipe: dict[str, Any]
    sha256: str
    png: bytes | None = None  # workers.images = "redis"
    path: str | None = None  # workers.images = "shared": relative to the shared data_dir


class WorkerResult(BaseModel):
    worker: str
    images: list[RenderedImage] = []
    timings: dict[str, Any] = {}
    error: str | None = None  # the engine refused or failed this job: the user sees this text
