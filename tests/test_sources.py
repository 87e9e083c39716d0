"""Loading real layouts: single files (safetensors, GGUF Q8_0, fp8 T5), a Forge models/ folder, and the
clear error for a checkpoint without text encoders. Files are written from the tiny model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.api import GenerationRequest
from engine.doctor import run_doctor
from engine.engine import FluxEngine
from engine.errors import ModelLoadError
from engine.gguf_writer import write_gguf
from engine.settings import EngineSettings
from engine.sources import NO_TEXT_ENCODERS, locate_model
from engine.transformer_layout import BFL_PREFIX, bfl_to_diffusers
from tests.conftest import pixels
from tests.layouts import diffusers_to_bfl, write_forge_nf4, write_t5_gguf


def _component(tiny_dir: Path, cls_name: str, subfolder: str) -> torch.nn.Module:
    import diffusers
    import transformers

    cls = getattr(diffusers, cls_name, None) or getattr(transformers, cls_name)
    return cls.from_pretrained(tiny_dir, subfolder=subfolder)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def split_files(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model as the separate files Forge/ComfyUI users have: transformer, ae, clip_l, t5xxl (fp8)."""
    root = tmp_path_factory.mktemp("split")
    transformer = _component(tiny_dir, "FluxTransformer2DModel", "transformer").state_dict()
    files = {
        "transformer": root / "flux1-tiny.safetensors",
        "gguf": root / "flux1-tiny-Q8_0.gguf",
        "vae": root / "ae.safetensors",
        "clip_l": root / "clip_l.safetensors",
        "t5xxl": root / "t5xxl_fp8_e4m3fn.safetensors",
    }
    save_file({k: v.contiguous() for k, v in transformer.items()}, files["transformer"])
    write_gguf(transformer, files["gguf"], "Q8_0")
    save_file(_component(tiny_dir, "AutoencoderKL", "vae").state_dict(), files["vae"])
    save_file(_component(tiny_dir, "CLIPTextModel", "text_encoder").state_dict(), files["clip_l"])
    t5 = _component(tiny_dir, "T5EncoderModel", "text_encoder_2").state_dict()
    t5.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight; files store it once
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in t5.items()}, files["t5xxl"])
    return files


@pytest.fixture(scope="module")
def single_file_settings(
    make_settings: Callable[..., EngineSettings], tiny_dir: Path
) -> Callable[..., EngineSettings]:
    def make(**overrides: object) -> EngineSettings:
        return make_settings(configs=tiny_dir, tokenizers=str(tiny_dir), **overrides)

    return make


def separate_encoders(split_files: dict[str, Path]) -> dict[str, Path]:
    return {"vae": split_files["vae"], "clip_l": split_files["clip_l"], "t5xxl": split_files["t5xxl"]}


def draw_with(settings: EngineSettings, data_dir: Path, request: GenerationRequest) -> np.ndarray:
    return pixels(FluxEngine.load(settings, data_dir).generate(request).images[0])


def gguf_decoded(path: Path) -> dict[str, np.ndarray]:
    """A GGUF file's tensors as gguf-py itself decodes them (the reference a loader must match)."""
    import gguf

    return {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(
            tuple(int(n) for n in reversed(t.shape))
        )
        for t in gguf.GGUFReader(str(path)).tensors
    }


def test_single_safetensors_with_separate_vae_and_text_encoders_generates_like_the_folder(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    data_dir: Path,
    engine: FluxEngine,
) -> None:
    files = split_files
    settings = single_file_settings(
        model=str(files["transformer"]), vae=files["vae"], clip_l=files["clip_l"], t5xxl=files["t5xxl"]
    )
    single = FluxEngine.load(settings, data_dir)
    request = GenerationRequest(prompt="a cat in the city", seed=11)

    image = single.generate(request).images[0]
    reference = engine.generate(request).images[0]

    assert single.info.variant == "dev" and single.pipe.text_encoder_2.dtype == torch.float32
    # Same transformer and VAE; only the T5 went through fp8, so pictures are close, not equal.
    assert np.abs(pixels(image) - pixels(reference)).mean() < 12
    assert set(single.info.model_files) == {p.name for k, p in files.items() if k != "gguf"}


def test_gguf_q8_transformer_loads_quantized_and_generates(
    single_file_settings: Callable[..., EngineSettings], split_files: dict[str, Path], data_dir: Path
) -> None:
    from diffusers.quantizers.gguf.utils import GGUFParameter

    files = split_files
    settings = single_file_settings(
        model=str(files["gguf"]), vae=files["vae"], clip_l=files["clip_l"], t5xxl=files["t5xxl"]
    )
    gguf_engine = FluxEngine.load(settings, data_dir)

    result = gguf_engine.generate(GenerationRequest(prompt="a red fox", seed=3))

    weight = gguf_engine.pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert isinstance(weight, GGUFParameter)
    assert result.recipes[0].quant == "gguf"
    assert pixels(result.images[0]).std() > 0


