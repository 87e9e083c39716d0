"""Quantization as a setting: probe the device, pick a tier, build diffusers/transformers quant configs."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch

from engine.errors import QuantizationError
from engine.settings import EngineSettings

log = logging.getLogger(__name__)

Offload = Literal["none", "model", "sequential"]
GB = 1024**3


@dataclass(frozen=True)
class DeviceInfo:
    device: str  # "cpu" or "cuda:N"
    name: str
    total_gb: float | None = None
    free_gb: float | None = None
    compute_capability: tuple[int, int] | None = None

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


def probe_device(setting: str) -> DeviceInfo:
    """What `device = auto|cpu|cuda[:N]` means on this host, with free memory when on CUDA."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return DeviceInfo("cpu", "CPU")
    if not torch.cuda.is_available():
        raise QuantizationError(
            f"device {setting!r} asked for, but torch sees no CUDA GPU (torch {torch.__version__})"
        )
    device = torch.device("cuda" if setting == "auto" else setting)
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    return DeviceInfo(
        f"cuda:{index}",
        torch.cuda.get_device_name(index),
        total / GB,
        free / GB,
        torch.cuda.get_device_capability(index),
    )


@dataclass(frozen=True)
class QuantPlan:
    """How the model is held in memory, and why."""

    transformer: str  # bf16 | fp8dq | fp8 | int8 | nf4 | gguf
    text_encoder: str  # none | fp8 | int8 | nf4
    dtype: torch.dtype
    cpu_offload: Offload
    vae_tiling: bool
    compile: str  # off | regional | full
    reason: str

    def describe(self) -> str:
        extras = [f"offload={self.cpu_offload}"] if self.cpu_offload != "none" else []
        extras += ["vae tiling"] if self.vae_tiling else []
        extras += [f"{self.compile} torch.compile"] if self.compile != "off" else []
        te = f", text encoder {self.text_encoder}" if self.text_encoder != "none" else ""
        dtype = str(self.dtype).removeprefix("torch.")
        return f"transformer {self.transformer} ({dtype}){te}" + (f", {', '.join(extras)}" if extras else "")


def _fp8_capable(info: DeviceInfo) -> bool:
    # fp8 via torchao wants Ada/Hopper (sm_89+: fp8 tensor cores); older cards get int8 instead.
    return info.compute_capability is not None and info.compute_capability >= (8, 9)


AutoTier = tuple[str, str, Offload, bool, str]  # transformer, text encoder, offload, VAE tiling, why
HEADROOM_GB = 3.0  # what the weights must leave free: activations at ~1 MP, the VAE, CUDA's own


def sized_tier(
    info: DeviceInfo, transformer_params: int, encoder_params: int, reserved_gb: float = 0.0
) -> AutoTier:
    """`auto` from the model's own sizes: the best tier whose weights fit the free VRAM with
    HEADROOM_GB to spare; the text encoder (run once per prompt) is quantized before the
    transformer; nf4 with model CPU offload when nothing else fits. `reserved_gb`: what else will
    sit on the device beside them (a prompt upsampler)."""
    if not info.is_cuda:
        return auto_tier(info)
    free = (info.free_gb or 0.0) - reserved_gb
    eight = ("fp8dq", "fp8") if _fp8_capable(info) else ("int8", "int8")

    def gb(params: int, bits: float) -> float:
        return params * bits / 8 / 1024**3

    transformer, encoder = transformer_params, encoder_params
    options: list[tuple[str, str, bool, float]] = [
        ("bf16", "none", False, gb(transformer, 16) + gb(encoder, 16)),
        ("bf16", eight[1], False, gb(transformer, 16) + gb(encoder, 8)),
        (eight[0], eight[1], False, gb(transformer, 8) + gb(encoder, 8)),
        (eight[0], "nf4", True, gb(transformer, 8) + gb(encoder, 4.5)),
        ("nf4", "nf4", True, gb(transformer, 4.5) + gb(encoder, 4.5)),  # nf4: 4 bits + block scales
    ]
    for tier, te, tiling, need in options:
        if need + HEADROOM_GB <= free:
            why = f"{free:.1f} GB free: the weights need {need:.1f} GB as {tier} / text encoder {te}"
            return tier, te, "none", tiling, why
    largest = max(gb(transformer, 4.5), gb(encoder, 4.5))
    why = f"{free:.1f} GB free: nf4 with model CPU offload (the largest model needs {largest:.1f} GB)"
    return "nf4", "nf4", "model", True, why


