"""The recipe inside the PNG: a JSON chunk for fluxbot, an A1111/Forge `parameters` chunk for other tools."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from engine.api import Recipe
from engine.errors import EngineError

RECIPE_KEY = "fluxbot-recipe"
PARAMETERS_KEY = "parameters"


def a1111_parameters(recipe: Recipe) -> str:
    """The text A1111, Forge and most image viewers show as 'generation parameters'."""
    fields = [
        f"Steps: {recipe.steps}",
        f"Sampler: {recipe.sampler.capitalize()}",
        "Schedule type: Simple",
        f"CFG scale: {recipe.true_cfg:g}",
    ]
    if recipe.guidance is not None:
        fields.append(f"Distilled CFG Scale: {recipe.guidance:g}")
    fields += [f"Seed: {recipe.seed}", f"Size: {recipe.width}x{recipe.height}"]
    if recipe.cache != "none":
        # Not A1111 keys: tools show them as they are; what a reader needs to redo the picture.
        fields.append(f"Step cache: {recipe.cache}")
        if recipe.computed_steps is not None:
            fields.append(f"Full steps: {recipe.computed_steps}/{recipe.steps}")
    main = next(iter(recipe.model_files.values()), None)
    if main:
        fields.append(f"Model hash: {main[:10]}")
    fields.append(f"Model: {Path(recipe.model).stem}")
    if recipe.loras:
        hashes = ", ".join(f"{lo.name}: {lo.sha256[:12]}" for lo in recipe.loras)
        fields.append(f'Lora hashes: "{hashes}"')
    fields.append(f"Version: fluxbot {recipe.versions.get('fluxbot', '?')}")
    prompt = recipe.drawn_prompt + "".join(f" <lora:{lo.name}:{lo.weight:g}>" for lo in recipe.loras)
    return f"{prompt}\n" + ", ".join(fields)


def png_bytes(image: Image.Image, recipe: Recipe) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_itxt(PARAMETERS_KEY, a1111_parameters(recipe))
    info.add_itxt(RECIPE_KEY, recipe.model_dump_json())
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image: Image.Image, recipe: Recipe, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image, recipe))
    return path


def read_recipe(source: Path | bytes) -> Recipe:
    """The recipe written by `png_bytes`; EngineError when the PNG carries none."""
    data = source if isinstance(source, bytes) else source.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        text = image.text.get(RECIPE_KEY) if hasattr(image, "text") else None
    if text is None:
        raise EngineError("this PNG carries no fluxbot recipe")
    try:
        return Recipe.model_validate(json.loads(text))
    except ValueError as exc:
        raise EngineError(f"the PNG's fluxbot recipe is unreadable: {exc}") from exc


def read_parameters(source: Path | bytes) -> str | None:
    data = source if isinstance(source, bytes) else source.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        return image.text.get(PARAMETERS_KEY) if hasattr(image, "text") else None
