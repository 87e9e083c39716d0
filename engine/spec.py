"""What a job is: one typed spec from the command to the engine and into the database.

`DrawSpec` is a request with every default filled in and every preset bound checked (engine/resolve.py
makes it from what a user typed). The bot stores it as it is, Reroll/Vary/Upscale are copies of it with
a field or two changed, scale-out workers receive it, and the engine draws it checking only its own
hard limits. This module imports neither torch nor discord: the bot process reads it without either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.step_cache import NO_CACHE, StepCacheField

MAX_PIXELS = 4096 * 4096  # beyond any preset: a spec from anywhere is refused past it, not drawn
MAX_SIDE = 8192  # a spec's width and height at most
MAX_SEED = 2**32 - 1  # A1111/Forge seeds are 32-bit; keeping to that makes recipes portable.
SHA256 = r"^[0-9a-f]{64}$"
Family = Literal["flux1", "flux2", "flux3"]
# What the engine does with a spec: draw from text, redraw an input image (img2img: Vary, Upscale,
# image prompts), edit one with an instruction (Kontext, FLUX.2/3 references), repaint the masked
# part of one (FLUX.1 Fill), or only enlarge one with the upscaler model (Upscale without a redraw).
Mode = Literal["txt2img", "img2img", "edit", "inpaint", "upscale"]
Sha256 = Annotated[str, Field(pattern=SHA256)]
MAX_REFERENCES = 10  # what any FLUX edit model takes at most (FLUX.2's limit); each family has its own


class SpecLora(BaseModel):
    """A LoRA as a job uses it: pinned by its file's sha256, at the weight the job asked for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    sha256: str = Field(pattern=SHA256)
    weight: float = Field(ge=-4.0, le=4.0, allow_inf_nan=False)


