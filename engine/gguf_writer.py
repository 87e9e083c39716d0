"""Write a transformer state dict as a GGUF file (Q8_0, Q6_K, Q5_0/1, Q4_0/1) with gguf-py.

Real Flux GGUF files come from city96's converter; this makes equivalent files from the tiny and
mid-size random models so the GGUF loading path and the memory figures can be checked offline.
gguf-py's Python quantizers cover Q8_0/Q4_x/Q5_x, not the K-quants: Q6_K (city96's most downloaded
middle size) is packed here, as the exact inverse of gguf-py's own Q6_K reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def write_gguf(
    state_dict: dict[str, torch.Tensor],
    path: Path,
    quant: str = "Q8_0",
    arch: str = "flux",
    names: Mapping[str, str] | None = None,
    keep_float: tuple[str, ...] = (),
    block_count: int | None = None,
) -> Path:
    """Quantize 2-D weights whose rows fit the block size; keep the rest (norms, biases, and names
    containing one of `keep_float`) in F32. `names`: the file's tensor name for each state-dict key
    (keys it lacks are left out); default: the keys as they are, as city96's FLUX files store them."""
    import gguf

    qtype = gguf.GGMLQuantizationType[quant]
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    writer = gguf.GGUFWriter(str(path), arch=arch)
    if block_count is not None:
        writer.add_block_count(block_count)
    for key, tensor in state_dict.items():
        name = key if names is None else names.get(key)
        if name is None:
            continue
        quantizable = not any(part in name for part in keep_float)
        shape = tuple(tensor.shape)
        if quantizable and len(shape) == 2 and shape[-1] % block_size == 0 and name.endswith(".weight"):
            if quant == "Q8_0":  # in torch, on the tensor's device: a 12B model in seconds on a GPU
                packed = quantize_q8_0(tensor)
            else:
                data = tensor.detach().to(torch.float32).cpu().numpy()
                packed = quantize_q6_k(data) if quant == "Q6_K" else gguf.quants.quantize(data, qtype)
            writer.add_tensor(name, packed, raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(tensor.detach().to(torch.float32).cpu().numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantize_q8_0(tensor: torch.Tensor) -> np.ndarray:
    """gguf-py's Q8_0 (ggml's reference: per block of 32, d = max|x| / 127 as fp16, then
    q = roundf(x / d) as int8, round half away from zero), computed in torch: the same bytes."""
    rows, cols = tensor.shape
    blocks = tensor.detach().to(torch.float32).reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    scaled = blocks * inverse
    magnitude = scaled.abs()
    floored = torch.floor(magnitude)
    q = torch.sign(scaled) * (floored + torch.floor(2 * (magnitude - floored)))
    scales = d.to(torch.float16).cpu().numpy().view(np.uint8)
    values = q.to(torch.int8).cpu().numpy().view(np.uint8)
    return np.concatenate([scales, values], axis=1).reshape(rows, cols // 32 * 34)


def quantize_q6_k(data: np.ndarray) -> np.ndarray:
    """ggml's Q6_K: blocks of 256 values in 16 groups of 16, each value 6 bits (`ql` low nibbles,
    `qh` high pairs), an int8 scale per group and one fp16 scale per block: 210 bytes a block.
    Scales are chosen plainly (group max / 31), not with llama.cpp's search; the bytes are laid out
    exactly as ggml reads them."""
    rows = data.reshape(-1, 256).astype(np.float32)
    blocks = rows.shape[0]
    groups = rows.reshape(blocks, 16, 16)
    group_scale = np.abs(groups).max(axis=-1) / 31.0  # (blocks, 16)
    d = (group_scale.max(axis=-1, keepdims=True) / 127.0).astype(np.float16)  # (blocks, 1)
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = np.where(d32 > 0, np.round(group_scale / d32), 0).clip(-128, 127).astype(np.int8)
        step = (d32 * scales.astype(np.float32))[..., None]  # (blocks, 16, 1)
        q = np.where(step > 0, np.round(groups / step), 0)
    q = (q.clip(-32, 31) + 32).astype(np.uint8).reshape(blocks, 256)
    low, high = q & 0x0F, q >> 4
    low = low.reshape(blocks, 2, 2, 64)  # [half, nibble, byte]
    ql = (low[:, :, 0, :] | (low[:, :, 1, :] << 4)).reshape(blocks, 128)
    high = high.reshape(blocks, 2, 4, 32)  # [half, bit pair, byte]
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(
        blocks, 64
    )
    packed = np.concatenate([ql, qh, scales.view(np.uint8), d.view(np.uint8)], axis=1)
    return packed.reshape(*data.shape[:-1], data.shape[-1] // 256 * 210)
