"""A GenerationRequest (what someone typed) into a DrawSpec (what gets drawn): defaults filled in,
preset and whitelist bounds checked. Pure and torch-free: the bot resolves before it stores anything."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace

from engine.api import GenerationRequest
from engine.catalog import Catalog
from engine.errors import LoraError, RequestError
from engine.lora_tags import take_lora_tags
from engine.messages import Message
from engine.presets import Preset
from engine.settings import EngineSettings
from engine.spec import MAX_SEED, DrawSpec, Mode, SpecLora
from engine.whitelist import LoraEntry

# How many images an edit may read, per family: FLUX.1 Kontext one; FLUX.2 klein edits with up to
# four references in the resident model (BFL's klein limit), FLUX.3 klein with up to ten.
EDIT_REFERENCES = {"flux1": 1, "flux2": 4, "flux3": 10}


def reference_count_problem(family: str, count: int) -> Message | None:
    """Why an edit of `count` images is more than this family's model reads, or None."""
    most = EDIT_REFERENCES.get(family, 1)
    if count <= most:
        return None
    if most == 1:
        return Message("FLUX.1 Kontext edits one picture at a time (got {count})", count=count)
    return Message("this model edits with at most {most} images (got {count})", most=most, count=count)


@dataclass(frozen=True)
class Resolution:
    spec: DrawSpec
    warnings: tuple[Message, ...] = ()
    # What is marked nsfw ("preset 'x'", "LoRA 'y'"): for the bot's age-restricted-channel rule.
    nsfw: tuple[Message, ...] = ()


