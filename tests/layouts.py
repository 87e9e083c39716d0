"""Test writers for the file layouts people download, each proven against the reader of that layout
(see test_sources: the BFL writer against diffusers' converter)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from engine.gguf_writer import write_gguf


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def diffusers_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict in Black Forest Labs' layout (flux1-dev.safetensors):
    the exact inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers."""
    out: dict[str, torch.Tensor] = {}

    def move(bfl: str, diffusers: str) -> None:
        for kind in ("weight", "bias"):
            if f"{diffusers}.{kind}" in state:
                out[f"{bfl}.{kind}"] = state[f"{diffusers}.{kind}"]

    def fuse(bfl: str, *parts: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{bfl}.{kind}"] = torch.cat([state[f"{p}.{kind}"] for p in parts], dim=0)

    move("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    move("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    move("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    move("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    move("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
    move("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    move("txt_in", "context_embedder")
    move("img_in", "x_embedder")
    doubles = {int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}
    for i in sorted(doubles):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        move(b + "img_mod.lin", d + "norm1.linear")
        move(b + "txt_mod.lin", d + "norm1_context.linear")
        fuse(b + "img_attn.qkv", d + "attn.to_q", d + "attn.to_k", d + "attn.to_v")
        fuse(b + "txt_attn.qkv", d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj")
        out[b + "img_attn.norm.query_norm.scale"] = state[d + "attn.norm_q.weight"]
        out[b + "img_attn.norm.key_norm.scale"] = state[d + "attn.norm_k.weight"]
        out[b + "txt_attn.norm.query_norm.scale"] = state[d + "attn.norm_added_q.weight"]
        out[b + "txt_attn.norm.key_norm.scale"] = state[d + "attn.norm_added_k.weight"]
        move(b + "img_mlp.0", d + "ff.net.0.proj")
        move(b + "img_mlp.2", d + "ff.net.2")
        move(b + "txt_mlp.0", d + "ff_context.net.0.proj")
        move(b + "txt_mlp.2", d + "ff_context.net.2")
        move(b + "img_attn.proj", d + "attn.to_out.0")
        move(b + "txt_attn.proj", d + "attn.to_add_out")
    singles = {int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")}
    for i in sorted(singles):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        move(b + "modulation.lin", d + "norm.linear")
        fuse(b + "linear1", d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp")
        out[b + "norm.query_norm.scale"] = state[d + "attn.norm_q.weight"]
        out[b + "norm.key_norm.scale"] = state[d + "attn.norm_k.weight"]
        move(b + "linear2", d + "proj_out")
    move("final_layer.linear", "proj_out")
    for kind in ("weight", "bias"):  # BFL's AdaLayerNorm is (shift, scale); diffusers' (scale, shift)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(state[f"norm_out.linear.{kind}"])
    return {k: v.contiguous() for k, v in out.items()}


def write_t5_gguf(state: dict[str, torch.Tensor], blocks: int, path: Path, quant: str = "Q8_0") -> None:
    """city96's T5 encoder GGUF layout (t5-v1_1-xxl-encoder-Q8_0.gguf): llama.cpp's tensor names from
    gguf-py's table, arch t5encoder, 2-D weights quantized where their rows fit the block size, the
    relative-attention bias kept in F32, the tied embed_tokens stored once (as token_embd)."""
    import gguf

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, blocks)
    names = {
        key: name
        for key in state
        if key != "encoder.embed_tokens.weight"
        and (name := table.get_name(key, try_suffixes=(".weight", ".bias"))) is not None
    }
    assert len(names) == len(state) - ("encoder.embed_tokens.weight" in state)
    write_gguf(state, path, quant, arch="t5encoder", names=names, keep_float=("rel_b",), block_count=blocks)


def write_forge_nf4(
    transformer: dict[str, torch.Tensor], embedded: dict[str, dict[str, torch.Tensor]], path: Path
) -> dict[str, torch.Tensor]:
    """Forge's all-in-one NF4 layout (flux1-dev-bnb-nf4-v2.safetensors): the BFL transformer under
    `model.diffusion_model.`, its 2-D weights packed by bitsandbytes' quantize_4bit with the quant state
    bitsandbytes itself serialises (QuantState.as_dict(packed=True)), VAE and text encoders embedded
    under their prefixes. Returns the BFL weights the file decodes to (bitsandbytes' dequantize_4bit)."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    from safetensors.torch import save_file

    out: dict[str, torch.Tensor] = {}
    decoded: dict[str, torch.Tensor] = {}
    for key, tensor in diffusers_to_bfl(transformer).items():
        name = "model.diffusion_model." + key
        if key.endswith(".weight") and tensor.dim() == 2:
            packed, state = quantize_4bit(tensor.float(), quant_type="nf4", compress_statistics=True)
            out[name] = packed
            out.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})
            decoded[key] = dequantize_4bit(packed, state)
        else:
            out[name] = tensor
            decoded[key] = tensor.float()
    for prefix, component in embedded.items():
        out.update({prefix + k: v.contiguous() for k, v in component.items()})
    save_file(out, path)
    return decoded


# LoRA layouts. Each writer takes a LoRA in diffusers' layout (`transformer.<module>.lora_A.weight`,
# `text_encoder.<module>.lora_A.weight`, alpha = rank) and writes the same change in another layout:
# the inverse of the diffusers converter that reads it (proven in test_loras).

# diffusers module -> BFL module, per double block / single block / whole model.
_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "norm1.linear": "img_mod.lin",
    "attn.to_add_out": "txt_attn.proj",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "norm1_context.linear": "txt_mod.lin",
}
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
}


def _lora_pairs(state: dict[str, torch.Tensor], prefix: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B) for the keys under prefix."""
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in state.items():
        if key.startswith(prefix) and key.endswith(".lora_A.weight"):
            module = key.removeprefix(prefix).removesuffix(".lora_A.weight")
            pairs[module] = (a, state[key.replace(".lora_A.", ".lora_B.")])
    return pairs


def _fuse(parts: list[tuple[torch.Tensor, torch.Tensor] | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Separate LoRAs of one fused layer as kohya fuses them: downs stacked, ups block-diagonal."""
    assert all(p is not None for p in parts), "a fused layer needs a LoRA on every part"
    present = [p for p in parts if p is not None]
    return torch.cat([a for a, _ in present]), torch.block_diag(*[b for _, b in present])


def _bfl_lora(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """BFL module path -> (down, up) for the transformer part of a diffusers-layout LoRA."""
    pairs = _lora_pairs(state, "transformer.")
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    used: set[str] = set()
    blocks = {
        (kind, int(m.split(".")[1]))
        for m in pairs
        for kind in ("transformer_blocks", "single_transformer_blocks")
        if m.startswith(kind + ".")
    }
    for kind, i in sorted(blocks):
        base, singles, fused = (
            ("double_blocks", _DOUBLE, _DOUBLE_FUSED)
            if kind == "transformer_blocks"
            else ("single_blocks", _SINGLE, _SINGLE_FUSED)
        )
        for diffusers, bfl in singles.items():
            if f"{kind}.{i}.{diffusers}" in pairs:
                out[f"{base}.{i}.{bfl}"] = pairs[f"{kind}.{i}.{diffusers}"]
                used.add(f"{kind}.{i}.{diffusers}")
        for bfl, members in fused.items():
            names = [f"{kind}.{i}.{m}" for m in members]
            if any(n in pairs for n in names):
                out[f"{base}.{i}.{bfl}"] = _fuse([pairs.get(n) for n in names])
                used.update(names)
    for diffusers, bfl in _TOP.items():
        if diffusers in pairs:
            out[bfl] = pairs[diffusers]
            used.add(diffusers)
    assert used == set(pairs), f"no BFL name for {sorted(set(pairs) - used)}"
    return out


def _with_alpha(
    out: dict[str, torch.Tensor], name: str, down: torch.Tensor, up: torch.Tensor, alpha_scale: float
) -> None:
    # alpha / rank scales the product at load: written down / scale so the change is the same.
    rank = down.shape[0]
    out[f"{name}.lora_down.weight"] = (down / alpha_scale).contiguous()
    out[f"{name}.lora_up.weight"] = up.contiguous()
    out[f"{name}.alpha"] = torch.tensor(float(rank * alpha_scale))


def lora_to_kohya(state: dict[str, torch.Tensor], alpha_scale: float = 2.0) -> dict[str, torch.Tensor]:
    """kohya sd-scripts' FLUX.1 layout: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`,
    `.alpha`, CLIP-L under `lora_te1_text_model_encoder_layers_0_self_attn_q_proj`."""
    out: dict[str, torch.Tensor] = {}
    for bfl, (down, up) in _bfl_lora(state).items():
        _with_alpha(out, "lora_unet_" + bfl.replace(".", "_"), down, up, alpha_scale)
    for module, (down, up) in _lora_pairs(state, "text_encoder.").items():
        _with_alpha(out, "lora_te1_" + module.replace(".", "_"), down, up, alpha_scale)
    return out


def lora_to_comfyui(state: dict[str, torch.Tensor], alpha_scale: float = 2.0) -> dict[str, torch.Tensor]:
    """ComfyUI's layout: kohya's tensors under `diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`
    and `text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight`."""
    out: dict[str, torch.Tensor] = {}
    for bfl, (down, up) in _bfl_lora(state).items():
        _with_alpha(out, "diffusion_model." + bfl, down, up, alpha_scale)
    for module, (down, up) in _lora_pairs(state, "text_encoder.").items():
        _with_alpha(out, "text_encoders.clip_l.transformer." + module, down, up, alpha_scale)
    return out


def lora_to_xlabs(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """XLabs' layout (double-block attention only, what XLabs trains): `double_blocks.0.processor.
    qkv_lora1.down.weight` (one down shared by q, k and v), `proj_lora1` for the image stream,
    `qkv_lora2` / `proj_lora2` for the text stream. Separate q/k/v LoRAs of rank r become one of rank
    3r whose up is block-diagonal: the same change."""
    out: dict[str, torch.Tensor] = {}
    bfl = _bfl_lora(state)
    names = {"img_attn.qkv": "qkv_lora1", "img_attn.proj": "proj_lora1", "txt_attn.qkv": "qkv_lora2"}
    names["txt_attn.proj"] = "proj_lora2"
    for module, (down, up) in bfl.items():
        _, index, stream = module.split(".", 2)
        assert module.startswith("double_blocks.") and stream in names, f"XLabs has no place for {module}"
        out[f"double_blocks.{index}.processor.{names[stream]}.down.weight"] = down.contiguous()
        out[f"double_blocks.{index}.processor.{names[stream]}.up.weight"] = up.contiguous()
    assert not _lora_pairs(state, "text_encoder."), "XLabs LoRAs have no text-encoder part"
    return out


def lora_to_ai_toolkit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ostris' ai-toolkit saves diffusers' own layout; its files differ only in metadata."""
    return {k: v.contiguous() for k, v in state.items()}


# FLUX.2 klein as ComfyUI / BFL ship it (proven in test_flux2_files against diffusers' converters).


def diffusers_to_bfl_flux2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Flux2Transformer2DModel state dict in Black Forest Labs' layout (flux-2-klein-4b.
    safetensors): the exact inverse of diffusers' convert_flux2_transformer_checkpoint_to_diffusers.
    FLUX.2 has no biases and shares its modulations across blocks; the single blocks' linear1 stays
    fused in both layouts."""
    out: dict[str, torch.Tensor] = {}

    def move(bfl: str, diffusers: str) -> None:
        for kind in ("weight", "bias"):
            if f"{diffusers}.{kind}" in state:
                out[f"{bfl}.{kind}"] = state[f"{diffusers}.{kind}"]

    def fuse(bfl: str, *parts: str) -> None:
        for kind in ("weight", "bias"):
            if f"{parts[0]}.{kind}" in state:
                out[f"{bfl}.{kind}"] = torch.cat([state[f"{p}.{kind}"] for p in parts], dim=0)

    move("img_in", "x_embedder")
    move("txt_in", "context_embedder")
    move("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1")
    move("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2")
    move("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1")
    move("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2")
    move("double_stream_modulation_img.lin", "double_stream_modulation_img.linear")
    move("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear")
    move("single_stream_modulation.lin", "single_stream_modulation.linear")
    doubles = {int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}
    for i in sorted(doubles):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        fuse(b + "img_attn.qkv", d + "attn.to_q", d + "attn.to_k", d + "attn.to_v")
        fuse(b + "txt_attn.qkv", d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj")
        out[b + "img_attn.norm.query_norm.scale"] = state[d + "attn.norm_q.weight"]
        out[b + "img_attn.norm.key_norm.scale"] = state[d + "attn.norm_k.weight"]
        out[b + "txt_attn.norm.query_norm.scale"] = state[d + "attn.norm_added_q.weight"]
        out[b + "txt_attn.norm.key_norm.scale"] = state[d + "attn.norm_added_k.weight"]
        move(b + "img_attn.proj", d + "attn.to_out.0")
        move(b + "txt_attn.proj", d + "attn.to_add_out")
        move(b + "img_mlp.0", d + "ff.linear_in")
        move(b + "img_mlp.2", d + "ff.linear_out")
        move(b + "txt_mlp.0", d + "ff_context.linear_in")
        move(b + "txt_mlp.2", d + "ff_context.linear_out")
    singles = {int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")}
    for i in sorted(singles):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        move(b + "linear1", d + "attn.to_qkv_mlp_proj")
        move(b + "linear2", d + "attn.to_out")
        out[b + "norm.query_norm.scale"] = state[d + "attn.norm_q.weight"]
        out[b + "norm.key_norm.scale"] = state[d + "attn.norm_k.weight"]
    move("final_layer.linear", "proj_out")
    # BFL's final AdaLayerNorm is (shift, scale); diffusers' (scale, shift).
    out["final_layer.adaLN_modulation.1.weight"] = _swap_halves(state["norm_out.linear.weight"])
    return {k: v.contiguous() for k, v in out.items()}


def diffusers_vae_to_bfl_flux2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An AutoencoderKLFlux2 state dict in BFL's layout (flux2-vae.safetensors): the LDM VAE names of
    FLUX.1's ae.safetensors, the quant convs nested in encoder/decoder, the latent BatchNorm stats at
    bn.*. The inverse of what diffusers' convert_ldm_vae_checkpoint reads (engine/flux2_files.py)."""
    out: dict[str, torch.Tensor] = {}
    up_count = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks."))
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in state.items():
        new = key
        if key.startswith("quant_conv."):
            new = "encoder." + key
        elif key.startswith("post_quant_conv."):
            new = "decoder." + key
        elif key.startswith("bn."):
            new = key
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            block = m[3].replace("conv_shortcut", "nin_shortcut")
            new = f"decoder.up.{up_count - 1 - int(m[1])}.block.{m[2]}.{block}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{up_count - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", key
        ):
            new = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                value = value[:, :, None, None]  # BFL's attention projections are 1x1 convs
        out[new] = value
    return {k: v.contiguous() for k, v in out.items()}
