"""The recipe travels inside the PNG and gives the same image back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.api import GenerationRequest
from engine.engine import FluxEngine
from engine.errors import EngineError
from engine.png import png_bytes, read_parameters, read_recipe, save_png
from tests.conftest import pixels


def test_recipe_round_trips_through_the_png(engine: FluxEngine, tmp_path: Path) -> None:
    result = engine.generate(GenerationRequest(prompt="a portrait of a robot", seed=77, steps=5))

    path = save_png(result.images[0], result.recipes[0], tmp_path / "out.png")

    assert read_recipe(path) == result.recipes[0]


def test_png_has_a1111_style_parameters(engine: FluxEngine) -> None:
    result = engine.generate(GenerationRequest(prompt="a misty lake", seed=12, steps=3))

    text = read_parameters(png_bytes(result.images[0], result.recipes[0]))

    assert text is not None
    prompt_line, fields = text.split("\n")
    assert prompt_line == "a misty lake"
    for part in (
        "Steps: 3",
        "Sampler: Euler",
        "CFG scale: 1",
        "Distilled CFG Scale: 3.5",
        "Seed: 12",
        "Size: 64x64",
        "Model: tiny-flux1",
        "Model hash: ",
    ):
        assert part in fields


def test_recipe_from_png_regenerates_identical_pixels(engine: FluxEngine) -> None:
    first = engine.generate(GenerationRequest(prompt="a snowy forest", seed=5))
    data = png_bytes(first.images[0], first.recipes[0])

    (again,) = engine.draw([read_recipe(data).spec()])

    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))


def test_png_without_recipe_is_a_clear_error(tmp_path: Path) -> None:
    from PIL import Image

    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)

    with pytest.raises(EngineError, match="carries no fluxbot recipe"):
        read_recipe(plain)
