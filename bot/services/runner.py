"""Run one stored job on the resident engine, off the event loop, and keep its PNGs under the data dir."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.store.jobs import StoredImage
from engine.api import GenerationRequest, Recipe, StepProgress
from engine.engine import FluxEngine
from engine.png import png_bytes


@dataclass
class StepClock:
    """Measured seconds per step per megapixel (moving average), for queue ETAs."""

    s_per_step_mp: float = 0.5
    overhead_s: float = 0.5
    _alpha: float = 0.3

    def estimate(self, steps: int, pixels: int) -> float:
        return self.overhead_s + steps * self.s_per_step_mp * max(pixels, 1) / 1e6

    def record(self, steps: int, pixels: int, denoise_s: float, other_s: float) -> None:
        sample = denoise_s / max(steps, 1) / (max(pixels, 1) / 1e6)
        self.s_per_step_mp += self._alpha * (sample - self.s_per_step_mp)
        self.overhead_s += self._alpha * (other_s - self.overhead_s)


def png_path(job_id: int, index: int) -> Path:
    """Relative to the data dir. Generated name only: no user text ever reaches the filesystem."""
    return Path("images") / f"{job_id // 1000:04d}" / f"{job_id}-{index}.png"


def save_png(data_dir: Path, job_id: int, index: int, data: bytes, recipe: Recipe) -> StoredImage:
    relative = png_path(job_id, index)
    path = data_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return stored_image(index, relative.as_posix(), data, recipe)


def stored_image(index: int, relative: str, data: bytes, recipe: Recipe) -> StoredImage:
    return StoredImage(
        index=index,
        path=relative,
        sha256=hashlib.sha256(data).hexdigest(),
        width=recipe.width,
        height=recipe.height,
        seed=recipe.seed,
        recipe=recipe.model_dump(mode="json"),
    )


class JobRunner:
    """Turns a job's stored request into PNG files; blocking engine work runs in a worker thread."""

    def __init__(self, engine: FluxEngine, data_dir: Path, clock: StepClock | None = None) -> None:
        self.engine = engine
        self.images_dir = data_dir / "images"
        self.clock = clock or StepClock()

    async def run(
        self,
        job_id: int,
        request: GenerationRequest,
        on_step: Callable[[StepProgress], None],
        cancel: threading.Event,
    ) -> tuple[list[StoredImage], dict[str, Any]]:
        return await asyncio.to_thread(self._run_blocking, job_id, request, on_step, cancel)

    def _run_blocking(
        self,
        job_id: int,
        request: GenerationRequest,
        on_step: Callable[[StepProgress], None],
        cancel: threading.Event,
    ) -> tuple[list[StoredImage], dict[str, Any]]:
        result = self.engine.generate(request, on_step=on_step, cancel=cancel)
        stored = [
            save_png(self.images_dir.parent, job_id, index, png_bytes(image, recipe), recipe)
            for index, (image, recipe) in enumerate(zip(result.images, result.recipes, strict=True))
        ]
        timings = result.timings.model_dump()
        pixels = stored[0].width * stored[0].height if stored else 0
        self.clock.record(
            result.timings.steps,
            pixels,
            result.timings.denoise_s,
            result.timings.total_s - result.timings.denoise_s,
        )
        return stored, timings
