"""Seconds per image on the tiny model: step caches, compilation, attention backends, the nf4 tier."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from engine.api import GenerationRequest, GenerationResult
from engine.doctor import run_doctor
from engine.engine import FluxEngine
from engine.errors import ConfigError, RequestError
from engine.png import png_bytes, read_parameters, read_recipe
from engine.presets import Preset, load_presets
from engine.quant import DeviceInfo, QuantPlan
from engine.settings import EngineSettings, shipped
from engine.speed import choose_attention, compiled_graphs
from engine.step_cache import StepCache
from tests.conftest import pixels
from tests.lora_support import make_lora, sha, whitelist_toml

STEPS = 12  # enough steps for every cache to skip some on the tiny model
CACHES = [
    # (as written, canonical): thresholds high enough for the tiny random model to skip steps
    ("fbcache:0.3", "fbcache:0.3"),
    ("taylorseer:3", "taylorseer:3:1"),
    ("magcache:0.2", "magcache:0.2"),
]
CPU_DEVICE = DeviceInfo("cpu", "CPU")
HOPPER = DeviceInfo("cuda:0", "NVIDIA H100", 80.0, 70.0, (9, 0))


def draw(engine: FluxEngine, cache: str | None = None, **fields: object) -> GenerationResult:
    values: dict[str, object] = {"prompt": "a red fox in a snowy forest", "seed": 11, "steps": STEPS}
    values.update(fields)
    return engine.generate(GenerationRequest.model_validate({**values, "cache": cache}))


def same(a: GenerationResult, b: GenerationResult) -> bool:
    return all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(a.images, b.images, strict=True))


def largest_difference(a: GenerationResult, b: GenerationResult) -> int:
    return max(int(np.abs(pixels(x) - pixels(y)).max()) for x, y in zip(a.images, b.images, strict=True))


# Step caches


@pytest.mark.parametrize(("written", "canonical"), CACHES)
def test_a_step_cache_skips_steps_repeats_its_pixels_and_leaves_the_next_job_alone(
    engine: FluxEngine, written: str, canonical: str
) -> None:
    before = draw(engine)

    cached = draw(engine, written)
    again = draw(engine, written)
    after = draw(engine)

    assert same(cached, again), "same seed, same cache: same pixels"
    assert not same(cached, before), "the cache changed what was drawn"
    assert same(after, before), "the cache was removed after its job"
    recipe = cached.recipes[0]
    assert recipe.cache == canonical and recipe.computed_steps is not None
    assert 0 < recipe.computed_steps < STEPS
    assert cached.timings.computed_steps == recipe.computed_steps and cached.timings.steps == STEPS
    assert before.recipes[0].cache == "none" and before.recipes[0].computed_steps == STEPS


def test_the_png_records_the_cache_and_how_many_steps_ran_in_full(engine: FluxEngine) -> None:
    result = draw(engine, "fbcache:0.3")
    png = png_bytes(result.images[0], result.recipes[0])

    recipe = read_recipe(png)
    parameters = read_parameters(png) or ""

    assert (recipe.cache, recipe.computed_steps) == ("fbcache:0.3", result.recipes[0].computed_steps)
    assert f"Step cache: fbcache:0.3, Full steps: {recipe.computed_steps}/{STEPS}" in parameters


def test_a_cached_recipe_reruns_to_the_same_pixels(engine: FluxEngine) -> None:
    first = draw(engine, "taylorseer:3")

    (again,) = engine.draw([first.recipes[0].spec()])

    assert same(first, again) and again.recipes[0].cache == "taylorseer:3:1"


def test_a_preset_brings_its_cache_and_a_request_may_pin_another(
    make_settings: Callable[..., EngineSettings], data_dir: Path, tmp_path: Path
) -> None:
    presets = tmp_path / "presets.toml"
    presets.write_text(
        "[turbo]\nsteps = 12\nsteps_range = [1, 50]\nguidance = 3.5\nguidance_range = [1.0, 10.0]\n"
        'width = 64\nheight = 64\nmegapixels_range = [0.001, 2.1]\ncache = "fbcache:0.3"\n'
    )
    engine = FluxEngine.load(make_settings(presets_file=presets), data_dir)

    by_preset = draw(engine, preset="turbo")
    pinned_off = draw(engine, "none", preset="turbo")

    assert by_preset.recipes[0].cache == "fbcache:0.3" and by_preset.recipes[0].computed_steps < STEPS
    assert pinned_off.recipes[0].cache == "none" and pinned_off.recipes[0].computed_steps == STEPS


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("lru", 'is not one of "none", "fbcache:<threshold>"'),
        ("taylorseer", "is not one of"),
        ("fbcache:7", "threshold: Input should be less than or equal to 1"),
        ("taylorseer:x", "numbers expected"),
        ("fbcache:0.1:2", "is not one of"),
    ],
)
def test_a_cache_text_is_parsed_once_and_a_bad_one_is_refused_in_one_line(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)) as refused:
        StepCache.parse(text)
    with pytest.raises(ValueError, match="cache"):
        GenerationRequest(prompt="a cat", cache=text)  # type: ignore[arg-type]

    assert "\n" not in str(refused.value)
    assert (
        str(StepCache.parse("FBCache")) == "fbcache:0.08"
        and str(StepCache.parse("magcache")) == "magcache:0.06"
    )


def test_magcache_is_for_flux1_only_because_its_ratios_are() -> None:
    with pytest.raises(ValueError, match="diffusers ships them for FLUX.1 only"):
        Preset(
            name="k",
            family="flux2",
            steps=4,
            steps_range=(1, 8),
            width=64,
            height=64,
            megapixels_range=(0.001, 4.2),
            cache=StepCache.parse("magcache"),
        )
    with pytest.raises(RequestError, match="FLUX.1 only"):
        StepCache.parse("magcache").check_family("flux2")


def test_the_shipped_dev_turbo_preset_is_dev_with_a_first_block_cache() -> None:
    presets = load_presets(shipped("presets.toml"))
    dev, turbo = presets["dev"], presets["dev-turbo"]

    assert str(turbo.cache) == "fbcache:0.08" and not dev.cache.on
    assert turbo.model_dump(exclude={"name", "description", "cache"}) == dev.model_dump(
        exclude={"name", "description", "cache"}
    )
    assert next(iter(presets)) == "dev", "dev stays the default preset"


# Attention backends


def test_attention_auto_is_sdpa_on_cpu_and_fa3_only_when_hopper_has_it() -> None:
    on_cpu = choose_attention("auto", CPU_DEVICE)
    on_hopper = choose_attention("auto", HOPPER)

    assert on_cpu.backend == "native" and "SDPA on CPU" in on_cpu.why
    assert on_hopper.backend == "native" and "without FlashAttention 3" in on_hopper.why


@pytest.mark.parametrize(
    ("setting", "device", "problem"),
    [
        ("fastest", CPU_DEVICE, "engine.attention = 'fastest' is not a diffusers attention backend"),
        (
            "flash",
            CPU_DEVICE,
            "engine.attention = 'flash' needs a CUDA GPU; on this host use 'native' or 'auto'",
        ),
        ("_flash_3", HOPPER, "needs the flash_attn_interface package, which is not installed"),
        ("sage", HOPPER, "needs the sageattention package"),
    ],
)
def test_an_attention_backend_this_host_lacks_is_refused_in_one_line(
    setting: str, device: DeviceInfo, problem: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)) as refused:
        choose_attention(setting, device)

    assert "\n" not in str(refused.value)


def test_an_unavailable_attention_backend_stops_the_engine_before_it_loads(
    make_settings: Callable[..., EngineSettings], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        FluxEngine.load(make_settings(attention="xformers", model=str(tmp_path / "no-such-model")), tmp_path)


def test_native_attention_by_name_draws_what_auto_draws(
    make_settings: Callable[..., EngineSettings], data_dir: Path, engine: FluxEngine
) -> None:
    native = FluxEngine.load(make_settings(attention="native"), data_dir)

    assert native.info.attention.backend == "native"
    assert same(draw(native), draw(engine))


def test_doctor_shows_attention_compile_and_the_presets_caches(
    make_settings: Callable[..., EngineSettings], tmp_path: Path
) -> None:
    report = run_doctor(make_settings(compile="regional", presets_file=shipped("presets.toml")), tmp_path)
    lines = {check.label: (check.status, check.detail) for check in report.checks}

    assert lines["attention"] == ("ok", "native: auto: PyTorch SDPA on CPU")
    assert lines["compile"][1].startswith("regional: compiled and warmed up at start") and (
        "not measured here yet" in lines["compile"][1]
    )
    assert "dev-turbo (fbcache:0.08)" in lines["presets"][1]


# Compilation (regional and full), with LoRAs swapped in and step caches


@pytest.fixture(scope="module")
def speed_setup(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two LoRAs of different layers and ranks, whitelisted, and presets with a cached one."""
    root = tmp_path_factory.mktemp("speed")
    lora_dir = root / "Lora"
    attention = make_lora(tiny_dir, lora_dir, "inky", 1)
    mlp = make_lora(tiny_dir, lora_dir, "mlp", 2, targets=("proj_mlp", "ff.net.2"), rank=8)
    whitelist = root / "loras.toml"
    whitelist.write_text(
        whitelist_toml(
            {
                "inky": {"file": "inky.safetensors", "sha256": sha(attention)},
                "mlp": {"file": "mlp.safetensors", "sha256": sha(mlp), "default_weight": 0.8},
            }
        )
    )
    presets = root / "presets.toml"
    presets.write_text(
        "[dev]\nsteps = 6\nsteps_range = [1, 50]\nguidance = 3.5\nguidance_range = [1.0, 10.0]\n"
        "width = 64\nheight = 64\nmegapixels_range = [0.001, 2.1]\n\n"
        "[turbo]\nsteps = 6\nsteps_range = [1, 50]\nguidance = 3.5\nguidance_range = [1.0, 10.0]\n"
        'width = 64\nheight = 64\nmegapixels_range = [0.001, 2.1]\ncache = "fbcache:0.3"\n'
    )
    return whitelist, lora_dir, presets


