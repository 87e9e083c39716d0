"""Upscaler models (engine/upscaler.py): files written with spandrel's own architecture classes in the
layouts people download, read back by spandrel's detection; found by name in Forge's and ComfyUI's
folders; hostile files refused; tiles; and Upscale through the engine with and without a redraw,
exact reruns, a pinned model refused when another is loaded."""

from __future__ import annotations

import io
import pickle
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from bot.services.errors import UserError
from bot.services.studio import Requester
from bot.store.models import JobKind
from engine.api import GenerationRequest, StepProgress
from engine.engine import FluxEngine
from engine.errors import ConfigError, GenerationCancelled, ModelLoadError, RequestError
from engine.hashing import FileHasher
from engine.input_image import InputImage, normalize_input_image
from engine.png import read_recipe
from engine.settings import EngineSettings
from engine.spec import DrawSpec
from engine.upscaler import Upscaler, _to_image, _to_tensor, find_upscaler, save_realesrgan
from tests.conftest import pixels
from tests.discord_support import (
    ALICE,
    BOB,
    Harness,
    finished_message,
    is_ephemeral_error,
    job_id_of,
    make_bot_settings,
    opt,
    png_of,
    running_bot,
)
from tests.fake_discord import FakeDiscord


def _photo(size: tuple[int, int] = (48, 40), seed: int = 1) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _esrgan(scale: int = 4, seed: int = 5) -> torch.nn.Module:
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    return ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=2, scale=scale).eval()


def _direct(network: torch.nn.Module, picture: Image.Image) -> Image.Image:
    with torch.inference_mode():
        return _to_image(network(_to_tensor(picture)).clamp(0, 1))


def _write_realesrgan(network: torch.nn.Module, path: Path) -> Path:
    """RealESRGAN_x4plus.pth: basicsr's RRDBNet key names under "params_ema"."""
    return save_realesrgan(network, path)


def _write_ultrasharp(network: torch.nn.Module, path: Path) -> Path:
    """4x-UltraSharp.pth / .safetensors: the original ESRGAN keys (model.0, model.1.sub.N.RDBk...)."""
    state = {k: v.contiguous() for k, v in network.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def _write_compact(path: Path) -> tuple[torch.nn.Module, Path]:
    """realesr-general-x4v3.pth: SRVGGNetCompact under "params"."""
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(7)
    network = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2).eval()
    torch.save({"params": network.state_dict()}, path)
    return network, path


def _write_swinir(path: Path) -> tuple[torch.nn.Module, Path]:
    """001_classicalSR_DF2K_s64w8_SwinIR-M_x2.pth: SwinIR under "params"."""
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(8)
    network = SwinIR(
        img_size=16,
        window_size=8,
        embed_dim=12,
        depths=[1],
        num_heads=[2],
        mlp_ratio=2.0,
        upscale=2,
        upsampler="pixelshuffle",
        resi_connection="1conv",
    ).eval()
    torch.save({"params": network.state_dict()}, path)
    return network, path


def _load(path: Path, **kw: Any) -> Upscaler:
    return Upscaler.load(path, "cpu", FileHasher(None), **kw)


@pytest.mark.parametrize("layout", ["realesrgan.pth", "ultrasharp.pth", "ultrasharp.safetensors"])
def test_esrgan_files_in_downloaded_layouts_draw_what_the_network_draws(tmp_path: Path, layout: str) -> None:
    network = _esrgan()
    write = _write_realesrgan if layout.startswith("realesrgan") else _write_ultrasharp
    upscaler = _load(write(network, tmp_path / f"4x-{layout}"))

    picture = _photo()
    assert (upscaler.architecture, upscaler.scale) == ("ESRGAN", 4)
    assert upscaler.description == "ESRGAN x4 (8nf, 2nb)"
    out = upscaler.upscale(picture)
    assert out.size == (4 * picture.width, 4 * picture.height)
    assert np.array_equal(pixels(out), pixels(_direct(network, picture)))


@pytest.mark.parametrize("write", [_write_compact, _write_swinir], ids=["compact", "swinir"])
def test_other_architectures_load_by_detection(
    tmp_path: Path, write: Callable[[Path], tuple[torch.nn.Module, Path]]
) -> None:
    network, path = write(tmp_path / "2x-model.pth")
    upscaler = _load(path)
    picture = _photo((32, 24))
    assert upscaler.scale == 2
    assert np.abs(pixels(upscaler.upscale(picture)) - pixels(_direct(network, picture))).max() <= 1


