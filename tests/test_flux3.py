"""FLUX.3 klein (diffusers' modular pipelines) behind the same engine API, on tiny random-weight models
built from config: distilled and base, progress, previews, cancel, batching, reruns, edits."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.api import GenerationRequest, StepProgress
from engine.engine import FluxEngine
from engine.errors import GenerationCancelled, QuantizationError, RequestError
from engine.flux3 import Flux3Upsampler
from engine.input_image import InputImage, normalize_input_image
from engine.preview import PreviewEvery
from engine.settings import EngineSettings
from engine.tiny import build_tiny_flux3_klein
from tests.conftest import pixels


@pytest.fixture(scope="module")
def flux3(make_settings: Callable[..., EngineSettings], data_dir: Path) -> FluxEngine:
    return FluxEngine.load(make_settings(model="tiny-flux3"), data_dir)


@pytest.fixture(scope="module")
def flux3_base(
    make_settings: Callable[..., EngineSettings], data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> FluxEngine:
    folder = tmp_path_factory.mktemp("flux3-base") / "tiny-flux3-base"
    build_tiny_flux3_klein(distilled=False).save_pretrained(str(folder), overwrite_modular_index=True)
    return FluxEngine.load(make_settings(model=str(folder)), data_dir)


def test_flux3_draws_through_the_same_api_with_its_own_preset_and_reruns_exactly(flux3: FluxEngine) -> None:
    seen: list[StepProgress] = []
    result = flux3.generate(GenerationRequest(prompt="a red cat", seed=3), on_step=seen.append)

    recipe = result.recipes[0]
    assert (recipe.family, recipe.variant, recipe.preset, recipe.steps) == (
        "flux3",
        "klein",
        "flux3-distilled",
        3,
    )
    assert result.images[0].size == (64, 64) and pixels(result.images[0]).std() > 0
    assert [(p.step, p.total) for p in seen] == [(1, 3), (2, 3), (3, 3)]
    again = flux3.draw([recipe.spec()])[0]
    assert again.timings.embeds_cached
    assert np.array_equal(pixels(again.images[0]), pixels(result.images[0]))
    other = flux3.generate(GenerationRequest(prompt="a red cat", seed=4))
    assert not np.array_equal(pixels(other.images[0]), pixels(result.images[0]))


def test_flux3_is_diffusers_own_pipeline_call(flux3: FluxEngine) -> None:
    """The engine's picture is the modular pipeline's own, called as diffusers documents it (with the
    prompt embeddings of diffusers' own text step)."""
    from engine.flux3 import encode_prompt

    result = flux3.generate(GenerationRequest(prompt="a blue owl", seed=8))
    embeds = encode_prompt(flux3.pipe, "a blue owl", 512)
    direct = flux3.pipe.pipe(
        prompt_embeds=embeds,
        height=64,
        width=64,
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(8),
        output="images",
    )[0]

    assert np.array_equal(pixels(result.images[0]), pixels(direct))


def test_flux3_batches_split_by_prompt_and_previews_and_cancel_work(flux3: FluxEngine) -> None:
    short = GenerationRequest(prompt="a fox", seed=1)
    long = GenerationRequest(prompt="a fox " + "in a misty forest near the river " * 12, seed=2)
    batch = flux3.generate_batch([short, long])
    alone = [flux3.generate(short), flux3.generate(long)]
    assert [
        np.array_equal(pixels(b.images[0]), pixels(a.images[0])) for b, a in zip(batch, alone, strict=True)
    ] == [
        True,
        True,
    ]

    seen: list[StepProgress] = []
    flux3.generate(short, on_step=seen.append, preview=PreviewEvery(seconds=0.0))
    shown = [p.preview for p in seen if p.preview]
    from PIL import Image

    assert shown and Image.open(io.BytesIO(shown[0])).format == "JPEG"

    cancel = threading.Event()
    with pytest.raises(GenerationCancelled):
        flux3.generate(short, on_step=lambda p: cancel.set(), cancel=cancel)
    assert np.array_equal(pixels(flux3.generate(short).images[0]), pixels(alone[0].images[0])), (
        "still serving"
    )


def test_flux3_base_runs_real_guidance_and_presets_follow_the_variant(
    flux3: FluxEngine, flux3_base: FluxEngine
) -> None:
    result = flux3_base.generate(GenerationRequest(prompt="a castle", seed=5))

    recipe = result.recipes[0]
    assert (recipe.variant, recipe.preset, recipe.true_cfg) == ("klein-base", "flux3", 4.0)
    assert flux3_base.pipe.guider.guidance_scale == 4.0
    with pytest.raises(RequestError, match="preset flux3 is for klein-base, but the loaded model is klein"):
        flux3.resolve(GenerationRequest(prompt="a castle", preset="flux3"))
    with pytest.raises(RequestError, match="preset dev is for flux1"):
        flux3.resolve(GenerationRequest(prompt="a castle", preset="dev"))
    with pytest.raises(RequestError, match="step caches are not wired for FLUX.3"):
        flux3.resolve(GenerationRequest(prompt="a castle", cache="fbcache:0.1"))


def test_flux3_edits_with_references_in_the_resident_model(flux3: FluxEngine) -> None:
    from PIL import Image

    def reference(seed: int, size: tuple[int, int]) -> InputImage:
        rng = np.random.default_rng(seed)
        data = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(data, "PNG")
        return normalize_input_image(data.getvalue(), max_bytes=10**7, max_pixels=10**7)

    first, second = reference(1, (96, 64)), reference(2, (64, 64))
    request = GenerationRequest(
        prompt="make it night",
        mode="edit",
        size="96x64",
        seed=2,
        init_image=first.sha256,
        references=(second.sha256,),
    )
    result = flux3.generate(request, init_image=first.png, references=[second.png])

    assert result.images[0].size == (96, 64)
    assert result.recipes[0].reference_sha256s == (second.sha256,)


def test_flux3_int8_tier_loads_quantized_and_refuses_what_it_lacks(
    make_settings: Callable[..., EngineSettings], data_dir: Path, flux3: FluxEngine
) -> None:
    from engine.flux3 import flux3_plan
    from engine.quant import DeviceInfo, plan_quant

    quantized = FluxEngine.load(
        make_settings(model="tiny-flux3", quant="int8", text_encoder_quant="int8"), data_dir
    )
    request = GenerationRequest(prompt="a cat", seed=9)

    result = quantized.generate(request)

    weight = quantized.pipe.transformer.single_transformer_blocks[0].attn.to_q.weight
    assert type(weight).__module__.startswith("torchao"), type(weight)
    assert (result.recipes[0].quant, result.recipes[0].text_encoder_quant) == ("int8", "int8")
    assert np.abs(pixels(result.images[0]) - pixels(flux3.generate(request).images[0])).mean() < 20
    # auto on a 6 GB card picks nf4 with model CPU offload, for FLUX.3 as for the others.
    small = DeviceInfo("cuda:0", "a 6 GB card", 6.0, 6.0, (8, 9))
    plan = flux3_plan(plan_quant(EngineSettings(), small, False), EngineSettings())
    assert (plan.transformer, plan.text_encoder, plan.cpu_offload) == ("nf4", "nf4", "model")
    with pytest.raises(QuantizationError, match="FLUX.3 does not take quant = 'gguf'"):
        flux3_plan(plan, EngineSettings(quant="gguf"))


def test_flux3_with_model_cpu_offload_draws_the_same_pixels(
    make_settings: Callable[..., EngineSettings], data_dir: Path, flux3: FluxEngine
) -> None:
    offloaded = FluxEngine.load(make_settings(model="tiny-flux3", cpu_offload="model"), data_dir)
    request = GenerationRequest(prompt="a cat", seed=9)

    result = offloaded.generate(request)

    assert offloaded.info.plan.cpu_offload == "model"
    for model in (offloaded.pipe.text_encoder, offloaded.pipe.transformer, offloaded.pipe.vae):
        assert any(hasattr(m, "_hf_hook") for m in model.modules()), "accelerate's hooks move it"
    assert np.array_equal(pixels(result.images[0]), pixels(flux3.generate(request).images[0]))
    with pytest.raises(QuantizationError, match="FLUX.3 does not take cpu_offload = 'sequential'"):
        FluxEngine.load(make_settings(model="tiny-flux3", cpu_offload="sequential"), data_dir)


@pytest.mark.usefixtures("bitsandbytes_on_cpu")
def test_flux3_nf4_tier_quantizes_while_loading_and_draws_with_a_lora(
    make_settings: Callable[..., EngineSettings], data_dir: Path, flux3: FluxEngine, tmp_path: Path
) -> None:
    import bitsandbytes as bnb

    from engine.api import LoraChoice
    from engine.quant import QuantPlan

    lora_dir, whitelist = _flux3_whitelist(data_dir, tmp_path)
    plan = QuantPlan("nf4", "nf4", torch.float32, "none", False, "off", "nf4 on CPU (test)")
    nf4 = FluxEngine.load(
        make_settings(model="tiny-flux3", loras_file=whitelist, lora_dir=lora_dir), data_dir, plan=plan
    )
    request = GenerationRequest(prompt="a cat", seed=9)

    plain = nf4.generate(request)
    styled = nf4.generate(request.model_copy(update={"loras": (LoraChoice(name="f3"),)}))

    to_q = nf4.pipe.transformer.single_transformer_blocks[0].attn.to_q
    assert isinstance(getattr(to_q, "base_layer", to_q), bnb.nn.Linear4bit)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in nf4.pipe.text_encoder.modules())
    assert (plain.recipes[0].quant, plain.recipes[0].text_encoder_quant) == ("nf4", "nf4")
    assert not np.array_equal(pixels(plain.images[0]), pixels(styled.images[0])), "the LoRA draws"
    assert np.abs(pixels(plain.images[0]) - pixels(flux3.generate(request).images[0])).mean() < 30


