"""Queue ETAs: measured seconds per step per megapixel, and the order jobs reach free engines."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engine.spec import DrawSpec


@dataclass
class StepClock:
    """Seconds per step per megapixel and per-job overhead, as moving averages of finished jobs."""

    s_per_step_mp: float = 0.5
    overhead_s: float = 0.5
    _alpha: float = 0.3

    def estimate(self, steps: int, pixels: int) -> float:
        return self.overhead_s + steps * self.s_per_step_mp * max(pixels, 1) / 1e6

    def record(self, steps: int, pixels: int, denoise_s: float, other_s: float) -> None:
        sample = denoise_s / max(steps, 1) / (max(pixels, 1) / 1e6)
        self.s_per_step_mp += self._alpha * (sample - self.s_per_step_mp)
        self.overhead_s += self._alpha * (other_s - self.overhead_s)

    def record_timings(self, timings: dict[str, Any], pixels: int) -> None:
        if "denoise_s" in timings and pixels and timings.get("steps", 1):  # upscales run no steps
            denoise = float(timings["denoise_s"])
            self.record(int(timings.get("steps", 1)), pixels, denoise, float(timings["total_s"]) - denoise)


def job_cost(spec: DrawSpec) -> tuple[int, int]:
    """(steps, pixels) of a job, for ETAs: every image of a batch is steps on the engine. An upscale
    without a redraw runs no steps: its upscaler pass counts as one at its size."""
    if spec.mode == "upscale":
        return 1, spec.pixels
    return spec.steps * spec.batch_size, spec.pixels


def etas(busy_s: Iterable[float], engines: int, waiting: Iterable[float]) -> list[float]:
    """When each waiting job (in order, by its own duration) should finish, if each goes to the engine
    that frees up first. `busy_s` are the seconds left on engines that are busy now."""
    slots = sorted(busy_s)
    slots += [0.0] * max(0, max(engines, 1) - len(slots))
    heapq.heapify(slots)
    out = []
    for duration in waiting:
        finish = heapq.heappop(slots) + duration
        heapq.heappush(slots, finish)
        out.append(finish)
    return out
