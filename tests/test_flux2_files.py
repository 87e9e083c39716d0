"""FLUX.2 klein from the files ComfyUI users download (transformer in BFL's layout, bf16 or fp8, with
or without `model.diffusion_model.`; `qwen_3_4b`; `flux2-vae`), written by writers proven against
diffusers' own converters, drawing what the diffusers folder draws."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import flux2_files
from engine.api import GenerationRequest
from engine.engine import FluxEngine
from engine.errors import ModelLoadError
from engine.settings import EngineSettings
from engine.sources import locate_model
from engine.tiny import ensure_tiny_model
from tests.conftest import pixels
from tests.layouts import diffusers_to_bfl_flux2, diffusers_vae_to_bfl_flux2

REQUEST = GenerationRequest(prompt="a red cat on a blue sofa", seed=5)


@pytest.fixture(scope="module")
def flux2_dir(data_dir: Path) -> Path:
    return ensure_tiny_model(data_dir / "models" / "tiny-flux2", "flux2")


def _component(folder: Path, cls_name: str, subfolder: str) -> torch.nn.Module:
    import diffusers
    import transformers

    cls = getattr(diffusers, cls_name, None) or getattr(transformers, cls_name)
    return cls.from_pretrained(folder, subfolder=subfolder)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def comfy(flux2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny klein as Comfy's files: transformer (BFL names), Qwen3 encoder, VAE (BFL names)."""
    root = tmp_path_factory.mktemp("comfy-flux2")
    transformer = _component(flux2_dir, "Flux2Transformer2DModel", "transformer").state_dict()
    files = {
        "transformer": root / "flux-2-klein-4b.safetensors",
        "prefixed": root / "prefixed" / "flux-2-klein-4b.safetensors",
        "text_encoder": root / "qwen_3_4b.safetensors",
        "vae": root / "flux2-vae.safetensors",
    }
    files["prefixed"].parent.mkdir()
    bfl = diffusers_to_bfl_flux2(transformer)
    save_file(bfl, files["transformer"])
    save_file({"model.diffusion_model." + k: v for k, v in bfl.items()}, files["prefixed"])
    qwen = _component(flux2_dir, "Qwen3ForCausalLM", "text_encoder").state_dict()
    save_file({k: v.contiguous() for k, v in qwen.items()}, files["text_encoder"])
    vae = _component(flux2_dir, "AutoencoderKLFlux2", "vae").state_dict()
    save_file(diffusers_vae_to_bfl_flux2(vae), files["vae"])
    return files


@pytest.fixture(scope="module")
def klein_files(
    make_settings: Callable[..., EngineSettings], flux2_dir: Path, comfy: dict[str, Path]
) -> Callable[..., EngineSettings]:
    def make(**overrides: object) -> EngineSettings:
        values: dict[str, object] = {
            "model": str(comfy["transformer"]),
            "vae": comfy["vae"],
            "text_encoder": comfy["text_encoder"],
            # What the tiny model's tensors cannot say (its rotary axes, the Qwen3 rope theta) and
            # the Qwen3 tokenizer, which Comfy's files do not carry: the tiny folder's.
            "configs": flux2_dir,
            "tokenizers": str(flux2_dir),
        }
        return make_settings(**{**values, **overrides})

    return make


@pytest.fixture(scope="module")
def folder_pixels(make_settings: Callable[..., EngineSettings], data_dir: Path) -> np.ndarray:
    return pixels(FluxEngine.load(make_settings(model="tiny-flux2"), data_dir).generate(REQUEST).images[0])