def test_found_by_name_in_forge_and_comfy_folders(tmp_path: Path) -> None:
    forge, comfy = tmp_path / "forge" / "models", tmp_path / "comfy" / "models"
    (forge / "ESRGAN").mkdir(parents=True)
    (comfy / "upscale_models").mkdir(parents=True)
    ultrasharp = _write_ultrasharp(_esrgan(), forge / "ESRGAN" / "4x-UltraSharp.pth")
    realesrgan = _write_realesrgan(_esrgan(), comfy / "upscale_models" / "RealESRGAN_x4plus.pth")

    assert find_upscaler("4x-UltraSharp", [forge]) == ultrasharp
    assert find_upscaler("4x-ultrasharp.pth", [forge]) == ultrasharp
    assert find_upscaler("RealESRGAN_x4plus", [forge, comfy]) == realesrgan
    assert find_upscaler(str(realesrgan), []) == realesrgan
    with pytest.raises(ConfigError, match=r"no upscaler named '4x-Nope' \(.*ESRGAN"):
        find_upscaler("4x-Nope", [forge])
    with pytest.raises(ConfigError, match="no file"):
        find_upscaler(str(tmp_path / "missing.pth"), [forge])


class _Boom:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("pwned",))


def test_files_that_are_not_upscalers_are_refused_in_one_line(tmp_path: Path) -> None:
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    restorer = _write_ultrasharp(_esrgan(scale=1), tmp_path / "1x-denoise.pth")
    hostile = tmp_path / "4x-evil.pth"
    hostile.write_bytes(pickle.dumps({"params_ema": _Boom()}))
    truncated = tmp_path / "4x-cut.pth"
    whole = _write_realesrgan(_esrgan(), tmp_path / "whole.pth").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])

    with pytest.raises(ModelLoadError, match="not an upscaler architecture spandrel knows"):
        _load(lora)
    with pytest.raises(ModelLoadError, match=r"1x-denoise.pth is a ESRGAN Restoration model \(scale 1\)"):
        _load(restorer)
    for bad in (hostile, truncated):
        with pytest.raises(ModelLoadError, match=f"cannot read {bad.name}") as refused:
            _load(bad)
        assert "\n" not in str(refused.value)


def test_tiles_blend_without_seams_report_progress_and_stop_on_cancel(tmp_path: Path) -> None:
    upscaler = _load(_write_realesrgan(_esrgan(), tmp_path / "x4.pth"), tile=64)
    picture = _photo((150, 100))
    whole = _direct(upscaler.descriptor.model, picture)
    seen: list[tuple[int, int]] = []

    tiled = upscaler.upscale(picture, on_tile=lambda done, total: seen.append((done, total)))

    assert tiled.size == whole.size == (600, 400)
    difference = np.abs(pixels(tiled) - pixels(whole))
    assert difference.mean() < 0.5 and difference.max() <= 16, "overlaps blended, no seams"
    assert seen == [(i, 6) for i in range(1, 7)]
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(GenerationCancelled):
        upscaler.upscale(picture, cancel=cancel)


# Through the engine: the tiny model with the tiny upscaler (a Real-ESRGAN-shaped random x4).


@pytest.fixture(scope="module")
def upscaling_engine(make_settings: Callable[..., EngineSettings], data_dir: Path) -> FluxEngine:
    return FluxEngine.load(make_settings(upscaler="tiny"), data_dir)


def _stored(picture: Image.Image) -> InputImage:
    data = io.BytesIO()
    picture.save(data, "PNG")
    return normalize_input_image(data.getvalue(), max_bytes=10**7, max_pixels=10**8)


def _upscale_spec(engine: FluxEngine, source: InputImage, factor: int, redraw: bool) -> DrawSpec:
    spec = engine.resolve(
        GenerationRequest(prompt="a red barn", seed=4, init_image=source.sha256, strength=0.3)
    )
    size = {"width": factor * source.width, "height": factor * source.height, "model_upscale": True}
    if redraw:
        return spec.model_copy(update=size)
    return spec.model_copy(update={**size, "mode": "upscale", "strength": None})