def _flux3_lora(folder: Path, out: Path, seed: int) -> Path:
    """A random LoRA for the tiny FLUX.3 transformer's attention, made with peft, in diffusers' layout."""
    from diffusers import Flux3Transformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    transformer = Flux3Transformer2DModel.from_pretrained(folder, subfolder="transformer")
    transformer.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"transformer.{k}": v for k, v in get_peft_model_state_dict(transformer).items()}, out)
    return out


def _flux3_whitelist(data_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A LoRA folder with one random FLUX.3 LoRA ("f3") and the whitelist naming it."""
    from engine.tiny import ensure_tiny_model
    from tests.lora_support import sha, whitelist_toml

    folder = ensure_tiny_model(data_dir / "models" / "tiny-flux3", "flux3")
    lora = _flux3_lora(folder, tmp_path / "Lora" / "f3.safetensors", 2)
    whitelist = tmp_path / "loras.toml"
    whitelist.write_text(
        whitelist_toml({"f3": {"file": "f3.safetensors", "sha256": sha(lora), "families": ["flux3"]}})
    )
    return tmp_path / "Lora", whitelist


def test_a_lora_on_flux3_changes_the_picture_and_switching_it_off_restores_it(
    make_settings: Callable[..., EngineSettings], data_dir: Path, tmp_path: Path
) -> None:
    from engine.api import LoraChoice
    from engine.errors import LoraError
    from engine.tiny import ensure_tiny_model
    from tests.lora_support import sha, whitelist_toml

    folder = ensure_tiny_model(data_dir / "models" / "tiny-flux3", "flux3")
    lora = _flux3_lora(folder, tmp_path / "Lora" / "glow3.safetensors", 1)
    kohya = tmp_path / "Lora" / "kohya.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(4, 16)}, kohya)
    whitelist = tmp_path / "loras.toml"
    whitelist.write_text(
        whitelist_toml(
            {
                "glow3": {"file": "glow3.safetensors", "sha256": sha(lora), "families": ["flux3"]},
                "kohya": {"file": "kohya.safetensors", "sha256": sha(kohya), "families": ["flux3"]},
            }
        )
    )
    engine = FluxEngine.load(
        make_settings(model="tiny-flux3", loras_file=whitelist, lora_dir=tmp_path / "Lora"), data_dir
    )
    plain = GenerationRequest(prompt="a cat", seed=6)

    before = pixels(engine.generate(plain).images[0])
    styled = engine.generate(plain.model_copy(update={"loras": (LoraChoice(name="glow3", weight=1.0),)}))
    after = pixels(engine.generate(plain).images[0])
    tagged = engine.generate(GenerationRequest(prompt="a cat <lora:glow3:1>", seed=6))

    assert not np.array_equal(before, pixels(styled.images[0]))
    assert np.array_equal(before, after)
    assert np.array_equal(pixels(styled.images[0]), pixels(tagged.images[0]))
    assert [lo.name for lo in styled.recipes[0].loras] == ["glow3"]
    with pytest.raises(LoraError, match="LoRA kohya: does not fit this model"):
        engine.generate(plain.model_copy(update={"loras": (LoraChoice(name="kohya"),)}))
    assert np.array_equal(before, pixels(engine.generate(plain).images[0])), (
        "a refused LoRA leaves nothing behind"
    )


def test_doctor_names_family_variant_and_upsampler(
    make_settings: Callable[..., EngineSettings], data_dir: Path, flux3: FluxEngine
) -> None:
    from engine.doctor import run_doctor
    from engine.tiny import ensure_tiny_model

    ensure_tiny_model(data_dir / "models" / "tiny-flux2", "flux2")
    ensure_tiny_model(data_dir / "models" / "tiny-flux1", "flux1")
    for model, family in (
        ("tiny-flux3", "FLUX.3 klein (Flux3DistilledModularPipeline)"),
        ("tiny-flux2", "FLUX.2 klein (Flux2KleinPipeline)"),
        ("tiny", "FLUX.1 dev (FluxPipeline)"),
    ):
        report = run_doctor(make_settings(model=model), data_dir).render()
        assert "family" in report and family in report, report
    report = run_doctor(
        make_settings(model="tiny-flux3", prompt_enhancer="http://127.0.0.1:9/v1"), data_dir
    ).render()
    assert "llama3.2 at http://127.0.0.1:9/v1" in report


def test_flux3_enhances_with_its_own_upsampler_and_reruns_the_stored_caption(
    make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    from engine.doctor import run_doctor

    settings = make_settings(model="tiny-flux3", prompt_upsampler="tiny")
    engine = FluxEngine.load(settings, data_dir)

    result = engine.generate(GenerationRequest(prompt="a red cat", seed=2, enhance=True))

    recipe = result.recipes[0]
    assert engine.enhancer is not None and "prompt upsampler" in engine.enhancer.name
    assert recipe.enhanced_prompt and recipe.enhanced_prompt != "a red cat" and recipe.enhance_note is None
    # The random upsampler is greedy: the same prompt, the same caption; the stored one draws again.
    assert engine.generate(GenerationRequest(prompt="a red cat", seed=2, enhance=True)).recipes[
        0
    ].enhanced_prompt == (recipe.enhanced_prompt)
    spec = recipe.spec()
    assert spec.enhanced_prompt == recipe.enhanced_prompt and not spec.needs_enhancement
    assert np.array_equal(pixels(engine.draw([spec])[0].images[0]), pixels(result.images[0]))
    assert "upsampler" in run_doctor(settings, data_dir).render()
    with pytest.raises(Exception, match="prompt_upsampler is FLUX.3's"):
        FluxEngine.load(make_settings(model="tiny-flux2", prompt_upsampler="tiny"), data_dir)


def test_flux3_upsampler_expands_an_edit_from_its_references(
    make_settings: Callable[..., EngineSettings], data_dir: Path, flux3: FluxEngine
) -> None:
    from PIL import Image

    engine = FluxEngine.load(make_settings(model="tiny-flux3", prompt_upsampler="tiny"), data_dir)
    assert isinstance(engine.enhancer, Flux3Upsampler) and engine.enhancer.sees_images

    def stored(color: tuple[int, int, int]) -> InputImage:
        data = io.BytesIO()
        Image.new("RGB", (64, 64), color).save(data, "PNG")
        return normalize_input_image(data.getvalue(), max_bytes=10**7, max_pixels=10**7)

    red, blue = stored((200, 20, 20)), stored((20, 20, 200))
    request = GenerationRequest(
        prompt="make it night", mode="edit", size="64x64", seed=3, init_image=red.sha256, enhance=True
    )

    with_red = engine.generate(request, init_image=red.png)
    with_blue = engine.generate(request.model_copy(update={"init_image": blue.sha256}), init_image=blue.png)

    recipe = with_red.recipes[0]
    assert recipe.enhanced_prompt and recipe.enhance_note is None and recipe.mode == "edit"
    assert with_blue.recipes[0].enhanced_prompt != recipe.enhanced_prompt, "it read the picture"
    rerun = engine.draw([recipe.spec()], init_image=red.png)[0]
    assert np.array_equal(pixels(rerun.images[0]), pixels(with_red.images[0]))
    # Other hosts keep edits as written: the endpoint does not read pictures.
    with pytest.raises(RequestError, match="only FLUX.3's own prompt upsampler"):
        flux3.resolve(request)


def test_flux3_auto_is_sized_by_its_own_transformer_and_text_encoder(data_dir: Path) -> None:
    from engine.flux3 import auto_for, weight_params
    from engine.quant import DeviceInfo, sized_tier
    from engine.sources import ModelSource
    from engine.tiny import ensure_tiny_model

    def card(free_gb: float) -> DeviceInfo:
        return DeviceInfo("cuda:0", f"a {free_gb:g} GB card", free_gb, free_gb, (9, 0))

    billion = 10**9
    # A 4B transformer beside a 4B encoder, then a 9B one beside an 8B encoder (Hopper: fp8 capable).
    small = [sized_tier(card(free), 4 * billion, 4 * billion)[:3] for free in (24, 16, 10, 6)]
    assert small == [
        ("bf16", "none", "none"),
        ("bf16", "fp8", "none"),  # the encoder runs once per prompt: it is quantized first
        ("fp8dq", "nf4", "none"),
        ("nf4", "nf4", "model"),
    ]
    assert sized_tier(card(24), 9 * billion, 8 * billion)[:2] == ("fp8dq", "fp8")
    assert sized_tier(DeviceInfo("cuda:0", "an Ampere card", 24.0, 24.0, (8, 6)), 9 * billion, 8 * billion)[
        :2
    ] == ("int8", "int8")

    folder = ensure_tiny_model(data_dir / "models" / "tiny-flux3", "flux3")
    assert weight_params(folder / "transformer") > 0 and weight_params(folder / "text_encoder") > 0
    sized = auto_for(ModelSource(kind="tiny", location=str(folder)), card(8), EngineSettings())
    assert sized is not None and sized[0] == "bf16" and "the weights need 0.0 GB" in sized[4]
    flux1 = ModelSource(kind="tiny", location=str(data_dir / "models" / "tiny-flux1"))
    assert auto_for(flux1, card(8), EngineSettings()) is None
    # A prompt upsampler stays on the device: its bf16 weights come off the free memory first.
    assert sized_tier(card(24), 4 * billion, 4 * billion, reserved_gb=14.0)[:2] == ("fp8dq", "nf4")
