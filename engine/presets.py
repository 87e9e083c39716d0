"""Presets: named, bounded generation settings loaded from config/presets.toml."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.errors import ConfigError, RequestError
from engine.messages import Message
from engine.spec import Family
from engine.step_cache import NO_CACHE, StepCacheField
from engine.tomlfile import read_toml, validate_entry

_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX×*]\s*(\d{1,5})\s*$")
_ASPECT = re.compile(r"^\s*(\d{1,3})\s*:\s*(\d{1,3})\s*$")
ASPECT_TOLERANCE = 0.03


class PresetLora(BaseModel):
    """A LoRA a preset always applies (e.g. a turbo LoRA that makes 8 steps enough)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    weight: float


class Preset(BaseModel):
    """Defaults and bounds for one kind of generation; a request is checked against them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    family: Family = "flux1"
    # The model variants of the family it is made for (FLUX.3 klein's distilled and base models need
    # other steps and guidance); empty: any.
    variants: list[str] = Field(default_factory=list)
    steps: int = Field(ge=1, le=200)
    steps_range: tuple[int, int]
    # Flux dev's *distilled* guidance (diffusers' guidance_scale); None for schnell, which has none.
    guidance: float | None = None
    guidance_range: tuple[float, float] | None = None
    # Real classifier-free guidance; 1.0 = off. Flux dev turns grey/noisy when this is raised.
    true_cfg: float = Field(1.0, ge=1.0, le=10.0)
    sampler: Literal["euler"] = "euler"
    width: int
    height: int
    size_multiple: int = Field(16, ge=8, le=128)
    megapixels_range: tuple[float, float] = (0.25, 2.1)
    warn_below_megapixels: float | None = None
    aspects: list[str] = Field(default_factory=list)
    max_sequence_length: int = Field(512, ge=16, le=512)
    loras: list[PresetLora] = Field(default_factory=list)
    # img2img: the strength an image prompt gets by default and the bounds a user may pick within;
    # Vary (Subtle / Strong) and Upscale use theirs (Midjourney-like: subtle keeps the composition).
    strength: float = Field(0.7, gt=0.0, le=1.0)
    strength_range: tuple[float, float] = (0.1, 1.0)
    vary_subtle_strength: float = Field(0.35, gt=0.0, le=1.0)
    vary_strong_strength: float = Field(0.7, gt=0.0, le=1.0)
    upscale_strength: float = Field(0.3, gt=0.0, le=1.0)
    # Upscale with engine.upscaler: false makes it the model's enlargement alone (no redraw), which
    # may be larger than megapixels_range allows (it runs no diffusion) up to this many MP.
    upscale_redraw: bool = True
    upscale_max_megapixels: float = Field(16.78, gt=0.0, le=16.78)  # 4096x4096: the engine's limit
    # Made for sexual content: the bot serves it only in age-restricted channels and DMs.
    nsfw: bool = False
    # Step caching (engine/step_cache.py): "none", "fbcache:0.08", "taylorseer:4", "magcache".
    cache: StepCacheField = NO_CACHE
    # Expand prompts with the engine's enhancer unless the user says otherwise (engine/enhancer.py).
    enhance: bool = False

    @model_validator(mode="after")
    def _defaults_within_bounds(self) -> Self:
        lo, hi = self.steps_range
        if not 1 <= lo <= self.steps <= hi:
            raise ValueError(f"steps {self.steps} must lie in steps_range {list(self.steps_range)}")
        if (self.guidance is None) != (self.guidance_range is None):
            raise ValueError("guidance and guidance_range must both be set, or both be left out")
        if self.guidance is not None and self.guidance_range is not None:
            glo, ghi = self.guidance_range
            if not 0 <= glo <= self.guidance <= ghi:
                raise ValueError(
                    f"guidance {self.guidance} must lie in guidance_range {list(self.guidance_range)}"
                )
        for aspect in self.aspects:
            if not _ASPECT.match(aspect):
                raise ValueError(f"aspect {aspect!r} is not of the form W:H")
        slo, shi = self.strength_range
        if not 0 < slo <= self.strength <= shi <= 1:
            raise ValueError(
                f"strength {self.strength} must lie in strength_range {list(self.strength_range)}"
            )
        mlo, mhi = self.megapixels_range
        if not 0 < mlo <= mhi:
            raise ValueError("megapixels_range must be two positive numbers, low first")
        problem = self.size_problem(self.width, self.height)
        if problem:
            raise ValueError(f"default size {self.width}x{self.height}: {problem}")
        try:
            self.cache.check_family(self.family)
        except RequestError as exc:
            raise ValueError(str(exc)) from None
        return self

    def size_problem(self, width: int, height: int) -> Message | None:
        """Why this size is refused, or None when it is allowed."""
        m = self.size_multiple
        if width % m or height % m:
            return Message("width and height must be multiples of {m}", m=m)
        mp = width * height / 1e6
        lo, hi = self.megapixels_range
        if mp < lo:
            return Message(
                "{mp:.2f} MP is below this preset's minimum of {lo} MP (Flux turns to noise when small)",
                mp=mp,
                lo=lo,
            )
        if mp > hi:
            return Message("{mp:.2f} MP is above this preset's maximum of {hi} MP", mp=mp, hi=hi)
        if self.aspects and not any(_close_aspect(width, height, a) for a in self.aspects):
            return Message(
                "aspect {width}:{height} is not one of {aspects}",
                width=width,
                height=height,
                aspects=", ".join(self.aspects),
            )
        return None

    def parse_size(self, text: str) -> tuple[int, int]:
        """Turn 'WxH' or an aspect 'W:H' into a checked (width, height)."""
        if m := _SIZE.match(text):
            width, height = int(m[1]), int(m[2])
        elif m := _ASPECT.match(text):
            aw, ah = int(m[1]), int(m[2])
            if aw == 0 or ah == 0:
                raise RequestError("aspect {text!r} must have two positive numbers", text=text[:32])
            width, height = self.size_for_aspect(aw, ah)
        else:
            raise RequestError("size {text!r} must look like 1024x768 or an aspect like 16:9", text=text[:32])
        problem = self.size_problem(width, height)
        if problem:
            raise RequestError(
                "size {width}x{height} for preset {preset}: {problem}",
                width=width,
                height=height,
                preset=self.name,
                problem=problem,
            )
        return width, height

    def size_for_aspect(self, aw: int, ah: int) -> tuple[int, int]:
        """The size of this aspect at the preset's default pixel count, on the size grid."""
        pixels = self.width * self.height
        m = self.size_multiple
        width = max(m, round(math.sqrt(pixels * aw / ah) / m) * m)
        height = max(m, round(math.sqrt(pixels * ah / aw) / m) * m)
        return width, height


def _close_aspect(width: int, height: int, aspect: str) -> bool:
    aw, ah = (int(x) for x in aspect.split(":"))
    return ah > 0 and abs(width / height - aw / ah) <= ASPECT_TOLERANCE * (aw / ah)


def load_presets(path: Path) -> dict[str, Preset]:
    """Read every [name] table of the presets file; fails at start with the file, key and problem."""
    data = read_toml(path)
    if not data:
        raise ConfigError(f"{path}: no presets defined")
    return {name: validate_entry(path, name, Preset, table, name=name) for name, table in data.items()}
