"""What a FLUX.1 transformer file fixes by itself: its key layout (BFL's `double_blocks.*` or
diffusers'), its block counts and its widths. Read from the tensors, as ComfyUI's model detection
does, so pruned variants (Freepik's flux.1-lite drops double blocks) and other widths load without
engine.configs.

BFL-layout files go through diffusers' own converter. diffusers 0.42 splits each single block's
`linear1` at FLUX.1's width (3072) whatever the file holds; for another width that one split is
redone here at the file's width, every other key is the converter's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from engine.errors import ModelLoadError

FLUX1_WIDTH = 3072
BFL_PREFIX = "model.diffusion_model."


def is_bfl_layout(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("double_blocks.", BFL_PREFIX + "double_blocks.")) for k in state)


def bfl_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL keys -> diffusers keys (diffusers' converter, with the single-block split at the file's width)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    state = {k.removeprefix(BFL_PREFIX): v for k, v in state.items()}
    width = state["img_in.weight"].shape[0]
    linear1: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if width != FLUX1_WIDTH:
        for i in sorted({int(k.split(".")[1]) for k in state if k.startswith("single_blocks.")}):
            weight, bias = (
                state[f"single_blocks.{i}.linear1.weight"],
                state[f"single_blocks.{i}.linear1.bias"],
            )
            linear1[i] = (weight, bias)
            # Stand-ins of the shape the converter splits (zero-stride: no memory); replaced below.
            rows = 7 * FLUX1_WIDTH
            state[f"single_blocks.{i}.linear1.weight"] = weight.new_zeros(1, weight.shape[1]).expand(rows, -1)
            state[f"single_blocks.{i}.linear1.bias"] = bias.new_zeros(1).expand(rows)
    converted: dict[str, torch.Tensor] = convert_flux_transformer_checkpoint_to_diffusers(state)
    for i, (weight, bias) in linear1.items():
        sizes = [width, width, width, weight.shape[0] - 3 * width]
        prefix = f"single_transformer_blocks.{i}."
        for name, w, b in zip(
            ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
            torch.split(weight, sizes, dim=0),
            torch.split(bias, sizes, dim=0),
            strict=True,
        ):
            converted[f"{prefix}{name}.weight"], converted[f"{prefix}{name}.bias"] = w.clone(), b.clone()
    return converted


def config_from_weights(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The transformer config values a diffusers-layout state dict fixes."""

    def blocks(prefix: str) -> int:
        return len({k.split(".")[1] for k in state if k.startswith(prefix)})

    width, in_channels = state["x_embedder.weight"].shape
    head_dim = state["transformer_blocks.0.attn.norm_q.weight"].shape[0]
    return {
        "num_layers": blocks("transformer_blocks."),
        "num_single_layers": blocks("single_transformer_blocks."),
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(width // head_dim),
        "in_channels": int(in_channels),
        "joint_attention_dim": int(state["context_embedder.weight"].shape[1]),
        "pooled_projection_dim": int(state["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "guidance_embeds": any(k.startswith("time_text_embed.guidance_embedder.") for k in state),
    }


def write_config_folder(configs: Path, state: dict[str, torch.Tensor], folder: Path) -> Path:
    """`configs`' transformer config with what the weights fix written over it, as a config folder
    (folder/transformer/config.json) for from_single_file."""
    config = json.loads((configs / "transformer" / "config.json").read_text())
    config.update(config_from_weights(state))
    rope = config.get("axes_dims_rope")
    if rope is not None and sum(rope) != config["attention_head_dim"]:
        raise ModelLoadError(
            f"the file's attention heads are {config['attention_head_dim']} wide, the rotary axes of "
            f"{configs} add up to {sum(rope)}: set engine.configs to a diffusers folder made for this model"
        )
    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    return folder
