"""Build the resident pipeline from a ModelSource and a QuantPlan, using diffusers' own loaders."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from engine.errors import ModelLoadError, QuantizationError
from engine.quant import DeviceInfo, QuantPlan, text_encoder_quant_config, transformer_quant_config
from engine.settings import EngineSettings
from engine.sources import NO_TEXT_ENCODERS, ModelSource
from engine.transformer_layout import bfl_to_diffusers, is_bfl_layout, write_config_folder

log = logging.getLogger(__name__)

FLUX1_PIPELINES = {"FluxPipeline"}
FLUX2_PIPELINES = {"Flux2Pipeline", "Flux2KleinPipeline"}
DEFAULT_TOKENIZERS = "black-forest-labs/FLUX.1-dev"
# Comfy/Forge all-in-one checkpoints carry these prefixes beside the transformer.
EMBEDDED_PREFIXES = {
    "clip_l": ("text_encoders.clip_l.transformer.", "text_encoders.clip_l."),
    "t5xxl": ("text_encoders.t5xxl.transformer.", "text_encoders.t5xxl."),
    "vae": ("vae.", "first_stage_model."),
}
# Keys of an all-in-one file that belong to other components than the transformer.
EMBEDDED_KEY_PREFIXES = (
    *(p for prefixes in EMBEDDED_PREFIXES.values() for p in prefixes),
    "text_encoders.",
    "conditioner.",
    "cond_stage_model.",
)


@dataclass
class LoadedModel:
    pipe: Any
    family: str  # flux1 | flux2
    variant: str  # dev | schnell | klein | ...
    model_id: str


def shipped_configs(variant: str) -> Path:
    """The bundled diffusers-layout config folder for a FLUX.1 variant (no hub look-up needed)."""
    return Path(str(resources.files("engine") / "model_configs" / f"flux1-{variant}"))


def load_pipeline(
    source: ModelSource, plan: QuantPlan, settings: EngineSettings, device: DeviceInfo
) -> LoadedModel:
    if source.kind == "single_file":
        loaded = _load_single_file(source, plan, settings)
    else:
        loaded = _load_diffusers(source, plan)
    _place(loaded.pipe, plan, device)
    return loaded


def _load_diffusers(source: ModelSource, plan: QuantPlan) -> LoadedModel:
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig

    local = source.kind != "hub"
    try:
        class_name = DiffusionPipeline.load_config(source.location, local_files_only=local)["_class_name"]
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read model_index.json of {source.location}: {exc}") from exc
    if class_name in FLUX1_PIPELINES:
        family, te_key = "flux1", "text_encoder_2"
    elif class_name in FLUX2_PIPELINES:
        family, te_key = "flux2", "text_encoder"
    else:
        raise ModelLoadError(f"{source.location} is a {class_name}, not a FLUX.1 or FLUX.2 pipeline")
    mapping = {}
    if (tq := transformer_quant_config(plan.transformer, plan.dtype)) is not None:
        mapping["transformer"] = tq
    if (eq := text_encoder_quant_config(plan.text_encoder, plan.dtype)) is not None:
        mapping[te_key] = eq
    quant = PipelineQuantizationConfig(quant_mapping=mapping) if mapping else None
    try:
        pipe = DiffusionPipeline.from_pretrained(
            source.location, dtype=plan.dtype, quantization_config=quant, local_files_only=local
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load {source.location}: {exc}") from exc
    variant = _variant_of(pipe, family, class_name)
    return LoadedModel(
        pipe, family, variant, Path(source.location).name if source.kind == "tiny" else source.location
    )


def _variant_of(pipe: Any, family: str, class_name: str) -> str:
    if family == "flux2":
        return "klein" if class_name == "Flux2KleinPipeline" else "dev"
    return "dev" if pipe.transformer.config.guidance_embeds else "schnell"


# Scale tensors of other fp8 schemes (ModelOpt, DeepSeek-style block scales): not applied by the
# loader, so a file carrying them is refused.
UNSUPPORTED_SCALES = ("weight_scale", "input_scale", "weight_scale_inv", ".scale_inv")


def checkpoint_keys(path: Path) -> list[str]:
    """Tensor names of a .safetensors or .gguf file, without loading the tensors."""
    try:
        if path.suffix == ".gguf":
            from gguf import GGUFReader

            return [t.name for t in GGUFReader(str(path)).tensors]
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    except Exception as exc:  # any parser error means the same thing to the operator
        raise ModelLoadError(f"{path.name} is not a readable {path.suffix} checkpoint: {exc}") from exc


def describe_layout(path: Path) -> str:
    """What `fluxbot doctor` says about a transformer file: its layout and what loading will do."""
    keys = checkpoint_keys(path)
    if path.suffix == ".gguf":
        kind = "GGUF (city96), loaded quantized"
    else:
        kind = "BFL layout" if any("double_blocks." in k for k in keys) else "diffusers layout"
        if any(k.endswith(".scale_weight") or k == "scaled_fp8" for k in keys):
            kind += ", fp8_scaled: its per-tensor scales are multiplied in on load"
        if any(k.endswith(".absmax") for k in keys):
            kind += ", bitsandbytes NF4: dequantized on load, then quantized per the plan"
        if path.suffix == ".sft":
            kind += ", .sft (read as safetensors)"
    doubles = {k.split(".")[1] for k in keys if k.startswith(("double_blocks.", "transformer_blocks."))}
    singles = {
        k.split(".")[1] for k in keys if k.startswith(("single_blocks.", "single_transformer_blocks."))
    }
    return f"{kind}; {len(doubles)} double + {len(singles)} single blocks (the config follows the file)"


@dataclass(frozen=True)
class CheckpointFacts:
    variant: str  # dev | schnell
    embedded: dict[str, bool]  # role -> carried inside the checkpoint


def inspect_checkpoint(source: ModelSource, settings: EngineSettings) -> CheckpointFacts:
    """Read a single-file checkpoint's tensor names and refuse what cannot load, before loading anything."""
    assert source.transformer is not None
    keys = checkpoint_keys(source.transformer)
    if any(k.endswith("single_stream_modulation.lin.weight") for k in keys):
        raise ModelLoadError(
            "FLUX.2 single-file checkpoints are not supported: use a FLUX.2 diffusers folder"
        )
    if not any("double_blocks." in k or "transformer_blocks." in k for k in keys):
        raise ModelLoadError(f"{source.transformer.name} does not look like a FLUX transformer checkpoint")
    embedded = {
        role: any(k.startswith(p) for k in keys for p in prefixes)
        for role, prefixes in EMBEDDED_PREFIXES.items()
    }
    lacking = [role for role in ("clip_l", "t5xxl") if getattr(source, role) is None and not embedded[role]]
    if len(lacking) == 2:
        raise ModelLoadError(f"{source.transformer.name}: {NO_TEXT_ENCODERS}")
    if lacking:
        raise ModelLoadError(
            f"{source.transformer.name}: no {lacking[0]} text encoder found (the other one is): "
            f"set engine.{lacking[0]} to its file (.safetensors, or .gguf for T5)"
        )
    if source.vae is None and not embedded["vae"]:
        raise ModelLoadError(f"{source.transformer.name}: no VAE found: set engine.vae to ae.safetensors")
    variant = settings.variant
    if variant == "auto":
        variant = "dev" if any("guidance_in" in k or "guidance_embedder" in k for k in keys) else "schnell"
    return CheckpointFacts(variant, embedded)


