"""FluxEngine end to end on the tiny model: images, determinism, cache, progress, cancel, batching."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from engine.api import GenerationRequest, StepProgress
from engine.engine import FluxEngine
from engine.errors import GenerationCancelled, RequestError
from engine.settings import EngineSettings
from tests.conftest import pixels


def test_generate_returns_image_of_requested_size_with_recipe(engine: FluxEngine) -> None:
    result = engine.generate(GenerationRequest(prompt="a red cat", size="96x64", seed=7))

    assert result.images[0].size == (96, 64)
    assert result.seeds == [7]
    recipe = result.recipes[0]
    assert (recipe.width, recipe.height, recipe.seed, recipe.steps, recipe.guidance) == (96, 64, 7, 4, 3.5)
    assert recipe.model == "tiny-flux1" and recipe.variant == "dev"
    assert recipe.versions["diffusers"] and recipe.versions["torch"]
    assert recipe.model_files, "the transformer's sha256 is part of the recipe"
    assert pixels(result.images[0]).std() > 0, "not a blank image"


def test_same_request_and_seed_give_identical_pixels(engine: FluxEngine) -> None:
    request = GenerationRequest(prompt="a blue owl at night", seed=1234)

    first = engine.generate(request).images[0]
    second = engine.generate(request).images[0]

    assert np.array_equal(pixels(first), pixels(second))


def test_different_seeds_give_different_pixels(engine: FluxEngine) -> None:
    a = engine.generate(GenerationRequest(prompt="a fox", seed=1)).images[0]
    b = engine.generate(GenerationRequest(prompt="a fox", seed=2)).images[0]

    assert not np.array_equal(pixels(a), pixels(b))


def test_no_seed_gets_a_random_one_that_reproduces(engine: FluxEngine) -> None:
    first = engine.generate(GenerationRequest(prompt="a castle"))
    (again,) = engine.draw([first.recipes[0].spec()])

    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))


def test_cached_embeds_skip_text_encoders_and_equal_uncached_pixels(
    make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    cached = FluxEngine.load(make_settings(embed_cache_size=8), data_dir)
    uncached = FluxEngine.load(make_settings(embed_cache_size=0), data_dir)
    encoder_calls = []
    cached.pipe.text_encoder_2.register_forward_hook(lambda *_: encoder_calls.append(1))
    request = GenerationRequest(prompt="a green dragon over the sea", seed=99)

    cold = cached.generate(request)
    reroll = cached.generate(request)
    reference = uncached.generate(request)

    assert (cold.timings.embeds_cached, reroll.timings.embeds_cached) == (False, True)
    assert len(encoder_calls) == 1, "the reroll must not run the T5 encoder again"
    assert np.array_equal(pixels(reroll.images[0]), pixels(reference.images[0]))
    assert np.array_equal(pixels(cold.images[0]), pixels(reference.images[0]))


def test_progress_is_reported_after_every_step(engine: FluxEngine) -> None:
    seen: list[StepProgress] = []

    engine.generate(GenerationRequest(prompt="a robot", seed=3, steps=5), on_step=seen.append)

    assert [p.step for p in seen] == [1, 2, 3, 4, 5]
    assert all(p.total == 5 for p in seen)
    assert seen[-1].elapsed_s >= seen[0].elapsed_s


def test_cancel_stops_between_steps_and_engine_keeps_working(engine: FluxEngine) -> None:
    cancel = threading.Event()
    seen: list[int] = []

    def on_step(progress: StepProgress) -> None:
        seen.append(progress.step)
        if progress.step == 2:
            cancel.set()

    with pytest.raises(GenerationCancelled) as info:
        engine.generate(GenerationRequest(prompt="a tree", seed=4, steps=10), on_step=on_step, cancel=cancel)

    assert info.value.step == 2 and seen == [1, 2]
    assert engine.generate(GenerationRequest(prompt="a tree", seed=4)).images


def test_batch_size_gives_consecutive_seeds_each_reproducible(engine: FluxEngine) -> None:
    batch = engine.generate(GenerationRequest(prompt="a horse", seed=10, batch_size=3))
    single = engine.generate(GenerationRequest(prompt="a horse", seed=11))

    assert batch.seeds == [10, 11, 12] and [r.seed for r in batch.recipes] == [10, 11, 12]
    assert np.abs(pixels(batch.images[1]) - pixels(single.images[0])).max() <= 2


def test_batched_requests_equal_unbatched_within_tolerance(engine: FluxEngine) -> None:
    requests = [
        GenerationRequest(prompt="a cat", seed=5),
        GenerationRequest(prompt="a dog on the beach", seed=6),
    ]

    batched = engine.generate_batch(requests)
    alone = [engine.generate(r) for r in requests]

    for together, single in zip(batched, alone, strict=True):
        assert together.recipes[0] == single.recipes[0]
        assert np.abs(pixels(together.images[0]) - pixels(single.images[0])).max() <= 2


def test_requests_with_different_settings_do_not_batch(engine: FluxEngine) -> None:
    with pytest.raises(RequestError, match="same size, steps"):
        engine.generate_batch(
            [GenerationRequest(prompt="a", steps=3), GenerationRequest(prompt="b", steps=4)]
        )


def test_true_cfg_preset_runs_with_a_negative_pass(engine: FluxEngine) -> None:
    result = engine.generate(GenerationRequest(prompt="a sunny field", preset="cfg", seed=8))
    plain = engine.generate(GenerationRequest(prompt="a sunny field", preset="dev", seed=8, steps=3))

    assert result.recipes[0].true_cfg == 2.0
    assert not np.array_equal(pixels(result.images[0]), pixels(plain.images[0]))


def test_schnell_preset_sends_no_guidance(engine: FluxEngine) -> None:
    result = engine.generate(GenerationRequest(prompt="a city", preset="schnell", seed=2))

    assert result.recipes[0].guidance is None and result.recipes[0].steps == 2


def test_engine_package_never_imports_bot_or_discord() -> None:
    import ast

    root = Path(__file__).resolve().parent.parent / "engine"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"bot", "discord", "fluxbot"}, f"{path.name} imports {name}"


def test_out_of_memory_fails_one_job_with_a_hint_and_the_next_runs(
    make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    from engine.errors import OutOfMemory

    engine = FluxEngine.load(make_settings(memory_cap_gb=0.001), data_dir)  # any real run exceeds 1 MB

    with pytest.raises(OutOfMemory, match="try a smaller size, fewer images or a lighter preset"):
        engine.generate(GenerationRequest(prompt="a huge cat", seed=1))
    engine.set_memory_cap(None)
    assert engine.generate(GenerationRequest(prompt="a small cat", seed=1)).images
