"""LoRAs in the layouts people download (kohya, ComfyUI, XLabs, ai-toolkit), CLIP-L parts included.

Each test writer (tests/layouts.py) is first proven against the diffusers converter that reads its
layout, at FLUX.1's real widths; then files in every layout, written from one tiny-model LoRA, are
drawn through the engine and must match the diffusers-layout original."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.api import GenerationRequest, LoraChoice
from engine.engine import FluxEngine
from engine.errors import LoraError
from engine.lora_layout import _placed_as_diffusers_loads
from engine.settings import EngineSettings
from tests.conftest import pixels
from tests.layouts import lora_to_ai_toolkit, lora_to_comfyui, lora_to_kohya, lora_to_xlabs

LayoutWriter = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
WRITERS: dict[str, LayoutWriter] = {
    "kohya": lora_to_kohya,
    "comfyui": lora_to_comfyui,
    "xlabs": lora_to_xlabs,
    "ai-toolkit": lora_to_ai_toolkit,
}
DOUBLE_ATTENTION = (
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
)
TRANSFORMER_MODULES = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "proj_mlp",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "norm1.linear",
    "norm.linear",
    "x_embedder",
]


def _module_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """component.module -> (A, B), whatever diffusers naming the text-encoder part uses."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    text = {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")}
    flat = {k: v for k, v in state.items() if not k.startswith("text_encoder.")}
    if text:
        peft = convert_state_dict_to_peft(convert_state_dict_to_diffusers(text))
        flat.update({"text_encoder." + k: v for k, v in peft.items()})
    return {
        k.removesuffix(".lora_A.weight"): (v, flat[k.replace(".lora_A.", ".lora_B.")])
        for k, v in flat.items()
        if k.endswith(".lora_A.weight")
    }


