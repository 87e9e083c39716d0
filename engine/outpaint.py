"""Zoom Out and Pan: a picture on a larger canvas, and the mask of what FLUX.1 Fill draws there.

Midjourney's bot offers both under every result; here each is an inpaint job (engine.fill) whose input
is the canvas and whose mask is the new border. The canvas keeps the job's megapixel cap (the
original shrinks inside it when the larger canvas would pass it) and sizes on the model's grid. The
mask reaches a few pixels into the original so the seam is drawn, not pasted. Pure PIL, torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from PIL import Image

Direction = Literal["left", "right", "up", "down"]
PAN_SHARE = 0.5  # a pan adds half the picture's width (or height) on that side
SEAM = 8  # pixels of the original the mask reaches into, so the border is drawn into it
GRID = 16


@dataclass(frozen=True)
class Canvas:
    image: Image.Image  # RGB: the original (perhaps shrunk) on the new canvas, grey around it
    mask: Image.Image  # L: white where Fill draws (the border and the seam), black where it keeps
    box: tuple[int, int, int, int]  # where the original sits on the canvas (left, top, right, bottom)

    @property
    def kept(self) -> tuple[int, int, int, int]:
        """The part of the canvas Fill leaves as it is (the original, less the seam)."""
        box = self.mask.point(lambda v: 255 if v < 128 else 0).getbbox()
        return box if box is not None else (0, 0, 0, 0)


def zoom_out(picture: Image.Image, factor: float, max_pixels: int) -> Canvas:
    """The picture in the middle of a canvas `factor` times its size (1.5, 2)."""
    width, height = picture.size
    return _canvas(picture, width * factor, height * factor, "center", max_pixels)


def pan(picture: Image.Image, direction: Direction, max_pixels: int) -> Canvas:
    """The picture with half its width (or height) more on one side."""
    width, height = picture.size
    wide = direction in ("left", "right")
    new_w = width * (1 + PAN_SHARE) if wide else width
    new_h = height if wide else height * (1 + PAN_SHARE)
    return _canvas(picture, new_w, new_h, direction, max_pixels)


def _canvas(
    picture: Image.Image, width: float, height: float, toward: Direction | Literal["center"], max_pixels: int
) -> Canvas:
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))  # under the cap: all of it shrinks
    canvas_w, canvas_h = _grid(width * scale), _grid(height * scale)
    # The original keeps its aspect, at the share of the canvas the grid (rounding down) leaves it.
    ratio = min(canvas_w / width, canvas_h / height)
    inner_w = min(canvas_w, max(1, round(picture.width * ratio)))
    inner_h = min(canvas_h, max(1, round(picture.height * ratio)))
    # The new strip goes where the user pans to: the original sits against the other side.
    left = {"left": canvas_w - inner_w, "right": 0}.get(toward, (canvas_w - inner_w) // 2)
    top = {"up": canvas_h - inner_h, "down": 0}.get(toward, (canvas_h - inner_h) // 2)
    image = Image.new("RGB", (canvas_w, canvas_h), (127, 127, 127))
    inner = picture.convert("RGB").resize((inner_w, inner_h), Image.Resampling.LANCZOS)
    image.paste(inner, (left, top))
    mask = Image.new("L", (canvas_w, canvas_h), 255)
    keep = (
        left + (SEAM if left > 0 else 0),
        top + (SEAM if top > 0 else 0),
        left + inner_w - (SEAM if left + inner_w < canvas_w else 0),
        top + inner_h - (SEAM if top + inner_h < canvas_h else 0),
    )
    mask.paste(0, keep)
    return Canvas(image, mask, (left, top, left + inner_w, top + inner_h))


def _grid(value: float) -> int:
    return max(GRID, int(value) // GRID * GRID)