@pytest.fixture(scope="module")
def engines(
    make_settings: Callable[..., EngineSettings],
    tmp_path_factory: pytest.TempPathFactory,
    speed_setup: tuple[Path, Path, Path],
    tiny_dir: Path,
) -> Iterator[tuple[FluxEngine, FluxEngine, Path]]:
    """(eager, regional-compiled) engines on the same files; the compiled one warmed up at load."""
    whitelist, lora_dir, presets = speed_setup
    data = tmp_path_factory.mktemp("compiled")
    (data / "models").symlink_to(tiny_dir.parent)
    settings = make_settings(loras_file=whitelist, lora_dir=lora_dir, presets_file=presets)
    eager = FluxEngine.load(settings, data)
    compiled = FluxEngine.load(settings.model_copy(update={"compile": "regional"}), data)
    yield eager, compiled, data


# Compiled and eager kernels round differently: pixels may differ by this much (of 255).
TOLERANCE = 3


def test_regional_compile_draws_what_eager_draws_after_a_warm_up_at_load(
    engines: tuple[FluxEngine, FluxEngine, Path],
) -> None:
    eager, compiled, data = engines

    assert compiled.warmup_s is not None and compiled.warmup_s > 0 and compiled.warmup_graphs > 0
    assert largest_difference(draw(compiled, steps=6), draw(eager, steps=6)) <= TOLERANCE
    record = json.loads((data / "engine-warmup.json").read_text())
    assert record["compile"] == "regional" and record["graphs"] == compiled.warmup_graphs


