"""Inpainting with FLUX.1 Fill beside the resident model: the mask's part repainted, the rest kept,
exact reruns, hostile masks refused in one line with nothing stored; through the engine and Discord."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.api import GenerationRequest
from engine.engine import FluxEngine
from engine.errors import RequestError
from engine.input_image import InputImage, normalize_input_image
from engine.png import read_recipe
from engine.settings import EngineSettings
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


@pytest.fixture(scope="module")
def fill_engine(make_settings: Callable[..., EngineSettings], data_dir: Path) -> FluxEngine:
    return FluxEngine.load(make_settings(fill="tiny"), data_dir)


def _stored(picture: Image.Image) -> InputImage:
    data = io.BytesIO()
    picture.save(data, "PNG")
    return normalize_input_image(data.getvalue(), max_bytes=10**7, max_pixels=10**7)


def _photo(size: tuple[int, int] = (64, 64), seed: int = 1) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _mask(size: tuple[int, int] = (64, 64), box: tuple[int, int, int, int] = (0, 0, 32, 64)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def test_fill_repaints_only_the_masked_part_and_reruns_exactly(fill_engine: FluxEngine) -> None:
    picture, mask = _stored(_photo()), _stored(_mask())
    request = GenerationRequest(
        prompt="a red door",
        mode="inpaint",
        preset="fill",
        init_image=picture.sha256,
        mask=mask.sha256,
        seed=3,
    )

    result = fill_engine.generate(request, init_image=picture.png, references=[mask.png])

    out, before = pixels(result.images[0]), pixels(Image.open(io.BytesIO(picture.png)))
    assert np.array_equal(out[:, 32:], before[:, 32:]), "outside the mask: the input's own pixels"
    assert not np.array_equal(out[:, :32], before[:, :32]), "inside it: repainted"
    recipe = result.recipes[0]
    assert (recipe.kind, recipe.mode, recipe.preset, recipe.guidance) == ("inpaint", "inpaint", "fill", 30.0)
    assert recipe.mask_sha256 == mask.sha256 and recipe.fill_files
    assert fill_engine.fill is not None and fill_engine.fill.pipe.vae is fill_engine.pipe.vae
    assert fill_engine.fill.pipe.text_encoder_2 is fill_engine.pipe.text_encoder_2, "shared, not copied"
    assert (
        fill_engine.fill.pipe.transformer.config.in_channels
        == 6 * fill_engine.pipe.transformer.config.in_channels
    )
    again = fill_engine.draw([recipe.spec()], init_image=picture.png, references=[mask.png])[0]
    assert np.array_equal(pixels(again.images[0]), out)


def test_inpaint_needs_fill_a_mask_and_no_loras(engine: FluxEngine, fill_engine: FluxEngine) -> None:
    picture, mask = _stored(_photo()), _stored(_mask())
    request = GenerationRequest(prompt="x", mode="inpaint", init_image=picture.sha256, mask=mask.sha256)
    with pytest.raises(RequestError, match="inpainting needs FLUX.1 Fill"):
        engine.draw([engine.resolve(request)], init_image=picture.png, references=[mask.png])
    with pytest.raises(RequestError, match="a mask is for inpainting"):
        fill_engine.resolve(GenerationRequest(prompt="x", mask=mask.sha256))
    with pytest.raises(RequestError, match="take no LoRAs"):
        fill_engine.resolve(request.model_copy(update={"loras": ({"name": "x"},)}))  # type: ignore[dict-item]


@pytest.fixture
async def fill_bot(
    fake: FakeDiscord, tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> AsyncIterator[Harness]:
    settings = make_bot_settings(tmp_path, lambda **kw: make_settings(fill="tiny", **kw), fake)
    async with running_bot(fake, settings, data_dir) as harness:
        yield harness


def _png(picture: Image.Image) -> bytes:
    data = io.BytesIO()
    picture.save(data, "PNG")
    return data.getvalue()


async def test_inpaint_through_discord_on_a_job_and_hostile_masks(fill_bot: Harness) -> None:
    fake = fill_bot.fake
    alice, bob = fake.member(ALICE, "alice"), fake.member(BOB, "bob")
    original = await finished_message(
        fake, await fake.slash("imagine", [opt("prompt", "a house"), opt("seed", 2, 4)], alice)
    )
    drawn = np.asarray(Image.open(io.BytesIO(png_of(fake, original))).convert("RGB"))

    mask = fake.attach(_png(_mask(box=(0, 0, 32, 64))), "mask.png", "image/png")
    token = await fake.slash(
        "inpaint",
        [opt("prompt", "a red door"), opt("mask", mask["id"], 11), opt("job_id", job_id_of(original), 4)],
        bob,
        attachments=[mask],
    )
    repainted = await finished_message(fake, token)

    out = np.asarray(Image.open(io.BytesIO(png_of(fake, repainted))).convert("RGB"))
    assert np.array_equal(out[:, 32:], drawn[:, 32:]) and not np.array_equal(out[:, :32], drawn[:, :32])
    recipe = read_recipe(png_of(fake, repainted))
    assert (recipe.kind, recipe.parent_job) == ("inpaint", job_id_of(original))
    assert "inpaint of job" in repainted["content"]

    hostile = {
        "black": (_png(Image.new("L", (64, 64), 0)), "the mask selects nothing"),
        "white": (_png(Image.new("L", (64, 64), 255)), "the mask covers the whole picture"),
        "wide": (_png(_mask((128, 32), (0, 0, 10, 10))), "the mask is 128x32, the picture 64x64"),
        "text": (b"not an image at all", "not a readable PNG, JPEG or WebP image"),
    }
    for name, (data, refusal) in hostile.items():
        attached = fake.attach(data, f"{name}.png", "image/png")
        token = await fake.slash(
            "inpaint",
            [opt("prompt", "x"), opt("mask", attached["id"], 11), opt("job_id", job_id_of(original), 4)],
            bob,
            attachments=[attached],
        )
        await fake.wait_for(lambda token=token, refusal=refusal: is_ephemeral_error(fake, token, refusal))
    bobs, _ = await fill_bot.app.jobs.history(BOB, 1, 10)
    assert len(bobs) == 1, "only the good inpaint was stored"


async def test_without_fill_inpaint_says_how_to_enable_it(harness: Harness) -> None:
    fake = harness.fake
    mask = fake.attach(_png(_mask()), "mask.png", "image/png")
    token = await fake.slash(
        "inpaint",
        [opt("prompt", "x"), opt("mask", mask["id"], 11), opt("job_id", 1, 4)],
        fake.member(ALICE, "alice"),
        attachments=[mask],
    )
    await fake.wait_for(lambda: is_ephemeral_error(fake, token, "engine.fill = "))


@pytest.mark.parametrize(
    ("move", "size", "box"),
    [
        ("zoom15", (96, 96), (16, 16, 80, 80)),
        ("zoom2", (128, 128), (32, 32, 96, 96)),
        ("left", (96, 64), (32, 0, 96, 64)),
        ("right", (96, 64), (0, 0, 64, 64)),
        ("up", (64, 96), (0, 32, 64, 96)),
        ("down", (64, 96), (0, 0, 64, 64)),
    ],
)
def test_zoom_out_and_pan_canvases_keep_the_picture_and_mask_the_new_border(
    move: str, size: tuple[int, int], box: tuple[int, int, int, int]
) -> None:
    from engine.outpaint import SEAM, pan, zoom_out

    picture = _photo()
    canvas = (
        zoom_out(picture, {"zoom15": 1.5, "zoom2": 2.0}[move], 10**7)
        if move.startswith("zoom")
        else pan(
            picture,
            move,
            10**7,  # type: ignore[arg-type]
        )
    )

    assert canvas.image.size == size and canvas.box == box
    assert np.array_equal(np.asarray(canvas.image.crop(box)), np.asarray(picture)), (
        "the picture itself, unscaled"
    )
    left, top, right, bottom = canvas.kept
    assert (right - left, bottom - top) <= (64, 64) and 64 - (right - left) in (0, SEAM, 2 * SEAM)
    capped = zoom_out(picture, 2.0, 96 * 96)
    assert capped.image.size == (96, 96) and capped.box == (24, 24, 72, 72), "the cap shrinks it all alike"


async def test_zoom_out_and_pan_buttons_draw_only_the_new_border(fill_bot: Harness) -> None:
    fake = fill_bot.fake
    alice, bob = fake.member(ALICE, "alice"), fake.member(BOB, "bob")
    original = await finished_message(
        fake, await fake.slash("imagine", [opt("prompt", "a house"), opt("seed", 2, 4)], alice)
    )
    labels = [c["label"] for row in original["components"] for c in row["components"]]
    assert {"Zoom Out 1.5x", "Zoom Out 2x", "Pan left", "Pan up", "Pan right", "Pan down"} <= set(labels)
    assert (
        all(len(row["components"]) <= 5 for row in original["components"])
        and len(original["components"]) <= 5
    )
    drawn = np.asarray(Image.open(io.BytesIO(png_of(fake, original))).convert("RGB"))

    for move, size, (left, top) in (
        ("zoom2", (128, 128), (32, 32)),
        ("left", (96, 64), (32, 0)),
        ("down", (64, 96), (0, 0)),
    ):
        click = await fake.click(original["id"], f"fluxbot:{move}:{job_id_of(original)}", bob)
        await fake.wait_for(lambda click=click: fake.response_to(click))
        # The form's prompt: empty keeps the job's own; the pan left is drawn with another.
        prompt = "a garden" if move == "left" else ""
        result = await finished_message(fake, await fake.submit_modal(click, [prompt], bob))
        out = np.asarray(Image.open(io.BytesIO(png_of(fake, result))).convert("RGB"))
        assert (out.shape[1], out.shape[0]) == size, move
        # The picture sits at (left, top) on the canvas; away from the seams it is its own pixels.
        inner = out[top + 8 : top + 56, left + 8 : left + 56]
        assert np.array_equal(inner, drawn[8:56, 8:56]), f"{move}: the picture itself is kept"
        recipe = read_recipe(png_of(fake, result))
        assert (recipe.kind, recipe.mode, recipe.parent_job, recipe.prompt) == (
            "outpaint",
            "inpaint",
            job_id_of(original),
            prompt or "a house",
        )
        assert "zoom out or pan of job" in result["content"]


async def test_inpaint_by_words_uses_and_shows_the_segmenters_mask(
    fake: FakeDiscord, tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    settings = make_bot_settings(
        tmp_path, lambda **kw: make_settings(fill="tiny", segmenter="tiny", **kw), fake
    )
    async with running_bot(fake, settings, data_dir) as bot:
        alice = fake.member(ALICE, "alice")
        original = await finished_message(
            fake, await fake.slash("imagine", [opt("prompt", "a house")], alice)
        )
        drawn = np.asarray(Image.open(io.BytesIO(png_of(fake, original))).convert("RGB"))

        token = await fake.slash(
            "inpaint",
            [opt("prompt", "a blue sky"), opt("where", "the sky"), opt("job_id", job_id_of(original), 4)],
            alice,
        )
        result = await finished_message(fake, token)

        names = [a["filename"] for a in result["attachments"]]
        assert names[-1].endswith("-mask.png"), "the mask used is shown beside the result"
        mask = np.asarray(
            Image.open(io.BytesIO(fake.attachment_bytes[result["attachments"][-1]["id"]])).convert("L")
        )
        out = np.asarray(Image.open(io.BytesIO(png_of(fake, result))).convert("RGB"))
        untouched = mask == 0
        assert 0 < untouched.mean() < 1, "the words selected a part, not all or nothing"
        assert np.array_equal(out[untouched], drawn[untouched]), "outside the mask: the picture's own pixels"
        job = await bot.app.jobs.get(job_id_of(result))
        assert job is not None and job.spec.mask is not None
        labels = [c["label"] for row in original["components"] for c in row["components"]]
        assert "Vary (Region)" in labels
        click = await fake.click(original["id"], f"fluxbot:region:{job_id_of(original)}", alice)
        await fake.wait_for(lambda: fake.response_to(click))
        region = await finished_message(
            fake, await fake.submit_modal(click, ["the sky", "a stormy sky"], alice)
        )
        region_recipe = read_recipe(png_of(fake, region))
        assert (region_recipe.kind, region_recipe.prompt) == ("inpaint", "a stormy sky")
        assert region["attachments"][-1]["filename"].endswith("-mask.png")
        again = await finished_message(fake, await fake.slash("rerun", [opt("job_id", job.id, 4)], alice))
        assert np.array_equal(out, np.asarray(Image.open(io.BytesIO(png_of(fake, again))).convert("RGB")))


async def test_inpaint_by_words_without_a_segmenter_says_so(fill_bot: Harness) -> None:
    fake = fill_bot.fake
    token = await fake.slash(
        "inpaint",
        [opt("prompt", "x"), opt("where", "the sky"), opt("job_id", 1, 4)],
        fake.member(ALICE, "alice"),
    )
    await fake.wait_for(lambda: is_ephemeral_error(fake, token, "Masks from words need a segmentation model"))


def test_swap_keeps_one_extra_transformer_on_the_device_and_draws_the_same(
    make_settings: Callable[..., EngineSettings], data_dir: Path, fill_engine: FluxEngine
) -> None:
    from engine.extra_models import extra_policy
    from engine.quant import DeviceInfo

    swapping = FluxEngine.load(make_settings(fill="tiny", kontext="tiny", extra_models="swap"), data_dir)
    picture, mask = _stored(_photo()), _stored(_mask())
    inpaint = GenerationRequest(
        prompt="a red door",
        mode="inpaint",
        preset="fill",
        init_image=picture.sha256,
        mask=mask.sha256,
        seed=3,
    )
    edit = GenerationRequest(
        prompt="make it night", mode="edit", init_image=picture.sha256, size="64x64", seed=3
    )

    first = swapping.generate(inpaint, init_image=picture.png, references=[mask.png])
    assert swapping.swap is not None and swapping.swap.on_device is swapping.fill
    swapping.generate(edit, init_image=picture.png)
    assert swapping.swap.on_device is swapping.kontext
    again = swapping.generate(inpaint, init_image=picture.png, references=[mask.png])

    assert swapping.swap.swaps == 3 and swapping.extra_policy == "swap"
    resident = fill_engine.generate(inpaint, init_image=picture.png, references=[mask.png])
    assert np.array_equal(pixels(first.images[0]), pixels(resident.images[0])), "swapping changes no pixel"
    assert np.array_equal(pixels(again.images[0]), pixels(first.images[0]))
    # auto: resident on a CPU and where the GPU holds them with room to spare; swap where it does not.
    assert extra_policy("auto", DeviceInfo("cpu", "cpu"), 10**12) == "resident"
    assert extra_policy("auto", DeviceInfo("cuda:0", "H100", 80.0, 60.0), 24 * 1024**3) == "resident"
    assert extra_policy("auto", DeviceInfo("cuda:0", "4090", 24.0, 10.0), 24 * 1024**3) == "swap"


def test_extra_models_off_loads_neither_and_says_so(
    make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    off = FluxEngine.load(make_settings(fill="tiny", kontext="tiny", extra_models="off"), data_dir)
    picture, mask = _stored(_photo()), _stored(_mask())
    request = GenerationRequest(
        prompt="x", mode="inpaint", preset="fill", init_image=picture.sha256, mask=mask.sha256
    )

    assert off.kontext is None and off.fill is None and off.extra_policy == "off"
    with pytest.raises(RequestError, match="inpainting needs FLUX.1 Fill"):
        off.generate(request, init_image=picture.png, references=[mask.png])


async def test_the_dispatcher_runs_jobs_on_the_same_extra_model_together_when_swapping(
    make_settings: Callable[..., EngineSettings], data_dir: Path, tmp_path: Path
) -> None:
    from bot.services.studio import Requester
    from bot.store.models import JobStatus
    from tests.bot_support import RecordingEvents, make_app
    from tests.bot_support import make_settings as app_settings

    settings = app_settings(
        tmp_path, lambda **kw: make_settings(fill="tiny", kontext="tiny", extra_models="swap", **kw)
    )
    app = await make_app(settings, RecordingEvents(), data_dir)
    await app.start()
    try:
        engine = app.engine
        assert engine is not None and engine.swap is not None
        picture, mask = (
            await app.studio.image_prompt(_png(_photo())),
            await app.studio.image_prompt(_png(_mask())),
        )
        members = [Requester(user_id=100 + i, user_name=f"m{i}") for i in range(4)]
        app.queue.pause()
        # In line: Kontext, Fill, Kontext, Fill, one member each.
        kontext_first = await app.studio.edit(members[0], "make it night", [picture])
        fill_first = await app.studio.inpaint(members[1], "a red door", picture, mask)
        kontext_second = await app.studio.edit(members[2], "make it dusk", [picture])
        fill_second = await app.studio.inpaint(members[3], "a blue door", picture, mask)
        app.queue.resume()
        await app.queue.wait_idle(60)

        tickets = (kontext_first, fill_first, kontext_second, fill_second)
        jobs = [job for t in tickets if (job := await app.jobs.get(t.job_id)) is not None]
        assert len(jobs) == 4 and all(job.status == JobStatus.DONE for job in jobs)
        started = sorted(jobs, key=lambda job: job.started_at or job.created_at)
        assert [job.spec.extra_model for job in started] == ["kontext", "kontext", "fill", "fill"]
        assert engine.swap.swaps == 2, "one move onto the device per model, not one per job"
    finally:
        await app.close()
