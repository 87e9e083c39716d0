"""Image in, image out, in the engine: img2img over the resident weights, upscale, input images checked
and normalized, live previews from the latents."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.api import GenerationRequest, StepProgress
from engine.engine import FluxEngine
from engine.errors import ConfigError, RequestError
from engine.input_image import InputImage, decode_input, normalize_input_image
from engine.png import read_recipe
from engine.preview import PreviewEvery, PreviewMaker, latent_rgb, unpack_latents
from engine.settings import EngineSettings
from tests.conftest import pixels

LIMITS = {"max_bytes": 8_000_000, "max_pixels": 40_000_000}


def _png(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def source(engine: FluxEngine) -> InputImage:
    drawn = engine.generate(GenerationRequest(prompt="a red barn", seed=3)).images[0]
    return normalize_input_image(_png(drawn), **LIMITS)


def _img2img(engine: FluxEngine, source: InputImage, **fields: object) -> Image.Image:
    request = GenerationRequest.model_validate(
        {"prompt": "a red barn at night", "seed": 9, "init_image": source.sha256, **fields}
    )
    return engine.generate(request, init_image=source.png).images[0]


def test_img2img_draws_from_the_input_and_repeats_exactly(engine: FluxEngine, source: InputImage) -> None:
    other = normalize_input_image(_png(Image.new("RGB", (64, 64), (20, 200, 40))), **LIMITS)
    steps: list[StepProgress] = []
    request = GenerationRequest(
        prompt="a red barn at night", seed=9, steps=10, init_image=source.sha256, strength=0.3
    )

    light = engine.generate(request, on_step=steps.append, init_image=source.png).images[0]
    again = engine.generate(request, init_image=source.png).images[0]
    from_other = _img2img(engine, other, strength=0.3, steps=10)
    heavy = _img2img(engine, source, strength=1.0, steps=10)
    text_only = engine.generate(GenerationRequest(prompt="a red barn at night", seed=9, steps=10)).images[0]

    assert np.array_equal(pixels(light), pixels(again)), "same input, same recipe: same pixels"
    assert not np.array_equal(pixels(light), pixels(from_other)), "the input image shapes the picture"
    assert not np.array_equal(pixels(light), pixels(heavy))
    assert not np.array_equal(pixels(light), pixels(text_only))
    assert [p.step for p in steps] == [1, 2, 3] and steps[-1].total == 3, (
        "strength 0.3 of 10 steps: the last 3"
    )


def test_the_recipe_names_the_input_and_reruns_the_same_picture(
    engine: FluxEngine, source: InputImage
) -> None:
    request = GenerationRequest(prompt="a red barn", seed=4, init_image=source.sha256, strength=0.5)
    spec = engine.resolve(request).model_copy(update={"origin": "vary_subtle", "parent_job": 7})
    (result,) = engine.draw([spec], init_image=source.png)
    recipe = read_recipe(_png_with_recipe(result.images[0], result.recipes[0]))

    assert recipe is not None
    assert (recipe.kind, recipe.mode, recipe.init_image_sha256, recipe.strength, recipe.parent_job) == (
        "vary_subtle",
        "img2img",
        source.sha256,
        0.5,
        7,
    )
    again = engine.draw([recipe.spec()], init_image=source.png)[0].images[0]
    assert np.array_equal(pixels(again), pixels(result.images[0]))


def _png_with_recipe(image: Image.Image, recipe: object) -> bytes:
    from engine.png import png_bytes

    return png_bytes(image, recipe)  # type: ignore[arg-type]


def test_img2img_shares_every_weight_with_the_resident_pipeline(
    engine: FluxEngine, source: InputImage
) -> None:
    _img2img(engine, source, strength=0.5)
    img2img = engine._img2img()

    def storage(pipe: object) -> dict[str, set[int]]:
        return {
            name: {p.data_ptr() for p in getattr(pipe, name).parameters()}
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
        }

    assert storage(img2img) == storage(engine.pipe), "from_pipe: the same tensors, no second copy"


def test_upscale_doubles_the_size_and_respects_the_presets_megapixel_cap(
    engine: FluxEngine, source: InputImage
) -> None:
    up = engine.generate(
        GenerationRequest(
            prompt="a red barn", seed=1, init_image=source.sha256, strength=0.3, size="128x128"
        ),
        init_image=source.png,
    )

    assert up.images[0].size == (128, 128)
    with pytest.raises(RequestError, match="above this preset's maximum of 2.1 MP"):
        engine.resolve(
            GenerationRequest(prompt="x", init_image=source.sha256, strength=0.3, size="2048x2048")
        )


def test_strength_is_checked_against_the_preset(engine: FluxEngine, source: InputImage) -> None:
    with pytest.raises(RequestError, match="strength only applies with an input image"):
        engine.resolve(GenerationRequest(prompt="x", strength=0.5))
    with pytest.raises(RequestError, match="strength must be between 0.1 and 1.0"):
        engine.resolve(GenerationRequest(prompt="x", init_image=source.sha256, strength=0.05))
    assert engine.resolve(GenerationRequest(prompt="x", init_image=source.sha256)).strength == 0.7


def test_a_stored_input_that_does_not_match_its_hash_is_refused(
    engine: FluxEngine, source: InputImage
) -> None:
    other = normalize_input_image(_png(Image.new("RGB", (64, 64), "blue")), **LIMITS)
    request = GenerationRequest(prompt="x", init_image=source.sha256)

    with pytest.raises(RequestError, match="does not match the hash"):
        engine.generate(request, init_image=other.png)
    with pytest.raises(RequestError, match="none was given"):
        engine.generate(request)


def test_input_images_are_oriented_stripped_and_hashed_by_content() -> None:
    picture = Image.new("RGB", (40, 20), "white")
    picture.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    jpeg = io.BytesIO()
    picture.save(jpeg, format="JPEG", exif=exif.tobytes(), quality=95)
    from PIL import PngImagePlugin

    text = PngImagePlugin.PngInfo()
    text.add_text("parameters", "secret prompt, GPS 48.85N")
    with_text, plain = _png(picture, pnginfo=text), _png(picture)

    oriented = normalize_input_image(jpeg.getvalue(), **LIMITS)
    a, b = normalize_input_image(with_text, **LIMITS), normalize_input_image(plain, **LIMITS)

    assert (oriented.width, oriented.height) == (20, 40), "EXIF orientation applied"
    assert a.sha256 == b.sha256 and a.png == b.png, "metadata dropped: same picture, same bytes"
    assert b"secret prompt" not in a.png
    assert Image.open(io.BytesIO(a.png)).info.get("parameters") is None
    assert decode_input(a.png, a.sha256).size == (40, 20)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height: a valid header and a tiny (incomplete) image stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("gif behind a .png name", lambda: _gif(), r"not a PNG, JPEG or WebP image \(it is GIF\)"),
        ("text behind a .png name", lambda: b"<html>hello</html>", "not a readable PNG, JPEG or WebP image"),
        ("truncated png", lambda: _png(Image.new("RGB", (64, 64), "red"))[:120], "not a readable PNG"),
        (
            "20k x 20k pixel bomb",
            lambda: _png_header_only(20_000, 20_000),
            "far more pixels than the limit of 40 MP",
        ),
        ("8k x 8k image", lambda: _png_header_only(8_000, 8_000), r"8000x8000 \(64 MP\); the limit is 40 MP"),
        ("oversized file", lambda: b"\0" * 9_000_000, r"9\.0 MB; the limit is 8 MB"),
    ],
)
def test_hostile_uploads_are_refused_in_one_line(name: str, make: object, message: str) -> None:
    data = make()  # type: ignore[operator]

    with pytest.raises(RequestError, match=message) as refused:
        normalize_input_image(data, **LIMITS)
    assert "\n" not in str(refused.value)


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="GIF")
    return buffer.getvalue()


def test_previews_come_with_progress_at_the_interval_as_small_jpegs(engine: FluxEngine) -> None:
    every_step: list[StepProgress] = []
    none: list[StepProgress] = []

    engine.generate(
        GenerationRequest(prompt="a cat", seed=2, steps=6),
        on_step=every_step.append,
        preview=PreviewEvery(seconds=0.0),
    )
    engine.generate(
        GenerationRequest(prompt="a cat", seed=2, steps=6),
        on_step=none.append,
        preview=PreviewEvery(seconds=3600.0),
    )

    with_preview = [p.step for p in every_step if p.preview]
    assert with_preview == [2, 3, 4, 5], "from the second step (a velocity needs two) to the one before last"
    assert [p.step for p in none if p.preview] == [2], "one, then none until the interval has passed"
    by_steps: list[StepProgress] = []
    engine.generate(
        GenerationRequest(prompt="a cat", seed=2, steps=6),
        on_step=by_steps.append,
        preview=PreviewEvery(steps=2),
    )
    assert [p.step for p in by_steps if p.preview] == [2, 4], "images.preview_every_steps: every second step"
    preview = Image.open(io.BytesIO(next(p.preview for p in every_step if p.preview)))  # type: ignore[arg-type]
    assert preview.format == "JPEG" and max(preview.size) <= 256


def test_the_preview_is_the_flow_matching_prediction_of_the_clean_latents() -> None:
    generator = torch.Generator().manual_seed(0)
    clean, noise = (
        torch.randn(1, 16, 8, 8, generator=generator),
        torch.randn(1, 16, 8, 8, generator=generator),
    )

    def packed(x: torch.Tensor) -> torch.Tensor:  # FluxPipeline._pack_latents
        return x.view(1, 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 16, 64)

    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.0])
    maker = PreviewMaker(height=64, width=64, every=PreviewEvery(seconds=0.0))
    at = [packed((1 - s) * clean + s * noise) for s in sigmas.tolist()]

    assert maker.after_step(at[1], sigmas, 1, now=0.0) is None
    preview = maker.after_step(at[2], sigmas, 2, now=1.0)

    assert torch.allclose(unpack_latents(packed(clean), 64, 64), clean)
    expected = Image.open(io.BytesIO(_jpeg(latent_rgb(clean[0]))))
    got = Image.open(io.BytesIO(preview or b""))
    assert np.abs(pixels(got) - pixels(expected)).mean() < 2


def _jpeg(image: Image.Image) -> bytes:
    from engine.preview import jpeg

    return jpeg(image)


def test_kontext_edits_share_the_resident_vae_and_text_encoders_and_load_from_a_bfl_file(
    make_settings: Callable[..., EngineSettings],
    data_dir: Path,
    tiny_dir: Path,
    source: InputImage,
    tmp_path: Path,
) -> None:
    from safetensors.torch import save_file

    from tests.layouts import diffusers_to_bfl

    engine = FluxEngine.load(make_settings(kontext="tiny"), data_dir)
    edit = GenerationRequest(prompt="make it night", seed=4, mode="edit", init_image=source.sha256)
    result = engine.generate(edit, init_image=source.png)
    assert engine.kontext is not None
    kontext = engine.kontext.pipe
    for shared in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert getattr(kontext, shared) is getattr(engine.pipe, shared), f"{shared}: the resident one"
    assert kontext.transformer is not engine.pipe.transformer
    assert result.recipes[0].kind == "edit" and result.recipes[0].kontext_files
    file = tmp_path / "flux1-kontext-dev.safetensors"
    save_file(
        {k: v.contiguous() for k, v in diffusers_to_bfl(kontext.transformer.state_dict()).items()}, file
    )

    from_file = FluxEngine.load(make_settings(kontext=str(file), configs=tiny_dir), data_dir)

    again = from_file.generate(edit, init_image=source.png)
    assert np.array_equal(pixels(again.images[0]), pixels(result.images[0])), "same weights, same edit"
    with pytest.raises(RequestError, match="edits take no strength"):
        engine.resolve(edit.model_copy(update={"strength": 0.5}))
    with pytest.raises(RequestError, match="edits need FLUX.1 Kontext"):
        FluxEngine.load(make_settings(), data_dir).generate(edit, init_image=source.png)


def test_taef1_previews_decode_with_the_operators_tiny_vae(
    make_settings: Callable[..., EngineSettings], data_dir: Path, tmp_path: Path
) -> None:
    from diffusers import AutoencoderTiny

    folder = tmp_path / "taef1"
    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        latent_channels=16,
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).save_pretrained(folder)
    engine = FluxEngine.load(make_settings(preview=f"taef1:{folder}"), data_dir)
    steps: list[StepProgress] = []

    engine.generate(
        GenerationRequest(prompt="a cat", seed=1, steps=4, size="128x128"),
        on_step=steps.append,
        preview=PreviewEvery(seconds=0.0),
    )

    preview = Image.open(io.BytesIO(next(p.preview for p in steps if p.preview)))  # type: ignore[arg-type]
    assert preview.format == "JPEG" and preview.size == (128, 128), "decoded to the picture's own size"
    with pytest.raises(ConfigError, match='engine.preview must be "latent", "off" or "taef1:<folder>"'):
        FluxEngine.load(make_settings(preview="vae"), data_dir)


def test_vae_tiling_is_on_only_for_jobs_above_the_threshold(engine: FluxEngine, source: InputImage) -> None:
    seen: list[bool] = []

    def watch(progress: StepProgress) -> None:
        seen.append(bool(engine.pipe.vae.use_tiling))

    before = engine.vae_tiling_above_mp
    try:
        engine.vae_tiling_above_mp = 0.01  # 128x128 = 0.016 MP: above
        upscale = GenerationRequest(
            prompt="x", seed=1, init_image=source.sha256, strength=0.3, size="128x128"
        )
        engine.generate(upscale, on_step=watch, init_image=source.png)
        small = GenerationRequest(prompt="x", seed=1, size="64x64")  # 0.004 MP: below
        engine.generate(small, on_step=watch)
    finally:
        engine.vae_tiling_above_mp = before

    assert seen[0] is True and seen[-1] is False
    assert engine.pipe.vae.use_tiling is False, "switched off again after the large job"
    engine.pipe.vae.enable_tiling()  # as a plan with vae tiling on leaves it
    try:
        engine.vae_tiling_above_mp = 0.01
        engine.generate(upscale, init_image=source.png)
        assert engine.pipe.vae.use_tiling is True, "the plan's own tiling stays on"
    finally:
        engine.pipe.vae.disable_tiling()
        engine.vae_tiling_above_mp = before
