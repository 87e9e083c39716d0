"""What an engine worker tells the bot about itself: /admin workers and the dispatcher's choices read it."""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from bot.services.wire import WORKER_KEY_PREFIX

if TYPE_CHECKING:
    from engine.engine import FluxEngine

log = logging.getLogger(__name__)

WorkerState = Literal["idle", "busy", "draining"]
THROUGHPUT_WINDOW_S = 600.0


class WorkerInfo(BaseModel):
    """One worker's advertisement. `incarnation` changes on every start, so a restarted worker with the
    same name is not mistaken for the one that died holding a job."""

    name: str
    incarnation: str
    host: str
    family: str
    model: str
    quant: str
    device: str
    free_vram_gb: float | None
    resident_loras: list[str]
    state: WorkerState
    job_id: int | None = None
    jobs_done: int = 0
    jobs_failed: int = 0
    jobs_per_min: float = 0.0
    started_at: float
    seen_at: float
    # Speed settings in effect: compile mode, attention backend, seconds the compile + warm-up took.
    compile: str = "off"
    attention: str = "native"
    warmup_s: float | None = None


async def advertised_workers(redis: Any) -> dict[str, WorkerInfo]:
    """The workers advertising themselves in Redis now (each entry expires unless renewed)."""
    keys = [key async for key in redis.scan_iter(match=WORKER_KEY_PREFIX + "*", count=200)]
    table = {}
    for raw in await redis.mget(keys) if keys else []:
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            info = WorkerInfo.model_validate_json(raw)
        except ValueError:
            log.warning("ignoring a worker entry this bot cannot read (a different fluxbot version?)")
            continue
        table[info.name] = info
    return table


class Throughput:
    """Finished jobs over the last ten minutes (or since start, when that is shorter)."""

    def __init__(self, window_s: float = THROUGHPUT_WINDOW_S) -> None:
        self.window_s = window_s
        self.started = time.monotonic()
        self._finished: deque[float] = deque()
        self.done = 0
        self.failed = 0

    def record(self, ok: bool) -> None:
        now = time.monotonic()
        self._finished.append(now)
        self.done += ok
        self.failed += not ok
        while self._finished and self._finished[0] < now - self.window_s:
            self._finished.popleft()

    def per_minute(self) -> float:
        now = time.monotonic()
        recent = sum(1 for t in self._finished if t >= now - self.window_s)
        span = min(self.window_s, max(now - self.started, 1.0))
        return recent * 60.0 / span


def describe_engine(
    engine: FluxEngine,
    name: str,
    incarnation: str,
    state: WorkerState,
    job_id: int | None,
    throughput: Throughput,
    started_at: float,
    resident_loras: list[str],
) -> WorkerInfo:
    """`resident_loras` is passed in, read after each job: the engine thread may be changing the set now."""
    info = engine.info
    return WorkerInfo(
        name=name,
        incarnation=incarnation,
        host=socket.gethostname(),
        family=info.family,
        model=info.model_id,
        quant=info.plan.transformer,
        device=info.device.device,
        free_vram_gb=engine.free_vram_gb(),
        resident_loras=resident_loras,
        state=state,
        job_id=job_id,
        jobs_done=throughput.done,
        jobs_failed=throughput.failed,
        jobs_per_min=round(throughput.per_minute(), 2),
        started_at=started_at,
        seen_at=time.time(),
        compile=info.plan.compile,
        attention=info.attention.backend,
        warmup_s=None if engine.warmup_s is None else round(engine.warmup_s, 1),
    )


def default_worker_name() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "worker"
    return f"{host}-{os.getpid()}"[-64:].lstrip("-_.")
