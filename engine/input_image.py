"""Input images (image prompts, Vary, Upscale, edits): checked, decoded once, normalized, hashed.

An upload is hostile until proven otherwise: its name and its declared content type say nothing, so
the format is what PIL finds in the bytes; its pixel count is read from the header and refused
before anything is decoded (a 20k x 20k PNG of a few KB would take 1.2 GB); a truncated file is
refused rather than drawn half grey. What is kept is a plain RGB PNG with EXIF orientation applied
and every metadata chunk dropped: the same bytes, and so the same sha256, for the same picture.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

from engine.errors import RequestError
from engine.messages import Message

ACCEPTED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}


@dataclass(frozen=True)
class InputImage:
    png: bytes  # normalized: RGB, oriented, no metadata
    sha256: str
    width: int
    height: int


def normalize_input_image(data: bytes, *, max_bytes: int, max_pixels: int) -> InputImage:
    """The upload as a normalized PNG, or a RequestError saying in one line why not. Blocking."""
    if len(data) > max_bytes:
        raise RequestError(
            "the image is {mb:.1f} MB; the limit is {limit:g} MB", mb=len(data) / 1e6, limit=max_bytes / 1e6
        )
    try:
        with warnings.catch_warnings():
            # PIL's own bomb check warns below twice its limit; here any bomb is an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
            name = ACCEPTED_FORMATS.get(opened.format or "")
            if name is None:
                kind = opened.format or "unknown"
                raise RequestError("the file is not a PNG, JPEG or WebP image (it is {kind})", kind=kind)
            width, height = opened.size
            if width * height > max_pixels:
                raise RequestError(
                    "the image is {width}x{height} ({mp:.0f} MP); the limit is {limit:g} MP",
                    width=width,
                    height=height,
                    mp=width * height / 1e6,
                    limit=max_pixels / 1e6,
                )
            opened.load()
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL stops at open() past twice its own limit, before the size can be read here.
        raise RequestError(
            "the image has far more pixels than the limit of {limit:g} MP", limit=max_pixels / 1e6
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for unknown, damaged or truncated files
        if isinstance(exc, OSError) and "truncated" in str(exc):
            raise RequestError(
                "the file is not a readable PNG, JPEG or WebP image (damaged or truncated)"
            ) from None
        raise RequestError("the file is not a readable PNG, JPEG or WebP image (unreadable)") from None
    oriented = ImageOps.exif_transpose(opened).convert("RGB")
    clean = Image.new("RGB", oriented.size)
    clean.paste(oriented)  # a fresh image: no EXIF, ICC, text chunks or XMP carried over
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG", optimize=False)
    png = buffer.getvalue()
    return InputImage(png, hashlib.sha256(png).hexdigest(), clean.width, clean.height)


def decode_input(png: bytes, sha256: str) -> Image.Image:
    """A stored input image, checked against the hash its recipe names. Blocking."""
    if hashlib.sha256(png).hexdigest() != sha256:
        raise RequestError(
            "the input image does not match the hash its job recorded; refusing to draw from it"
        )
    image = Image.open(io.BytesIO(png))
    image.load()
    return image.convert("RGB")


# FLUX.2 klein reads a reference of at least 64 pixels a side and at most 8:1 (diffusers'
# Flux2ImageProcessor refuses others with a ValueError mid-job).
REFERENCE_MIN_SIDE = 64
REFERENCE_MAX_ASPECT = 8.0


def reference_problem(width: int, height: int) -> Message | None:
    """Why a picture cannot be a FLUX.2 reference image, or None."""
    if min(width, height) < REFERENCE_MIN_SIDE:
        return Message(
            "a reference image needs at least {least} pixels a side (this one is {width}x{height})",
            least=REFERENCE_MIN_SIDE,
            width=width,
            height=height,
        )
    if max(width, height) > REFERENCE_MAX_ASPECT * min(width, height):
        return Message(
            "a reference image may be at most {most:g}:1 (this one is {width}x{height})",
            most=REFERENCE_MAX_ASPECT,
            width=width,
            height=height,
        )
    return None


MASK_ASPECT_TOLERANCE = 0.02  # a mask is stretched to its picture only when their aspects agree


def mask_problem(mask_png: bytes, width: int, height: int) -> Message | None:
    """Why an uploaded mask (white: repaint) cannot mask a `width` x `height` picture, or None: a
    mask of another aspect (it would be stretched over the wrong part), one that selects nothing,
    one that selects everything (that is a new picture: /imagine). Blocking."""
    mask = Image.open(io.BytesIO(mask_png)).convert("L")
    if abs(mask.width / mask.height - width / height) > MASK_ASPECT_TOLERANCE * (width / height):
        return Message(
            "the mask is {mw}x{mh}, the picture {width}x{height}: draw the mask over the picture itself",
            mw=mask.width,
            mh=mask.height,
            width=width,
            height=height,
        )
    low, high = mask.getextrema()  # one band ("L"): (darkest, brightest)
    assert isinstance(low, int) and isinstance(high, int)
    if high < 128:
        return Message("the mask selects nothing: paint the part to repaint white")
    if low >= 128:
        return Message("the mask covers the whole picture: for a new picture use /imagine")
    return None
