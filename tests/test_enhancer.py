"""Prompt enhancement through a real local OpenAI-compatible server: shown, stored, rerun without a
second call, and a failing enhancer never fails the job."""

from __future__ import annotations

import io
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.store.models import JobStatus
from engine.api import GenerationRequest
from engine.engine import FluxEngine
from engine.enhancer import MAX_ENHANCED_CHARS, SYSTEM_PROMPT, EnhancerError, tidy
from engine.errors import RequestError
from engine.png import a1111_parameters, png_bytes, read_recipe
from engine.settings import EngineSettings
from tests.chat_server import ChatServer, chat_server, expansion_of
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
def server() -> Iterator[ChatServer]:
    with chat_server() as running:
        yield running


@pytest.fixture
def chat(server: ChatServer) -> ChatServer:
    server.behaviour = "expand"
    server.requests.clear()
    return server


@pytest.fixture(scope="module")
def enhancing(make_settings: Callable[..., EngineSettings], data_dir: Path, server: ChatServer) -> FluxEngine:
    settings = make_settings(
        prompt_enhancer=server.url, prompt_enhancer_model="tiny-llm", prompt_enhancer_timeout_s=1.0
    )
    return FluxEngine.load(settings, data_dir)


def test_an_enhanced_prompt_is_drawn_recorded_and_rerun_without_asking_again(
    enhancing: FluxEngine, chat: ChatServer
) -> None:
    result = enhancing.generate(GenerationRequest(prompt="a lighthouse", seed=3, enhance=True))

    recipe = result.recipes[0]
    expanded = expansion_of("a lighthouse")
    assert (recipe.prompt, recipe.enhanced_prompt, recipe.drawn_prompt) == (
        "a lighthouse",
        expanded,
        expanded,
    )
    assert len(chat.requests) == 1
    sent = chat.requests[0]
    assert sent["model"] == "tiny-llm"
    assert sent["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "a lighthouse"},
    ]
    # The model read the expansion: the same pixels as typing it.
    typed = enhancing.generate(GenerationRequest(prompt=expanded, seed=3))
    assert np.array_equal(pixels(result.images[0]), pixels(typed.images[0]))
    # The PNG's recipe holds it; its parameters show what was drawn (what Forge would need).
    png = png_bytes(result.images[0], recipe)
    assert read_recipe(png).enhanced_prompt == expanded
    assert a1111_parameters(recipe).startswith(expanded)
    # An exact rerun from the stored recipe: no second call, same pixels.
    again = enhancing.draw([read_recipe(png).spec()])[0]
    assert len(chat.requests) == 1
    assert np.array_equal(pixels(result.images[0]), pixels(again.images[0]))


def test_trigger_words_stay_before_the_enhanced_prompt(enhancing: FluxEngine, chat: ChatServer) -> None:
    spec = enhancing.resolve(GenerationRequest(prompt="a fox", seed=1, enhance=True))
    with_triggers = spec.model_copy(update={"final_prompt": "inkstyle, a fox"})

    (result,) = enhancing.draw([with_triggers], loras=[])

    assert result.recipes[0].drawn_prompt == "inkstyle, " + expansion_of("a fox")
    assert chat.requests[0]["messages"][1]["content"] == "a fox", "the enhancer sees the typed prompt"


@pytest.mark.parametrize(
    ("behaviour", "note"),
    [
        ("error", "the prompt enhancer failed: HTTP 500"),
        ("slow", "the prompt enhancer failed: no answer in time"),
        ("empty", "the prompt enhancer answered with an empty prompt"),
        ("garbage", "the prompt enhancer failed"),
    ],
)
def test_a_failing_enhancer_draws_the_prompt_as_written_and_says_so(
    enhancing: FluxEngine, chat: ChatServer, behaviour: str, note: str
) -> None:
    chat.behaviour = behaviour  # type: ignore[assignment]
    plain = enhancing.generate(GenerationRequest(prompt="a red barn", seed=9))

    result = enhancing.generate(GenerationRequest(prompt="a red barn", seed=9, enhance=True))

    recipe = result.recipes[0]
    assert recipe.enhanced_prompt is None and recipe.enhance_note is not None
    assert recipe.enhance_note.startswith(note)
    assert "secret" not in recipe.enhance_note, "the endpoint's error body stays out of the public recipe"
    assert result.warnings == (recipe.enhance_note,)
    assert np.array_equal(pixels(plain.images[0]), pixels(result.images[0]))
    assert recipe.spec().enhance is False, "a rerun draws what was drawn, without asking again"


def test_an_unreachable_enhancer_is_a_note_not_a_failure() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from engine.enhancer import EndpointEnhancer

    enhancer = EndpointEnhancer(f"http://127.0.0.1:{port}/v1", "tiny-llm", timeout_s=1.0)
    with pytest.raises(EnhancerError, match="not reachable"):
        enhancer.enhance("a cat")


