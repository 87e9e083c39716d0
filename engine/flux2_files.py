"""FLUX.2 klein as ComfyUI users download it: the transformer in BFL's layout (`flux-2-klein-4b.
safetensors`, bf16 or fp8, with or without Forge/Comfy's `model.diffusion_model.` prefix), the Qwen3
text encoder (`qwen_3_4b.safetensors`, `qwen_3_8b.safetensors`) and the VAE (`flux2-vae.safetensors`).

Each is read through diffusers' (or transformers') own code for that layout:
- the transformer through diffusers' convert_flux2_transformer_checkpoint_to_diffusers, which does not
  strip the prefix itself (it fails on prefixed keys), so that is done first;
- the VAE through convert_ldm_vae_checkpoint, the converter of FLUX.1's `ae.safetensors` whose names it
  shares, with its quant convs moved out of encoder/decoder and its latent BatchNorm statistics
  (`bn.*`, which the pipeline normalizes latents with) kept: diffusers 0.42 has no single-file loader
  for AutoencoderKLFlux2;
- the text encoder as transformers' Qwen3Model: Comfy's files hold transformers' own Qwen3 names, and
  the pipeline only reads hidden states (layers 9, 18, 27), never the language-model head.
Block counts and widths come from the tensors; what tensors cannot say (rotary axes, rope theta,
norm epsilons, the scheduler) from the config folder (the bundled klein 4B one, or engine.configs).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from engine.errors import ModelLoadError

BFL_PREFIX = "model.diffusion_model."
FLUX2_TAPS = (9, 18, 27)  # Flux2KleinPipeline's hidden-state layers: the encoder needs 28 at least


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(BFL_PREFIX): v for k, v in state.items()}


def transformer_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FLUX.2 transformer's tensors in diffusers' layout, whichever layout the file has."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    state = strip_prefix(state)
    if not any(k.startswith("double_blocks.") for k in state):
        return state  # already diffusers' names
    converted: dict[str, torch.Tensor] = convert_flux2_transformer_checkpoint_to_diffusers(state)
    return converted


def transformer_config(state: dict[str, torch.Tensor], base: dict[str, Any]) -> dict[str, Any]:
    """`base` (a Flux2Transformer2DModel config) with what a diffusers-layout state dict fixes."""

    def blocks(prefix: str) -> int:
        return len({k.split(".")[1] for k in state if k.startswith(prefix)})

    width, in_channels = state["x_embedder.weight"].shape
    head_dim = int(state["transformer_blocks.0.attn.norm_q.weight"].shape[0])
    out_channels = int(state["proj_out.weight"].shape[0])
    config = {
        **base,
        "in_channels": int(in_channels),
        "out_channels": None if out_channels == in_channels else out_channels,
        "num_layers": blocks("transformer_blocks."),
        "num_single_layers": blocks("single_transformer_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": int(width) // head_dim,
        "joint_attention_dim": int(state["context_embedder.weight"].shape[1]),
        "timestep_guidance_channels": int(
            state["time_guidance_embed.timestep_embedder.linear_1.weight"].shape[1]
        ),
        "mlp_ratio": int(state["transformer_blocks.0.ff.linear_out.weight"].shape[1]) / int(width),
        "guidance_embeds": any(k.startswith("time_guidance_embed.guidance_embedder.") for k in state),
    }
    rope = config.get("axes_dims_rope")
    if rope is not None and sum(rope) != head_dim:
        raise ModelLoadError(
            f"the file's attention heads are {head_dim} wide, the rotary axes of the config add up to "
            f"{sum(rope)}: set engine.configs to a diffusers FLUX.2 folder made for this model"
        )
    return config


def vae_to_diffusers(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """BFL's FLUX.2 VAE names (FLUX.1 `ae` names, quant convs inside encoder/decoder, `bn.*`) ->
    AutoencoderKLFlux2's, through diffusers' convert_ldm_vae_checkpoint."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if "decoder.conv_in.weight" in state and "decoder.up_blocks.0.resnets.0.conv1.weight" in state:
        return state  # already diffusers' names
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in ("vae.", "first_stage_model."):
            key = key.removeprefix(prefix)
        key = re.sub(r"^encoder\.quant_conv\.", "quant_conv.", key)
        key = re.sub(r"^decoder\.post_quant_conv\.", "post_quant_conv.", key)
        renamed[key] = value
    converted: dict[str, torch.Tensor] = convert_ldm_vae_checkpoint(renamed, config)
    converted.update({k: v for k, v in renamed.items() if k.startswith("bn.")})
    return converted


