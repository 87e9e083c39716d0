"""FLUX.1 Kontext instruction edits ("make it night") beside the resident model.

Kontext [dev] is a FLUX.1 transformer of the same architecture trained to read the input image's
latents next to the picture's: only the transformer differs. So it is the one extra thing loaded
(`engine.kontext`: a diffusers folder, a single .safetensors/.sft file in BFL or diffusers layout, a
city96 GGUF, or "tiny" for the offline random model), quantized per the same plan as the main
transformer, and diffusers' FluxKontextPipeline is built around it with the resident VAE, text
encoders, tokenizers and scheduler: no second copy of any of them.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import ConfigError, ModelLoadError
from engine.hashing import FileHasher
from engine.quant import DeviceInfo, QuantPlan, transformer_quant_config

log = logging.getLogger(__name__)
TINY_KONTEXT_SEED = 20250626


@dataclass(frozen=True)
class KontextModel:
    pipe: Any  # FluxKontextPipeline sharing everything but its transformer with the resident pipeline
    files: dict[str, str]  # the Kontext transformer's file name(s) -> sha256, for recipes


def build_tiny_kontext(directory: Path, like: Any) -> Path:
    """A random Kontext transformer shaped like the tiny model's (`like`), saved as a diffusers folder."""
    from diffusers import FluxTransformer2DModel

    if (directory / "transformer" / "config.json").is_file():
        return directory
    log.info("building the tiny random-weight Kontext transformer in %s", directory)
    torch.manual_seed(TINY_KONTEXT_SEED)
    transformer = FluxTransformer2DModel.from_config(like.config)
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    transformer.save_pretrained(tmp / "transformer")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp.replace(directory)
    return directory


def load_kontext(
    where: str,
    base: Any,
    plan: QuantPlan,
    device: DeviceInfo,
    data_dir: Path,
    hasher: FileHasher,
    configs: Path | None = None,
) -> KontextModel:
    """The Kontext transformer from `where`, and its pipeline around the resident components."""
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel

    if plan.cpu_offload != "none":
        raise ConfigError(
            'engine.kontext with CPU offload is not supported yet: set engine.cpu_offload = "none" '
            "(a GPU that holds both transformers), or leave engine.kontext unset"
        )
    if where == "tiny":
        path = build_tiny_kontext(data_dir / "models" / "tiny-kontext", base.transformer)
    else:
        path = Path(where).expanduser()
        if not path.exists():
            raise ConfigError(f"engine.kontext: {path} does not exist")
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
            files = {f"kontext/{p.name}": hasher.sha256(p) for p in weights}
        else:
            transformer = _single_file(path, plan, configs)
            files = {f"kontext/{path.name}": hasher.sha256(path)}
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(
            f"engine.kontext: cannot load {path.name}: {str(exc).splitlines()[0][:200]}"
        ) from exc
    if transformer.config.in_channels != base.transformer.config.in_channels:
        raise ModelLoadError(
            f"engine.kontext: {path.name} is not a FLUX.1 transformer of this model's latents"
        )
    transformer.to(device.device)
    pipe = FluxKontextPipeline(
        scheduler=base.scheduler,
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    log.info("Kontext edits: %s loaded beside the resident model", path.name)
    return KontextModel(pipe, files)


def _single_file(path: Path, plan: QuantPlan, configs: Path | None) -> Any:
    """A single-file Kontext transformer, read like the main one (BFL or diffusers layout, fp8,
    fp8_scaled, GGUF; block counts and widths from the file) over engine.configs or the bundled
    FLUX.1 dev config."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    from engine.loading import shipped_configs, transformer_input_for

    quant = (
        GGUFQuantizationConfig(compute_dtype=plan.dtype)
        if path.suffix == ".gguf"
        else transformer_quant_config(plan.transformer if plan.transformer != "gguf" else "bf16", plan.dtype)
    )
    with tempfile.TemporaryDirectory(prefix="fluxbot-kontext-") as scratch:
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