def test_checkpoint_without_text_encoders_says_which_settings_to_set(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    data_dir: Path,
    tmp_path: Path,
) -> None:
    lonely = tmp_path / "flux1-dev.safetensors"
    lonely.write_bytes(split_files["transformer"].read_bytes())
    settings = single_file_settings(model=str(lonely), vae=split_files["vae"])

    with pytest.raises(ModelLoadError) as info:
        FluxEngine.load(settings, data_dir)

    assert str(info.value) == f"flux1-dev.safetensors: {NO_TEXT_ENCODERS}"
    assert NO_TEXT_ENCODERS == "this checkpoint has no text encoders: set engine.clip_l / engine.t5xxl"


def test_forge_models_folder_is_searched_by_role(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    data_dir: Path,
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    for sub, key in (
        ("Stable-diffusion", "gguf"),
        ("VAE", "vae"),
        ("text_encoder", "clip_l"),
        ("text_encoder", "t5xxl"),
    ):
        (models / sub).mkdir(parents=True, exist_ok=True)
        (models / sub / split_files[key].name).write_bytes(split_files[key].read_bytes())
    (models / "Lora").mkdir()
    settings = single_file_settings(model=str(models))

    source = locate_model(settings, data_dir)
    forge_engine = FluxEngine.load(settings, data_dir)

    assert source.transformer is not None and source.transformer.name == "flux1-tiny-Q8_0.gguf"
    assert (source.vae, source.clip_l, source.t5xxl) == (
        models / "VAE" / "ae.safetensors",
        models / "text_encoder" / "clip_l.safetensors",
        models / "text_encoder" / "t5xxl_fp8_e4m3fn.safetensors",
    )
    assert forge_engine.lora_files is not None and forge_engine.lora_files.lora_dir == models / "Lora"
    assert forge_engine.generate(GenerationRequest(prompt="a dog", seed=1)).images


def test_models_folder_with_several_checkpoints_asks_which_one(
    make_settings: Callable[..., EngineSettings], data_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    for name in ("a.safetensors", "b.gguf"):
        (folder / name).write_bytes(b"")

    with pytest.raises(ModelLoadError, match="set engine.checkpoint to one of a.safetensors, b.gguf"):
        locate_model(make_settings(model=str(tmp_path / "models")), data_dir)


def test_missing_model_path_is_a_clear_error(
    make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    with pytest.raises(ModelLoadError, match="not found: set FLUXBOT_MODEL"):
        locate_model(make_settings(model="./no/such/model"), data_dir)


def test_hub_id_is_recognised_without_touching_the_network(
    make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    source = locate_model(make_settings(model="black-forest-labs/FLUX.1-dev"), data_dir)

    assert (source.kind, source.location) == ("hub", "black-forest-labs/FLUX.1-dev")


def test_file_that_is_not_a_checkpoint_is_refused(
    single_file_settings: Callable[..., EngineSettings], data_dir: Path, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")

    with pytest.raises(ModelLoadError, match="not a readable .safetensors checkpoint"):
        FluxEngine.load(single_file_settings(model=str(junk)), data_dir)


def write_fp8_scaled(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Comfy-Org's `*_fp8_scaled` layout: 2-D weights as float8_e4m3fn with a per-tensor
    `.scale_weight`, a `scaled_fp8` marker, the rest as is. Returns the weights the file decodes to
    (fp8 value times scale, in float32): what a correct reader must draw with."""
    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    decoded: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(".weight") and tensor.dim() == 2:
            scale = (tensor.abs().max().float() / 448.0).clamp(min=1e-12)
            fp8 = (tensor.float() / scale).to(torch.float8_e4m3fn)
            out[key], out[key.removesuffix(".weight") + ".scale_weight"] = fp8, scale.reshape(1)
            decoded[key] = fp8.float() * scale
        else:
            out[key] = tensor.contiguous()
            decoded[key] = tensor.float()
    save_file(out, path)
    return decoded


def test_fp8_scaled_transformer_draws_with_its_scales_applied(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    tiny_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    state = _component(tiny_dir, "FluxTransformer2DModel", "transformer").state_dict()
    scaled = tmp_path / "flux1-tiny-fp8_scaled.safetensors"
    decoded = write_fp8_scaled(state, scaled)
    reference_file = tmp_path / "flux1-tiny-decoded.safetensors"
    save_file({k: v.contiguous() for k, v in decoded.items()}, reference_file)
    unscaled_file = tmp_path / "flux1-tiny-scales-dropped.safetensors"  # what the old loader read
    save_file(
        {k: (v.float() if v.dtype == torch.float8_e4m3fn else v) for k, v in load_scaled(scaled).items()},
        unscaled_file,
    )
    encoders = separate_encoders(split_files)
    request = GenerationRequest(prompt="a lighthouse", seed=5)

    def draw(path: Path) -> np.ndarray:
        return draw_with(single_file_settings(model=str(path), **encoders), data_dir, request)

    drawn, reference, dropped = draw(scaled), draw(reference_file), draw(unscaled_file)

    assert np.array_equal(drawn, reference), "the file's own decoded weights, exactly"
    report = run_doctor(single_file_settings(model=str(scaled), **encoders), data_dir).render()
    assert "fp8_scaled: its per-tensor scales are multiplied in" in report and "1 double + 2 single" in report
    assert np.abs(dropped - reference).mean() > 5, "dropping the scales would show"


def load_scaled(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {
        k: v for k, v in load_file(str(path)).items() if not k.endswith(".scale_weight") and k != "scaled_fp8"
    }


def test_fp8_with_scales_of_another_scheme_is_refused(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    tiny_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    state = _component(tiny_dir, "FluxTransformer2DModel", "transformer").state_dict()
    odd = {k: v.contiguous() for k, v in state.items()}
    key = next(k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2)
    odd[key] = state[key].to(torch.float8_e4m3fn)
    odd[key.removesuffix(".weight") + ".weight_scale"] = torch.ones(1)  # ModelOpt's naming
    path = tmp_path / "flux1-modelopt-fp8.safetensors"
    save_file(odd, path)
    encoders = separate_encoders(split_files)

    with pytest.raises(ModelLoadError, match="cannot apply .* refused"):
        FluxEngine.load(single_file_settings(model=str(path), **encoders), data_dir)


def test_sft_files_load_like_safetensors(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    data_dir: Path,
    tmp_path: Path,
) -> None:
    transformer = tmp_path / "flux1-tiny.sft"
    transformer.write_bytes(split_files["transformer"].read_bytes())
    vae = tmp_path / "ae.sft"
    vae.write_bytes(split_files["vae"].read_bytes())
    request = GenerationRequest(prompt="a harbour", seed=2)
    common = {"clip_l": split_files["clip_l"], "t5xxl": split_files["t5xxl"]}

    sft = FluxEngine.load(single_file_settings(model=str(transformer), vae=vae, **common), data_dir)
    safetensors = FluxEngine.load(
        single_file_settings(model=str(split_files["transformer"]), vae=split_files["vae"], **common),
        data_dir,
    )

    assert np.array_equal(
        pixels(sft.generate(request).images[0]), pixels(safetensors.generate(request).images[0])
    )


def test_models_folder_sub_folders_are_searched_and_checkpoint_takes_a_relative_path(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    data_dir: Path,
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    for sub, key in (
        ("Stable-diffusion/FLUX", "gguf"),
        ("Stable-diffusion/SDXL", "transformer"),  # another checkpoint elsewhere in the tree
        ("VAE/flux", "vae"),
        ("text_encoder/flux", "clip_l"),
        ("text_encoder/flux", "t5xxl"),
    ):
        (models / sub).mkdir(parents=True, exist_ok=True)
        (models / sub / split_files[key].name).write_bytes(split_files[key].read_bytes())

    with pytest.raises(ModelLoadError, match="FLUX/flux1-tiny-Q8_0.gguf, SDXL/flux1-tiny.safetensors"):
        locate_model(single_file_settings(model=str(models)), data_dir)
    settings = single_file_settings(model=str(models), checkpoint="FLUX/flux1-tiny-Q8_0.gguf")
    source = locate_model(settings, data_dir)

    assert source.transformer == models / "Stable-diffusion" / "FLUX" / "flux1-tiny-Q8_0.gguf"
    assert (source.vae, source.clip_l, source.t5xxl) == (
        models / "VAE" / "flux" / "ae.safetensors",
        models / "text_encoder" / "flux" / "clip_l.safetensors",
        models / "text_encoder" / "flux" / "t5xxl_fp8_e4m3fn.safetensors",
    )
    assert FluxEngine.load(settings, data_dir).generate(GenerationRequest(prompt="a dog", seed=1)).images


def test_the_bfl_writer_is_what_diffusers_converter_reads_back(tiny_dir: Path) -> None:
    state = _component(tiny_dir, "FluxTransformer2DModel", "transformer").state_dict()

    bfl = diffusers_to_bfl(state)
    back = bfl_to_diffusers(dict(bfl))

    assert any(k.startswith("double_blocks.0.img_attn.qkv") for k in bfl)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_bfl_layout_transformer_draws_exactly_like_the_diffusers_folder(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    tiny_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    state = _component(tiny_dir, "FluxTransformer2DModel", "transformer").state_dict()
    bfl_file = tmp_path / "flux1-dev.safetensors"
    save_file({BFL_PREFIX + k: v for k, v in diffusers_to_bfl(state).items()}, bfl_file)  # as Forge saves it
    settings = single_file_settings(
        model=str(bfl_file), vae=split_files["vae"], clip_l=split_files["clip_l"], t5xxl=split_files["t5xxl"]
    )
    reference_settings = single_file_settings(
        model=str(split_files["transformer"]),
        vae=split_files["vae"],
        clip_l=split_files["clip_l"],
        t5xxl=split_files["t5xxl"],
    )
    request = GenerationRequest(prompt="a mill by a river", seed=9)

    bfl = FluxEngine.load(settings, data_dir).generate(request).images[0]
    reference = FluxEngine.load(reference_settings, data_dir).generate(request).images[0]

    assert np.array_equal(pixels(bfl), pixels(reference))
    assert "BFL layout" in run_doctor(settings, data_dir).render()


def test_a_pruned_transformer_loads_with_the_block_counts_of_its_file(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    tiny_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    """flux.1-lite style: fewer blocks than the config (here the tiny config's 2 single blocks, 1 kept)."""
    from diffusers import FluxTransformer2DModel

    full = _component(tiny_dir, "FluxTransformer2DModel", "transformer")
    pruned_state = {
        k: v for k, v in full.state_dict().items() if not k.startswith("single_transformer_blocks.1.")
    }
    pruned_file = tmp_path / "flux1-lite-tiny.safetensors"
    save_file(diffusers_to_bfl(pruned_state), pruned_file)
    reference = FluxTransformer2DModel.from_config({**full.config, "num_single_layers": 1})
    reference.load_state_dict(pruned_state)
    reference_file = tmp_path / "reference" / "flux1-lite-tiny.safetensors"
    reference_file.parent.mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, reference_file)
    encoders = separate_encoders(split_files)
    request = GenerationRequest(prompt="a lighthouse", seed=4)

    engine = FluxEngine.load(single_file_settings(model=str(pruned_file), **encoders), data_dir)
    image = engine.generate(request).images[0]
    expected = FluxEngine.load(single_file_settings(model=str(reference_file), **encoders), data_dir)

    loaded, wanted = engine.pipe.transformer.state_dict(), expected.pipe.transformer.state_dict()
    assert len(engine.pipe.transformer.single_transformer_blocks) == 1
    assert engine.pipe.transformer.config == expected.pipe.transformer.config
    assert set(loaded) == set(wanted) and all(torch.equal(loaded[k], wanted[k]) for k in wanted)
    # Same weights, same config: the pictures agree up to float rounding in a different engine.
    assert np.abs(pixels(image) - pixels(expected.generate(request).images[0])).max() <= 1


def test_an_unreadable_gguf_text_encoder_is_refused_in_one_clear_line(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    data_dir: Path,
    tmp_path: Path,
) -> None:
    t5_gguf = tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf"
    t5_gguf.write_bytes(b"GGUF")
    settings = single_file_settings(
        model=str(split_files["transformer"]),
        vae=split_files["vae"],
        clip_l=split_files["clip_l"],
        t5xxl=t5_gguf,
    )

    with pytest.raises(
        ModelLoadError, match="engine.t5xxl: t5-v1_1-xxl-encoder-Q8_0.gguf is not a readable GGUF"
    ):
        FluxEngine.load(settings, data_dir)
    clip_gguf = tmp_path / "clip_l-Q8_0.gguf"
    clip_gguf.write_bytes(b"GGUF")
    with pytest.raises(
        ModelLoadError, match=r"engine.clip_l: clip_l-Q8_0.gguf: CLIP-L has no GGUF layout .* clip_l"
    ):
        FluxEngine.load(
            settings.model_copy(update={"clip_l": clip_gguf, "t5xxl": split_files["t5xxl"]}), data_dir
        )


def test_t5_gguf_text_encoder_draws_like_its_own_decoded_weights(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    tiny_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    import gguf

    t5 = _component(tiny_dir, "T5EncoderModel", "text_encoder_2")
    state = t5.state_dict()
    encoder = tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf"
    write_t5_gguf(state, t5.config.num_layers, encoder)
    # What the file decodes to, by gguf-py's own reader: the weights a correct loader must use.
    decoded = gguf_decoded(encoder)
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in gguf.GGUFReader(str(encoder)).tensors)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, t5.config.num_layers)
    reference_state = {
        key: torch.from_numpy(decoded[names.get_name(key, try_suffixes=(".weight", ".bias"))].copy())
        for key in state
        if key != "encoder.embed_tokens.weight"
    }
    reference = tmp_path / "t5xxl_decoded.safetensors"
    save_file(reference_state, reference)
    common = {
        "model": str(split_files["transformer"]),
        "vae": split_files["vae"],
        "clip_l": split_files["clip_l"],
    }
    request = GenerationRequest(prompt="a quiet harbour", seed=8)

    from_gguf = FluxEngine.load(single_file_settings(t5xxl=encoder, **common), data_dir)
    from_decoded = FluxEngine.load(single_file_settings(t5xxl=reference, **common), data_dir)

    assert np.array_equal(
        pixels(from_gguf.generate(request).images[0]), pixels(from_decoded.generate(request).images[0])
    )


def test_forge_nf4_all_in_one_is_dequantized_and_its_embedded_parts_used(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    tiny_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    from bitsandbytes.functional import QuantState, dequantize_4bit
    from safetensors.torch import load_file

    transformer = _component(tiny_dir, "FluxTransformer2DModel", "transformer").state_dict()
    t5 = _component(tiny_dir, "T5EncoderModel", "text_encoder_2").state_dict()
    embedded = {
        "vae.": load_file(str(split_files["vae"])),
        "text_encoders.clip_l.transformer.": load_file(str(split_files["clip_l"])),
        "text_encoders.t5xxl.transformer.": {
            k: v for k, v in t5.items() if k != "encoder.embed_tokens.weight"
        },
    }
    nf4 = tmp_path / "flux1-dev-bnb-nf4-v2.safetensors"
    decoded = write_forge_nf4(transformer, embedded, nf4)
    # The writer is bitsandbytes' own serialisation: read back through QuantState.from_dict it decodes
    # to the same weights.
    raw = load_file(str(nf4))
    key = "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
    parts = {k.removeprefix(key + "."): v for k, v in raw.items() if k.startswith(key + ".")}
    state = QuantState.from_dict(parts, device=torch.device("cpu"))
    assert torch.equal(dequantize_4bit(raw[key], state), decoded["double_blocks.0.img_attn.qkv.weight"])
    reference = tmp_path / "decoded" / "flux1-dev.safetensors"
    reference.parent.mkdir()
    save_file({k: v.contiguous() for k, v in decoded.items()}, reference)
    request = GenerationRequest(prompt="a quiet harbour", seed=6)

    all_in_one = FluxEngine.load(single_file_settings(model=str(nf4)), data_dir)
    expected = FluxEngine.load(
        single_file_settings(
            model=str(reference),
            vae=split_files["vae"],
            clip_l=split_files["clip_l"],
            t5xxl=_t5_file(tmp_path, embedded["text_encoders.t5xxl.transformer."]),
        ),
        data_dir,
    )

    assert np.array_equal(
        pixels(all_in_one.generate(request).images[0]), pixels(expected.generate(request).images[0])
    )
    assert (
        "bitsandbytes NF4: dequantized on load"
        in run_doctor(single_file_settings(model=str(nf4)), data_dir).render()
    )


def _t5_file(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    path = folder / "t5xxl_fp32.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def test_kijai_fp8_transformer_draws_with_its_fp8_weights_upcast(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    tiny_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    state = _component(tiny_dir, "FluxTransformer2DModel", "transformer").state_dict()
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 else v.contiguous()) for k, v in state.items()}
    kijai = tmp_path / "flux1-dev-fp8-e4m3fn.safetensors"
    save_file(diffusers_to_bfl(fp8), kijai)
    decoded = tmp_path / "decoded" / "flux1-dev.safetensors"
    decoded.parent.mkdir()
    save_file({k: v.float().contiguous() for k, v in fp8.items()}, decoded)
    encoders = separate_encoders(split_files)
    request = GenerationRequest(prompt="a windmill", seed=12)

    def draw(path: Path) -> np.ndarray:
        return draw_with(single_file_settings(model=str(path), **encoders), data_dir, request)

    assert np.array_equal(draw(kijai), draw(decoded))


def test_gguf_q4_0_transformer_draws_with_its_own_decoded_weights(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    tiny_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    state = _component(tiny_dir, "FluxTransformer2DModel", "transformer").state_dict()
    q4 = write_gguf(state, tmp_path / "flux1-tiny-Q4_0.gguf", "Q4_0")

    drawn, reference = _gguf_and_its_decoded_weights(q4, single_file_settings, split_files, data_dir)

    assert np.abs(drawn - reference).max() <= 1  # GGUF matmuls dequantize on the fly


def _gguf_and_its_decoded_weights(
    path: Path,
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    data_dir: Path,
) -> tuple[np.ndarray, np.ndarray]:
    """The GGUF drawn, and the same request drawn from its weights as gguf-py decodes them."""
    decoded = {name: torch.from_numpy(values.copy()) for name, values in gguf_decoded(path).items()}
    reference = path.parent / "decoded" / path.with_suffix(".safetensors").name
    reference.parent.mkdir(exist_ok=True)
    save_file(decoded, reference)
    encoders = separate_encoders(split_files)
    request = GenerationRequest(prompt="a windmill", seed=12)
    return tuple(  # type: ignore[return-value]
        draw_with(single_file_settings(model=str(file), **encoders), data_dir, request)
        for file in (path, reference)
    )


def test_the_q6_k_writer_is_what_gguf_py_reads_back() -> None:
    import gguf

    from engine.gguf_writer import quantize_q6_k

    weights = (torch.randn(6, 512, generator=torch.Generator().manual_seed(3)) * 0.05).numpy()
    weights[0, :16] = 0.0  # an all-zero group must stay zero

    decoded = gguf.quants.dequantize(quantize_q6_k(weights), gguf.GGMLQuantizationType.Q6_K)

    groups = weights.reshape(-1, 16)
    step = np.abs(groups).max(axis=1, keepdims=True) / 31  # one 6-bit step per group, before rounding
    error = np.abs(decoded.reshape(-1, 16) - groups)
    assert decoded.shape == weights.shape
    assert (error <= step * 0.55 + 1e-6).all(), "every value within half a step of its group"
    assert not decoded[0, :16].any()


def test_gguf_q6_k_transformer_draws_with_its_own_decoded_weights(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    tiny_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    import gguf
    from diffusers import FluxTransformer2DModel

    # Q6_K packs rows of 256: the tiny transformer widened to 16 heads (256 wide) so its layers fit.
    config = dict(FluxTransformer2DModel.load_config(tiny_dir, subfolder="transformer"))
    torch.manual_seed(4)
    wide = FluxTransformer2DModel.from_config({**config, "num_attention_heads": 16}).state_dict()
    q6 = write_gguf(wide, tmp_path / "flux1-tiny-wide-Q6_K.gguf", "Q6_K")

    kinds = {t.tensor_type for t in gguf.GGUFReader(str(q6)).tensors}
    assert gguf.GGMLQuantizationType.Q6_K in kinds
    drawn, reference = _gguf_and_its_decoded_weights(q6, single_file_settings, split_files, data_dir)
    assert np.abs(drawn - reference).max() <= 1  # GGUF matmuls dequantize on the fly


def test_fp8_scaled_t5_draws_with_its_scales_applied(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    tiny_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    t5 = _component(tiny_dir, "T5EncoderModel", "text_encoder_2").state_dict()
    t5.pop("encoder.embed_tokens.weight", None)
    scaled = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    decoded = write_fp8_scaled(t5, scaled)
    reference = tmp_path / "t5xxl_decoded.safetensors"
    save_file({k: v.contiguous() for k, v in decoded.items()}, reference)
    dropped = tmp_path / "t5xxl_scales_dropped.safetensors"
    save_file({k: v.float() for k, v in load_scaled(scaled).items()}, dropped)
    request = GenerationRequest(prompt="a windmill by the sea", seed=8)

    def draw(t5xxl: Path) -> np.ndarray:
        encoders = separate_encoders(split_files) | {"t5xxl": t5xxl}
        return draw_with(
            single_file_settings(model=str(split_files["transformer"]), **encoders), data_dir, request
        )

    drawn, expected, without_scales = draw(scaled), draw(reference), draw(dropped)

    assert np.array_equal(drawn, expected), "the file's own decoded weights, exactly"
    assert np.abs(without_scales - expected).mean() > 1, "dropping the scales would show"


def test_a_pruned_gguf_transformer_loads_with_the_block_counts_in_its_header(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    tiny_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    full = _component(tiny_dir, "FluxTransformer2DModel", "transformer").state_dict()
    pruned = {k: v for k, v in full.items() if not k.startswith("single_transformer_blocks.1.")}
    path = write_gguf(pruned, tmp_path / "flux1-lite-tiny-Q8_0.gguf", "Q8_0")

    engine = FluxEngine.load(
        single_file_settings(model=str(path), **separate_encoders(split_files)), data_dir
    )

    assert len(engine.pipe.transformer.single_transformer_blocks) == 1
    assert engine.generate(GenerationRequest(prompt="a lighthouse", seed=4)).images[0].size == (64, 64)


def test_comfy_org_fp8_all_in_one_uses_its_embedded_parts(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    tiny_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    """Comfy-Org's `flux1-dev-fp8.safetensors`: the BFL transformer in fp8 under `model.diffusion_model.`,
    with the VAE and both text encoders inside the same file."""
    from safetensors.torch import load_file

    transformer = _component(tiny_dir, "FluxTransformer2DModel", "transformer").state_dict()
    t5 = {k: v for k, v in _component(tiny_dir, "T5EncoderModel", "text_encoder_2").state_dict().items()}
    t5.pop("encoder.embed_tokens.weight", None)
    fp8 = {
        k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in diffusers_to_bfl(transformer).items()
    }
    all_in_one = {BFL_PREFIX + k: v.contiguous() for k, v in fp8.items()}
    all_in_one |= {"vae." + k: v for k, v in load_file(str(split_files["vae"])).items()}
    all_in_one |= {
        "text_encoders.clip_l.transformer." + k: v for k, v in load_file(str(split_files["clip_l"])).items()
    }
    all_in_one |= {"text_encoders.t5xxl.transformer." + k: v.contiguous() for k, v in t5.items()}
    path = tmp_path / "flux1-dev-fp8.safetensors"
    save_file(all_in_one, path)
    reference = tmp_path / "separate" / "flux1-dev-fp8.safetensors"
    reference.parent.mkdir()
    save_file({k: v.contiguous() for k, v in fp8.items()}, reference)
    request = GenerationRequest(prompt="a quiet harbour", seed=6)

    drawn = FluxEngine.load(single_file_settings(model=str(path)), data_dir).generate(request).images[0]
    expected = FluxEngine.load(
        single_file_settings(
            model=str(reference),
            vae=split_files["vae"],
            clip_l=split_files["clip_l"],
            t5xxl=_t5_file(tmp_path, t5),
        ),
        data_dir,
    ).generate(request)

    assert np.array_equal(pixels(drawn), pixels(expected.images[0]))


def test_a_gguf_with_bfl_names_as_city96_ships_draws_like_one_with_diffusers_names(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    tiny_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    """city96's flux1-dev-Q8_0.gguf keeps BFL's tensor names (`double_blocks.0.img_attn.qkv.weight`)."""
    state = _component(tiny_dir, "FluxTransformer2DModel", "transformer").state_dict()
    bfl = write_gguf(diffusers_to_bfl(state), tmp_path / "flux1-dev-Q8_0.gguf", "Q8_0")
    encoders = separate_encoders(split_files)
    request = GenerationRequest(prompt="a windmill", seed=12)
    import gguf

    names = {t.name for t in gguf.GGUFReader(str(bfl)).tensors}
    assert "double_blocks.0.img_attn.qkv.weight" in names and "single_blocks.0.linear1.weight" in names

    def draw(path: Path) -> np.ndarray:
        return draw_with(single_file_settings(model=str(path), **encoders), data_dir, request)

    # Q8_0 blocks run along rows, so splitting the fused rows keeps every block: identical weights.
    assert np.array_equal(draw(bfl), draw(split_files["gguf"]))


def test_the_q8_0_writer_makes_gguf_pys_own_bytes() -> None:
    """Q8_0 is packed in torch (a 12B model in seconds on a GPU, for bench/gpu.py); gguf-py's reference
    quantizer is the proof, ties and zero blocks included."""
    import gguf

    from engine.gguf_writer import quantize_q8_0

    torch.manual_seed(0)
    halves = torch.full((2, 32), 0.5) * torch.tensor([[1.0], [-1.0]])
    for tensor in (torch.randn(64, 96), torch.randn(8, 64) * 1e-3, torch.zeros(4, 32), halves):
        reference = gguf.quants.quantize(tensor.numpy(), gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(quantize_q8_0(tensor), reference)


def test_text_encoders_and_vae_are_found_by_what_their_files_hold(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    tiny_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    """A GGUF user's models/ folder as downloaded: city96's T5 under its own name, a CLIP-L and the VAE
    under names no `clip_l*`/`ae*` rule knows, beside files that hold other parts (SDXL's CLIP-G,
    FLUX.2 klein's Qwen3 encoder, FLUX.2's 32-channel VAE, a broken download)."""
    from engine.file_roles import read_contents
    from engine.tiny import ensure_tiny_model

    models = tmp_path / "models"
    for sub in ("unet", "vae", "text_encoders"):
        (models / sub).mkdir(parents=True)
    (models / "unet" / "flux1-dev-Q8_0.gguf").write_bytes(split_files["gguf"].read_bytes())
    t5 = _component(tiny_dir, "T5EncoderModel", "text_encoder_2")
    city96 = models / "text_encoders" / "t5-v1_1-xxl-encoder-Q8_0.gguf"
    write_t5_gguf(t5.state_dict(), t5.config.num_layers, city96)
    clip = models / "text_encoders" / "ViT-L-14-TEXT-detail-improved-hiT-GmP-TE-only-HF.safetensors"
    clip.write_bytes(split_files["clip_l"].read_bytes())
    vae = models / "vae" / "flux1_vae_fp16.safetensors"
    vae.write_bytes(split_files["vae"].read_bytes())
    # Decoys that sort first and whose names say nothing (or the wrong thing).
    flux2 = ensure_tiny_model(data_dir / "models" / "tiny-flux2", "flux2")
    qwen = _component(flux2, "Qwen3ForCausalLM", "text_encoder").state_dict()
    qwen_file = models / "text_encoders" / "qwen_3_4b.safetensors"
    save_file({k: v.contiguous() for k, v in qwen.items()}, qwen_file)
    flux2_vae = _component(flux2, "AutoencoderKLFlux2", "vae").state_dict()
    save_file(flux2_vae, models / "vae" / "a_flux2-vae.safetensors")
    save_file(
        {"text_model.embeddings.token_embedding.weight": torch.zeros(8, 1280)},
        models / "text_encoders" / "a_clip_g.safetensors",
    )
    (models / "text_encoders" / "a_partial_download.safetensors").write_bytes(b"\x00" * 64)
    save_file(  # Wan's umT5: T5's layout, another vocabulary
        {
            "shared.weight": torch.zeros(256384, 1),
            "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(1, 1),
        },
        models / "text_encoders" / "a_umt5_xxl_fp8.safetensors",
    )
    (models / "vae" / "a_sd3_vae.safetensors").write_bytes(split_files["vae"].read_bytes())  # FLUX's shape

    source = locate_model(single_file_settings(model=str(models)), data_dir)

    assert (source.vae, source.clip_l, source.t5xxl) == (vae, clip, city96)
    assert any(note.startswith(f"t5xxl: {city96} (a T5 text encoder (GGUF") for note in source.notes)
    says = {p.name: read_contents(p).role for p in (models / "text_encoders").iterdir()}
    assert says == {
        city96.name: "t5xxl",
        clip.name: "clip_l",
        "qwen_3_4b.safetensors": "qwen3",
        "a_clip_g.safetensors": "clip_g",
        "a_partial_download.safetensors": "unreadable",
        "a_umt5_xxl_fp8.safetensors": "other",
    }
    assert read_contents(models / "vae" / "a_flux2-vae.safetensors").role == "flux2_vae"
    # The found files draw what the same files named by hand draw.
    request = GenerationRequest(prompt="a harbour at dawn", seed=5)
    by_hand = single_file_settings(
        model=str(models / "unet" / "flux1-dev-Q8_0.gguf"), vae=vae, clip_l=clip, t5xxl=city96
    )
    assert np.array_equal(
        draw_with(single_file_settings(model=str(models)), data_dir, request),
        draw_with(by_hand, data_dir, request),
    )


def test_a_named_file_that_holds_another_part_is_not_taken_for_it(
    single_file_settings: Callable[..., EngineSettings],
    split_files: dict[str, Path],
    data_dir: Path,
    tmp_path: Path,
) -> None:
    """`t5xxl_fp16.safetensors` that is really a CLIP-L (a mislabelled upload) is not used as T5: with no
    T5 anywhere the loader says so, instead of failing on a CLIP's weights inside T5."""
    folder = tmp_path / "download"
    folder.mkdir()
    transformer = folder / "flux1-dev.safetensors"
    transformer.write_bytes(split_files["transformer"].read_bytes())
    (folder / "ae.safetensors").write_bytes(split_files["vae"].read_bytes())
    (folder / "clip_l.safetensors").write_bytes(split_files["clip_l"].read_bytes())
    (folder / "t5xxl_fp16.safetensors").write_bytes(split_files["clip_l"].read_bytes())

    source = locate_model(single_file_settings(model=str(transformer)), data_dir)

    assert source.clip_l == folder / "clip_l.safetensors" and source.t5xxl is None
    with pytest.raises(ModelLoadError, match="no t5xxl text encoder found"):
        FluxEngine.load(single_file_settings(model=str(transformer)), data_dir)
