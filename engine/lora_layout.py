"""LoRA files in the layouts people download, read into diffusers' layout before they load.

Civitai and Hugging Face carry FLUX.1 LoRAs in four layouts: kohya sd-scripts (`lora_unet_*`,
`lora_te1_*`, with `.alpha`), ComfyUI (the same tensors under `diffusion_model.*` and
`text_encoders.clip_l.transformer.*`), XLabs (`double_blocks.N.processor.qkv_lora1.*`) and
ai-toolkit / diffusers (`transformer.*.lora_A.weight`). diffusers' own converters read all four; two
things are done here around them:

- kohya and ComfyUI fuse each single block's q, k, v and MLP into one `linear1`; diffusers 0.42
  splits it at FLUX.1's width (3072) whatever the model is. Those tensors are split here at the
  width of the model in memory (the same split, sparse or dense, with alpha folded in), the rest
  goes through the converter.
- diffusers drops keys it cannot place (T5 LoRA weights, norm `diff`s, unknown kohya modules) with
  at most a log line, and ignores names the model lacks: the LoRA would then draw wrong. Such a
  file is refused here, naming what could not be placed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from engine.errors import LoraError


class LoraLayout(StrEnum):
    KOHYA = "kohya"
    COMFYUI = "ComfyUI"
    XLABS = "XLabs"
    DIFFUSERS = "ai-toolkit/diffusers"


_KOHYA_LINEAR1 = re.compile(r"^lora_unet_single_blocks_(\d+)_linear1$")
# kohya module -> (diffusers module, up halves swapped); diffusers 0.42 loads these without alpha.
_FINAL_LAYER = {
    "lora_unet_final_layer_linear": ("proj_out", False),
    "lora_unet_final_layer_adaLN_modulation_1": ("norm_out.linear", True),
}
# Every module diffusers' kohya converter places (diffusers 0.42); anything else it would drop.
_KOHYA_MODULE = re.compile(
    r"^(?:"
    r"lora_unet_double_blocks_\d+_(?:img|txt)_(?:attn_proj|attn_qkv|mlp_0|mlp_2|mod_lin)"
    r"|lora_unet_single_blocks_\d+_(?:linear1|linear2|modulation_lin)"
    r"|lora_unet_(?:guidance_in|time_in|vector_in)_(?:in|out)_layer"
    r"|lora_unet_(?:img_in|txt_in|final_layer_linear|final_layer_adaLN_modulation_1)"
    r"|lora_te1?_text_model_encoder_layers_\d+_(?:self_attn_(?:q|k|v|out)_proj|mlp_fc[12])"
    r")\.(?:lora_down\.weight|lora_up\.weight|alpha)$"
)
_PEFT_SUFFIX = re.compile(r"\.(?:lora_[AB]|lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?$")


def lora_layout(keys: Iterable[str]) -> LoraLayout:
    names = list(keys)
    if any(k.startswith("diffusion_model.") or k.startswith("text_encoders.") for k in names) and any(
        ".lora_down." in k for k in names
    ):
        return LoraLayout.COMFYUI
    if any(".lora_down.weight" in k for k in names):
        return LoraLayout.KOHYA
    if any(".processor." in k for k in names):
        return LoraLayout.XLABS
    if any(k.startswith(("transformer.", "text_encoder.")) for k in names):
        return LoraLayout.DIFFUSERS
    sample = ", ".join(sorted(names)[:2]) or "no tensors"
    raise LoraError(f"not a FLUX.1 LoRA layout fluxbot knows ({sample})")


@dataclass(frozen=True)
class LoraTensors:
    """One LoRA file, read: `transformer` goes to `pipe.load_lora_weights` (diffusers' layout, any
    `.alpha` kept for it), `text_encoder` is in peft's names for the CLIP-L in memory, alpha folded."""

    layout: LoraLayout
    transformer: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]