def assert_same_change(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Both LoRAs change every layer by the same B @ A (compared on random probes)."""
    got, want = _module_pairs(actual), _module_pairs(expected)
    assert set(got) == set(want)
    for module, (a, b) in want.items():
        probe = torch.randn(a.shape[1], 3, dtype=torch.float64)
        got_a, got_b = got[module]
        torch.testing.assert_close(
            got_b.double() @ (got_a.double() @ probe), b.double() @ (a.double() @ probe), msg=module
        )


def real_width_lora(rank: int = 2, *, attention_only: bool = False) -> dict[str, torch.Tensor]:
    """A LoRA in diffusers' layout on one double and one single block of FLUX.1 at its real widths."""
    width, mlp, clip = 3072, 12288, 768
    shapes: dict[str, tuple[int, int]] = {}
    for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"):
        shapes[f"transformer_blocks.0.{m}"] = (width, width)
    for m in ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"):
        shapes[f"transformer_blocks.0.{m}"] = (width, width)
    if not attention_only:
        shapes |= {
            "transformer_blocks.0.ff.net.0.proj": (width, 4 * width),
            "transformer_blocks.0.ff_context.net.2": (4 * width, width),
            "transformer_blocks.0.norm1.linear": (width, 6 * width),
            "single_transformer_blocks.0.attn.to_q": (width, width),
            "single_transformer_blocks.0.attn.to_k": (width, width),
            "single_transformer_blocks.0.attn.to_v": (width, width),
            "single_transformer_blocks.0.proj_mlp": (width, mlp),
            "single_transformer_blocks.0.proj_out": (width + mlp, width),
            "x_embedder": (64, width),
            "proj_out": (width, 64),
        }
    generator = torch.Generator().manual_seed(7)
    state = {}
    for module, (fan_in, fan_out) in shapes.items():
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator)
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator)
    if not attention_only:
        for module, (fan_in, fan_out) in {
            "text_model.encoder.layers.0.self_attn.q_proj": (clip, clip),
            "text_model.encoder.layers.0.mlp.fc1": (clip, 4 * clip),
        }.items():
            state[f"text_encoder.{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator)
            state[f"text_encoder.{module}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator)
    return state


@pytest.mark.parametrize("layout", ["kohya", "comfyui", "xlabs", "ai-toolkit"])
def test_each_lora_writer_is_what_diffusers_converter_reads_back(layout: str) -> None:
    from diffusers import FluxPipeline

    reference = real_width_lora(attention_only=layout == "xlabs")
    written = WRITERS[layout](reference)

    converted = _placed_as_diffusers_loads(FluxPipeline.lora_state_dict(dict(written)))
    final = "transformer.proj_out.lora_"
    if layout in ("kohya", "comfyui"):
        # diffusers 0.42 reads kohya's final layer without its alpha (a TODO in its converter): the
        # one place where it and the writer disagree, by exactly the alpha the writer wrote.
        a, b = converted.pop(final + "A.weight"), converted.pop(final + "B.weight")
        torch.testing.assert_close(
            b @ a * 2, reference.pop(final + "B.weight") @ reference.pop(final + "A.weight")
        )
    assert_same_change(converted, reference)


def _pipe_at_flux1_width() -> object:
    """FLUX.1's real widths on the meta device (no memory): what the engine's reader needs of a pipe."""
    from types import SimpleNamespace

    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(num_layers=1, num_single_layers=1)
        text_encoder = CLIPTextModel(CLIPTextConfig(num_hidden_layers=1))
    return SimpleNamespace(
        transformer=transformer, text_encoder=text_encoder, lora_state_dict=FluxPipeline.lora_state_dict
    )


@pytest.mark.parametrize("layout", ["kohya", "comfyui"])
def test_the_engine_reads_kohya_and_comfyui_at_flux1_width_like_the_original(layout: str) -> None:
    from engine.lora_layout import _kohya_to_diffusers

    reference = real_width_lora()

    read = _kohya_to_diffusers(WRITERS[layout](reference), _pipe_at_flux1_width(), "x")

    assert_same_change(read, reference)


@pytest.fixture(scope="module")
def layout_loras(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One random LoRA on the tiny model (transformer and CLIP-L), written in every layout, and a
    whitelist naming each file; plus one on the double blocks' attention only, for XLabs."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel

    def diffusers_lora(targets: list[str] | str, with_text: bool, seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
        transformer.add_adapter(
            LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets)
        )
        layers: dict[str, dict[str, torch.Tensor]] = {
            "transformer_lora_layers": get_peft_model_state_dict(transformer)
        }
        if with_text:
            clip = CLIPTextModel.from_pretrained(tiny_dir, subfolder="text_encoder")
            # peft itself: transformers 5's add_adapter wants a newer peft than this install has.
            config = LoraConfig(
                r=4,
                lora_alpha=4,
                init_lora_weights=False,
                target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"],
            )
            inject_adapter_in_model(config, clip, "default")
            # Saved under CLIP's classic names (`text_model.`), as files made with transformers 4 are.
            clip_layers = get_peft_model_state_dict(clip, adapter_name="default")
            layers["text_encoder_lora_layers"] = {"text_model." + k: v for k, v in clip_layers.items()}
        folder = tmp_path_factory.mktemp("saved")
        FluxPipeline.save_lora_weights(folder, **layers, weight_name="lora.safetensors")
        from safetensors.torch import load_file

        # B from peft's random init is small: scaled up so the LoRA changes the picture clearly.
        return {
            k: v * (4.0 if ".lora_B." in k else 1.0)
            for k, v in load_file(folder / "lora.safetensors").items()
        }

    root = tmp_path_factory.mktemp("lora_layouts")
    lora_dir = root / "Lora"
    lora_dir.mkdir()
    full = diffusers_lora(TRANSFORMER_MODULES, with_text=True, seed=11)
    attention = diffusers_lora(DOUBLE_ATTENTION, with_text=False, seed=12)
    files = {"reference": full, "reference_attention": attention}
    files |= {layout: writer(attention if layout == "xlabs" else full) for layout, writer in WRITERS.items()}
    files["kohya_without_clip"] = lora_to_kohya(
        {k: v for k, v in full.items() if k.startswith("transformer.")}
    )
    lines = []
    for name, state in files.items():
        path = lora_dir / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f'[{name}]\nfile = "{name}.safetensors"\nsha256 = "{digest}"\n')
    whitelist = root / "loras.toml"
    whitelist.write_text("\n".join(lines))
    return whitelist, lora_dir


@pytest.fixture(scope="module")
def layout_engine(
    make_settings: Callable[..., EngineSettings], data_dir: Path, layout_loras: tuple[Path, Path]
) -> FluxEngine:
    whitelist, lora_dir = layout_loras
    return FluxEngine.load(
        make_settings(loras_file=whitelist, lora_dir=lora_dir, max_resident_loras=2), data_dir
    )


def _draw(engine: FluxEngine, lora: str | None) -> np.ndarray:
    loras = (LoraChoice(name=lora, weight=1.0),) if lora else ()
    return pixels(engine.generate(GenerationRequest(prompt="a lighthouse", seed=5, loras=loras)).images[0])


@pytest.mark.parametrize("layout", ["kohya", "comfyui", "xlabs", "ai-toolkit"])
def test_a_lora_in_each_layout_draws_like_its_diffusers_original(
    layout_engine: FluxEngine, layout: str
) -> None:
    reference = "reference_attention" if layout == "xlabs" else "reference"
    plain, expected = _draw(layout_engine, None), _draw(layout_engine, reference)

    drawn = _draw(layout_engine, layout)

    assert np.abs(expected - plain).mean() > 2, "the LoRA changes the picture"
    assert np.abs(drawn - expected).max() <= 2, f"{layout} draws like the diffusers-layout LoRA"


def test_the_clip_l_part_of_a_kohya_lora_is_applied(layout_engine: FluxEngine) -> None:
    with_clip, without_clip = _draw(layout_engine, "kohya"), _draw(layout_engine, "kohya_without_clip")

    assert np.abs(with_clip - without_clip).mean() > 1, "the CLIP-L part changes the picture"
    assert any(name.startswith("lora_kohya_") for name in layout_engine.pipe.text_encoder.peft_config)


def _write_lora(folder: Path, name: str, state: dict[str, torch.Tensor]) -> str:
    path = folder / f"{name}.safetensors"
    save_file({k: v.clone() for k, v in state.items()}, path)
    return (
        f'[{name}]\nfile = "{name}.safetensors"\nsha256 = "{hashlib.sha256(path.read_bytes()).hexdigest()}"\n'
    )


def test_loras_that_would_draw_wrong_are_refused_naming_the_problem(
    make_settings: Callable[..., EngineSettings], data_dir: Path, tmp_path: Path
) -> None:
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    cases = {
        # diffusers filters T5 LoRA weights out with a log line: the LoRA would draw without them.
        "t5_part": {
            "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": down,
            "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": up,
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_down.weight": down,
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_up.weight": up,
        },
        # A block this model does not have (a LoRA for a bigger model).
        "other_model": {
            "transformer.transformer_blocks.40.attn.to_q.lora_A.weight": down,
            "transformer.transformer_blocks.40.attn.to_q.lora_B.weight": up,
        },
        # BFL names with peft's lora_A/lora_B: no FLUX.1 reader takes these.
        "unknown_layout": {
            "diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": down,
            "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": up,
        },
        # The CLIP-L part fits, the transformer part does not (diffusers would widen the layer).
        "half_fits": {
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": down,
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": up,
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 999),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": up,
        },
        # kohya's fused linear1 for a model of another width.
        "other_width": {
            "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(4, 32),
            "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(999, 4),
        },
    }
    lines = [_write_lora(lora_dir, name, state) for name, state in cases.items()]
    (lora_dir / "damaged.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    damaged = hashlib.sha256((lora_dir / "damaged.safetensors").read_bytes()).hexdigest()
    lines.append(f'[damaged]\nfile = "damaged.safetensors"\nsha256 = "{damaged}"\n')
    whitelist = tmp_path / "loras.toml"
    whitelist.write_text("\n".join(lines))
    engine = FluxEngine.load(make_settings(loras_file=whitelist, lora_dir=lora_dir), data_dir)
    expected = {
        "t5_part": r"2 of its tensors change layers fluxbot cannot apply \(e\.g\. text_encoders\.t5xxl",
        "other_model": r"name layers this model does not have \(e\.g\. transformer\.transformer_blocks\.40",
        "unknown_layout": r"not a FLUX\.1 LoRA layout fluxbot knows",
        "half_fits": (
            r"made for another model \(transformer\.transformer_blocks\.0\.attn\.to_q\.lora_A\.weight "
            r"takes 999 inputs, the layer 32\)"
        ),
        "other_width": r"linear1 has 999 rows, this model 224",
        "damaged": r"not a readable \.safetensors file",
    }
    plain = _draw(engine, None)

    for name, message in expected.items():
        with pytest.raises(LoraError, match=message):
            _draw(engine, name)

    assert np.array_equal(_draw(engine, None), plain), "a refused LoRA leaves the model as it was"
    assert not getattr(engine.pipe.text_encoder, "peft_config", None)
    assert not any(engine.pipe.get_list_adapters().values())


def test_doctor_names_each_loras_layout_from_its_header(
    make_settings: Callable[..., EngineSettings], data_dir: Path, layout_loras: tuple[Path, Path]
) -> None:
    from engine.doctor import run_doctor

    whitelist, lora_dir = layout_loras
    report = run_doctor(make_settings(loras_file=whitelist, lora_dir=lora_dir), data_dir)
    details = {c.label: (c.status, c.detail) for c in report.checks}

    assert details["lora kohya"][1].endswith("kohya layout")
    assert details["lora comfyui"][1].endswith("ComfyUI layout")
    assert details["lora xlabs"][1].endswith("XLabs layout")
    assert details["lora ai-toolkit"][1].endswith("ai-toolkit/diffusers layout")
    assert all(status == "ok" for status, _ in details.values() if status != "warn")
