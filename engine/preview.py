"""Live previews: the picture the model predicts at a step, from the latents alone, with no VAE call.

FLUX.1's 16 latent channels map to RGB nearly linearly; ComfyUI publishes the 16x3 factors and the
bias it previews with (comfy/latent_formats.py, class Flux), used here as data. The prediction is the
flow-matching estimate of the clean latents, x0 = x - sigma * v, with v recovered from two consecutive
Euler steps (x_next = x + (sigma_next - sigma) * v): exact for diffusers' FlowMatchEulerDiscreteScheduler
and a matrix product of the latent size, far below one denoising step (bench/images.py measures it).
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
from engine.spec import PreviewEvery

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
# FLUX.2's VAE has 32 channels; its transformer sees them as 128 (2x2 patches). ComfyUI's factors
# (class Flux2) project the 32 after undoing the patches.
FLUX2_LATENT_RGB_FACTORS = (
    (0.0058, 0.0113, 0.0073),
    (0.0495, 0.0443, 0.0836),
    (-0.0099, 0.0096, 0.0644),
    (0.2144, 0.3009, 0.3652),
    (0.0166, -0.0039, -0.0054),
    (0.0157, 0.0103, -0.0160),
    (-0.0398, 0.0902, -0.0235),
    (-0.0052, 0.0095, 0.0109),
    (-0.3527, -0.2712, -0.1666),
    (-0.0301, -0.0356, -0.0180),
    (-0.0107, 0.0078, 0.0013),
    (0.0746, 0.0090, -0.0941),
    (0.0156, 0.0169, 0.0070),
    (-0.0034, -0.0040, -0.0114),
    (0.0032, 0.0181, 0.0080),
    (-0.0939, -0.0008, 0.0186),
    (0.0018, 0.0043, 0.0104),
    (0.0284, 0.0056, -0.0127),
    (-0.0024, -0.0022, -0.0030),
    (0.1207, -0.0026, 0.0065),
    (0.0128, 0.0101, 0.0142),
    (0.0137, -0.0072, -0.0007),
    (0.0095, 0.0092, -0.0059),
    (0.0000, -0.0077, -0.0049),
    (-0.0465, -0.0204, -0.0312),
    (0.0095, 0.0012, -0.0066),
    (0.0290, -0.0034, 0.0025),
    (0.0220, 0.0169, -0.0048),
    (-0.0332, -0.0457, -0.0468),
    (-0.0085, 0.0389, 0.0609),
    (-0.0076, 0.0003, -0.0043),
    (-0.0111, -0.0460, -0.0614),
)
FLUX2_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)
PREVIEW_MAX_SIDE = 256  # enough to see the composition; a few KB as JPEG


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """FLUX.1's packed sequence (B, h/2*w/2, 64) back to latent images (B, 16, h, w); as diffusers'
    FluxPipeline._unpack_latents (8x VAE, 2x2 patches)."""
    batch, _, channels = packed.shape
    h, w = 2 * (height // 16), 2 * (width // 16)
    latents = packed.view(batch, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, channels // 4, h, w)


def unpack_flux2_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """FLUX.2's token sequence (B, h*w, 128) back to VAE latents (B, 32, 2h, 2w): diffusers'
    Flux2 _pack_latents and _patchify_latents run backwards (tokens in row order, as text-to-image
    lays them out)."""
    batch, _, channels = packed.shape
    h, w = height // 16, width // 16
    patches = packed.permute(0, 2, 1).reshape(batch, channels, h, w)
    latents = patches.reshape(batch, channels // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return latents.reshape(batch, channels // 4, h * 2, w * 2)


def latent_rgb(latents: torch.Tensor) -> Image.Image:
    """One latent image (16 channels for FLUX.1, 32 for FLUX.2; h, w) as RGB through the fixed projection."""
    flux2 = latents.shape[0] == len(FLUX2_LATENT_RGB_FACTORS)
    factor_rows = FLUX2_LATENT_RGB_FACTORS if flux2 else FLUX1_LATENT_RGB_FACTORS
    factors = torch.tensor(factor_rows, dtype=torch.float32, device=latents.device)
    bias_values = FLUX2_LATENT_RGB_BIAS if flux2 else FLUX1_LATENT_RGB_BIAS
    bias = torch.tensor(bias_values, dtype=torch.float32, device=latents.device)
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
    every: PreviewEvery
    decode: LatentDecoder = latent_rgb
    unpack: Callable[[torch.Tensor, int, int], torch.Tensor] = unpack_latents
    _previous: tuple[torch.Tensor, float] | None = None
    _last_at: float = field(default=float("-inf"))

    def after_step(
        self, latents: torch.Tensor, sigmas: torch.Tensor, step_index: int, now: float
    ) -> bytes | None:
        """`latents` after the step that moved them to `sigmas[step_index]`."""
        sigma = float(sigmas[step_index])
        previous, self._previous = self._previous, (latents, sigma)
        if previous is None or not self.every.due(step_index, now - self._last_at) or sigma <= 0.0:
            return None  # the first step (no velocity yet), not due, or the last (the image is coming)
        before, sigma_before = previous
        velocity = (latents[:1] - before[:1]) / (sigma - sigma_before)
        predicted = latents[:1] - sigma * velocity
        self._last_at = now
        return jpeg(self.decode(self.unpack(predicted, self.height, self.width)[0]))
