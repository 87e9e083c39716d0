"""Live previews: the picture the model predicts at a step, from the latents alone, with no VAE call.

FLUX.1's 16 latent channels map to RGB nearly linearly; ComfyUI publishes the 16x3 factors and the
bias it previews with (comfy/latent_formats.py, class Flux), used here as data. The prediction is the
flow-matching estimate of the clean latents, x0 = x - sigma * v, with v recovered from two consecutive
Euler steps (x_next = x + (sigma_next - sigma) * v): exact for diffusers' FlowMatchEulerDiscreteScheduler
and a matrix product of the latent size, far below one denoising step (bench/previews.py).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from engine.errors import ConfigError

# One latent image (16, h, w), in the model's normalized space, to a picture.
LatentDecoder = Callable[[torch.Tensor], Image.Image]

FLUX1_LATENT_RGB_FACTORS = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLUX1_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)
PREVIEW_MAX_SIDE = 256  # enough to see the composition; a few KB as JPEG


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """FLUX.1's packed sequence (B, h/2*w/2, 64) back to latent images (B, 16, h, w); as diffusers'
    FluxPipeline._unpack_latents (8x VAE, 2x2 patches)."""
    batch, _, channels = packed.shape
    h, w = 2 * (height // 16), 2 * (width // 16)
    latents = packed.view(batch, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, channels // 4, h, w)


def latent_rgb(latents: torch.Tensor) -> Image.Image:
    """One latent image (16, h, w) as RGB through the fixed projection."""
    factors = torch.tensor(FLUX1_LATENT_RGB_FACTORS, dtype=torch.float32, device=latents.device)
    bias = torch.tensor(FLUX1_LATENT_RGB_BIAS, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("chw,cr->hwr", latents.float(), factors) + bias
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
    image = Image.fromarray(pixels, "RGB")
    scale = PREVIEW_MAX_SIDE / max(image.size)
    if scale > 1:
        image = image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.Resampling.NEAREST
        )
    return image


def _fitted(image: Image.Image) -> Image.Image:
    scale = PREVIEW_MAX_SIDE / max(image.size)
    if scale < 1:
        return image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR
        )
    return image


def taef1_decoder(folder: Path, device: str, dtype: torch.dtype) -> LatentDecoder:
    """madebyollin's TAEF1 (a tiny FLUX.1 VAE decoder, diffusers' AutoencoderTiny) from the operator's
    folder: sharper previews for a few ms of GPU a preview."""
    from diffusers import AutoencoderTiny

    try:
        tiny: Any = AutoencoderTiny.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"engine.preview: cannot load TAEF1 from {folder}: {str(exc).splitlines()[0][:160]}"
        ) from exc
    if tiny.config.latent_channels != 16:
        raise ConfigError(
            f"engine.preview: {folder} decodes {tiny.config.latent_channels} channels, FLUX.1 has 16"
        )
    tiny.to(device).eval()
    scaling, shift = tiny.config.scaling_factor, tiny.config.shift_factor or 0.0

    def decode(latents: torch.Tensor) -> Image.Image:
        with torch.inference_mode():
            # As the pipelines decode: the model's space back to the VAE's.
            pixels = tiny.decode((latents[None].to(device, dtype) / scaling) + shift).sample[0]
        array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return _fitted(Image.fromarray(array, "RGB"))

    return decode


def preview_decoder(setting: str, device: str, dtype: torch.dtype) -> LatentDecoder | None:
    """engine.preview: "latent" (the fixed projection), "taef1:<folder>", or "off"."""
    if setting == "off":
        return None
    if setting == "latent":
        return latent_rgb
    if setting.startswith("taef1:"):
        return taef1_decoder(Path(setting.removeprefix("taef1:")).expanduser(), device, dtype)
    raise ConfigError(f'engine.preview must be "latent", "off" or "taef1:<folder>" (got {setting[:60]!r})')


def jpeg(image: Image.Image, quality: int = 70) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@dataclass
class PreviewMaker:
    """Follows one denoising loop; `after_step` gives a JPEG when one is due (None otherwise)."""

    height: int
    width: int
    every_s: float
    decode: LatentDecoder = latent_rgb
    _previous: tuple[torch.Tensor, float] | None = None
    _last_at: float = field(default=float("-inf"))

    def after_step(
        self, latents: torch.Tensor, sigmas: torch.Tensor, step_index: int, now: float
    ) -> bytes | None:
        """`latents` after the step that moved them to `sigmas[step_index]`."""
        sigma = float(sigmas[step_index])
        previous, self._previous = self._previous, (latents, sigma)
        if previous is None or now - self._last_at < self.every_s or sigma <= 0.0:
            return None  # the first step (no velocity yet), not due, or the last (the image is coming)
        before, sigma_before = previous
        velocity = (latents[:1] - before[:1]) / (sigma - sigma_before)
        predicted = latents[:1] - sigma * velocity
        self._last_at = now
        return jpeg(self.decode(unpack_latents(predicted, self.height, self.width)[0]))