def test_upscale_without_redraw_is_the_models_enlargement(upscaling_engine: FluxEngine) -> None:
    engine = upscaling_engine
    assert engine.upscaler is not None
    source = _stored(_photo((64, 48)))
    steps: list[StepProgress] = []

    spec = _upscale_spec(engine, source, 4, False)
    (result,) = engine.draw([spec], on_step=steps.append, init_image=source.png)
    (again,) = engine.draw([_upscale_spec(engine, source, 4, False)], init_image=source.png)

    image = result.images[0]
    assert image.size == (256, 192)
    assert np.array_equal(pixels(image), pixels(engine.upscaler.upscale(Image.open(io.BytesIO(source.png)))))
    assert np.array_equal(pixels(image), pixels(again.images[0]))
    assert [(s.step, s.total) for s in steps] == [(1, 1)], "one tile, reported as the job's progress"
    recipe = result.recipes[0]
    assert recipe.mode == "upscale" and recipe.upscaler == "ESRGAN x4 (8nf, 1nb), tiles of 512 px, float32"
    assert recipe.upscaler_files == engine.upscaler.files
    # Factor 2 with a x4 model: the model's enlargement, resized down.
    (half,) = engine.draw([_upscale_spec(engine, source, 2, False)], init_image=source.png)
    assert half.images[0].size == (128, 96)

    # The recipe is a whole spec: an exact rerun draws the same pixels, pinned to this model.
    rerun = recipe.spec()
    assert rerun.upscaler == engine.upscaler.sha256 and rerun.mode == "upscale"
    (redone,) = engine.draw([rerun], init_image=source.png)
    assert np.array_equal(pixels(redone.images[0]), pixels(image))


def test_upscale_with_redraw_redraws_the_enlargement(
    upscaling_engine: FluxEngine, engine: FluxEngine
) -> None:
    source = _stored(_photo((64, 64), seed=3))
    spec = _upscale_spec(upscaling_engine, source, 2, True)

    (drawn,) = upscaling_engine.draw([spec], init_image=source.png)
    (again,) = upscaling_engine.draw([spec], init_image=source.png)
    lanczos_only = spec.model_copy(update={"model_upscale": False})
    (plain,) = upscaling_engine.draw([lanczos_only], init_image=source.png)

    assert drawn.images[0].size == (128, 128)
    assert np.array_equal(pixels(drawn.images[0]), pixels(again.images[0]))
    assert not np.array_equal(pixels(drawn.images[0]), pixels(plain.images[0])), "the model's pixels feed it"
    recipe = drawn.recipes[0]
    assert recipe.mode == "img2img" and recipe.strength == 0.3 and recipe.upscaler_files is not None
    (redone,) = upscaling_engine.draw([recipe.spec()], init_image=source.png)
    assert np.array_equal(pixels(redone.images[0]), pixels(drawn.images[0]))
    assert plain.recipes[0].upscaler_files is None

    # An engine without an upscaler, or with another one, refuses instead of drawing other pixels.
    with pytest.raises(RequestError, match="upscales with a model, and this engine has none"):
        engine.draw([spec], init_image=source.png)
    pinned = recipe.spec().model_copy(update={"upscaler": "0" * 64})
    with pytest.raises(RequestError, match="upscaled with another upscaler model"):
        upscaling_engine.draw([pinned], init_image=source.png)


def test_upscale_specs_are_checked() -> None:
    base = {
        "family": "flux1",
        "preset": "dev",
        "prompt": "x",
        "final_prompt": "x",
        "width": 64,
        "height": 64,
        "steps": 4,
        "seed": 1,
        "init_image": "a" * 64,
    }
    DrawSpec.model_validate({**base, "mode": "upscale", "model_upscale": True})
    for wrong in (
        {"mode": "upscale"},  # no model
        {"mode": "upscale", "model_upscale": True, "strength": 0.3},
        {"mode": "upscale", "model_upscale": True, "batch_size": 4},  # one image: no seeds to vary
        {"mode": "edit", "model_upscale": True},
        {"mode": "img2img", "strength": 0.3, "upscaler": "b" * 64},
    ):
        with pytest.raises(ValueError):
            DrawSpec.model_validate({**base, **wrong})


# Through Discord: the real discord.py client against the fake Discord, the tiny engine and upscaler.