def test_enhancement_must_be_set_up_and_is_off_for_edits(engine: FluxEngine, enhancing: FluxEngine) -> None:
    with pytest.raises(RequestError, match="prompt enhancement is not set up here"):
        engine.resolve(GenerationRequest(prompt="a cat", enhance=True))
    assert engine.resolve(GenerationRequest(prompt="a cat")).enhance is False
    with pytest.raises(RequestError, match="only FLUX.3.s own prompt upsampler .* expands an edit"):
        enhancing.resolve(
            GenerationRequest(prompt="make it red", mode="edit", init_image="0" * 64, enhance=True)
        )


def test_a_preset_can_enhance_by_default_where_an_enhancer_exists(
    engine: FluxEngine, enhancing: FluxEngine
) -> None:
    from engine.catalog import Catalog

    preset = enhancing.resolver.catalog.presets["dev"].model_copy(update={"enhance": True})
    with_default = enhancing.resolver.with_catalog(enhancing.resolver.catalog.with_preset(preset))
    without = engine.resolver.with_catalog(Catalog(engine.resolver.catalog.presets).with_preset(preset))

    assert with_default.resolve(GenerationRequest(prompt="a cat", preset="dev")).spec.enhance is True
    assert (
        with_default.resolve(GenerationRequest(prompt="a cat", preset="dev", enhance=False)).spec.enhance
        is False
    )
    assert without.resolve(GenerationRequest(prompt="a cat", preset="dev")).spec.enhance is False


def test_an_answer_is_tidied_into_a_prompt() -> None:
    assert tidy('Sure! Here is your enhanced prompt:\n"A cat on a roof."') == "A cat on a roof."
    assert tidy("  A cat\x00 on   a roof.  ") == "A cat on a roof."
    long = tidy("A sentence about a cat. " * 200)
    assert len(long) <= MAX_ENHANCED_CHARS and long.endswith(".")
    with pytest.raises(EnhancerError, match="empty"):
        tidy('  "" ')


async def test_enhance_through_discord_is_shown_stored_and_rerun_without_a_second_call(
    fake: FakeDiscord,
    tmp_path: Path,
    make_settings: Callable[..., EngineSettings],
    data_dir: Path,
    chat: ChatServer,
) -> None:
    def engine_settings(**kw: object) -> EngineSettings:
        return make_settings(prompt_enhancer=chat.url, prompt_enhancer_model="tiny-llm", **kw)

    async with running_bot(fake, make_bot_settings(tmp_path, engine_settings, fake), data_dir) as bot:
        alice = fake.member(ALICE, "alice")
        token = await fake.slash("imagine", [opt("prompt", "a lighthouse"), opt("enhance", True, 5)], alice)
        first = await finished_message(fake, token)

        expanded = expansion_of("a lighthouse")
        assert "✨ Enhanced prompt: ||A detailed photograph of a lighthouse" in first["content"]
        assert first["content"].startswith("**a lighthouse**"), "the typed prompt stays the headline"
        job_id = job_id_of(first)
        stored = await bot.app.jobs.get(job_id)
        assert stored is not None and stored.spec.enhanced_prompt == expanded
        assert len(chat.requests) == 1

        again = await fake.slash("rerun", [opt("job_id", job_id, 4)], fake.member(BOB, "bob"))
        second = await finished_message(fake, again)
        assert len(chat.requests) == 1, "the rerun drew the stored enhancement"
        assert png_pixels(fake, first).tolist() == png_pixels(fake, second).tolist()
        assert "✨ Enhanced prompt:" in second["content"]

        chat.behaviour = "error"
        failing = await fake.slash("imagine", [opt("prompt", "a red barn"), opt("enhance", True, 5)], alice)
        drawn = await finished_message(fake, failing)
        assert "The prompt enhancer did not answer, so your prompt was drawn as written." in drawn["content"]
        failed_id = job_id_of(drawn)
        failed_job = await bot.app.jobs.get(failed_id)
        assert failed_job is not None and failed_job.status == JobStatus.DONE
        assert failed_job.spec.enhance is False and failed_job.spec.enhanced_prompt is None


