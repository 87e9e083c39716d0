"""FLUX.2 (klein) behind the same API, on the tiny random-weight FLUX.2 pipeline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from engine.api import GenerationRequest
from engine.engine import FluxEngine
from engine.errors import RequestError
from engine.settings import EngineSettings
from tests.conftest import pixels


@pytest.fixture(scope="module")
def flux2(make_settings: Callable[..., EngineSettings], data_dir: Path) -> FluxEngine:
    return FluxEngine.load(make_settings(model="tiny-flux2"), data_dir)


def test_flux2_generates_through_the_same_api_with_its_own_default_preset(flux2: FluxEngine) -> None:
    result = flux2.generate(GenerationRequest(prompt="a red cat", seed=3))

    recipe = result.recipes[0]
    assert (recipe.family, recipe.variant, recipe.preset, recipe.guidance) == (
        "flux2",
        "klein",
        "klein",
        None,
    )
    assert result.images[0].size == (64, 64) and pixels(result.images[0]).std() > 0


def test_flux2_is_deterministic_and_cached_embeds_match(flux2: FluxEngine) -> None:
    request = GenerationRequest(prompt="a blue owl", seed=8)

    first = flux2.generate(request)
    second = flux2.generate(request)

    assert second.timings.embeds_cached
    assert np.array_equal(pixels(first.images[0]), pixels(second.images[0]))


def test_flux1_presets_are_refused_on_a_flux2_model(flux2: FluxEngine) -> None:
    with pytest.raises(RequestError, match="preset dev is for flux1, but the loaded model is flux2"):
        flux2.resolve(GenerationRequest(prompt="a cat", preset="dev"))


def test_flux2_previews_come_from_its_own_32_channel_projection(flux2: FluxEngine) -> None:
    import io

    import torch
    from diffusers import Flux2KleinPipeline
    from PIL import Image

    from engine.api import StepProgress
    from engine.preview import PreviewEvery, unpack_flux2_latents

    latents = torch.randn(1, 32, 16, 12)
    packed = Flux2KleinPipeline._pack_latents(Flux2KleinPipeline._patchify_latents(latents))
    seen: list[StepProgress] = []

    flux2.generate(
        GenerationRequest(prompt="a fox", seed=1, steps=4),
        on_step=seen.append,
        preview=PreviewEvery(seconds=0.0),
    )

    assert torch.equal(unpack_flux2_latents(packed, 16 * 8, 12 * 8), latents), "diffusers' packing undone"
    previews = [p.preview for p in seen if p.preview]
    assert previews and Image.open(io.BytesIO(previews[0])).format == "JPEG"
