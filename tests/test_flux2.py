"""FLUX.2 (klein) behind the same API, on the tiny random-weight FLUX.2 pipeline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from engine.api import GenerationRequest, Recipe
from engine.engine import FluxEngine
from engine.errors import RequestError
from engine.input_image import InputImage, normalize_input_image
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


def _reference(seed: int, size: tuple[int, int]) -> InputImage:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    data = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(data, "PNG")
    return normalize_input_image(data.getvalue(), max_bytes=10_000_000, max_pixels=4_000_000)


def test_flux2_klein_edits_with_one_and_three_references_in_the_resident_model(flux2: FluxEngine) -> None:
    first, second, third = _reference(1, (96, 64)), _reference(2, (64, 64)), _reference(3, (64, 80))

    def edit(*refs: InputImage, seed: int = 4) -> tuple[np.ndarray, Recipe]:
        request = GenerationRequest(
            prompt="make it night",
            mode="edit",
            size="96x64",
            seed=seed,
            init_image=refs[0].sha256,
            references=tuple(r.sha256 for r in refs[1:]),
        )
        result = flux2.generate(request, init_image=refs[0].png, references=[r.png for r in refs[1:]])
        return pixels(result.images[0]), result.recipes[0]

    one, one_recipe = edit(first)
    three, three_recipe = edit(first, second, third)
    reordered, _ = edit(first, third, second)

    assert flux2.kontext is None, "no second transformer: the resident klein edits"
    assert one.shape == (64, 96, 3)
    assert not np.array_equal(one, three) and not np.array_equal(three, reordered), (
        "every reference, in order"
    )
    assert (one_recipe.kind, one_recipe.init_image_sha256, one_recipe.reference_sha256s) == (
        "edit",
        first.sha256,
        (),
    )
    assert three_recipe.reference_sha256s == (second.sha256, third.sha256)
    # The recipe is the whole spec: drawn again from it, the same pixels.
    again = flux2.draw([three_recipe.spec()], init_image=first.png, references=[second.png, third.png])[0]
    assert np.array_equal(pixels(again.images[0]), three)


def test_flux2_edit_limits_are_checked(flux2: FluxEngine) -> None:
    refs = [_reference(i, (64, 64)) for i in range(5)]
    with pytest.raises(RequestError, match="at most 4 images"):
        flux2.resolve(
            GenerationRequest(
                prompt="x",
                mode="edit",
                init_image=refs[0].sha256,
                references=tuple(r.sha256 for r in refs[1:]),
            )
        )
    with pytest.raises(RequestError, match="reference images are for edits"):
        flux2.resolve(GenerationRequest(prompt="x", references=(refs[1].sha256,)))
    spec = flux2.resolve(
        GenerationRequest(prompt="x", mode="edit", init_image=refs[0].sha256, references=(refs[1].sha256,))
    )
    with pytest.raises(RequestError, match="reads 1 more reference images, and the engine was given 0"):
        flux2.draw([spec], init_image=refs[0].png)
    with pytest.raises(Exception, match="hash"):
        flux2.draw([spec], init_image=refs[0].png, references=[refs[2].png])


def test_flux2_refuses_image_to_image_in_the_engine(flux2: FluxEngine) -> None:
    """A stored img2img spec reaching a FLUX.2 engine is refused, not drawn as an edit."""
    ref = _reference(1, (64, 64))
    spec = flux2.resolve(GenerationRequest(prompt="x", mode="edit", init_image=ref.sha256))
    img2img = spec.model_copy(update={"mode": "img2img", "strength": 0.5})
    with pytest.raises(RequestError, match="image-to-image needs a FLUX.1 model"):
        flux2.draw([img2img], init_image=ref.png)