async def test_an_enhanced_prompt_meets_the_blocklist_and_trigger_words_lead_it(
    fake: FakeDiscord,
    tmp_path: Path,
    make_settings: Callable[..., EngineSettings],
    data_dir: Path,
    chat: ChatServer,
) -> None:
    from fluxbot.settings import SafetySettings

    def engine_settings(**kw: object) -> EngineSettings:
        return make_settings(prompt_enhancer=chat.url, **kw)

    # "golden" is in every expansion the server writes, never in what the user typed.
    settings = make_bot_settings(
        tmp_path, engine_settings, fake, safety=SafetySettings(blocked_terms=["golden"])
    )
    async with running_bot(fake, settings, data_dir) as bot:
        token = await fake.slash(
            "imagine", [opt("prompt", "a barn"), opt("enhance", True, 5)], fake.member(ALICE, "alice")
        )
        message = await fake.wait_for(
            lambda: (m := fake.original(token)) and "❌" in m.get("content", "") and m
        )
        assert "The enhanced prompt used a blocked term ('golden'), so nothing was kept" in message["content"]
        job = await bot.app.jobs.get(1)
        assert job is not None and job.status == JobStatus.FAILED and not job.images

    from engine.catalog import Catalog
    from engine.resolve import RequestResolver
    from engine.whitelist import LoraEntry

    inky = LoraEntry(name="inky", file="inky.safetensors", sha256="0" * 64, trigger_words=["inkstyle"])
    resolver = RequestResolver(
        Catalog.from_files(settings.engine.presets_path, settings.engine.loras_path).with_lora(inky),
        can_enhance=True,
    )
    typed = GenerationRequest(prompt="an inkstyle cat", loras=[{"name": "inky"}])  # type: ignore[list-item]
    assert resolver.resolve(typed).spec.final_prompt == "an inkstyle cat", "typed: not added twice"
    enhanced = resolver.resolve(typed.model_copy(update={"enhance": True})).spec
    assert enhanced.final_prompt == "inkstyle, an inkstyle cat", "the expansion may drop it: it leads"


async def test_enhance_without_an_enhancer_is_a_private_one_liner(harness: Harness) -> None:
    fake = harness.fake
    token = await fake.slash(
        "imagine", [opt("prompt", "a cat"), opt("enhance", True, 5)], fake.member(ALICE, "alice")
    )
    await fake.wait_for(lambda: is_ephemeral_error(fake, token, "prompt enhancement is not set up here"))
    assert not await harness.app.jobs.get(1)


def png_pixels(fake: FakeDiscord, message: dict[str, object]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png_of(fake, message))))  # type: ignore[arg-type]


def test_a_hostile_enhancement_fits_discords_limit_with_its_spoiler_closed() -> None:
    from bot import render
    from bot.i18n import Languages
    from bot.store.models import Job, JobKind
    from tests.bot_support import spec_for

    tr = Languages.load().for_locale("en-US")
    hostile = "*_~`|>" * 300  # every character escaped: twice as long once escaped
    job = Job(
        id=7,
        user_id=1,
        kind=JobKind.IMAGINE,
        spec=spec_for("a barn " * 250, enhance=True, enhanced_prompt="x"),
        status=JobStatus.DONE,
        recipe={"enhanced_prompt": hostile},
        timings={"total_s": 1.0},
    )

    text = render.final(tr, job, safety_action="spoiler")

    assert len(text) <= render.MESSAGE_LIMIT
    assert text.endswith("||") and text.count("||") == 2
    assert "Flagged by the safety filter" in text, "the safety note is never cut for the enhancement"


async def test_the_engine_draws_the_next_job_while_an_endpoint_enhances(
    tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path, chat: ChatServer
) -> None:
    from bot.services.studio import Requester
    from tests.bot_support import RecordingEvents, make_app, until
    from tests.bot_support import make_settings as app_settings

    chat.behaviour, chat.slow_s = "slow", 2.0
    settings = app_settings(
        tmp_path, lambda **kw: make_settings(prompt_enhancer=chat.url, prompt_enhancer_model="tiny-llm", **kw)
    )
    app = await make_app(settings, RecordingEvents(), data_dir)
    await app.start()
    try:
        slow = await app.studio.imagine(
            Requester(user_id=ALICE, user_name="alice"),
            GenerationRequest(prompt="a lighthouse", enhance=True),
        )
        plain = await app.studio.imagine(
            Requester(user_id=BOB, user_name="bob"), GenerationRequest(prompt="a red barn", seed=3)
        )
        await app.queue.wait_idle(60)
        # Cancelled while its endpoint answers: it never draws.
        cancelled = await app.studio.imagine(
            Requester(user_id=BOB, user_name="bob"), GenerationRequest(prompt="a boat", enhance=True)
        )
        await until(lambda: len(chat.requests) == 2)
        assert await app.queue.cancel(cancelled.job_id, "bob")
        await app.queue.wait_idle(60)
        gone = await app.jobs.get(cancelled.job_id)
        assert gone is not None and gone.status == JobStatus.CANCELLED and not gone.images

        enhanced, drawn = await app.jobs.get(slow.job_id), await app.jobs.get(plain.job_id)
        assert enhanced is not None and drawn is not None
        assert enhanced.status == drawn.status == JobStatus.DONE
        assert enhanced.spec.enhanced_prompt == expansion_of("a lighthouse")
        assert enhanced.images[0].recipe["enhance_note"] is None
        assert drawn.finished_at is not None and enhanced.finished_at is not None
        assert drawn.finished_at < enhanced.finished_at, "Bob's job did not wait for Alice's enhancer"
    finally:
        chat.slow_s = 3.0
        await app.close()