def _load_single_file(source: ModelSource, plan: QuantPlan, settings: EngineSettings) -> LoadedModel:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    assert source.transformer is not None
    variant = inspect_checkpoint(source, settings).variant
    configs = Path(settings.configs) if settings.configs else shipped_configs(variant)
    common_configs = Path(settings.configs) if settings.configs else shipped_configs("dev")
    log.info("loading %s (FLUX.1 %s, %s)", source.transformer.name, variant, plan.transformer)
    try:
        with tempfile.TemporaryDirectory(prefix="fluxbot-config-") as derived:
            transformer_input, transformer_configs = transformer_input_for(
                source.transformer, plan.dtype, configs, Path(derived)
            )
            transformer = FluxTransformer2DModel.from_single_file(
                transformer_input,
                config=str(transformer_configs),
                subfolder="transformer",
                dtype=plan.dtype,
                quantization_config=transformer_quant_config(plan.transformer, plan.dtype),
                local_files_only=True,
            )
        vae_checkpoint: Any = (
            _single_file_input(source.vae, plan.dtype)
            if source.vae
            else _read_prefixed(source.transformer, "vae")
        )
        vae = AutoencoderKL.from_single_file(
            vae_checkpoint,
            config=str(common_configs),
            subfolder="vae",
            dtype=plan.dtype,
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        text = str(exc)
        if "ignore_mismatched_sizes" in text or "size mismatch" in text or "shape" in text:
            where = settings.configs or f"the bundled FLUX.1 {variant} config"
            raise ModelLoadError(
                f"{source.transformer.name}: its tensor shapes do not fit {where} (a pruned or resized "
                "variant?): set engine.configs to a diffusers folder whose transformer/config.json "
                f"matches it ({text.splitlines()[0][:160]})"
            ) from exc
        raise ModelLoadError(f"cannot load {source.transformer.name}: {text}") from exc
    clip = _load_text_encoder(
        "clip_l", source.clip_l, source.transformer, common_configs / "text_encoder", plan.dtype
    )
    t5 = _load_text_encoder(
        "t5xxl", source.t5xxl, source.transformer, common_configs / "text_encoder_2", plan.dtype
    )
    if plan.text_encoder in ("fp8", "int8"):
        from torchao.quantization import quantize_

        quantize_(t5, text_encoder_quant_config(plan.text_encoder, plan.dtype).quant_type)
    elif plan.text_encoder == "nf4":
        raise QuantizationError(
            "nf4 text encoders need a diffusers folder; with single files use int8 or fp8"
        )
    tokenizer, tokenizer_2 = _load_tokenizers(settings, source)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(configs), subfolder="scheduler")
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return LoadedModel(pipe, "flux1", variant, source.transformer.name)


