"""Quantization as a setting: the auto tiers, refusals that name the fix, and 8-bit running on CPU."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.api import GenerationRequest
from engine.engine import FluxEngine
from engine.errors import QuantizationError
from engine.quant import DeviceInfo, auto_tier, plan_quant
from engine.settings import EngineSettings
from tests.conftest import pixels

CPU = DeviceInfo("cpu", "CPU")


def gpu(free_gb: float, cc: tuple[int, int] = (8, 9)) -> DeviceInfo:
    return DeviceInfo("cuda:0", "GPU", 80.0, free_gb, cc)


@pytest.mark.parametrize(
    ("device", "transformer", "text_encoder", "offload", "tiling"),
    [
        (gpu(40), "bf16", "none", "none", False),
        (gpu(24), "bf16", "none", "none", False),
        (gpu(16, (8, 9)), "fp8dq", "fp8", "none", False),
        (gpu(16, (9, 0)), "fp8dq", "fp8", "none", False),
        (gpu(16, (8, 6)), "int8", "int8", "none", False),
        (gpu(10), "nf4", "nf4", "none", True),
        (gpu(6), "nf4", "nf4", "model", True),
        (CPU, "bf16", "none", "none", False),
    ],
)
def test_auto_picks_the_tier_people_pick_for_their_vram(
    device: DeviceInfo, transformer: str, text_encoder: str, offload: str, tiling: bool
) -> None:
    tier = auto_tier(device)

    assert tier[:4] == (transformer, text_encoder, offload, tiling)
    assert tier[4], "the reason is logged and shown by doctor"


def test_auto_on_cpu_uses_float32_and_says_why() -> None:
    plan = plan_quant(EngineSettings(), CPU, model_is_gguf=False)

    assert plan.dtype == torch.float32 and plan.reason.startswith("CPU")


def test_compile_is_the_operators_choice_and_the_old_boolean_means_regional() -> None:
    assert plan_quant(EngineSettings(compile=True), gpu(40), False).compile == "regional"
    assert plan_quant(EngineSettings(compile="full"), CPU, False).compile == "full"
    assert plan_quant(EngineSettings(compile=False), gpu(40), False).compile == "off"
    assert plan_quant(EngineSettings(), gpu(40), False).compile == "off"


@pytest.mark.parametrize(
    ("device", "says"),
    [
        (CPU, "fp8dq needs an NVIDIA GPU with fp8 tensor cores (sm_89+: Ada, Hopper); on this CPU use quant"),
        (gpu(40, (8, 6)), "this GPU is sm_86: use quant = 'int8' (or 'fp8', weight-only)"),
    ],
)
def test_fp8dq_is_refused_in_one_line_without_fp8_tensor_cores(device: DeviceInfo, says: str) -> None:
    with pytest.raises(QuantizationError, match=re.escape(says)) as refused:
        plan_quant(EngineSettings(quant="fp8dq"), device, model_is_gguf=False)

    assert "\n" not in str(refused.value)


def test_fp8dq_on_an_fp8_gpu_is_torchaos_rowwise_float8_dynamic_config() -> None:
    from engine.quant import transformer_quant_config

    plan = plan_quant(EngineSettings(quant="fp8dq"), gpu(40, (9, 0)), model_is_gguf=False)
    config = transformer_quant_config(plan.transformer, plan.dtype)

    assert plan.transformer == "fp8dq" and plan.text_encoder == "none"
    assert type(config.quant_type).__name__ == "Float8DynamicActivationFloat8WeightConfig"
    assert "PerRow" in repr(config.quant_type.granularity)


def test_gguf_file_decides_its_own_quantization() -> None:
    plan = plan_quant(EngineSettings(), gpu(30), model_is_gguf=True)

    assert plan.transformer == "gguf" and "GGUF" in plan.reason


def test_nf4_on_cpu_is_refused_with_the_alternative() -> None:
    with pytest.raises(QuantizationError, match="nf4 needs bitsandbytes on a CUDA GPU; on CPU use"):
        plan_quant(EngineSettings(quant="nf4"), CPU, model_is_gguf=False)


def test_text_encoder_quant_is_a_separate_setting() -> None:
    plan = plan_quant(EngineSettings(quant="bf16", text_encoder_quant="int8"), gpu(40), False)

    assert (plan.transformer, plan.text_encoder) == ("bf16", "int8")


def test_gguf_quant_without_a_gguf_file_and_fp8_with_one_are_refused() -> None:
    with pytest.raises(QuantizationError, match="needs a .gguf transformer file"):
        plan_quant(EngineSettings(quant="gguf"), CPU, model_is_gguf=False)
    with pytest.raises(QuantizationError, match="quantization is in the file"):
        plan_quant(EngineSettings(quant="fp8"), CPU, model_is_gguf=True)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_8bit_torchao_weights_load_and_generate_on_cpu(
    make_settings: Callable[..., EngineSettings], data_dir: Path, engine: FluxEngine, mode: str
) -> None:
    quantized = FluxEngine.load(make_settings(quant=mode, text_encoder_quant=mode), data_dir)
    request = GenerationRequest(prompt="a cat", seed=9)

    result = quantized.generate(request)
    reference = engine.generate(request)

    weight = quantized.pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__module__.startswith("torchao"), type(weight)
    assert result.recipes[0].quant == mode and result.recipes[0].text_encoder_quant == mode
    assert np.abs(pixels(result.images[0]) - pixels(reference.images[0])).mean() < 20
