"""Test writers for the file layouts people download, each proven against the reader of that layout
(see test_sources: the BFL writer against diffusers' converter)."""

from __future__ import annotations

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
