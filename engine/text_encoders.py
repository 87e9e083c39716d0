"""The text encoders of single-file checkpoints (CLIP-L and T5-XXL, from Forge/ComfyUI files: fp16,
bf16, fp8, Comfy's fp8_scaled, city96's T5 GGUF) and the tokenizers beside them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.checkpoints import EMBEDDED_PREFIXES
from engine.errors import ModelLoadError
from engine.settings import EngineSettings
from engine.sources import ModelSource

DEFAULT_TOKENIZERS = "black-forest-labs/FLUX.1-dev"
DEFAULT_FLUX2_TOKENIZER = "black-forest-labs/FLUX.2-klein-4B"  # Qwen3's; the same for klein 4B and 9B


def read_prefixed(path: Path, role: str) -> dict[str, torch.Tensor]:
    """The tensors of one embedded component of an all-in-one checkpoint, prefix stripped."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
            for prefix in EMBEDDED_PREFIXES[role]:
                if key.startswith(prefix):
                    out[key[len(prefix) :]] = fh.get_tensor(key)
                    break
    return out


def load_text_encoder(
    role: str, file: Path | None, checkpoint: Path, config_dir: Path, dtype: torch.dtype
) -> Any:
    """CLIP-L or T5-XXL from a Forge/ComfyUI file (fp16, bf16 or fp8 e4m3fn; fp8 is upcast on load)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, CLIPTextModel, T5EncoderModel

    cls = CLIPTextModel if role == "clip_l" else T5EncoderModel
    config = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    with torch.device("meta"):
        model = cls(config)
    if file is not None and file.suffix == ".gguf":
        raw = _read_gguf_text_encoder(file, role, set(model.state_dict()), config)
    else:
        try:
            raw = load_file(str(file)) if file is not None else read_prefixed(checkpoint, role)
        except Exception as exc:
            raise ModelLoadError(f"engine.{role}: {file} is not a readable .safetensors file: {exc}") from exc
    state = upcast(raw, dtype)
    state = _match_keys(state, set(model.state_dict()))
    missing, _ = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith(("position_ids", "embed_tokens.weight"))]
    if missing:
        raise ModelLoadError(
            f"engine.{role}: {file or checkpoint} does not look like a {role} text encoder "
            f"({len(missing)} weights missing, e.g. {missing[0]})"
        )
    if role == "t5xxl" and "encoder.embed_tokens.weight" not in state:
        model.encoder.embed_tokens = model.shared  # tied in T5; files often store it once
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta and name == "position_ids":  # not stored in files: rebuilt, as at init
                module.register_buffer(
                    name, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False
                )
    return model.eval()


def _read_gguf_text_encoder(
    path: Path, role: str, expected: set[str], config: Any
) -> dict[str, torch.Tensor]:
    """city96's T5 encoder GGUF (t5-v1_1-xxl-encoder-Q8_0.gguf...), read with gguf-py and dequantized,
    under the names the model expects: llama.cpp's tensor-name table (gguf-py's, which wrote those
    files) run backwards. Not transformers' own GGUF loader: for T5 v1.1 it sets the gated
    feed-forward but keeps the relu activation, so its embeddings are wrong."""
    import gguf

    if role != "t5xxl":
        # Neither gguf-py's tensor tables nor transformers' GGUF support know a CLIP text layout.
        raise ModelLoadError(
            f"engine.{role}: {path.name}: CLIP-L has no GGUF layout fluxbot (or gguf-py, or transformers) "
            "reads; use clip_l.safetensors (about 250 MB, fp16)"
        )
    try:
        reader = gguf.GGUFReader(str(path))
        architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    except Exception as exc:  # any parser error means the same to the operator
        raise ModelLoadError(f"engine.{role}: {path.name} is not a readable GGUF file: {exc}") from exc
    if architecture not in ("t5encoder", "t5"):
        raise ModelLoadError(f"engine.{role}: {path.name} holds a {architecture!r} model, not a T5 encoder")
    field = reader.fields.get(f"{architecture}.block_count")
    blocks = int(field.parts[-1][0]) if field is not None else config.num_layers
    if blocks != config.num_layers:
        raise ModelLoadError(
            f"engine.{role}: {path.name} has {blocks} blocks, the T5 config {config.num_layers}: "
            "set engine.configs to a folder whose text_encoder_2 config matches it"
        )
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, blocks)
    to_model = {
        gguf_name: key
        for key in expected
        if (gguf_name := names.get_name(key, try_suffixes=(".weight", ".bias"))) is not None
    }
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        key = to_model.get(tensor.name)
        if key is None:
            raise ModelLoadError(f"engine.{role}: {path.name}: unexpected tensor {tensor.name}")
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        state[key] = torch.from_numpy(values.reshape(shape).copy())
    return state


def _match_keys(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """File keys in the layout the model expects: transformers 4 and 5, Comfy's `transformer.` prefix."""
    out = {}
    for key, tensor in state.items():
        bare = key.removeprefix("transformer.")
        for candidate in (bare, bare.removeprefix("text_model."), "text_model." + bare):
            if candidate in expected:
                out[candidate] = tensor
                break
        else:
            out[bare] = tensor
    return out