def read_lora(path: Path, pipe: Any, name: str) -> LoraTensors:
    """The file's tensors, ready to load; refused if any of them would be lost or misplaced."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise LoraError(f"LoRA {name}: not a readable .safetensors file ({exc.__class__.__name__})") from exc
    if not _is_flux1(pipe):
        # FLUX.2 LoRAs have layouts of their own, read by diffusers' FLUX.2 converters as they are.
        return LoraTensors(LoraLayout.DIFFUSERS, state, {})
    try:
        layout = lora_layout(state)
    except LoraError as exc:
        raise LoraError(f"LoRA {name}: {exc}") from None
    if layout in (LoraLayout.KOHYA, LoraLayout.COMFYUI):
        converted, alphas = _kohya_to_diffusers(state, pipe, name), {}
    else:
        converted, alphas = pipe.lora_state_dict(dict(state), return_alphas=True)
        alphas = alphas or {}
    stray = sorted(k for k in converted if not k.startswith(("transformer.", "text_encoder.")))
    if stray:
        raise LoraError(
            f"LoRA {name}: {len(stray)} of its tensors belong to no part of FLUX.1 (e.g. {stray[0]})"
        )
    transformer = {k: v for k, v in converted.items() if k.startswith("transformer.")}
    transformer |= {k: v for k, v in alphas.items() if k.startswith("transformer.")}
    text = _text_encoder_part(converted, alphas, pipe.text_encoder, name)
    layers = {k: v for k, v in transformer.items() if not k.endswith(".alpha")}
    _refuse_unplaced("transformer", layers, pipe.transformer, name)
    _refuse_unplaced("text_encoder", text, pipe.text_encoder, name)
    return LoraTensors(layout, transformer, text)


def _text_encoder_part(
    converted: dict[str, torch.Tensor], alphas: dict[str, Any], text_encoder: Any, name: str
) -> dict[str, torch.Tensor]:
    """The CLIP-L tensors under peft's names (as diffusers' text-encoder loader renames them, and
    without `text_model.` where transformers 5 dropped it), each module's alpha / rank folded in."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    text = {k.removeprefix("text_encoder."): v for k, v in converted.items() if k.startswith("text_encoder.")}
    if not text:
        return {}
    if text_encoder is None:
        raise LoraError(f"LoRA {name}: it changes CLIP-L, and this model has no CLIP-L text encoder")
    try:
        peft: dict[str, torch.Tensor] = convert_state_dict_to_peft(convert_state_dict_to_diffusers(text))
    except ValueError:
        raise LoraError(f"LoRA {name}: its text-encoder part is in a layout fluxbot cannot read") from None
    if not hasattr(text_encoder, "text_model"):
        peft = {k.removeprefix("text_model."): v for k, v in peft.items()}
    for key, alpha in alphas.items():
        if key.startswith("text_encoder.") and key.endswith(".alpha"):
            module = key.removeprefix("text_encoder.").removesuffix(".alpha")
            module = module if hasattr(text_encoder, "text_model") else module.removeprefix("text_model.")
            down = peft.get(f"{module}.lora_A.weight")
            if down is not None:
                peft[f"{module}.lora_A.weight"] = down * (float(alpha) / down.shape[0])
    return peft


def _is_flux1(pipe: Any) -> bool:
    singles = getattr(pipe.transformer, "single_transformer_blocks", None)
    return singles is not None and len(singles) > 0 and hasattr(singles[0], "proj_mlp")


def _kohya_to_diffusers(state: dict[str, torch.Tensor], pipe: Any, name: str) -> dict[str, torch.Tensor]:
    named = {_kohya_name(k): v for k, v in state.items()}
    unknown = sorted(k for k, v in named.items() if not _KOHYA_MODULE.match(k) and bool(v.any()))
    if unknown:
        raise LoraError(
            f"LoRA {name}: {len(unknown)} of its tensors change layers fluxbot cannot apply "
            f"(e.g. {unknown[0]}); refusing it rather than drawing without them"
        )
    modules: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in named.items():
        module, _, part = key.partition(".")
        if _KOHYA_LINEAR1.match(module) or module in _FINAL_LAYER:
            modules.setdefault(module, {})[part] = tensor
        elif _KOHYA_MODULE.match(key):
            rest[key] = tensor
    converted = _placed_as_diffusers_loads(dict(pipe.lora_state_dict(rest))) if rest else {}
    for module, parts in sorted(modules.items()):
        down, up = _alpha_folded(parts, module, name)
        if module in _FINAL_LAYER:
            target, swap = _FINAL_LAYER[module]
            if swap:  # BFL's final modulation is (shift, scale); diffusers' norm_out is (scale, shift)
                up = torch.cat(up.chunk(2, dim=0)[::-1])
            converted[f"transformer.{target}.lora_A.weight"] = down
            converted[f"transformer.{target}.lora_B.weight"] = up.contiguous()
        else:
            converted.update(_split_linear1(module, down, up, pipe.transformer, name))
    return converted


