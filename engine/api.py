"""The engine's typed API: what someone asks for (GenerationRequest, resolved into a DrawSpec by
engine/resolve.py) and what comes back (GenerationResult: images, seeds, recipes, timings)."""

from __future__ import annotations

from dataclasses import dataclass

from PIL.Image import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.spec import MAX_REFERENCES, MAX_SEED, SHA256, DrawSpec, Mode, Sha256, SpecLora, drawn_prompt
from engine.step_cache import StepCache, StepCacheField
from engine.text import clean_text

MAX_PROMPT_CHARS = 2000


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
    # Edits: further reference images after init_image (models that read several: FLUX.2 klein).
    references: tuple[Sha256, ...] = Field((), max_length=MAX_REFERENCES - 1)
    mask: str | None = Field(None, pattern=SHA256)  # "inpaint": the stored mask PNG (white: repaint)
    strength: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    # "edit": a Kontext instruction edit of init_image; default: txt2img, or img2img with an image.
    mode: Mode | None = None
    # The step cache (engine/step_cache.py); default: the preset's.
    cache: StepCacheField | None = None
    # Expand the prompt with the engine's enhancer before drawing; default: the preset's.
    enhance: bool | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        # Cleaned before anything stores it: the DB, the PNG chunks and every echo hold inert text.
        value = clean_text(value).strip()
        if not value:
            raise ValueError("the prompt is empty")
        return value


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
    loras: tuple[SpecLora, ...] = ()
    versions: dict[str, str] = Field(default_factory=dict)
    kind: str = "txt2img"  # how the job came to be: imagine, reroll, vary_subtle, upscale, edit, ...
    parent_job: int | None = None
    init_image_sha256: str | None = None
    reference_sha256s: tuple[str, ...] = ()  # edits: the reference images after the first
    strength: float | None = None
    kontext_files: dict[str, str] | None = None  # edits: the Kontext transformer's file -> sha256
    fill_files: dict[str, str] | None = None  # inpaints: the Fill transformer's file -> sha256
    mask_sha256: str | None = None  # inpaints: the mask's stored PNG
    # Upscales with a model (engine/upscaler.py): its file -> sha256, and what spandrel found in it.
    upscaler_files: dict[str, str] | None = None
    upscaler: str | None = None  # "ESRGAN x4 (64nf, 23nb), tiles of 512 px, bfloat16"
    # The step cache the job ran with (engine/step_cache.py) and how many of its denoising steps ran
    # the full transformer (None: recipes from before step caching, all of them).
    cache: str = "none"
    computed_steps: int | None = None
    # What the engine did (txt2img, img2img, edit) and the T5 sequence length it padded the prompt
    # to: with these a recipe is a whole DrawSpec (None: recipes written before they were recorded).
    mode: Mode | None = None
    max_sequence_length: int | None = None
    # Prompt enhancement (engine/enhancer.py): the expansion the model read in place of `prompt`, or
    # why the prompt was drawn as written although enhancement was asked for (English).
    enhanced_prompt: str | None = None
    enhance_note: str | None = None

    @property
    def drawn_prompt(self) -> str:
        """What the model read."""
        return drawn_prompt(self.prompt, self.final_prompt, self.enhanced_prompt)

    def spec(self) -> DrawSpec:
        """The spec that draws this image again (its own seed, alone): an exact rerun from a PNG."""
        mode = self.mode or (
            "edit" if self.kind == "edit" else "img2img" if self.init_image_sha256 else "txt2img"
        )
        return DrawSpec(
            family="flux3" if self.family == "flux3" else "flux2" if self.family == "flux2" else "flux1",
            mode=mode,
            preset=self.preset,
            prompt=self.prompt,
            final_prompt=self.final_prompt,
            width=self.width,
            height=self.height,
            steps=self.steps,
            guidance=self.guidance,
            true_cfg=self.true_cfg,
            max_sequence_length=self.max_sequence_length or 512,
            seed=self.seed,
            loras=self.loras,
            init_image=self.init_image_sha256,
            references=self.reference_sha256s,
            mask=self.mask_sha256,
            strength=self.strength,
            model_upscale=self.upscaler_files is not None,
            upscaler=next(iter(self.upscaler_files.values())) if self.upscaler_files else None,
            cache=StepCache.parse(self.cache),
            enhance=self.enhanced_prompt is not None,
            enhanced_prompt=self.enhanced_prompt,
            origin=self.kind if self.kind not in ("txt2img", "img2img") else "imagine",
            parent_job=self.parent_job,
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