def auto_tier(info: DeviceInfo) -> AutoTier:
    """The tier people pick by hand for this much free VRAM.

    Returns (transformer quant, text encoder quant, offload, VAE tiling, why).
    """
    if not info.is_cuda:
        return (
            "bf16",
            "none",
            "none",
            False,
            "CPU: full-precision float32 weights (quantized kernels are no faster here)",
        )
    free = info.free_gb or 0.0
    if free >= 24:
        return "bf16", "none", "none", False, f"{free:.1f} GB free >= 24 GB: bf16 weights"
    if free >= 12:
        if _fp8_capable(info):
            # float8 activations and weights: fp8 tensor-core matmuls, faster than bf16 (weight-only
            # fp8 only saves memory). The T5 encoder runs once per prompt: weight-only is enough.
            return (
                "fp8dq",
                "fp8",
                "none",
                False,
                f"{free:.1f} GB free (12-24 GB): fp8 dynamic (fp8dq) weights",
            )
        return "int8", "int8", "none", False, f"{free:.1f} GB free (12-24 GB): 8-bit int8 weights"
    if free >= 8:
        return "nf4", "nf4", "none", True, f"{free:.1f} GB free (8-12 GB): 4-bit nf4 + VAE tiling/slicing"
    return (
        "nf4",
        "nf4",
        "model",
        True,
        f"{free:.1f} GB free (< 8 GB): 4-bit nf4 + model CPU offload + VAE tiling",
    )


def plan_quant(
    settings: EngineSettings, info: DeviceInfo, model_is_gguf: bool, auto: AutoTier | None = None
) -> QuantPlan:
    """The plan: the operator's settings, `auto` where they say auto (default: the hand-picked
    tier for this much free VRAM, `auto_tier`)."""
    tier, te, offload, tiling, reason = auto or auto_tier(info)
    transformer: str = settings.quant
    if model_is_gguf:
        if transformer not in ("auto", "gguf"):
            raise QuantizationError(
                f"quant = {transformer!r} but the model is a GGUF file, whose quantization is in the file: "
                "set quant = 'gguf' or 'auto'"
            )
        transformer, reason = "gguf", f"GGUF file (quantized in the file); {reason}"
    elif transformer == "gguf":
        raise QuantizationError("quant = 'gguf' needs a .gguf transformer file as the model")
    elif transformer == "auto":
        transformer = tier
    else:
        reason = f"quant = {transformer} set by the operator"
    text_encoder = te if settings.text_encoder_quant == "auto" else settings.text_encoder_quant
    for mode in {transformer, text_encoder}:
        _check_available(mode, info)
    if settings.cpu_offload != "auto":
        offload = settings.cpu_offload
    if settings.vae_tiling != "auto":
        tiling = settings.vae_tiling == "on"
    dtype = _dtype(settings, info)
    plan = QuantPlan(transformer, text_encoder, dtype, offload, tiling, settings.compile, reason)
    log.info("quantization: %s (%s)", plan.describe(), plan.reason)
    return plan


def _dtype(settings: EngineSettings, info: DeviceInfo) -> torch.dtype:
    if settings.dtype != "auto":
        return getattr(torch, settings.dtype)  # type: ignore[no-any-return]
    return torch.bfloat16 if info.is_cuda else torch.float32


def _check_available(mode: str, info: DeviceInfo) -> None:
    if mode == "nf4":
        if not info.is_cuda:
            raise QuantizationError(
                "nf4 needs bitsandbytes on a CUDA GPU; on CPU use quant = 'int8' or 'bf16'"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise QuantizationError("nf4 needs bitsandbytes: pip install 'fluxbot[cuda]'")
    if mode == "fp8dq" and not _fp8_capable(info):
        need = "fp8dq needs an NVIDIA GPU with fp8 tensor cores (sm_89+: Ada, Hopper)"
        if not info.is_cuda:
            raise QuantizationError(f"{need}; on this CPU use quant = 'int8' or 'bf16'")
        sm = "".join(map(str, info.compute_capability or ()))
        raise QuantizationError(f"{need}; this GPU is sm_{sm}: use quant = 'int8' (or 'fp8', weight-only)")
    if mode in ("fp8dq", "fp8", "int8") and importlib.util.find_spec("torchao") is None:
        raise QuantizationError(f"{mode} needs torchao: pip install 'fluxbot[quant]'")
    if mode == "gguf" and importlib.util.find_spec("gguf") is None:
        raise QuantizationError("GGUF files need the gguf package: pip install gguf")


def transformer_quant_config(mode: str, dtype: torch.dtype) -> Any:
    """A diffusers quantization config for the transformer (None: plain weights in `dtype`)."""
    import diffusers

    if mode == "bf16":
        return None
    if mode == "gguf":
        return diffusers.GGUFQuantizationConfig(compute_dtype=dtype)
    if mode == "nf4":
        return diffusers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    return diffusers.TorchAoConfig(_torchao_config(mode))


def text_encoder_quant_config(mode: str, dtype: torch.dtype) -> Any:
    """A transformers quantization config for the T5 encoder (None: plain weights)."""
    import transformers

    if mode == "none":
        return None
    if mode == "nf4":
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    return transformers.TorchAoConfig(_torchao_config(mode))


def _torchao_config(mode: str) -> Any:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    if mode == "fp8dq":
        # Row-wise scales: what Hugging Face's fast-FLUX recipes use (per-tensor loses detail).
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    return Float8WeightOnlyConfig() if mode == "fp8" else Int8WeightOnlyConfig()
