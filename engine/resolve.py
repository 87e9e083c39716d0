"""Turn a GenerationRequest into a ResolvedRequest: fill defaults, check preset and whitelist bounds."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from engine.api import MAX_SEED, GenerationRequest, ResolvedLora, ResolvedRequest
from engine.errors import LoraError, RequestError
from engine.hashing import FileHasher
from engine.loras import LoraEntry, LoraWhitelist, default_lora_dir
from engine.presets import Preset, load_presets
from engine.settings import EngineSettings


@dataclass
class RequestResolver:
    """Pure checks, no model needed: the bot validates requests with it before queueing them."""

    presets: dict[str, Preset]
    whitelist: LoraWhitelist
    family: str = "flux1"
    max_loras_per_job: int = 3
    max_batch_size: int = 4

    @property
    def default_preset(self) -> str:
        """The first preset of the presets file that fits the loaded family."""
        for name, preset in self.presets.items():
            if preset.family == self.family:
                return name
        raise RequestError(f"no preset in the presets file is for {self.family} models")

    def family_of(self, preset_name: object) -> str:
        """The model family a stored request needs: its preset's, or the resolver's own."""
        preset = self.presets.get(str(preset_name))
        return preset.family if preset is not None else self.family

    def preset(self, name: str | None) -> Preset:
        if name is None:
            name = self.default_preset
        preset = self.presets.get(name)
        if preset is None:
            raise RequestError(
                f"unknown preset {name[:40]!r}; choose one of: {', '.join(sorted(self.presets))}"
            )
        if preset.family != self.family:
            raise RequestError(f"preset {name} is for {preset.family}, but the loaded model is {self.family}")
        return preset

    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        preset = self.preset(request.preset)
        width, height = (
            (preset.width, preset.height) if request.size is None else preset.parse_size(request.size)
        )
        warnings = []
        if preset.warn_below_megapixels and width * height / 1e6 < preset.warn_below_megapixels:
            warnings.append(
                f"{width}x{height} is below {preset.warn_below_megapixels} MP: {preset.name} often gives "
                "noisy images this small"
            )
        steps = self._steps(preset, request.steps)
        guidance = self._guidance(preset, request.guidance)
        if request.batch_size > self.max_batch_size:
            raise RequestError(
                f"batch size {request.batch_size} is above the maximum of {self.max_batch_size}"
            )
        loras = self._loras(preset, request)
        seed = secrets.randbelow(MAX_SEED + 1) if request.seed is None else request.seed
        seeds = tuple((seed + i) % (MAX_SEED + 1) for i in range(request.batch_size))
        triggers = [
            w for entry, _ in loras for w in entry.trigger_words if w.lower() not in request.prompt.lower()
        ]
        final_prompt = ", ".join([*triggers, request.prompt])
        strength = self._strength(preset, request)
        cache = request.cache if request.cache is not None else preset.cache
        cache.check_family(self.family)
        return ResolvedRequest(
            prompt=request.prompt,
            final_prompt=final_prompt,
            preset=preset.name,
            width=width,
            height=height,
            steps=steps,
            guidance=guidance,
            true_cfg=preset.true_cfg,
            sampler=preset.sampler,
            seeds=seeds,
            loras=tuple(ResolvedLora(name=e.name, sha256=e.sha256, weight=w) for e, w in loras),
            max_sequence_length=preset.max_sequence_length,
            warnings=tuple(warnings),
            nsfw=(f"preset {preset.name!r}",) * preset.nsfw
            + tuple(f"LoRA {entry.name!r}" for entry, _ in loras if entry.nsfw),
            init_image=request.init_image,
            strength=strength,
            kind=request.kind or ("img2img" if request.init_image else "txt2img"),
            parent_job=request.parent_job,
            cache=cache,
        )

    def lora_entries(self, resolved: ResolvedRequest) -> list[tuple[LoraEntry, float]]:
        return [(self.whitelist.get(lo.name), lo.weight) for lo in resolved.loras]

    @staticmethod
    def _steps(preset: Preset, steps: int | None) -> int:
        if steps is None:
            return preset.steps
        lo, hi = preset.steps_range
        if not lo <= steps <= hi:
            raise RequestError(f"steps must be between {lo} and {hi} for preset {preset.name} (got {steps})")
        return steps

    def _strength(self, preset: Preset, request: GenerationRequest) -> float | None:
        if request.kind == "edit":
            # Kontext reads the whole input image beside the picture: no strength, no LoRAs.
            if request.init_image is None:
                raise RequestError("an edit needs an image to edit")
            if request.strength is not None:
                raise RequestError("edits take no strength (Kontext keeps what the instruction leaves alone)")
            if request.loras:
                raise RequestError("edits take no LoRAs")
            return None
        if request.init_image is None:
            if request.strength is not None:
                raise RequestError("strength only applies with an input image")
            return None
        if self.family != "flux1":
            raise RequestError(f"image prompts need a FLUX.1 model (the loaded model is {self.family})")
        if request.strength is None:
            return preset.strength
        lo, hi = preset.strength_range
        # Vary and Upscale strengths are the preset's own and always allowed.
        own = {preset.vary_subtle_strength, preset.vary_strong_strength, preset.upscale_strength}
        if not lo <= request.strength <= hi and request.strength not in own:
            raise RequestError(
                f"strength must be between {lo} and {hi} for preset {preset.name} (got {request.strength})"
            )
        return request.strength

    @staticmethod
    def _guidance(preset: Preset, guidance: float | None) -> float | None:
        if preset.guidance_range is None:
            if guidance is not None:
                raise RequestError(f"preset {preset.name} takes no guidance (it is guidance-distilled)")
            return None
        if guidance is None:
            return preset.guidance
        lo, hi = preset.guidance_range
        if not lo <= guidance <= hi:
            raise RequestError(
                f"guidance must be between {lo} and {hi} for preset {preset.name} (got {guidance})"
            )
        return guidance

    def _loras(self, preset: Preset, request: GenerationRequest) -> list[tuple[LoraEntry, float]]:
        chosen: list[tuple[LoraEntry, float]] = []
        for pl in preset.loras:
            try:
                chosen.append((self.whitelist.get(pl.name), pl.weight))
            except LoraError as exc:
                raise LoraError(
                    f"preset {preset.name} needs LoRA {pl.name!r}, which is not on the whitelist "
                    "(config/loras.toml); an admin must add it"
                ) from exc
        user = [c for c in request.loras if c.name not in {e.name for e, _ in chosen}]
        if len(user) > self.max_loras_per_job:
            raise LoraError(f"at most {self.max_loras_per_job} LoRAs per image (got {len(user)})")
        if len({c.name for c in user}) != len(user):
            raise LoraError("the same LoRA is listed twice")
        for choice in user:
            entry = self.whitelist.get(choice.name)
            if self.family not in entry.families:
                raise LoraError(f"LoRA {entry.name} is for {', '.join(entry.families)}, not {self.family}")
            weight = entry.default_weight if choice.weight is None else choice.weight
            if abs(weight) > entry.max_weight:
                raise LoraError(
                    f"LoRA {entry.name}: weight must be within ±{entry.max_weight} (got {weight})"
                )
            chosen.append((entry, weight))
        return chosen


def build_resolver(
    settings: EngineSettings,
    data_dir: Path,
    family: str = "flux1",
    models_dir: Path | None = None,
    hasher: FileHasher | None = None,
) -> RequestResolver:
    """Presets + whitelist, without a model: checks requests before (or without) loading one."""
    presets = load_presets(settings.presets_path)
    hasher = hasher or FileHasher(data_dir / "hashes.json")
    lora_dir = settings.lora_dir or default_lora_dir(models_dir, data_dir)
    whitelist = LoraWhitelist.load(settings.loras_path, lora_dir, hasher)
    return RequestResolver(presets, whitelist, family, settings.max_loras_per_job, settings.max_batch_size)