@pytest.mark.parametrize(
    "fields",
    [
        {"size": "96x64"},
        {"size": "112x80", "batch_size": 3},
        {"loras": [{"name": "inky"}]},
        {"loras": [{"name": "mlp", "weight": 0.5}, {"name": "inky"}]},
        {"loras": [{"name": "mlp"}]},
        {"preset": "turbo"},
        {"preset": "turbo", "loras": [{"name": "inky", "weight": 0.3}], "size": "80x96"},
    ],
    ids=["second-size", "batch-and-size", "lora", "two-loras", "lora-switch", "cache", "cache-lora-size"],
)
def test_after_the_warm_up_sizes_loras_and_caches_draw_without_compiling_again(
    engines: tuple[FluxEngine, FluxEngine, Path], fields: dict[str, object]
) -> None:
    eager, compiled, _ = engines
    graphs = compiled_graphs()

    result = draw(compiled, steps=6, **fields)

    assert compiled_graphs() == graphs, "a recompile in a user's job"
    reference = draw(eager, steps=6, **fields)
    assert largest_difference(result, reference) <= TOLERANCE
    assert result.recipes[0].computed_steps == reference.recipes[0].computed_steps
    assert [lo.name for lo in result.recipes[0].loras] == [lo.name for lo in reference.recipes[0].loras]