def test_the_flux2_writers_are_what_diffusers_converters_read_back(flux2_dir: Path) -> None:
    from diffusers import AutoencoderKLFlux2

    transformer = _component(flux2_dir, "Flux2Transformer2DModel", "transformer").state_dict()
    bfl = diffusers_to_bfl_flux2(transformer)
    for written in (bfl, {"model.diffusion_model." + k: v for k, v in bfl.items()}):
        back = flux2_files.transformer_to_diffusers(written)  # diffusers' converter, prefix stripped
        assert set(back) == set(transformer) and all(torch.equal(back[k], transformer[k]) for k in back)
    # A VAE with every part FLUX.2's has (quant convs, mid-block attention, 2 resnets per level, shortcut
    # convs), which the tiny one lacks, through diffusers' convert_ldm_vae_checkpoint and back.
    torch.manual_seed(0)
    real_shape = AutoencoderKLFlux2(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, layers_per_block=2)
    real_shape.bn.running_mean.normal_()
    real_shape.bn.running_var.uniform_(0.5, 2.0)
    state = real_shape.state_dict()
    written_vae = diffusers_vae_to_bfl_flux2(state)
    written_vae.pop("bn.num_batches_tracked", None)
    config = flux2_files.vae_config(written_vae, dict(real_shape.config))
    back_vae = flux2_files.vae_to_diffusers(written_vae, config)
    assert set(back_vae) == set(state) - {"bn.num_batches_tracked"}
    assert all(torch.equal(back_vae[k], state[k]) for k in back_vae)


@pytest.mark.parametrize("layout", ["transformer", "prefixed"])
def test_comfy_files_draw_exactly_what_the_diffusers_folder_draws(
    klein_files: Callable[..., EngineSettings],
    comfy: dict[str, Path],
    data_dir: Path,
    folder_pixels: np.ndarray,
    layout: str,
) -> None:
    engine = FluxEngine.load(klein_files(model=str(comfy[layout])), data_dir)

    result = engine.generate(REQUEST)

    assert (engine.info.family, engine.info.variant) == ("flux2", "klein")
    assert engine.pipe.config.is_distilled is True
    assert np.array_equal(pixels(result.images[0]), folder_pixels)
    assert set(engine.info.model_files) == {
        comfy[layout].name,
        "qwen_3_4b.safetensors",
        "flux2-vae.safetensors",
    }


@pytest.mark.parametrize("kind", ["bf16", "fp8", "fp8_scaled"])
def test_bf16_and_fp8_transformers_draw_what_a_folder_of_their_weights_draws(
    klein_files: Callable[..., EngineSettings],
    make_settings: Callable[..., EngineSettings],
    flux2_dir: Path,
    data_dir: Path,
    tmp_path: Path,
    kind: str,
) -> None:
    transformer = _component(flux2_dir, "Flux2Transformer2DModel", "transformer").state_dict()
    if kind == "fp8_scaled":
        # Comfy's fp8_scaled: each matrix stored as fp8 with one scale (weight = fp8 x scale_weight).
        bfl = diffusers_to_bfl_flux2(transformer)
        written: dict[str, torch.Tensor] = {}
        decoded_bfl: dict[str, torch.Tensor] = {}
        for key, value in bfl.items():
            scale = (value.abs().max() / 448.0).reshape(()) if value.dim() == 2 else torch.tensor(1.0)
            written[key] = (value / scale).to(torch.float8_e4m3fn)
            decoded_bfl[key] = written[key].float() * scale
            if value.dim() == 2:
                written[key.removesuffix(".weight") + ".scale_weight"] = scale
        decoded = flux2_files.transformer_to_diffusers(decoded_bfl)
    else:
        narrow = {
            k: v.to(torch.bfloat16 if kind == "bf16" else torch.float8_e4m3fn) for k, v in transformer.items()
        }
        written = diffusers_to_bfl_flux2(narrow)
        decoded = {k: v.float() for k, v in narrow.items()}  # what the file holds, in float32
    file = tmp_path / f"flux-2-klein-4b-{kind}.safetensors"
    save_file(written, file)
    # The reference: the diffusers folder with the weights the file decodes to.
    folder = tmp_path / "folder"
    shutil.copytree(flux2_dir, folder)
    save_file(decoded, folder / "transformer" / "diffusion_pytorch_model.safetensors")

    from_file = FluxEngine.load(klein_files(model=str(file)), data_dir).generate(REQUEST)
    from_folder = FluxEngine.load(make_settings(model=str(folder)), data_dir).generate(REQUEST)

    assert np.array_equal(pixels(from_file.images[0]), pixels(from_folder.images[0]))