def transformer_input_for(
    path: Path, dtype: torch.dtype, configs: Path, scratch: Path
) -> tuple[str | dict[str, torch.Tensor], Path]:
    """The transformer's weights for from_single_file, and the config folder that fits them: the
    file's own block counts and widths over `configs` (see transformer_layout). GGUF files go to
    diffusers' GGUF loader as they are, their config read from the shapes in their header."""
    if path.suffix == ".gguf":
        shapes = _gguf_shapes(path)
        if not is_bfl_layout(shapes):
            return str(path), write_config_folder(configs, shapes, scratch)
        # city96's files keep BFL's names. Read here, still quantized (diffusers' own GGUF reader), so
        # the single-block split happens at the file's width (see transformer_layout); the config
        # comes from the logical shapes, not the packed ones.
        from diffusers.models.model_loading_utils import load_gguf_checkpoint

        quantized = bfl_to_diffusers(load_gguf_checkpoint(str(path)))
        return quantized, write_config_folder(configs, bfl_to_diffusers(shapes), scratch)
    loaded = _single_file_input(path, dtype)
    state = _read_all(path) if isinstance(loaded, str) else loaded
    state = {k: v for k, v in state.items() if not k.startswith(EMBEDDED_KEY_PREFIXES)}
    if is_bfl_layout(state):
        state = bfl_to_diffusers(state)
    return state, write_config_folder(configs, state, scratch)