@pytest.fixture
async def upscale_bot(
    fake: FakeDiscord, tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> AsyncIterator[Harness]:
    settings = make_bot_settings(tmp_path, lambda **kw: make_settings(upscaler="tiny", **kw), fake)
    async with running_bot(fake, settings, data_dir) as harness:
        yield harness


async def test_upscale_button_and_command_with_and_without_redraw(upscale_bot: Harness) -> None:
    fake = upscale_bot.fake
    alice, bob = fake.member(ALICE, "alice"), fake.member(BOB, "bob")
    original = await finished_message(
        fake, await fake.slash("imagine", [opt("prompt", "a harbour"), opt("seed", 8, 4)], alice)
    )
    job_id = job_id_of(original)
    assert "Upscale" in [c["label"] for row in original["components"] for c in row["components"]]

    pressed = await finished_message(fake, await fake.click(original["id"], f"fluxbot:upscale:{job_id}", bob))
    alone = await finished_message(
        fake,
        await fake.slash(
            "upscale", [opt("job_id", job_id, 4), opt("factor", 2, 4), opt("redraw", False, 5)], alice
        ),
    )

    redrawn = read_recipe(png_of(fake, pressed))
    assert (redrawn.width, redrawn.kind, redrawn.mode, redrawn.seed) == (256, "upscale", "img2img", 8)
    assert (redrawn.upscaler or "").startswith("ESRGAN x4 (8nf, 1nb)") and redrawn.parent_job == job_id
    enlarged = read_recipe(png_of(fake, alone))
    assert (enlarged.width, enlarged.mode) == (128, "upscale")
    assert Image.open(io.BytesIO(png_of(fake, alone))).size == (128, 128)
    assert f"upscale of job {job_id} (upscaler model, no redraw)" in alone["content"]
    # Its seed changes nothing: no Reroll or more seeds under it, and a reroll is refused in a line.
    labels = [c["label"] for row in alone["components"] for c in row["components"]]
    assert "Reroll" not in labels and "4 more seeds" not in labels and "Upscale" in labels
    alice_here = Requester(user_id=ALICE, user_name="alice")
    for press in (upscale_bot.app.studio.variations, upscale_bot.app.studio.reroll):
        with pytest.raises(UserError, match="is an upscale without a redraw: its seed changes nothing"):
            await press(alice_here, job_id_of(alone))

    big = await finished_message(
        fake, await fake.slash("imagine", [opt("prompt", "a harbour"), opt("size", "1024x1024")], alice)
    )
    refused = await fake.slash("upscale", [opt("job_id", job_id_of(big), 4), opt("factor", 4, 4)], alice)
    await fake.wait_for(
        lambda: is_ephemeral_error(
            fake, refused, "Upscale x4 would be 4096x4096: 16.78 MP is above this preset's maximum of 2.1 MP"
        )
    )
    bobs, _ = await upscale_bot.app.jobs.history(BOB, 1, 10)
    assert [job.kind for job in bobs] == [JobKind.UPSCALE]


async def test_without_an_upscaler_model_upscale_alone_says_how_to_get_one(harness: Harness) -> None:
    fake = harness.fake
    alice = fake.member(ALICE, "alice")
    original = await finished_message(fake, await fake.slash("imagine", [opt("prompt", "a boat")], alice))
    refused = await fake.slash(
        "upscale", [opt("job_id", job_id_of(original), 4), opt("redraw", False, 5)], alice
    )
    await fake.wait_for(lambda: is_ephemeral_error(fake, refused, "an admin sets engine.upscaler"))
    jobs, _ = await harness.app.jobs.history(ALICE, 1, 10)
    assert len(jobs) == 1, "nothing stored for the refusal"


def test_doctor_names_the_upscalers_architecture_and_scale(
    tmp_path: Path, make_settings: Callable[..., EngineSettings]
) -> None:
    from engine.doctor import run_doctor

    (tmp_path / "models" / "upscale_models").mkdir(parents=True)
    _write_ultrasharp(_esrgan(), tmp_path / "models" / "upscale_models" / "4x-UltraSharp.safetensors")

    found = run_doctor(make_settings(upscaler="4x-UltraSharp"), tmp_path).render()
    missing = run_doctor(make_settings(upscaler="4x-Nope"), tmp_path)

    assert "upscaler" in found and "4x-UltraSharp.safetensors: ESRGAN x4 (8nf, 2nb), tiles of 512 px" in found
    assert not missing.ok and "no upscaler named '4x-Nope'" in missing.render()
