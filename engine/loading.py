"""Build the resident pipeline from a ModelSource and a QuantPlan, using diffusers' own loaders."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from engine import flux2_files
from engine.checkpoints import EMBEDDED_KEY_PREFIXES, inspect_checkpoint, read_layout
from engine.errors import ModelLoadError, QuantizationError
from engine.flux3 import flux3_class, load_flux3, quantize_flux3
from engine.quant import DeviceInfo, QuantPlan, text_encoder_quant_config, transformer_quant_config
from engine.settings import EngineSettings
from engine.sources import ModelSource
from engine.text_encoders import (
    load_flux2_tokenizer,
    load_text_encoder,
    load_tokenizers,
    read_prefixed,
    upcast,
)
from engine.transformer_layout import bfl_to_diffusers, is_bfl_layout, write_config_folder

log = logging.getLogger(__name__)

FLUX1_PIPELINES = {"FluxPipeline"}
FLUX2_PIPELINES = {"Flux2Pipeline", "Flux2KleinPipeline"}


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
    if local and flux3_class(Path(source.location)) is not None:
        return _load_flux3(source, plan)
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


def _load_flux3(source: ModelSource, plan: QuantPlan) -> LoadedModel:
    """FLUX.3 klein (a modular pipeline folder), held as the plan says (flux3.flux3_plan)."""
    pipe, variant = load_flux3(Path(source.location), plan)
    quantize_flux3(pipe, plan)
    model_id = Path(source.location).name if source.kind == "tiny" else source.location
    return LoadedModel(pipe, "flux3", variant, model_id)


def _variant_of(pipe: Any, family: str, class_name: str) -> str:
    if family == "flux2":
        if class_name == "Flux2KleinPipeline":
            return "klein" if pipe.config.is_distilled else "klein-base"
        return "dev"
    return "dev" if pipe.transformer.config.guidance_embeds else "schnell"


def _load_single_file(source: ModelSource, plan: QuantPlan, settings: EngineSettings) -> LoadedModel:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    assert source.transformer is not None
    variant = inspect_checkpoint(source, settings).variant
    if source.family == "flux2":
        return _load_flux2_single_file(source, plan, settings, variant)
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
            else read_prefixed(source.transformer, "vae")
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
    clip = load_text_encoder(
        "clip_l", source.clip_l, source.transformer, common_configs / "text_encoder", plan.dtype
    )
    t5 = load_text_encoder(
        "t5xxl", source.t5xxl, source.transformer, common_configs / "text_encoder_2", plan.dtype
    )
    _quantize_text_encoder(t5, plan)
    tokenizer, tokenizer_2 = load_tokenizers(settings, source)
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


def _quantize_text_encoder(model: Any, plan: QuantPlan) -> None:
    if plan.text_encoder in ("fp8", "int8"):
        from torchao.quantization import quantize_

        quantize_(model, text_encoder_quant_config(plan.text_encoder, plan.dtype).quant_type)
    elif plan.text_encoder == "nf4":
        raise QuantizationError(
            "nf4 text encoders need a diffusers folder; with single files use int8 or fp8"
        )


def _load_flux2_single_file(
    source: ModelSource, plan: QuantPlan, settings: EngineSettings, variant: str
) -> LoadedModel:
    """FLUX.2 klein from ComfyUI's files (engine/flux2_files.py): transformer, Qwen3, VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    assert source.transformer is not None and source.text_encoder is not None and source.vae is not None
    configs = Path(settings.configs) if settings.configs else shipped_flux2_configs()
    log.info("loading %s (FLUX.2 %s, %s)", source.transformer.name, variant, plan.transformer)
    transformer_state = flux2_files.transformer_to_diffusers(_flux2_state(source.transformer, plan.dtype))
    base = json.loads((configs / "transformer" / "config.json").read_text())
    config = flux2_files.transformer_config(transformer_state, base)
    try:
        with tempfile.TemporaryDirectory(prefix="fluxbot-config-") as derived:
            (Path(derived) / "transformer").mkdir()
            (Path(derived) / "transformer" / "config.json").write_text(json.dumps(config))
            transformer = Flux2Transformer2DModel.from_single_file(
                transformer_state,
                config=derived,
                subfolder="transformer",
                dtype=plan.dtype,
                quantization_config=transformer_quant_config(plan.transformer, plan.dtype),
                local_files_only=True,
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(
            f"cannot load {source.transformer.name}: {str(exc).splitlines()[0][:300]}"
        ) from exc
    try:
        vae = flux2_files.load_vae(_flux2_state(source.vae, plan.dtype), configs, plan.dtype, source.vae.name)
    except KeyError as exc:  # a tensor the layout needs is missing: not this layout
        raise ModelLoadError(f"{source.vae.name} is not a FLUX.2 VAE file (no {exc})") from exc
    text_encoder = flux2_files.load_text_encoder(
        _flux2_state(source.text_encoder, plan.dtype), configs, plan.dtype, source.text_encoder.name
    )
    width = 3 * text_encoder.config.hidden_size  # the pipeline stacks three hidden states
    if width != transformer.config.joint_attention_dim:
        raise ModelLoadError(
            f"{source.text_encoder.name} gives {width}-wide prompts, {source.transformer.name} reads "
            f"{transformer.config.joint_attention_dim}: klein 4B takes qwen_3_4b, klein 9B qwen_3_8b"
        )
    _quantize_text_encoder(text_encoder, plan)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(configs), subfolder="scheduler"),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_flux2_tokenizer(settings, source),
        transformer=transformer,
        is_distilled=variant == "klein",
    )
    return LoadedModel(pipe, "flux2", variant, source.transformer.name)


def shipped_flux2_configs() -> Path:
    """The bundled FLUX.2 klein 4B config folder (what the tensors cannot say: rotary axes, rope
    theta, norm epsilons, the scheduler)."""
    return Path(str(resources.files("engine") / "model_configs" / "flux2-klein"))


def _flux2_state(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A FLUX.2 part's tensors, fp8 upcast (Comfy's scaled fp8 with its scales multiplied in); a
    scale scheme fluxbot cannot apply is refused, as for FLUX.1."""
    layout = read_layout(path)
    if (foreign := layout.foreign_scale()) is not None:
        raise ModelLoadError(
            f"{path.name} holds quantization scales fluxbot cannot apply ({foreign}): it would draw "
            "wrong pictures, so it is refused; use a bf16, fp8 (e4m3fn) or fp8_scaled file"
        )
    return upcast(_read_all(path), dtype)


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
    layout = read_layout(path)
    packed_4bit, scaled = layout.has("bnb_4bit"), layout.has("fp8_scaled")
    if (foreign := layout.foreign_scale()) is not None:
        raise ModelLoadError(
            f"{path.name} holds quantization scales fluxbot cannot apply ({foreign}): it would draw "
            "wrong pictures, so it is refused; use a bf16, fp8 (e4m3fn), fp8_scaled or GGUF file"
        )
    if path.suffix == ".safetensors" and not scaled and not packed_4bit:
        return str(path)
    state = _read_all(path)
    if packed_4bit:
        state = dequantize_bnb_4bit(state, dtype, path.name)
    return upcast(state, dtype) if scaled else state


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
