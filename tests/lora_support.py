"""Random LoRA files for the tiny model and whitelist files naming them (shared by the LoRA tests)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def make_lora(
    tiny_dir: Path,
    folder: Path,
    name: str,
    seed: int,
    targets: tuple[str, ...] = ATTENTION,
    rank: int = 4,
    alpha: float | None = None,
) -> Path:
    """A random LoRA for the tiny transformer, made with peft and saved the way diffusers saves LoRAs
    (alpha = rank unless given: diffusers then stores no alphas)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    transformer.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            init_lora_weights=False,
            target_modules=list(targets),
        )
    )
    folder.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        weight_name=f"{name}.safetensors",
    )
    return folder / f"{name}.safetensors"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def whitelist_toml(entries: dict[str, dict[str, object]]) -> str:
    lines = []
    for name, fields in entries.items():
        lines.append(f"[{name}]")
        for key, value in fields.items():
            rendered = repr(value).replace("'", '"') if not isinstance(value, float) else str(value)
            lines.append(f"{key} = {rendered}")
    return "\n".join(lines) + "\n"
