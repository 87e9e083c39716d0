"""Write a transformer state dict as a GGUF file (Q8_0, Q4_0, Q5_0/1) with gguf-py.

Real Flux GGUF files come from city96's converter; this makes equivalent files from the tiny and
mid-size random models so the GGUF loading path and the memory figures can be checked offline.
gguf-py's Python quantizers cover Q8_0/Q4_x/Q5_x, not the K-quants.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

QUANT_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def write_gguf(state_dict: dict[str, torch.Tensor], path: Path, quant: str = "Q8_0") -> Path:
    """Quantize 2-D weights whose rows fit the block size; keep the rest (norms, biases) in F32."""
    import gguf

    qtype = gguf.GGMLQuantizationType[quant]
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    writer = gguf.GGUFWriter(str(path), arch="flux")
    for name, tensor in state_dict.items():
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if data.ndim == 2 and data.shape[-1] % block_size == 0 and name.endswith(".weight"):
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