def _gguf_shapes(path: Path) -> dict[str, torch.Tensor]:
    """A GGUF file's tensors as meta tensors of their logical shapes: nothing decoded or read."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises plain ValueErrors and numpy errors for damaged files
        raise ModelLoadError(f"{path.name} is not a readable GGUF file: {exc}") from exc
    # GGUF lists dimensions innermost first.
    return {
        t.name: torch.empty(tuple(int(n) for n in reversed(t.shape)), device="meta") for t in reader.tensors
    }


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        state: dict[str, torch.Tensor] = load_file(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a readable safetensors file: {exc}") from exc
    return state


def _single_file_input(path: Path, dtype: torch.dtype) -> str | dict[str, torch.Tensor]:
    """What diffusers' from_single_file gets: the path, or the state dict when diffusers would read
    the file wrong: `.sft` (BFL's first uploads; diffusers picks the reader by suffix and would
    torch.load it) and fp8 files with Comfy's per-tensor scales (diffusers drops the `.scale_weight`
    tensors and draws a wrong picture), whose scales are multiplied in here."""
    if path.suffix == ".gguf":
        return str(path)
    keys = checkpoint_keys(path)
    packed_4bit = any(k.endswith(".absmax") for k in keys)
    scaled = any(k.endswith(".scale_weight") or k == "scaled_fp8" for k in keys)
    foreign = [k for k in keys if k.endswith(UNSUPPORTED_SCALES)]
    if foreign:
        raise ModelLoadError(
            f"{path.name} holds quantization scales fluxbot cannot apply ({foreign[0]}): it would draw "
            "wrong pictures, so it is refused; use a bf16, fp8 (e4m3fn), fp8_scaled or GGUF file"
        )
    if path.suffix == ".safetensors" and not scaled and not packed_4bit:
        return str(path)
    state = _read_all(path)
    if packed_4bit:
        state = dequantize_bnb_4bit(state, dtype, path.name)
    return _upcast(state, dtype) if scaled else state


# The tensors bitsandbytes stores beside each packed 4-bit weight (QuantState.as_dict(packed=True)).
BNB_STATE_SUFFIXES = (
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "quant_state.bitsandbytes__nf4",
    "quant_state.bitsandbytes__fp4",
)


def dequantize_bnb_4bit(
    state: dict[str, torch.Tensor], dtype: torch.dtype, name: str
) -> dict[str, torch.Tensor]:
    """Forge's NF4 files (flux1-dev-bnb-nf4-v2.safetensors): every packed 4-bit weight decoded with
    bitsandbytes' own QuantState.from_dict and dequantize_4bit (exact, CPU too). The result is
    quantized again per the plan (nf4 on CUDA, the CPU tier elsewhere); the other tensors pass."""
    try:
        from bitsandbytes.functional import QuantState, dequantize_4bit
    except ImportError as exc:
        raise ModelLoadError(
            f"{name} is a bitsandbytes NF4 file: install bitsandbytes "
            "(pip install 'fluxbot[quant]') to read it"
        ) from exc
    packed = [k.removesuffix(".absmax") for k in state if k.endswith(".absmax")]
    out = dict(state)
    for weight in packed:
        parts = {s: out.pop(f"{weight}.{s}") for s in BNB_STATE_SUFFIXES if f"{weight}.{s}" in out}
        try:
            quant_state = QuantState.from_dict(parts, device=torch.device("cpu"))
            out[weight] = dequantize_4bit(out[weight], quant_state).to(dtype)
        except Exception as exc:  # a layout bitsandbytes cannot read: refused, never drawn wrong
            raise ModelLoadError(f"{name}: {weight} cannot be decoded as bitsandbytes 4-bit ({exc})") from exc
    return out


def _read_prefixed(path: Path, role: str) -> dict[str, torch.Tensor]:
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


def _load_text_encoder(
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
            raw = load_file(str(file)) if file is not None else _read_prefixed(checkpoint, role)
        except Exception as exc:
            raise ModelLoadError(f"engine.{role}: {file} is not a readable .safetensors file: {exc}") from exc
    state = _upcast(raw, dtype)
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


def _upcast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
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


def _load_tokenizers(settings: EngineSettings, source: ModelSource) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    candidates = [settings.tokenizers] if settings.tokenizers else []
    if source.models_dir is not None:
        candidates.append(str(source.models_dir / "tokenizers"))
    candidates.append(DEFAULT_TOKENIZERS)
    problems = []
    for location in candidates:
        local = Path(location).exists()
        if not local and location != DEFAULT_TOKENIZERS:
            continue
        try:
            return (
                AutoTokenizer.from_pretrained(location, subfolder="tokenizer", local_files_only=local),
                AutoTokenizer.from_pretrained(location, subfolder="tokenizer_2", local_files_only=local),
            )
        except (OSError, ValueError) as exc:
            problems.append(f"{location}: {str(exc).splitlines()[0][:120]}")
    raise ModelLoadError(
        "tokenizers not found: set engine.tokenizers to a folder holding tokenizer/ and tokenizer_2/ "
        "(any FLUX.1 diffusers download has them)" + (f" [{'; '.join(problems)}]" if problems else "")
    )


def _place(pipe: Any, plan: QuantPlan, device: DeviceInfo) -> None:
    if plan.cpu_offload == "model":
        pipe.enable_model_cpu_offload(device=device.device)
    elif plan.cpu_offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device.device)
    else:
        pipe.to(device.device)
    if plan.vae_tiling:
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
