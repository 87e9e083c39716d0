"""Image in, image out through the real discord.py client and the fake Discord: attachments, Vary,
Upscale, the upload limit and live previews, on the tiny model."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bot.store.models import JobKind
from engine.engine import FluxEngine
from engine.png import read_recipe
from engine.settings import EngineSettings
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
)
from tests.fake_discord import FakeDiscord
from tests.test_image_to_image import _gif, _png_header_only


def _png(color: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    picture = Image.new("RGB", size, color)
    for x in range(0, size[0], 8):
        picture.putpixel((x, size[1] // 2), (255, 255, 255))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _image_option(attachment: dict[str, Any]) -> dict[str, Any]:
    return opt("image", attachment["id"], 11)


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


async def _imagine_from(harness: Harness, data: bytes, *options: dict[str, Any]) -> dict[str, Any]:
    fake = harness.fake
    attachment = fake.attach(data, "photo.png", "image/png")
    token = await fake.slash(
        "imagine",
        [opt("prompt", "a lighthouse at dusk"), _image_option(attachment), *options],
        fake.member(ALICE, "alice"),
        attachments=[attachment],
    )
    return await finished_message(fake, token)


@pytest.mark.usefixtures("database_backend")
async def test_an_attached_image_is_drawn_from_and_reruns_exactly(harness: Harness) -> None:
    fake = harness.fake
    first = await _imagine_from(harness, _png((200, 60, 20)), opt("seed", 5, 4), opt("strength", 0.6, 10))
    job_id = job_id_of(first)

    rerun = await fake.slash("rerun", [opt("job_id", job_id, 4)], fake.member(BOB, "bob"))
    second = await finished_message(fake, rerun)

    recipe = read_recipe(png_of(fake, first))
    job = await harness.app.jobs.get(job_id)
    assert job is not None and job.kind == JobKind.IMAGINE
    assert recipe.kind == "img2img" and recipe.strength == 0.6 and recipe.init_image_sha256
    assert job.spec.init_image == recipe.init_image_sha256
    assert (harness.app.settings.data_dir / "inputs" / recipe.init_image_sha256[:2]).is_dir()
    # 96x64 is 3:2: without a size option the picture keeps the input's aspect where the preset's
    # 16 px grid allows it (at 64x64 pixels it does not: the nearest allowed aspect that fits is used).
    assert recipe.width / recipe.height == pytest.approx(96 / 64, rel=0.35)
    assert np.array_equal(_pixels(png_of(fake, first)), _pixels(png_of(fake, second)))
    assert "from an image, strength 0.6" in first["content"]
    other = await _imagine_from(harness, _png((20, 60, 200)), opt("seed", 5, 4), opt("strength", 0.6, 10))
    assert not np.array_equal(_pixels(png_of(fake, first)), _pixels(png_of(fake, other)))


@pytest.mark.parametrize(
    ("data", "filename", "content_type", "message"),
    [
        (_gif(), "cat.png", "image/png", "not a PNG, JPEG or WebP image (it is GIF)"),
        (b"%PDF-1.4 not an image", "cat.png", None, "not a readable PNG, JPEG or WebP image"),
        (_png((1, 2, 3))[:90], "cut.png", "image/png", "not a readable PNG"),
        (_png_header_only(20_000, 20_000), "bomb.png", "image/png", "far more pixels than the limit"),
        (b"x" * 100, "notes.txt", "text/plain", "That file is text/plain, not a PNG, JPEG or WebP image"),
    ],
)
async def test_hostile_attachments_are_refused_in_one_line_and_nothing_is_stored(
    harness: Harness, data: bytes, filename: str, content_type: str | None, message: str
) -> None:
    fake = harness.fake
    attachment = fake.attach(data, filename, content_type)

    token = await fake.slash(
        "imagine",
        [opt("prompt", "a cat"), _image_option(attachment)],
        fake.member(ALICE, "alice"),
        attachments=[attachment],
    )

    await fake.wait_for(lambda: is_ephemeral_error(fake, token, message))
    _, total = await harness.app.jobs.history(ALICE, 1, 10)
    assert total == 0, "nothing stored for a refused image"
    assert not (harness.app.settings.data_dir / "inputs").exists()


async def test_an_oversized_attachment_is_refused_before_it_is_downloaded(harness: Harness) -> None:
    fake = harness.fake
    attachment = fake.attach(b"\0" * 11_000_000, "huge.png", "image/png")

    token = await fake.slash(
        "imagine",
        [opt("prompt", "a cat"), _image_option(attachment)],
        fake.member(ALICE, "alice"),
        attachments=[attachment],
    )

    await fake.wait_for(lambda: is_ephemeral_error(fake, token, "That image is 11.0 MB; the limit is 10 MB."))


async def test_vary_buttons_redraw_the_picture_as_the_pressers_own_job(harness: Harness) -> None:
    fake = harness.fake
    token = await fake.slash(
        "imagine", [opt("prompt", "an old tram"), opt("seed", 3, 4)], fake.member(ALICE, "alice")
    )
    original = await finished_message(fake, token)
    job_id = job_id_of(original)
    labels = [c["label"] for row in original["components"] for c in row["components"]]
    assert labels == ["Reroll", "4 more seeds", "Vary (Subtle)", "Vary (Strong)", "Upscale"]

    subtle = await finished_message(
        fake, await fake.click(original["id"], f"fluxbot:subtle:{job_id}", fake.member(BOB, "bob"))
    )
    strong = await finished_message(
        fake, await fake.click(original["id"], f"fluxbot:strong:{job_id}", fake.member(BOB, "bob"))
    )

    jobs, _ = await harness.app.jobs.history(BOB, 1, 10)
    assert sorted(j.kind for j in jobs) == sorted([JobKind.VARY_SUBTLE, JobKind.VARY_STRONG])
    assert all(j.parent_id == job_id and j.user_id == BOB for j in jobs)
    subtle_recipe, strong_recipe = read_recipe(png_of(fake, subtle)), read_recipe(png_of(fake, strong))
    assert (subtle_recipe.kind, subtle_recipe.strength, subtle_recipe.parent_job) == (
        "vary_subtle",
        0.35,
        job_id,
    )
    assert (strong_recipe.kind, strong_recipe.strength) == ("vary_strong", 0.7)
    assert subtle_recipe.seed != 3, "a new seed"
    assert subtle_recipe.init_image_sha256 == strong_recipe.init_image_sha256, (
        "both from the original picture"
    )
    assert f"<@{BOB}>" in subtle["content"] and f"vary (subtle) of job {job_id}" in subtle["content"]


async def test_upscale_doubles_the_size_and_refuses_past_the_megapixel_cap(harness: Harness) -> None:
    fake = harness.fake
    token = await fake.slash(
        "imagine", [opt("prompt", "a harbour"), opt("seed", 8, 4)], fake.member(ALICE, "alice")
    )
    original = await finished_message(fake, token)
    job_id = job_id_of(original)

    up = await finished_message(
        fake, await fake.click(original["id"], f"fluxbot:upscale:{job_id}", fake.member(ALICE, "alice"))
    )
    command = await finished_message(
        fake, await fake.slash("upscale", [opt("job_id", job_id, 4)], fake.member(BOB, "bob"))
    )

    recipe = read_recipe(png_of(fake, up))
    assert (recipe.width, recipe.height) == (128, 128) and recipe.kind == "upscale" and recipe.seed == 8
    assert Image.open(io.BytesIO(png_of(fake, command))).size == (128, 128)
    big = await fake.slash(
        "imagine", [opt("prompt", "a harbour"), opt("size", "1024x1024")], fake.member(ALICE, "alice")
    )
    big_job = job_id_of(await finished_message(fake, big))
    refused = await fake.slash("upscale", [opt("job_id", big_job, 4)], fake.member(ALICE, "alice"))
    await fake.wait_for(
        lambda: is_ephemeral_error(
            fake, refused, "Upscale x2 would be 2048x2048: 4.19 MP is above this preset's maximum of 2.1 MP"
        )
    )


async def test_a_result_over_the_upload_limit_goes_out_as_jpeg_and_the_png_is_kept(harness: Harness) -> None:
    fake = harness.fake
    fake.upload_limit = 6_000  # bytes, per file: the tiny model's 256x256 PNGs are larger

    token = await fake.slash(
        "imagine", [opt("prompt", "a field of poppies"), opt("size", "256x256")], fake.member(ALICE, "alice")
    )
    message = await finished_message(fake, token)

    attachment = message["attachments"][0]
    assert attachment["filename"].endswith(".jpg")
    assert len(fake.attachment_bytes[attachment["id"]]) <= 6_000
    assert "sent as JPEG" in message["content"] and "/rerun" in message["content"]
    job = await harness.app.jobs.get(job_id_of(message))
    assert job is not None and job.upload_limit == 6_000
    kept = harness.app.settings.data_dir / job.images[0].path
    assert read_recipe(kept.read_bytes()).prompt == "a field of poppies", "the PNG with its recipe is kept"
    assert fake.refused_uploads == 0, "never a failed upload"


async def test_progress_edits_carry_a_preview_of_the_picture_forming(harness: Harness) -> None:
    fake = harness.fake
    token = await fake.slash(
        "imagine",
        [opt("prompt", "a storm at sea"), opt("steps", 50, 4), opt("size", "256x256")],
        fake.member(ALICE, "alice"),
    )
    await finished_message(fake, token)

    previews = [
        blob
        for call in fake.calls
        if call.method == "PATCH" and token in call.path
        for name, blob in call.files
        if name.endswith("-preview.jpg")
    ]
    assert previews, "at least one progress edit showed the picture forming"
    assert Image.open(io.BytesIO(previews[0])).format == "JPEG"


@pytest.fixture
async def kontext_harness(
    fake: FakeDiscord, tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> AsyncIterator[Harness]:
    """The bot with FLUX.1 Kontext edits on: the tiny Kontext transformer beside the tiny model."""
    settings = make_bot_settings(tmp_path, lambda **kw: make_settings(kontext="tiny", **kw), fake)
    engine = await asyncio.to_thread(FluxEngine.load, settings.engine, data_dir)
    harness = Harness(fake, settings, engine)
    await harness.start()
    yield harness
    await harness.stop()


async def test_edit_command_and_button_draw_a_kontext_edit(kontext_harness: Harness) -> None:
    harness, fake = kontext_harness, kontext_harness.fake
    token = await fake.slash(
        "imagine", [opt("prompt", "a quiet street"), opt("seed", 2, 4)], fake.member(ALICE, "alice")
    )
    original = await finished_message(fake, token)
    job_id = job_id_of(original)
    labels = [c["label"] for row in original["components"] for c in row["components"]]
    assert labels[-1] == "Edit"

    attachment = fake.attach(_png((30, 90, 160)), "street.png", "image/png")
    by_command = await fake.slash(
        "edit",
        [opt("instruction", "make it night"), _image_option(attachment)],
        fake.member(BOB, "bob"),
        attachments=[attachment],
    )
    edited = await finished_message(fake, by_command)
    click = await fake.click(original["id"], f"fluxbot:edit:{job_id}", fake.member(BOB, "bob"))
    await fake.wait_for(lambda: fake.response_to(click))
    form = await fake.submit_modal(click, ["make it snow"], fake.member(BOB, "bob"))
    from_button = await finished_message(fake, form)

    command_recipe, button_recipe = read_recipe(png_of(fake, edited)), read_recipe(png_of(fake, from_button))
    assert command_recipe.kind == "edit" and command_recipe.prompt == "make it night"
    assert command_recipe.kontext_files and all(len(h) == 64 for h in command_recipe.kontext_files.values())
    assert (button_recipe.kind, button_recipe.parent_job, button_recipe.prompt) == (
        "edit",
        job_id,
        "make it snow",
    )
    assert "Kontext edit of job" in from_button["content"]
    jobs, _ = await harness.app.jobs.history(BOB, 1, 10)
    assert sorted(j.kind for j in jobs) == [JobKind.EDIT, JobKind.EDIT]
    again = await finished_message(
        fake, await fake.slash("rerun", [opt("job_id", job_id_of(edited), 4)], fake.member(BOB, "bob"))
    )
    assert np.array_equal(_pixels(png_of(fake, edited)), _pixels(png_of(fake, again))), (
        "an edit reruns exactly"
    )


async def test_without_kontext_edit_says_how_to_enable_it(harness: Harness) -> None:
    fake = harness.fake
    token = await fake.slash(
        "edit", [opt("instruction", "make it night"), opt("job_id", 1, 4)], fake.member(ALICE, "alice")
    )

    await fake.wait_for(lambda: is_ephemeral_error(fake, token, "engine.kontext = "))


async def test_upscale_takes_the_chosen_picture_of_a_four_image_job(harness: Harness) -> None:
    fake = harness.fake
    token = await fake.slash(
        "imagine", [opt("prompt", "a kite"), opt("seed", 20, 4)], fake.member(ALICE, "alice")
    )
    original = await finished_message(fake, token)
    four = await finished_message(
        fake,
        await fake.click(original["id"], f"fluxbot:vary:{job_id_of(original)}", fake.member(ALICE, "alice")),
    )
    four_id = job_id_of(four)

    third = await fake.slash(
        "upscale", [opt("job_id", four_id, 4), opt("picture", 3, 4)], fake.member(ALICE, "alice")
    )
    upscaled = await finished_message(fake, third)
    ninth = await fake.slash(
        "upscale", [opt("job_id", four_id, 4), opt("picture", 9, 4)], fake.member(ALICE, "alice")
    )

    assert read_recipe(png_of(fake, upscaled)).seed == 23, "seeds 21-24: the third picture's"
    await fake.wait_for(
        lambda: is_ephemeral_error(fake, ninth, f"Job {four_id} has 4 picture(s); pick 1 to 4.")
    )


async def test_a_flagged_picture_is_drawn_from_only_where_it_may_be_shown(harness: Harness) -> None:
    from sqlalchemy import update

    from bot.services.errors import NotAllowed
    from bot.services.studio import Requester
    from bot.store.models import Job

    fake, app = harness.fake, harness.app
    token = await fake.slash(
        "imagine", [opt("prompt", "a beach"), opt("seed", 4, 4)], fake.member(ALICE, "alice")
    )
    job_id = job_id_of(await finished_message(fake, token))
    # As if asked in an age-restricted channel and flagged there (so shown there, not withheld).
    async with app.db.session() as session, session.begin():
        await session.execute(
            update(Job).where(Job.id == job_id).values(safety={"flagged": True}, age_restricted=True)
        )
    owner = Requester(user_id=ALICE, guild_id=None)

    with pytest.raises(NotAllowed, match="withheld"):
        await app.studio.vary(owner, job_id, strong=False)
    allowed = await app.studio.vary(Requester(user_id=ALICE, age_restricted=True), job_id, strong=False)
    assert allowed.job_id > job_id
