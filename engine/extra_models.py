"""FLUX.1's extra transformers beside the resident model: Kontext instruction edits ("make it night")
and Fill inpainting (repaint the masked part of a picture).

Kontext [dev] and Fill [dev] are FLUX.1 transformers of the resident one's architecture: Kontext reads
the input image's latents next to the picture's, Fill reads the masked picture's latents and the mask
as extra input channels (384 = 64 + 64 + 256). Only the transformer differs, so it is the one extra
thing loaded (`engine.kontext` / `engine.fill`: a diffusers folder, a single .safetensors/.sft file in
BFL or diffusers layout, a city96 GGUF, or "tiny" for an offline random one), quantized per the same
plan as the main transformer, and diffusers' FluxKontextPipeline / FluxFillPipeline is built around it
with the resident VAE, text encoders, tokenizers and scheduler: no second copy of any of them.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import ConfigError, ModelLoadError
from engine.hashing import FileHasher
from engine.quant import DeviceInfo, QuantPlan, transformer_quant_config
from engine.tiny import save_atomically

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtraKind:
    """One kind of extra transformer: its setting, its pipeline, and how its input differs."""

    name: str  # kontext | fill: the setting engine.<name>, the recipe's file prefix
    pipeline: str  # the diffusers pipeline class built around it
    input_factor: int  # its in_channels over the resident transformer's (Fill: latents, masked, mask)
    seed: int  # of its tiny random version


KONTEXT = ExtraKind("kontext", "FluxKontextPipeline", 1, 20250626)
FILL = ExtraKind("fill", "FluxFillPipeline", 6, 20250627)


@dataclass(frozen=True)
class ExtraModel:
    pipe: Any  # the kind's pipeline, sharing everything but its transformer with the resident pipeline
    files: dict[str, str]  # the extra transformer's file name(s) -> sha256, for recipes


def build_tiny(kind: ExtraKind, directory: Path, like: Any) -> Path:
    """A random transformer of `kind` shaped like the tiny model's (`like`), saved as a diffusers folder."""
    from diffusers import FluxTransformer2DModel

    if (directory / "transformer" / "config.json").is_file():
        return directory
    log.info("building the tiny random-weight %s transformer in %s", kind.name, directory)
    torch.manual_seed(kind.seed)
    in_channels = like.config.in_channels
    transformer = FluxTransformer2DModel.from_config(
        {**like.config, "in_channels": in_channels * kind.input_factor, "out_channels": in_channels}
    )
    return save_atomically(directory, lambda tmp: transformer.save_pretrained(tmp / "transformer"))


def load_extra(
    kind: ExtraKind,
    where: str,
    base: Any,
    plan: QuantPlan,
    device: DeviceInfo,
    data_dir: Path,
    hasher: FileHasher,
    configs: Path | None = None,
    place: str | None = None,
) -> ExtraModel:
    """The `kind` transformer from `where`, and its pipeline around the resident components; its
    transformer on `place` (default: the engine's device; "cpu" for one that is swapped in)."""
    import diffusers
    from diffusers import FluxTransformer2DModel

    if plan.cpu_offload != "none":
        raise ConfigError(
            f'engine.{kind.name} with CPU offload is not supported yet: set engine.cpu_offload = "none" '
            f"(a GPU that holds both transformers), or leave engine.{kind.name} unset"
        )
    if where == "tiny":
        path = build_tiny(kind, data_dir / "models" / f"tiny-{kind.name}", base.transformer)
    else:
        path = Path(where).expanduser()
        if not path.exists():
            raise ConfigError(f"engine.{kind.name}: {path} does not exist")
    try:
        if path.is_dir():
            folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
            transformer = FluxTransformer2DModel.from_pretrained(
                folder,
                dtype=plan.dtype,
                quantization_config=transformer_quant_config(plan.transformer, plan.dtype),
                local_files_only=True,
            )
            weights = sorted(folder.glob("*.safetensors"))
            files = {f"{kind.name}/{p.name}": hasher.sha256(p) for p in weights}
        else:
            transformer = _single_file(path, plan, configs)
            files = {f"{kind.name}/{path.name}": hasher.sha256(path)}
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(
            f"engine.{kind.name}: cannot load {path.name}: {str(exc).splitlines()[0][:200]}"
        ) from exc
    if transformer.config.in_channels != base.transformer.config.in_channels * kind.input_factor:
        raise ModelLoadError(
            f"engine.{kind.name}: {path.name} is not a FLUX.1 {kind.name} transformer of this model's "
            f"latents ({transformer.config.in_channels} input channels)"
        )
    transformer.to(place or device.device)
    pipe = getattr(diffusers, kind.pipeline)(
        scheduler=base.scheduler,
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    log.info("%s: %s loaded beside the resident model", kind.name, path.name)
    return ExtraModel(pipe, files)


def _single_file(path: Path, plan: QuantPlan, configs: Path | None) -> Any:
    """A single-file extra transformer, read like the main one (BFL or diffusers layout, fp8,
    fp8_scaled, GGUF; block counts and widths from the file) over engine.configs or the bundled
    FLUX.1 dev config."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    from engine.loading import shipped_configs, transformer_input_for

    quant = (
        GGUFQuantizationConfig(compute_dtype=plan.dtype)
        if path.suffix == ".gguf"
        else transformer_quant_config(plan.transformer if plan.transformer != "gguf" else "bf16", plan.dtype)
    )
    with tempfile.TemporaryDirectory(prefix="fluxbot-extra-") as scratch:
        weights, folder = transformer_input_for(
            path, plan.dtype, configs or shipped_configs("dev"), Path(scratch)
        )
        return FluxTransformer2DModel.from_single_file(
            weights,
            config=str(folder),
            subfolder="transformer",
            dtype=plan.dtype,
            quantization_config=quant,
            local_files_only=True,
        )


class ExtraSwap:
    """engine.extra_models = "swap": at most one extra transformer on the GPU. The idle one waits in
    CPU RAM; a job that needs the other moves this one out and that one in (the seconds are logged)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.on_device: ExtraModel | None = None
        self.swaps = 0
        self.last_swap_s: float | None = None

    def bring(self, extra: ExtraModel) -> None:
        if self.on_device is extra:
            return
        started = time.perf_counter()
        if self.on_device is not None:
            self.on_device.pipe.transformer.to("cpu")
        extra.pipe.transformer.to(self.device)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.on_device = extra
        self.swaps += 1
        self.last_swap_s = time.perf_counter() - started
        log.info("extra transformer swapped onto %s in %.2f s", self.device, self.last_swap_s)


def extra_policy(setting: str, device: DeviceInfo, extra_bytes: int) -> str:
    """resident or swap: `auto` keeps the extras resident on a CPU (nothing to swap to) or where the
    GPU's free memory holds them with 2 GB to spare, and swaps them otherwise."""
    if setting != "auto":
        return setting
    if not device.is_cuda or device.free_gb is None:
        return "resident"
    return "resident" if device.free_gb * 1024**3 >= extra_bytes + 2 * 1024**3 else "swap"
