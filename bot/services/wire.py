"""What crosses Redis between the bot and its engine workers (queue = "redis://..."): key names and payloads.

arq carries the jobs (one arq queue per worker, so the bot picks the worker) and their results; a
pub/sub channel carries progress; each worker keeps a self-expiring entry that says what it serves.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from engine.spec import DrawSpec

GENERATE = "generate"  # the arq function every worker registers
EVENTS_CHANNEL = "fluxbot:events"
WORKER_KEY_PREFIX = "fluxbot:worker:"
DISPATCH_KEY = "fluxbot:dispatch"  # hash: job id -> Dispatch, so a restarted bot finds its jobs again


def worker_key(name: str) -> str:
    return WORKER_KEY_PREFIX + name


def image_key(arq_id: str, index: int) -> str:
    """Where a worker leaves a PNG for the bot (workers.images = "redis"), beside arq's small result:
    the bot deletes it once the image is in its images folder; it expires otherwise."""
    return f"fluxbot:image:{arq_id}:{index}"


def queue_name(worker: str) -> str:
    return f"fluxbot:queue:{worker}"


def arq_job_id(job_id: int, dispatch_no: int) -> str:
    """One arq job per dispatch: a job moved off a dead worker is a new arq job with the next try."""
    return f"fluxbot:job:{job_id}:{dispatch_no}"


class JobPayload(BaseModel):
    """Everything a worker needs, so workers never read the bot's database: the job's spec, and the
    files of its LoRAs (inside the worker's LoRA folder) as the whitelist has them now."""

    job_id: int
    spec: DrawSpec
    lora_files: dict[str, str] = {}  # LoRA name -> file; the worker checks each file's sha256
    init_image: str | None = None  # base64 of the input PNG (img2img jobs): workers share no files
    references: list[str] = []  # base64 of an edit's further reference PNGs, in the spec's order
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
    # workers.images = "shared": relative to the shared data_dir; else the PNG is at image_key(...)
    path: str | None = None


class WorkerResult(BaseModel):
    worker: str
    images: list[RenderedImage] = []
    timings: dict[str, Any] = {}
    error: str | None = None  # the engine refused or failed this job: the user sees this text
    # The job came back more often than workers.max_tries (its workers kept stopping under it): given
    # up without running it again; `tries`: the runs it had.
    exhausted: bool = False
    tries: int = 0