@dataclass(frozen=True)
class RequestResolver:
    """Checks requests against one catalog snapshot; a changed catalog is a new resolver (`with_catalog`)."""

    catalog: Catalog = field(default_factory=Catalog)
    family: str = "flux1"
    max_loras_per_job: int = 3
    max_batch_size: int = 4
    # Whether the engine can enhance prompts (an endpoint is set, or the family has its own upsampler),
    # and edit instructions (FLUX.3's upsampler reads the reference images; an endpoint does not).
    can_enhance: bool = False
    can_enhance_edits: bool = False
    # The loaded model's variant (klein, klein-base, dev...): presets made for other variants are
    # refused. None where it is not known here (a bot whose engines are workers): any.
    variant: str | None = None

    @classmethod
    def from_settings(
        cls, settings: EngineSettings, family: str = "flux1", variant: str | None = None
    ) -> RequestResolver:
        """Presets and whitelist from the settings' files, for a model of `family`."""
        return cls.with_settings(Catalog.load(settings), settings, family, variant)

    @classmethod
    def with_settings(
        cls, catalog: Catalog, settings: EngineSettings, family: str = "flux1", variant: str | None = None
    ) -> RequestResolver:
        return cls(
            catalog,
            family,
            settings.max_loras_per_job,
            settings.max_batch_size,
            can_enhance=settings.prompt_enhancer is not None
            or (settings.prompt_upsampler is not None and family == "flux3"),
            can_enhance_edits=settings.prompt_upsampler is not None and family == "flux3",
            variant=variant,
        )

    def with_catalog(self, catalog: Catalog) -> RequestResolver:
        return replace(self, catalog=catalog)

    @property
    def presets(self) -> dict[str, Preset]:
        return dict(self.catalog.presets)

    @property
    def default_preset(self) -> str:
        """The first preset of the presets file that fits the loaded family (and variant)."""
        for name, preset in self.catalog.presets.items():
            if preset.family == self.family and self._fits_variant(preset):
                return name
        raise RequestError("no preset in the presets file is for {family} models", family=self.family)

    def preset(self, name: str | None) -> Preset:
        if name is None:
            name = self.default_preset
        preset = self.catalog.presets.get(name)
        if preset is None:
            raise RequestError(
                "unknown preset {preset!r}; choose one of: {presets}",
                preset=name[:40],
                presets=", ".join(sorted(self.catalog.presets)),
            )
        if preset.family != self.family:
            raise RequestError(
                "preset {preset} is for {family}, but the loaded model is {loaded}",
                preset=name,
                family=preset.family,
                loaded=self.family,
            )
        if not self._fits_variant(preset):
            raise RequestError(
                "preset {preset} is for {variants}, but the loaded model is {loaded}",
                preset=name,
                variants=", ".join(preset.variants),
                loaded=self.variant,
            )
        return preset

    def _fits_variant(self, preset: Preset) -> bool:
        return not preset.variants or self.variant is None or self.variant in preset.variants

    def resolve(self, request: GenerationRequest) -> Resolution:
        preset = self.preset(request.preset)
        tagged = take_lora_tags(request.prompt, self.catalog.loras)
        if tagged.loras:
            # The tags join the lora option's choices and are checked with them (whitelist, family,
            # weight bounds, max_loras_per_job, the same LoRA twice).
            request = request.model_copy(
                update={"prompt": tagged.text, "loras": (*request.loras, *tagged.loras)}
            )
        width, height = (
            (preset.width, preset.height) if request.size is None else preset.parse_size(request.size)
        )
        warnings: list[Message] = []
        if preset.warn_below_megapixels and width * height / 1e6 < preset.warn_below_megapixels:
            warnings.append(
                Message(
                    "{width}x{height} is below {mp} MP: {preset} often gives noisy images this small",
                    width=width,
                    height=height,
                    mp=preset.warn_below_megapixels,
                    preset=preset.name,
                )
            )
        if request.batch_size > self.max_batch_size:
            raise RequestError(
                "batch size {batch} is above the maximum of {most}",
                batch=request.batch_size,
                most=self.max_batch_size,
            )
        mode = self._mode(request)
        loras = self._loras(preset, request, mode)
        enhance = self._enhance(preset, request.enhance, mode)
        # With enhancement every trigger word leads: the expansion may drop one the user typed.
        triggers = [
            w
            for entry, _ in loras
            for w in entry.trigger_words
            if enhance or w.lower() not in request.prompt.lower()
        ]
        cache = request.cache if request.cache is not None else preset.cache
        cache.check_family(self.family)
        spec = DrawSpec(
            family=preset.family,
            mode=mode,
            preset=preset.name,
            prompt=request.prompt,
            final_prompt=", ".join([*triggers, request.prompt]),
            width=width,
            height=height,
            steps=self._steps(preset, request.steps),
            guidance=self._guidance(preset, request.guidance),
            true_cfg=preset.true_cfg,
            sampler=preset.sampler,
            max_sequence_length=preset.max_sequence_length,
            seed=secrets.randbelow(MAX_SEED + 1) if request.seed is None else request.seed,
            batch_size=request.batch_size,
            loras=tuple(SpecLora(name=e.name, sha256=e.sha256, weight=w) for e, w in loras),
            init_image=request.init_image,
            references=request.references,
            mask=request.mask,
            strength=self._strength(preset, request, mode),
            cache=cache,
            enhance=enhance,
        )
        return Resolution(spec, tuple(warnings), self.nsfw(spec))

    def _enhance(self, preset: Preset, asked: bool | None, mode: Mode) -> bool:
        if mode == "edit" and not self.can_enhance_edits:
            if asked:
                raise RequestError(
                    "edits follow the instruction as written here: only FLUX.3's own prompt upsampler "
                    "(engine.prompt_upsampler) expands an edit"
                )
            return False
        if asked and not self.can_enhance:
            raise RequestError("prompt enhancement is not set up here (an admin sets engine.prompt_enhancer)")
        # A preset's default needs an enhancer too; without one its jobs draw the prompt as typed.
        return asked if asked is not None else preset.enhance and self.can_enhance

    def check(self, request: GenerationRequest, image_coming: bool = False) -> None:
        """Refuse a request before anything slow happens; `image_coming`: an input image will be
        attached once it is read (its strength and the model's family are checked now)."""
        if not image_coming:
            self.resolve(request)
            return
        if self.family != "flux1":
            raise RequestError(
                "image prompts need a FLUX.1 model (the loaded model is {family})", family=self.family
            )
        self._strength(self.preset(request.preset), request, "img2img")
        self.resolve(request.model_copy(update={"strength": None}))

    def nsfw(self, spec: DrawSpec) -> tuple[Message, ...]:
        """The parts of a spec marked nsfw in the catalog now (a stored job's too, on a rerun)."""
        preset = self.catalog.presets.get(spec.preset)
        marked = (
            (Message("preset {preset!r}", preset=spec.preset),) if preset is not None and preset.nsfw else ()
        )
        return marked + tuple(
            Message("LoRA {lora!r}", lora=lo.name)
            for lo in spec.loras
            if (e := self.catalog.loras.get(lo.name)) and e.nsfw
        )

    def check_stored(self, spec: DrawSpec) -> Preset:
        """A stored spec (a rerun, a reroll, a button) is drawn as it is, not resolved again: only what
        an admin may have withdrawn since is checked: its preset, and its LoRAs' whitelist entries."""
        preset = self.preset(spec.preset)
        if spec.family != self.family:
            raise RequestError(
                "that job was drawn by a {family} model; this one is {loaded}",
                family=spec.family,
                loaded=self.family,
            )
        self.catalog.lora_uses(spec)
        return preset

    def _mode(self, request: GenerationRequest) -> Mode:
        if request.mask is not None and request.mode != "inpaint":
            raise RequestError("a mask is for inpainting")
        if request.mode == "inpaint":
            if request.init_image is None or request.mask is None:
                raise RequestError("inpainting needs a picture and a mask")
            if self.family != "flux1":
                raise RequestError(
                    "inpainting needs a FLUX.1 model (this one is {family})", family=self.family
                )
            return "inpaint"
        if request.mode == "edit":
            if request.init_image is None:
                raise RequestError("an edit needs an image to edit")
            if (problem := reference_count_problem(self.family, 1 + len(request.references))) is not None:
                raise RequestError(problem)
            return "edit"
        if request.references:
            raise RequestError("reference images are for edits")
        if request.mode == "txt2img" and request.init_image is not None:
            raise RequestError("text-to-image takes no input image")
        if request.init_image is not None and self.family != "flux1":
            raise RequestError(
                "image prompts need a FLUX.1 model (the loaded model is {family})", family=self.family
            )
        return "img2img" if request.init_image is not None else "txt2img"

    @staticmethod
    def _steps(preset: Preset, steps: int | None) -> int:
        if steps is None:
            return preset.steps
        lo, hi = preset.steps_range
        if not lo <= steps <= hi:
            raise RequestError(
                "steps must be between {lo} and {hi} for preset {preset} (got {steps})",
                lo=lo,
                hi=hi,
                preset=preset.name,
                steps=steps,
            )
        return steps

    @staticmethod
    def _strength(preset: Preset, request: GenerationRequest, mode: Mode) -> float | None:
        if mode == "inpaint":
            if request.strength is not None:
                raise RequestError("inpainting takes no strength (the mask says what is repainted)")
            return None
        if mode == "edit":
            # Kontext reads the whole input image beside the picture: no strength.
            if request.strength is not None:
                raise RequestError("edits take no strength (Kontext keeps what the instruction leaves alone)")
            return None
        if mode == "txt2img":
            if request.strength is not None:
                raise RequestError("strength only applies with an input image")
            return None
        if request.strength is None:
            return preset.strength
        lo, hi = preset.strength_range
        if not lo <= request.strength <= hi:
            raise RequestError(
                "strength must be between {lo} and {hi} for preset {preset} (got {strength})",
                lo=lo,
                hi=hi,
                preset=preset.name,
                strength=request.strength,
            )
        return request.strength

    @staticmethod
    def _guidance(preset: Preset, guidance: float | None) -> float | None:
        if preset.guidance_range is None:
            if guidance is not None:
                raise RequestError(
                    "preset {preset} takes no guidance (it is guidance-distilled)", preset=preset.name
                )
            return None
        if guidance is None:
            return preset.guidance
        lo, hi = preset.guidance_range
        if not lo <= guidance <= hi:
            raise RequestError(
                "guidance must be between {lo} and {hi} for preset {preset} (got {guidance})",
                lo=lo,
                hi=hi,
                preset=preset.name,
                guidance=guidance,
            )
        return guidance

    def _loras(self, preset: Preset, request: GenerationRequest, mode: Mode) -> list[tuple[LoraEntry, float]]:
        if mode in ("edit", "inpaint"):
            # The resident transformer's adapters do not reach Kontext's or Fill's.
            if request.loras:
                raise RequestError("edits and inpainting take no LoRAs")
            return []
        chosen: list[tuple[LoraEntry, float]] = []
        for pl in preset.loras:
            try:
                chosen.append((self.catalog.lora(pl.name), pl.weight))
            except LoraError as exc:
                raise LoraError(
                    "preset {preset} needs LoRA {lora!r}, which is not on the whitelist "
                    "(config/loras.toml); an admin must add it",
                    preset=preset.name,
                    lora=pl.name,
                ) from exc
        user = [c for c in request.loras if c.name not in {e.name for e, _ in chosen}]
        if len(user) > self.max_loras_per_job:
            raise LoraError(
                "at most {most} LoRAs per image (got {count})", most=self.max_loras_per_job, count=len(user)
            )
        if len({c.name for c in user}) != len(user):
            raise LoraError("the same LoRA is listed twice")
        for choice in user:
            entry = self.catalog.lora(choice.name)
            if self.family not in entry.families:
                raise LoraError(
                    "LoRA {lora} is for {families}, not {family}",
                    lora=entry.name,
                    families=", ".join(entry.families),
                    family=self.family,
                )
            weight = entry.default_weight if choice.weight is None else choice.weight
            if abs(weight) > entry.max_weight:
                raise LoraError(
                    "LoRA {lora}: weight must be within ±{most} (got {weight})",
                    lora=entry.name,
                    most=entry.max_weight,
                    weight=weight,
                )
            chosen.append((entry, weight))
        return chosen
