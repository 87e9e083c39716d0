"""The warm-up after compiling: the graphs jobs need are compiled at start, not in a user's job.

Shapes are dynamic, but torch compiles a dynamic graph only once it has seen a second size, and
treats a batch of one apart; each step cache also adds hooks of its own. So the warm-up draws two
sizes, a batch of two, and every step cache the family's presets use (and a Kontext edit when
Kontext is loaded), small and with few steps: what matters is which graphs exist, not the pixels.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from PIL import Image

from engine.input_image import normalize_input_image
from engine.presets import Preset
from engine.spec import DrawSpec
from engine.step_cache import NO_CACHE, TAYLORSEER_WARMUP_STEPS, StepCache

if TYPE_CHECKING:
    from engine.engine import FluxEngine

log = logging.getLogger(__name__)
SIZES = ((256, 256), (384, 256))  # (width, height): two sizes make torch's graphs size-dynamic
PROMPT = "a red fox in a snowy forest"
EDIT_PRESET = "kontext"


def warm_up(engine: FluxEngine) -> None:
    resolver = engine.resolver
    base = resolver.preset(None)
    presets = resolver.catalog.presets
    caches = {NO_CACHE} | {p.cache for p in presets.values() if p.family == resolver.family}
    # Whether a cache skips a step depends on the pictures; at the largest threshold it skips every
    # step it may, so both paths are compiled whatever the warm-up draws.
    caches |= {c.model_copy(update={"threshold": 1.0}) for c in caches if c.threshold is not None}
    for cache in sorted(caches, key=str):
        for width, height, batch in (*((w, h, 1) for w, h in SIZES), (*SIZES[0], 2)):
            spec = _spec(base, width, height, batch, _steps(cache), cache)
            log.debug("warm-up: %dx%d x%d, cache %s", width, height, batch, cache)
            engine.draw([spec], loras=())
    if engine.kontext is not None:
        preset = presets.get(EDIT_PRESET, base)
        gray = Image.new("RGB", SIZES[0], (128, 128, 128))
        source = normalize_input_image(_png(gray), max_bytes=10**7, max_pixels=10**7)
        for width, height in SIZES:
            spec = _spec(preset, width, height, 1, 2, NO_CACHE).model_copy(
                update={"mode": "edit", "init_image": source.sha256}
            )
            engine.draw([spec], loras=(), init_image=source.png)


def _steps(cache: StepCache) -> int:
    """Enough steps for the cache to go through every state it has (full runs, then reuse)."""
    if cache.kind == "taylorseer":
        return TAYLORSEER_WARMUP_STEPS + 2 * (cache.interval or 2)
    return 8 if cache.on else 2


def _spec(preset: Preset, width: int, height: int, batch: int, steps: int, cache: StepCache) -> DrawSpec:
    """A spec the engine makes itself: outside the preset's bounds on purpose (small and short)."""
    return DrawSpec(
        family=preset.family,
        prompt=PROMPT,
        final_prompt=PROMPT,
        preset=preset.name,
        width=width,
        height=height,
        steps=steps,
        guidance=preset.guidance,
        true_cfg=preset.true_cfg,
        sampler=preset.sampler,
        seed=0,
        batch_size=batch,
        max_sequence_length=preset.max_sequence_length,
        cache=cache,
    )


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