def test_a_compiled_engine_swaps_loras_into_slots_and_frees_them_exactly(
    engines: tuple[FluxEngine, FluxEngine, Path],
) -> None:
    _, compiled, _ = engines
    plain = draw(compiled, steps=6)

    styled = draw(compiled, steps=6, loras=[{"name": "mlp"}])
    back = draw(compiled, steps=6)

    assert type(compiled.loras).__name__ == "LoraSlots" and "mlp" in compiled.loras.resident
    assert not same(plain, styled) and same(plain, back)


def test_full_compile_draws_what_eager_draws_and_a_new_size_does_not_recompile(
    make_settings: Callable[..., EngineSettings], data_dir: Path, engine: FluxEngine
) -> None:
    full = FluxEngine.load(make_settings(compile="full"), data_dir)
    graphs = compiled_graphs()

    result = draw(full, steps=4, size="64x96")

    assert compiled_graphs() == graphs
    assert largest_difference(result, draw(engine, steps=4, size="64x96")) <= TOLERANCE
    assert full.info.plan.compile == "full"


# The nf4 tier on a CPU (bitsandbytes runs 4-bit layers there; diffusers' quantizer asks for a GPU)


@pytest.mark.usefixtures("bitsandbytes_on_cpu")
def test_the_nf4_tier_loads_switches_loras_and_draws_on_cpu(
    make_settings: Callable[..., EngineSettings],
    data_dir: Path,
    engine: FluxEngine,
    speed_setup: tuple[Path, Path, Path],
) -> None:
    import bitsandbytes as bnb
    import torch

    whitelist, lora_dir, _ = speed_setup
    plan = QuantPlan("nf4", "nf4", torch.float32, "none", False, "off", "nf4 on CPU (test)")
    nf4 = FluxEngine.load(make_settings(loras_file=whitelist, lora_dir=lora_dir), data_dir, plan=plan)

    plain = draw(nf4, steps=4)
    styled = draw(nf4, steps=4, loras=[{"name": "inky"}])
    other = draw(nf4, steps=4, loras=[{"name": "mlp", "weight": 0.5}])
    back = draw(nf4, steps=4)

    to_q = nf4.pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(getattr(to_q, "base_layer", to_q), bnb.nn.Linear4bit)
    assert isinstance(nf4.pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q, bnb.nn.Linear4bit)
    assert plain.recipes[0].quant == "nf4" and plain.recipes[0].text_encoder_quant == "nf4"
    assert not same(plain, styled) and not same(styled, other) and same(plain, back)
    assert nf4.loras.resident == ["inky", "mlp"]
    assert np.abs(pixels(plain.images[0]) - pixels(draw(engine, steps=4).images[0])).mean() < 30


def test_the_nf4_tier_stays_refused_on_a_cpu_host_in_the_product(
    make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    from engine.errors import QuantizationError

    with pytest.raises(QuantizationError, match="nf4 needs bitsandbytes on a CUDA GPU; on CPU use"):
        FluxEngine.load(make_settings(quant="nf4"), data_dir)