class DrawSpec(BaseModel):
    """Everything that decides a job's pixels, and where it came from. Immutable: change it with
    `model_copy(update=...)`, which the bot does for rerolls, variations, Vary and Upscale."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: Family
    mode: Mode = "txt2img"
    preset: str = Field(min_length=1, max_length=64)
    prompt: str = Field(min_length=1, max_length=2000)  # as typed (cleaned); what people are shown
    final_prompt: str = Field(min_length=1, max_length=4000)  # what the model reads: trigger words first
    width: int = Field(ge=16, le=MAX_SIDE)
    height: int = Field(ge=16, le=MAX_SIDE)
    steps: int = Field(ge=1, le=200)
    guidance: float | None = Field(None, ge=0.0, le=30.0)  # FLUX.1 dev's distilled guidance
    true_cfg: float = Field(1.0, ge=1.0, le=10.0)
    sampler: Literal["euler"] = "euler"
    max_sequence_length: int = Field(512, ge=16, le=512)
    seed: int = Field(ge=0, le=MAX_SEED)
    batch_size: int = Field(1, ge=1, le=16)  # images, seeds seed, seed + 1, ...
    loras: tuple[SpecLora, ...] = ()
    init_image: str | None = Field(None, pattern=SHA256)  # img2img and edits: the input PNG's sha256
    # Edits with a model that reads several reference images (FLUX.2 klein): the ones after
    # init_image, in the order the user gave them, by the sha256 of their stored PNGs.
    references: tuple[Sha256, ...] = Field((), max_length=MAX_REFERENCES - 1)
    mask: str | None = Field(None, pattern=SHA256)  # inpaint: the mask PNG's sha256 (white: repaint)
    strength: float | None = Field(None, gt=0.0, le=1.0)  # img2img: how much is redrawn
    # Upscale: the input is first enlarged by the engine's upscaler model (engine/upscaler.py), then
    # resized to the spec's size (and redrawn, in img2img). `upscaler` pins the model file's sha256:
    # set when the job is drawn, so a rerun refuses another model instead of drawing other pixels.
    model_upscale: bool = False
    upscaler: str | None = Field(None, pattern=SHA256)
    cache: StepCacheField = NO_CACHE
    # Prompt enhancement (engine/enhancer.py): asked for, and once made, the expansion the model reads
    # in place of `prompt` (trigger words still first). Stored, so a rerun draws it again unasked.
    enhance: bool = False
    enhanced_prompt: str | None = Field(None, min_length=1, max_length=2000)
    # Provenance, copied into the recipe: the bot's job kind (imagine, reroll, upscale, ...) and the
    # job it was made from. Nothing in the engine depends on them.
    origin: str = Field("imagine", max_length=16, pattern=r"^[a-z0-9_]+$")
    parent_job: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _mode_fits_its_inputs(self) -> Self:
        if self.mode == "txt2img" and (self.init_image is not None or self.strength is not None):
            raise ValueError("a txt2img spec has no input image or strength")
        if self.mode == "img2img" and (self.init_image is None or self.strength is None):
            raise ValueError("an img2img spec needs an input image and a strength")
        if self.mode == "edit" and (self.init_image is None or self.strength is not None or self.loras):
            raise ValueError("an edit spec needs an input image, and takes no strength and no LoRAs")
        if self.references and self.mode != "edit":
            raise ValueError("only an edit spec takes more reference images")
        if (self.mode == "inpaint") != (self.mask is not None) or (
            self.mode == "inpaint" and not self.init_image
        ):
            raise ValueError("an inpaint spec has an input image and a mask, and only it has a mask")
        if self.mode == "upscale" and (
            self.init_image is None
            or self.strength is not None
            or not self.model_upscale
            or self.loras
            or self.batch_size != 1
        ):
            raise ValueError(
                "an upscale spec needs an input image and the upscaler, and takes no strength, no LoRAs "
                "and one image"
            )
        if self.model_upscale and self.mode not in ("img2img", "upscale"):
            raise ValueError("only img2img and upscale specs enlarge their input with the upscaler")
        if self.upscaler is not None and not self.model_upscale:
            raise ValueError("an upscaler file belongs to a spec that upscales with it")
        if self.enhanced_prompt is not None and not self.enhance:
            raise ValueError("an enhanced prompt belongs to a spec that asked for enhancement")
        return self

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every input image the spec draws from, in order: init_image, its references, its mask."""
        first = (self.init_image,) if self.init_image else ()
        return first + self.references + ((self.mask,) if self.mask else ())

    @property
    def needs_enhancement(self) -> bool:
        return self.enhance and self.enhanced_prompt is None

    @property
    def extra_model(self) -> str | None:
        """The extra transformer beside the resident model this job runs on (engine/extra_models.py):
        FLUX.1 Kontext for edits, FLUX.1 Fill for inpaints; None: the resident model alone."""
        if self.mode == "inpaint":
            return "fill"
        if self.mode == "edit" and self.family == "flux1":
            return "kontext"
        return None

    @property
    def needs_upscaler_pin(self) -> bool:
        """Upscales with the engine's model before it is known which one: pinned once drawn."""
        return self.model_upscale and self.upscaler is None

    @property
    def drawn_prompt(self) -> str:
        """What the model reads: `final_prompt`, with the enhanced prompt in place of the typed one."""
        return drawn_prompt(self.prompt, self.final_prompt, self.enhanced_prompt)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple((self.seed + i) % (MAX_SEED + 1) for i in range(self.batch_size))

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Specs with equal keys can share one pipeline call (their prompts and seeds may differ)."""
        return (
            self.family,
            self.mode,
            self.width,
            self.height,
            self.steps,
            self.guidance,
            self.true_cfg,
            self.max_sequence_length,
            self.loras,
            self.init_image,
            self.references,
            self.mask,
            self.strength,
            self.model_upscale,
            self.upscaler,
            self.cache,
        )


def drawn_prompt(prompt: str, final_prompt: str, enhanced: str | None) -> str:
    """`final_prompt` is the trigger words, then `prompt` (engine/resolve.py); an enhancement takes
    the place of `prompt` there, after the same trigger words."""
    if enhanced is None:
        return final_prompt
    triggers = final_prompt[: len(final_prompt) - len(prompt)] if final_prompt.endswith(prompt) else ""
    return triggers + enhanced


@dataclass(frozen=True)
class PreviewEvery:
    """How often a job shows the picture forming: every `steps` denoising steps, or else at most
    once per `seconds` (the bot's progress interval: more would never reach Discord)."""

    seconds: float = 1.5
    steps: int | None = None

    def due(self, step_index: int, since_last_s: float) -> bool:
        if self.steps is not None:
            return step_index % self.steps == 0
        return since_last_s >= self.seconds
