"""The bot on a FLUX.3 klein host, through the real discord.py client and the fake Discord: text to
image with an exact rerun, an enhanced prompt, an edit with references."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine.png import read_recipe
from engine.settings import EngineSettings
from tests.chat_server import ChatServer, chat_server, expansion_of
from tests.discord_support import (
    ALICE,
    BOB,
    Harness,
    finished_message,
    job_id_of,
    make_bot_settings,
    opt,
    png_of,
    running_bot,
)
from tests.fake_discord import FakeDiscord


@pytest.fixture(scope="module")
def chat() -> Iterator[ChatServer]:
    with chat_server() as running:
        yield running


@pytest.fixture
async def flux3_bot(
    fake: FakeDiscord,
    tmp_path: Path,
    make_settings: Callable[..., EngineSettings],
    data_dir: Path,
    chat: ChatServer,
) -> AsyncIterator[Harness]:
    def engine(**kw: object) -> EngineSettings:
        return make_settings(model="tiny-flux3", prompt_enhancer=chat.url, **kw)

    async with running_bot(fake, make_bot_settings(tmp_path, engine, fake), data_dir) as harness:
        yield harness


def _pixels(fake: FakeDiscord, message: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png_of(fake, message))).convert("RGB"))


async def test_flux3_through_discord_draws_reruns_enhances_and_edits(
    flux3_bot: Harness, chat: ChatServer
) -> None:
    fake = flux3_bot.fake
    alice, bob = fake.member(ALICE, "alice"), fake.member(BOB, "bob")
    chat.requests.clear()

    first = await finished_message(
        fake, await fake.slash("imagine", [opt("prompt", "a red fox"), opt("seed", 7, 4)], alice)
    )
    recipe = read_recipe(png_of(fake, first))
    assert (recipe.family, recipe.variant, recipe.preset) == ("flux3", "klein", "flux3-distilled")
    again = await finished_message(fake, await fake.slash("rerun", [opt("job_id", job_id_of(first), 4)], bob))
    assert np.array_equal(_pixels(fake, first), _pixels(fake, again))

    enhanced = await finished_message(
        fake, await fake.slash("imagine", [opt("prompt", "a lighthouse"), opt("enhance", True, 5)], alice)
    )
    assert read_recipe(png_of(fake, enhanced)).enhanced_prompt == expansion_of("a lighthouse")
    assert len(chat.requests) == 1

    edit = await finished_message(
        fake,
        await fake.slash(
            "edit",
            [
                opt("instruction", "the fox at night"),
                opt("job_id", job_id_of(first), 4),
                opt("jobs", str(job_id_of(enhanced)), 3),
            ],
            bob,
        ),
    )
    edit_recipe = read_recipe(png_of(fake, edit))
    assert (edit_recipe.kind, edit_recipe.family, len(edit_recipe.reference_sha256s)) == ("edit", "flux3", 1)
    assert "edit of job" in edit["content"]


async def test_an_edit_enhanced_by_flux3s_upsampler_through_discord(
    fake: FakeDiscord, tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    def engine(**kw: object) -> EngineSettings:
        return make_settings(model="tiny-flux3", prompt_upsampler="tiny", **kw)

    async with running_bot(fake, make_bot_settings(tmp_path, engine, fake), data_dir) as harness:
        alice = harness.fake.member(ALICE, "alice")
        first = await finished_message(
            fake, await fake.slash("imagine", [opt("prompt", "a red fox"), opt("seed", 7, 4)], alice)
        )
        edit = await finished_message(
            fake,
            await fake.slash(
                "edit",
                [
                    opt("instruction", "the fox at night"),
                    opt("job_id", job_id_of(first), 4),
                    opt("enhance", True, 5),
                ],
                alice,
            ),
        )
        recipe = read_recipe(png_of(fake, edit))
        assert recipe.mode == "edit" and recipe.enhanced_prompt and recipe.enhance_note is None
        assert "||" in edit["content"], "the expansion is shown, as a spoiler"
        rerun = await finished_message(
            fake, await fake.slash("rerun", [opt("job_id", job_id_of(edit), 4)], alice)
        )
        assert np.array_equal(_pixels(fake, edit), _pixels(fake, rerun))