def vae_config(state: dict[str, torch.Tensor], base: dict[str, Any]) -> dict[str, Any]:
    """`base` (an AutoencoderKLFlux2 config) with what a BFL-layout VAE file fixes."""
    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")})
    if not levels or "bn.running_mean" not in state:
        raise ModelLoadError("not a FLUX.2 VAE (no encoder.down.* blocks or no bn.running_mean)")
    latent = int(state["decoder.conv_in.weight"].shape[1])
    return {
        **base,
        "block_out_channels": [int(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in levels],
        "layers_per_block": len({k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")}),
        "latent_channels": latent,
        "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in state,
        "use_quant_conv": "encoder.quant_conv.weight" in state,
        "use_post_quant_conv": "decoder.post_quant_conv.weight" in state,
        # The latent BatchNorm covers p x p patches of the latent channels (2x2 x 32 = 128).
        "patch_size": [int((int(state["bn.running_mean"].shape[0]) // latent) ** 0.5)] * 2,
    }


def load_vae(state: dict[str, torch.Tensor], configs: Path, dtype: torch.dtype, name: str) -> Any:
    from diffusers import AutoencoderKLFlux2

    state = {k.removeprefix("vae.").removeprefix("first_stage_model."): v for k, v in state.items()}
    base = json.loads((configs / "vae" / "config.json").read_text())
    config = vae_config(state, base)
    converted = vae_to_diffusers(state, config)
    with torch.device("meta"):
        model = AutoencoderKLFlux2.from_config(config)
    expected = set(model.state_dict())
    if "bn.num_batches_tracked" not in converted and "bn.num_batches_tracked" in expected:
        converted["bn.num_batches_tracked"] = torch.tensor(0)  # a counter BatchNorm keeps; files drop it
    _load_strict(model, converted, dtype, f"VAE file {name}")
    return model


def text_encoder_config(state: dict[str, torch.Tensor], base: dict[str, Any]) -> Any:
    """A Qwen3Config: sizes from the tensors, the rest (rope theta, norm epsilon) from `base`."""
    from transformers import Qwen3Config

    head_dim = int(state["layers.0.self_attn.q_norm.weight"].shape[0])
    embed = state["embed_tokens.weight"]
    layers = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    values = {
        **{k: v for k, v in base.items() if not k.startswith(("_", "architectures", "model_type"))},
        "vocab_size": int(embed.shape[0]),
        "hidden_size": int(embed.shape[1]),
        "intermediate_size": int(state["layers.0.mlp.gate_proj.weight"].shape[0]),
        "num_hidden_layers": layers,
        "num_attention_heads": int(state["layers.0.self_attn.q_proj.weight"].shape[0]) // head_dim,
        "num_key_value_heads": int(state["layers.0.self_attn.k_proj.weight"].shape[0]) // head_dim,
        "head_dim": head_dim,
        "attention_bias": "layers.0.self_attn.q_proj.bias" in state,
    }
    return Qwen3Config(**values)


def load_text_encoder(state: dict[str, torch.Tensor], configs: Path, dtype: torch.dtype, name: str) -> Any:
    """Qwen3 (no language-model head: Flux2KleinPipeline reads only hidden states) from a Comfy file."""
    from transformers import Qwen3Model

    body = {k.removeprefix("model."): v for k, v in state.items() if not k.startswith("lm_head.")}
    if "layers.0.self_attn.q_norm.weight" not in body or "embed_tokens.weight" not in body:
        raise ModelLoadError(f"{name} is not a Qwen3 text encoder (FLUX.2 klein reads Qwen3's hidden states)")
    base = json.loads((configs / "text_encoder" / "config.json").read_text())
    config = text_encoder_config(body, base)
    if config.num_hidden_layers <= max(FLUX2_TAPS):
        raise ModelLoadError(
            f"{name} has {config.num_hidden_layers} layers; FLUX.2 klein reads layer {max(FLUX2_TAPS)}"
        )
    with torch.device("meta"):
        model = Qwen3Model(config)
    _load_strict(model, body, dtype, f"text encoder file {name}")
    # Buffers the file does not hold (rotary frequencies) were made on the meta device: made again.
    model.rotary_emb = type(model.rotary_emb)(config=config)
    return model.eval()


def _load_strict(model: Any, state: dict[str, torch.Tensor], dtype: torch.dtype, what: str) -> None:
    """Every weight the model has, from the file, and nothing left over: a file that fits only in part
    is refused, never drawn with random or missing weights."""
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(cast, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ModelLoadError(
            f"the FLUX.2 {what} file does not fit the model its tensors describe: {' '.join(first[:3])[:300]}"
        ) from exc
