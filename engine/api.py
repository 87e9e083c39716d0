"""The engine's typed API: what callers send (GenerationRequest) and get back (GenerationResult)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL.Image import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.step_cache import NO_CACHE, StepCacheField
from engine.text import clean_text

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1  # A1111/Forge seeds are 32-bit; keeping to that makes recipes portable.
SHA256 = r"^[0-9a-f]{64}$"


class LoraChoice(BaseModel):
    """A whitelisted LoRA by name, with an optional weight (default: the whitelist's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=64)
    weight: float | None = Field(None, ge=-4.0, le=4.0, allow_inf_nan=False)


class GenerationRequest(BaseModel):
    """What a user asked for. Shape is checked here; preset bounds when the engine resolves it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    preset: str | None = Field(
        None, description="default: the presets file's first preset for the model's family"
    )
    size: str | None = Field(
        None, max_length=32, description="'WxH' or an aspect 'W:H'; default: the preset's size"
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1, le=200)
    guidance: float | None = Field(None, ge=0.0, le=30.0, allow_inf_nan=False)
    loras: tuple[LoraChoice, ...] = ()
    batch_size: int = Field(1, ge=1, le=16)
    # img2img: the sha256 of the input image's normalized PNG (engine/input_image.py), which the
    # caller hands to generate(); strength 1.0 redraws everything, 0.3 keeps the composition.
    init_image: str | None = Field(None, pattern=SHA256)
    strength: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    # Provenance, copied into the recipe: what kind of job made it and from which job.
    kind: str | None = Field(None, max_length=16, pattern=r"^[a-z0-9_]+$")
    parent_job: int | None = Field(None, ge=1)
    # The step cache (engine/step_cache.py); default: the preset's. Pinned in stored jobs, because
    # it decides pixels: a rerun draws with the cache the job was drawn with.
    cache: StepCacheField | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        # Cleaned before anything stores it: the DB, the PNG chunks and every echo hold inert text.
        value = clean_text(value).strip()
        if not value:
            raise ValueError("the prompt is empty")
        return value


class ResolvedLora(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    sha256: str
    weight: float


class ResolvedRequest(BaseModel):
    """A request with every default filled in and every bound checked: safe to run."""

    model_config = ConfigDict(frozen=True)

    prompt: str  # as typed
    final_prompt: str  # with LoRA trigger words prepended
    preset: str
    width: int
    height: int
    steps: int
    guidance: float | None
    true_cfg: float
    sampler: str
    seeds: tuple[int, ...]
    loras: tuple[ResolvedLora, ...]
    max_sequence_length: int
    warnings: tuple[str, ...] = ()
    # The preset or LoRAs marked nsfw ("preset 'x'", "LoRA 'y'"): for the bot's channel rule.
    nsfw: tuple[str, ...] = ()
    init_image: str | None = None
    strength: float | None = None  # set exactly when init_image is
    kind: str = "txt2img"
    parent_job: int | None = None
    cache: StepCacheField = NO_CACHE

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one pipeline call."""
        return (
            self.preset,
            self.width,
            self.height,
            self.steps,
            self.guidance,
            self.true_cfg,
            self.max_sequence_length,
            self.loras,
            self.init_image,
            self.strength,
            self.cache,
        )


class Recipe(BaseModel):
    """Everything needed to make the same image again, and to say how it was made."""

    model_config = ConfigDict(frozen=True)

    model: str
    family: str
    variant: str
    model_files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256")
    quant: str
    text_encoder_quant: str
    device: str
    dtype: str
    preset: str
    prompt: str
    final_prompt: str
    width: int
    height: int
    steps: int
    guidance: float | None
    true_cfg: float
    sampler: str
    seed: int
    loras: tuple[ResolvedLora, ...] = ()
    versions: dict[str, str] = Field(default_factory=dict)
    kind: str = "txt2img"
    parent_job: int | None = None
    init_image_sha256: str | None = None
    strength: float | None = None
    kontext_files: dict[str, str] | None = None  # edits: the Kontext transformer's file -> sha256
    # The step cache the job ran with (engine/step_cache.py) and how many of its denoising steps ran
    # the full transformer (None: recipes from before step caching, all of them).
    cache: str = "none"
    computed_steps: int | None = None

    def to_request(self, seed: int | None = None) -> GenerationRequest:
        """The request that repeats this image (or rerolls it with another seed)."""
        return GenerationRequest(
            prompt=self.prompt,
            preset=self.preset,
            size=f"{self.width}x{self.height}",
            seed=self.seed if seed is None else seed,
            steps=self.steps,
            guidance=self.guidance,
            loras=tuple(LoraChoice(name=lo.name, weight=lo.weight) for lo in self.loras),
            init_image=self.init_image_sha256,
            strength=self.strength,
            kind=self.kind if self.kind != "txt2img" else None,
            parent_job=self.parent_job,
            cache=self.cache,
        )


class Timings(BaseModel):
    encode_s: float
    denoise_s: float
    decode_s: float
    total_s: float
    steps: int  # denoising steps run (img2img runs the last `strength` part of the schedule)
    embeds_cached: bool
    computed_steps: int | None = None  # of those, how many ran the full transformer (step caching)


@dataclass(frozen=True)
class StepProgress:
    """Reported after each denoising step."""

    step: int  # 1-based: steps done so far
    total: int
    elapsed_s: float
    # A small JPEG of the picture the model predicts at this step (engine/preview.py), every
    # the engine's `preview` schedule; None on the other steps.
    preview: bytes | None = None


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image]
    seeds: list[int]
    recipes: list[Recipe]
    timings: Timings
    warnings: tuple[str, ...] = ()