def test_a_comfy_models_folder_is_found_by_contents_and_doctor_names_flux2(
    make_settings: Callable[..., EngineSettings],
    flux2_dir: Path,
    comfy: dict[str, Path],
    data_dir: Path,
    tmp_path: Path,
    folder_pixels: np.ndarray,
) -> None:
    from engine.doctor import run_doctor

    models = tmp_path / "models"
    for sub, key in (
        ("diffusion_models", "prefixed"),
        ("text_encoders", "text_encoder"),
        ("vae", "vae"),
    ):
        (models / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(comfy[key], models / sub / comfy[key].name)
    # FLUX.1's parts beside them are not FLUX.2's and are never taken for them.
    tiny1 = ensure_tiny_model(data_dir / "models" / "tiny-flux1")
    shutil.copy(tiny1 / "vae" / "diffusion_pytorch_model.safetensors", models / "vae" / "ae.safetensors")
    settings = make_settings(model=str(models), configs=flux2_dir, tokenizers=str(flux2_dir))

    source = locate_model(settings, data_dir)
    engine = FluxEngine.load(settings, data_dir)
    report = run_doctor(settings, data_dir).render()

    assert source.family == "flux2"
    assert (source.text_encoder, source.vae) == (
        models / "text_encoders" / "qwen_3_4b.safetensors",
        models / "vae" / "flux2-vae.safetensors",
    )
    assert np.array_equal(pixels(engine.generate(REQUEST).images[0]), folder_pixels)
    assert "FLUX.2 klein" in report and "a Qwen3 text encoder" in report and "(FLUX.2's)" in report


def test_the_base_klein_is_told_by_its_file_name(
    klein_files: Callable[..., EngineSettings], comfy: dict[str, Path], data_dir: Path, tmp_path: Path
) -> None:
    base = tmp_path / "flux-2-klein-base-4b.safetensors"
    shutil.copy(comfy["transformer"], base)

    engine = FluxEngine.load(klein_files(model=str(base)), data_dir)

    assert engine.info.variant == "klein-base" and engine.pipe.config.is_distilled is False
    # The base model's own preset (real CFG at 4, an empty prompt's embedding per image), batched too.
    results = engine.generate_batch([REQUEST, REQUEST.model_copy(update={"prompt": "a blue dog"})])
    assert [r.recipes[0].preset for r in results] == ["klein-base", "klein-base"]
    assert results[0].recipes[0].guidance == 4.0
    forced = FluxEngine.load(klein_files(model=str(base), variant="klein"), data_dir)
    assert forced.pipe.config.is_distilled is True


def test_what_cannot_be_drawn_right_is_refused_in_one_line(
    klein_files: Callable[..., EngineSettings], comfy: dict[str, Path], data_dir: Path, tmp_path: Path
) -> None:
    lonely = tmp_path / "lonely" / "flux-2-klein-4b.safetensors"
    lonely.parent.mkdir()
    shutil.copy(comfy["transformer"], lonely)
    with pytest.raises(ModelLoadError, match="no Qwen3 text encoder found: set engine.text_encoder"):
        FluxEngine.load(klein_files(model=str(lonely), text_encoder=None), data_dir)
    # A Qwen3 of another width (klein 9B's encoder beside a 4B transformer).
    from transformers import Qwen3Config, Qwen3ForCausalLM

    other = Qwen3ForCausalLM(
        Qwen3Config(
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=28,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=4,
            vocab_size=128,
        )
    )
    wrong = tmp_path / "qwen_3_8b.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, wrong)
    with pytest.raises(ModelLoadError, match="qwen_3_8b.safetensors gives 24-wide prompts, .* reads 48"):
        FluxEngine.load(klein_files(text_encoder=wrong), data_dir)
    # Comfy's newer fp8 scheme (weight_scale + comfy_quant) is not read yet: refused, not drawn wrong.
    bfl = load_file(str(comfy["transformer"]))
    scaled = {**bfl, "img_in.weight_scale": torch.ones(())}
    scaled_file = tmp_path / "flux-2-klein-4b-fp8mixed.safetensors"
    save_file(scaled, scaled_file)
    with pytest.raises(ModelLoadError, match="quantization scales fluxbot cannot apply"):
        FluxEngine.load(klein_files(model=str(scaled_file)), data_dir)
    with pytest.raises(ModelLoadError, match="is FLUX.1's"):
        FluxEngine.load(klein_files(variant="dev"), data_dir)