def upcast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """fp8 files (e4m3fn, Comfy's 'scaled' variant too) become `dtype`; the rest is cast as usual.
    A scale is applied per tensor (one value) or per output row (one per row); any other shape is
    refused: multiplying it in some other way would draw a wrong picture."""
    out = {}
    for key, tensor in state.items():
        if key.endswith((".scale_weight", ".scale_input")) or key == "scaled_fp8":
            continue  # scale_input scales fp8 activations: computing in `dtype` needs none
        scale = state.get(key.removesuffix(".weight") + ".scale_weight") if key.endswith(".weight") else None
        if scale is None:
            out[key] = tensor.to(dtype)
            continue
        wide = tensor.to(torch.float32)
        if scale.numel() == 1:
            factor = scale.reshape(()).to(torch.float32)
        elif scale.numel() == wide.shape[0]:
            factor = scale.reshape(-1, *([1] * (wide.dim() - 1))).to(torch.float32)
        else:
            raise ModelLoadError(
                f"{key}: a scale of shape {tuple(scale.shape)} for a weight of shape {tuple(wide.shape)} "
                "cannot be applied; the file is refused rather than drawn wrong"
            )
        out[key] = (wide * factor).to(dtype)
    return out


def load_tokenizers(settings: EngineSettings, source: ModelSource) -> tuple[Any, Any]:
    """FLUX.1's CLIP and T5 tokenizers, which single files do not carry."""
    clip, t5 = _tokenizers(
        settings,
        source,
        DEFAULT_TOKENIZERS,
        ("tokenizer", "tokenizer_2"),
        "tokenizers not found: set engine.tokenizers to a folder holding tokenizer/ and tokenizer_2/ "
        "(any FLUX.1 diffusers download has them)",
    )
    return clip, t5


def load_flux2_tokenizer(settings: EngineSettings, source: ModelSource) -> Any:
    """Qwen3's tokenizer (with its chat template), which Comfy's text-encoder files do not carry."""
    (qwen,) = _tokenizers(
        settings,
        source,
        DEFAULT_FLUX2_TOKENIZER,
        ("tokenizer",),
        "the Qwen3 tokenizer was not found: set engine.tokenizers to a folder holding tokenizer/ (any "
        "FLUX.2 klein diffusers download has it)",
    )
    return qwen


def _tokenizers(
    settings: EngineSettings, source: ModelSource, default: str, subfolders: tuple[str, ...], missing: str
) -> list[Any]:
    """The tokenizers in `subfolders` of the first place that has them: engine.tokenizers, a models/
    folder's tokenizers/, then the hub repo `default` (its download cache, or the network)."""
    from transformers import AutoTokenizer

    candidates = [settings.tokenizers] if settings.tokenizers else []
    if source.models_dir is not None:
        candidates.append(str(source.models_dir / "tokenizers"))
    candidates.append(default)
    problems = []
    for location in candidates:
        local = Path(location).exists()
        if not local and location != default:
            continue
        try:
            return [
                AutoTokenizer.from_pretrained(location, subfolder=sub, local_files_only=local)
                for sub in subfolders
            ]
        except (OSError, ValueError) as exc:
            problems.append(f"{location}: {str(exc).splitlines()[0][:120]}")
    raise ModelLoadError(missing + (f" [{'; '.join(problems)}]" if problems else ""))