def _alpha_folded(
    parts: dict[str, torch.Tensor], module: str, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with kohya's alpha / rank folded into A, as diffusers' converter does elsewhere."""
    if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
        raise LoraError(f"LoRA {name}: {module} lacks its down or up tensor")
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    rank = down.shape[0]
    alpha = float(parts["alpha"].item()) if "alpha" in parts else float(rank)
    return (down * (alpha / rank)).contiguous(), up


def _placed_as_diffusers_loads(converted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Two gaps in diffusers 0.42's kohya converter, closed: it leaves `img_in`, `txt_in` and the
    time/vector/guidance embedders without the `transformer.` prefix (the loader then skips them),
    and names CLIP-L attention in diffusers' old layout (`to_q_lora`), which its text-encoder
    loader reads only when `out_proj` is there too. Both are renamed to diffusers' current layout.
    (The third gap, `final_layer` loaded without its alpha, is read in `_kohya_to_diffusers`.)"""
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft

    out: dict[str, torch.Tensor] = {}
    text: dict[str, torch.Tensor] = {}
    for key, tensor in converted.items():
        if key.startswith("text_encoder."):
            text[key.removeprefix("text_encoder.")] = tensor
        elif key.startswith("transformer."):
            out[key] = tensor
        else:
            out["transformer." + key] = tensor
    if text:
        peft = convert_state_dict_to_peft(text, original_type=StateDictType.DIFFUSERS_OLD)
        out.update({"text_encoder." + k: v for k, v in peft.items()})
    return out


def _kohya_name(key: str) -> str:
    """A ComfyUI key under kohya's name (as diffusers' converter renames it)."""
    for comfy, kohya in (
        ("diffusion_model.", "lora_unet_"),
        ("text_encoders.clip_l.transformer.", "lora_te_"),
    ):
        if key.startswith(comfy):
            module, _, tail = key.removeprefix(comfy).partition(".lora_")
            if not tail:
                module, _, tail = module.rpartition(".")
                return kohya + module.replace(".", "_") + "." + tail
            return kohya + module.replace(".", "_") + ".lora_" + tail
    return key


def _split_linear1(
    module: str, down: torch.Tensor, up: torch.Tensor, transformer: Any, name: str
) -> dict[str, torch.Tensor]:
    """One fused `linear1` LoRA as four diffusers LoRAs (q, k, v, proj_mlp) at the model's widths."""
    match = _KOHYA_LINEAR1.match(module)
    assert match is not None
    index = int(match.group(1))
    singles = transformer.single_transformer_blocks
    if index >= len(singles):
        raise LoraError(f"LoRA {name}: it changes single block {index}; this model has {len(singles)}")
    block = singles[index]
    targets = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    dims = [block.attn.to_q.out_features, block.attn.to_k.out_features, block.attn.to_v.out_features]
    dims.append(block.proj_mlp.out_features)
    if sum(dims) != up.shape[0]:
        raise LoraError(
            f"LoRA {name}: single block {index} linear1 has {up.shape[0]} rows, this model {sum(dims)}: "
            "it was made for another model"
        )
    out: dict[str, torch.Tensor] = {}
    keys = [f"transformer.single_transformer_blocks.{index}.{t}" for t in targets]
    for key, (a, b) in zip(keys, _fused_parts(down, up, dims), strict=True):
        out[key + ".lora_A.weight"] = a.contiguous()
        out[key + ".lora_B.weight"] = b.contiguous()
    return out


def _fused_parts(
    down: torch.Tensor, up: torch.Tensor, dims: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) per split. A block-diagonal `up` (kohya's own fusing of separate LoRAs) keeps each
    part's rank; otherwise every part shares the whole `down`."""
    splits = len(dims)
    ups = torch.split(up, dims, dim=0)
    if down.shape[0] % splits == 0:
        part_rank = down.shape[0] // splits
        owned = [slice(j * part_rank, (j + 1) * part_rank) for j in range(splits)]
        sparse = all(
            not bool(ups[j][:, owned[k]].any()) for j in range(splits) for k in range(splits) if j != k
        )
        if sparse:
            return [(down[owned[j]], ups[j][:, owned[j]]) for j in range(splits)]
    return [(down, part) for part in ups]


def _refuse_unplaced(component: str, tensors: dict[str, torch.Tensor], module: Any, name: str) -> None:
    """Every tensor must name a layer of the model in memory (diffusers and peft skip the rest) and
    fit its shape (diffusers would otherwise widen the resident layer, as for Flux Control LoRAs)."""
    if not tensors:
        return
    layers = dict(module.named_modules())
    unplaced, misfit = [], []
    for key, tensor in sorted(tensors.items()):
        layer = layers.get(_PEFT_SUFFIX.sub("", key.removeprefix(component + ".")))
        if layer is None:
            unplaced.append(key)
        elif ".lora_A." in key and tensor.shape[-1] != getattr(layer, "in_features", tensor.shape[-1]):
            misfit.append(f"{key} takes {tensor.shape[-1]} inputs, the layer {layer.in_features}")
        elif ".lora_B." in key and tensor.shape[0] != getattr(layer, "out_features", tensor.shape[0]):
            misfit.append(f"{key} gives {tensor.shape[0]} outputs, the layer {layer.out_features}")
    if unplaced:
        raise LoraError(
            f"LoRA {name}: {len(unplaced)} of its tensors name layers this model does not have "
            f"(e.g. {unplaced[0]}); it was made for another model or a layout fluxbot cannot read"
        )
    if misfit:
        raise LoraError(f"LoRA {name}: made for another model ({misfit[0]})")
