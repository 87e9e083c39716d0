"""Write a transformer state dict as a GGUF file (Q8_0, Q4_0, Q5_0/1) with gguf-py.

Real Flux GGUF files come from city96's converter; this makes equivalent files from the tiny and
mid-size random models so the GGUF loading path and the memory figures can be checked offline.
gguf-py's Python quantizers cover Q8_0/Q4_x/Q5_x, not the K-quants.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

QUANT_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


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
        data = tensor.detach().to(torch.float32).cpu().numpy()
        quantizable = not any(part in name for part in keep_float)
        if quantizable and data.ndim == 2 and data.shape[-1] % block_size == 0 and name.endswith(".weight"):
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
