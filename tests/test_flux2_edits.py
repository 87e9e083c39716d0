"""Edits on a FLUX.2 klein host, with the resident model's reference images (no Kontext): /edit with
one and three references (jobs and attachments, in the order given), the Edit button, visibility."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.commands.imagine import parse_job_pictures
from bot.services.errors import UserError
from bot.services.studio import JobPicture
from engine.input_image import normalize_input_image
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
    running_bot,
)
from tests.fake_discord import PRIVATE_CHANNEL_ID, FakeDiscord


@pytest.fixture
async def klein(
    fake: FakeDiscord, tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> AsyncIterator[Harness]:
    settings = make_bot_settings(tmp_path, lambda **kw: make_settings(model="tiny-flux2", **kw), fake)
    async with running_bot(fake, settings, data_dir) as harness:
        yield harness


def _png(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    picture = Image.new("RGB", size, color)
    for x in range(0, size[0], 8):
        picture.putpixel((x, size[1] // 2), (255, 255, 255))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


async def test_edit_with_one_and_three_references_the_button_and_an_exact_rerun(klein: Harness) -> None:
    fake = klein.fake
    alice, bob = fake.member(ALICE, "alice"), fake.member(BOB, "bob")
    first = await finished_message(
        fake, await fake.slash("imagine", [opt("prompt", "a cat"), opt("seed", 1, 4)], alice)
    )
    second = await finished_message(
        fake, await fake.slash("imagine", [opt("prompt", "a sofa"), opt("seed", 2, 4)], alice)
    )
    labels = [c["label"] for row in first["components"] for c in row["components"]]
    assert labels[-1] == "Edit", "FLUX.2 klein edits with the resident model: the button is there"
    assert "Upscale" not in labels, "Vary and Upscale are FLUX.1's image-to-image: not offered"

    one = await finished_message(
        fake,
        await fake.slash(
            "edit", [opt("instruction", "make it night"), opt("job_id", job_id_of(first), 4)], bob
        ),
    )
    photo = fake.attach(_png((200, 40, 40), (64, 80)), "hat.png", "image/png")
    three = await finished_message(
        fake,
        await fake.slash(
            "edit",
            [
                opt("instruction", "put the hat from image 2 on the cat"),
                opt("job_id", job_id_of(first), 4),
                opt("image", photo["id"], 11),
                opt("jobs", str(job_id_of(second)), 3),
            ],
            bob,
            attachments=[photo],
        ),
    )

    one_recipe, three_recipe = read_recipe(png_of(fake, one)), read_recipe(png_of(fake, three))
    assert (one_recipe.kind, one_recipe.parent_job, one_recipe.reference_sha256s) == (
        "edit",
        job_id_of(first),
        (),
    )
    assert one_recipe.kontext_files is None and one_recipe.family == "flux2"
    assert (
        len(three_recipe.reference_sha256s) == 2
        and three_recipe.init_image_sha256 == one_recipe.init_image_sha256
    )
    assert "edit of job" in one["content"] and "2 more images" in three["content"]
    stored = await klein.app.jobs.get(job_id_of(three))
    assert stored is not None and len(stored.spec.inputs) == 3
    # In the order given: the job's picture first, then the attachment, then the other job's picture.
    hat = normalize_input_image(_png((200, 40, 40), (64, 80)), max_bytes=10**7, max_pixels=10**7)
    assert three_recipe.reference_sha256s[0] == hat.sha256
    assert not np.array_equal(_pixels(png_of(fake, one)), _pixels(png_of(fake, three)))

    # A stale client's press (the buttons are not offered) is refused before anything is stored.
    from bot.services.studio import Requester

    with pytest.raises(UserError, match="Vary and Upscale redraw with FLUX.1's image-to-image"):
        await klein.app.studio.vary(Requester(user_id=BOB, user_name="bob"), job_id_of(first), strong=False)
    click = await fake.click(first["id"], f"fluxbot:edit:{job_id_of(first)}", bob)
    await fake.wait_for(lambda: fake.response_to(click))
    from_button = await finished_message(fake, await fake.submit_modal(click, ["make it snow"], bob))
    assert read_recipe(png_of(fake, from_button)).parent_job == job_id_of(first)

    again = await finished_message(
        fake, await fake.slash("rerun", [opt("job_id", job_id_of(three), 4)], alice)
    )
    assert np.array_equal(_pixels(png_of(fake, three)), _pixels(png_of(fake, again))), "edits rerun exactly"


async def test_a_reference_the_user_may_not_see_is_not_found_and_limits_hold(klein: Harness) -> None:
    fake = klein.fake
    alice, bob = fake.member(ALICE, "alice"), fake.member(BOB, "bob")
    public = await finished_message(fake, await fake.slash("imagine", [opt("prompt", "a cat")], alice))
    hidden = await finished_message(
        fake, await fake.slash("imagine", [opt("prompt", "mods cat")], alice, channel_id=PRIVATE_CHANNEL_ID)
    )

    token = await fake.slash(
        "edit",
        [
            opt("instruction", "x"),
            opt("job_id", job_id_of(public), 4),
            opt("jobs", str(job_id_of(hidden)), 3),
        ],
        bob,
    )
    await fake.wait_for(lambda: is_ephemeral_error(fake, token, "There is no job"))
    five = " ".join(str(job_id_of(public)) for _ in range(4))
    token = await fake.slash(
        "edit", [opt("instruction", "x"), opt("job_id", job_id_of(public), 4), opt("jobs", five, 3)], bob
    )
    await fake.wait_for(lambda: is_ephemeral_error(fake, token, "at most 4 images"))
    token = await fake.slash("edit", [opt("instruction", "x"), opt("jobs", "12 twelve", 3)], bob)
    await fake.wait_for(lambda: is_ephemeral_error(fake, token, "'twelve' is not a job number"))
    tiny = fake.attach(_png((9, 9, 9), (40, 40)), "icon.png", "image/png")
    token = await fake.slash(
        "edit", [opt("instruction", "x"), opt("image", tiny["id"], 11)], bob, attachments=[tiny]
    )
    await fake.wait_for(
        lambda: is_ephemeral_error(fake, token, "at least 64 pixels a side (this one is 40x40)")
    )
    bobs, _ = await klein.app.jobs.history(BOB, 1, 10)
    assert bobs == [], "nothing stored for a refused edit"


def test_job_lists_parse_in_order() -> None:
    assert parse_job_pictures("12 15:2, #20") == [JobPicture(12), JobPicture(15, 2), JobPicture(20)]
    assert parse_job_pictures("") == []
    with pytest.raises(UserError):
        parse_job_pictures("12:x")
