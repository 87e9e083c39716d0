"""Upscaler models (Real-ESRGAN, 4x-UltraSharp, SwinIR, ...), as Forge and ComfyUI users download them.

`engine.upscaler` names a `.pth`/`.safetensors` file: a path, or a name looked up in a Forge
`models/ESRGAN/` or ComfyUI `models/upscale_models/` folder (beside the model, or in <data_dir>/models),
or "tiny" (a random Real-ESRGAN-shaped x4 network built offline). spandrel reads the file: it detects
the architecture and its sizes from the tensors, and refuses a file it does not know, so nothing is
drawn by a network built wrong. Only super-resolution models (spandrel's purpose "SR", scale >= 2, RGB
in and out) are taken: a face restorer or a denoiser is refused by name.

The picture is upscaled in overlapping tiles on the engine's device (peak memory bounded by the tile,
not the picture); the overlaps are blended with linear ramps, so no seam shows. A picture that fits one
tile is one direct call: the same pixels as spandrel's own.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from engine.errors import ConfigError, GenerationCancelled, ModelLoadError
from engine.hashing import FileHasher

log = logging.getLogger(__name__)

# Forge keeps upscalers in models/ESRGAN (and per-architecture folders), ComfyUI in models/upscale_models.
UPSCALER_DIRS = ("ESRGAN", "upscale_models", "RealESRGAN", "SwinIR", "DAT", "HAT")
UPSCALER_SUFFIXES = (".pth", ".safetensors", ".pt", ".ckpt")
TILE = 512  # input pixels per tile side: ~0.5 GB of activations for a 64-filter ESRGAN at x4 in fp16
OVERLAP = 32  # input pixels two neighbouring tiles share, blended
TINY_UPSCALER_SEED = 20251206
TINY_UPSCALER_FILE = "RealESRGAN_x4plus-tiny.pth"

TileProgress = Callable[[int, int], None]  # (tiles done, tiles in all)


def locate_upscaler(where: str, models_dir: Path | None, data_dir: Path) -> Path:
    """engine.upscaler's file: "tiny" (built once under <data_dir>/models), else `find_upscaler` in the
    model's models/ folder and <data_dir>/models."""
    if where == "tiny":
        return ensure_tiny_upscaler(data_dir / "models" / "tiny-upscaler")
    return find_upscaler(where, [d for d in (models_dir, data_dir / "models") if d is not None])


def find_upscaler(where: str, models_dirs: list[Path]) -> Path:
    """The file `engine.upscaler` names: a path, or a file name (with or without its suffix, any case)
    in one of the upscaler folders of `models_dirs`. Torch-free."""
    path = Path(where).expanduser()
    if path.is_file():
        return path
    if len(path.parts) > 1:  # a path, not a name to look up
        raise ConfigError(f"engine.upscaler: no file {where}")
    wanted = where.lower()
    searched = []
    for models_dir in models_dirs:
        for sub in UPSCALER_DIRS:
            folder = models_dir / sub
            if not folder.is_dir():
                continue
            searched.append(str(folder))
            for candidate in sorted(folder.iterdir()):
                if candidate.suffix.lower() in UPSCALER_SUFFIXES and wanted in (
                    candidate.name.lower(),
                    candidate.stem.lower(),
                ):
                    return candidate
    where_looked = ", ".join(searched) if searched else "no models/ESRGAN or models/upscale_models folder"
    raise ConfigError(f"engine.upscaler: no upscaler named {where!r} ({where_looked})")


@dataclass
class Upscaler:
    """A loaded upscaler model and what the recipe says about it."""

    descriptor: Any  # spandrel.ImageModelDescriptor
    file: Path
    sha256: str
    dtype: torch.dtype
    tile: int = TILE
    overlap: int = OVERLAP

    @classmethod
    def load(cls, file: Path, device: str, hasher: FileHasher, tile: int = TILE) -> Upscaler:
        """spandrel's detection on the file's tensors; refused unless it is an RGB super-resolution
        model. On a GPU it runs in bf16 (else fp16) where the architecture supports it."""
        from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

        try:
            descriptor = ModelLoader(device="cpu").load_from_file(file)
        except UnsupportedModelError:
            raise ModelLoadError(
                f"engine.upscaler: {file.name} is not an upscaler architecture spandrel knows "
                "(Real-ESRGAN, ESRGAN, SwinIR, HAT, DAT, SPAN, Compact, ...)"
            ) from None
        except Exception as exc:  # a damaged file, a pickle spandrel's restricted unpickler refuses...
            why = str(exc).splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"engine.upscaler: cannot read {file.name}: {why}") from exc
        upscales = descriptor.purpose == "SR" and descriptor.scale >= 2
        if not isinstance(descriptor, ImageModelDescriptor) or not upscales:
            raise ModelLoadError(
                f"engine.upscaler: {file.name} is a {descriptor.architecture.name} "
                f"{descriptor.purpose} model (scale {descriptor.scale}), not an upscaler"
            )
        if descriptor.input_channels != 3 or descriptor.output_channels != 3:
            raise ModelLoadError(f"engine.upscaler: {file.name} does not take and give RGB pictures")
        dtype = torch.float32
        if device.startswith("cuda"):
            if descriptor.supports_bfloat16:
                dtype = torch.bfloat16
            elif descriptor.supports_half:
                dtype = torch.float16
        descriptor.to(device).to(dtype).eval()
        upscaler = cls(descriptor, file, hasher.sha256(file), dtype, tile, min(OVERLAP, tile // 4))
        log.info("upscaler %s: %s", file.name, upscaler.description)
        return upscaler

    @property
    def scale(self) -> int:
        return int(self.descriptor.scale)

    @property
    def architecture(self) -> str:
        return str(self.descriptor.architecture.name)

    @property
    def description(self) -> str:
        """What doctor and the recipe say: 'ESRGAN x4 (64nf, 23nb)'."""
        tags = ", ".join(self.descriptor.tags)
        return f"{self.architecture} x{self.scale}" + (f" ({tags})" if tags else "")

    @property
    def run_description(self) -> str:
        """What the recipe says: the model, and the tile size and precision its pixels depend on."""
        return f"{self.description}, tiles of {self.tile} px, {str(self.dtype).removeprefix('torch.')}"

    @property
    def files(self) -> dict[str, str]:
        return {self.file.name: self.sha256}

    def upscale(
        self,
        picture: Image.Image,
        on_tile: TileProgress | None = None,
        cancel: threading.Event | None = None,
    ) -> Image.Image:
        """`picture` at the model's scale. Blocking (the engine's thread)."""
        from spandrel import ModelTiling

        pixels = _to_tensor(picture).to(self.descriptor.device, self.dtype)
        height, width = pixels.shape[-2:]
        # Models that tile themselves run whole; spandrel's "discouraged" (SwinIR, SCUNet: window
        # attention sees a little less context at a tile's edge) are tiled all the same, so memory
        # stays bounded by the tile, with the overlaps blended.
        whole = self.descriptor.tiling == ModelTiling.INTERNAL
        tiles = [(0, 0, height, width)] if whole else _tiles(height, width, self.tile, self.overlap)
        if len(tiles) == 1:
            out = self.descriptor(pixels)
            if on_tile is not None:
                on_tile(1, 1)
            return _to_image(out)
        s = self.scale
        total = torch.zeros(1, 3, height * s, width * s, dtype=torch.float32, device=pixels.device)
        weight = torch.zeros(1, 1, height * s, width * s, dtype=torch.float32, device=pixels.device)
        for done, (top, left, bottom, right) in enumerate(tiles, start=1):
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled(done - 1, len(tiles))
            out = self.descriptor(pixels[..., top:bottom, left:right]).float()
            ramp = _ramp(top, left, bottom, right, height, width, self.overlap)
            ramp = ramp.to(out.device).repeat_interleave(s, -2).repeat_interleave(s, -1)
            total[..., top * s : bottom * s, left * s : right * s] += out * ramp
            weight[..., top * s : bottom * s, left * s : right * s] += ramp
            if on_tile is not None:
                on_tile(done, len(tiles))
        return _to_image(total / weight)


def _tiles(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right) of each tile: as few as cover the picture with at most `tile` pixels
    a side and at least `overlap` shared by neighbours, spread evenly (so no tile is a sliver that
    costs a whole call)."""

    def spans(length: int) -> list[tuple[int, int]]:
        if length <= tile:
            return [(0, length)]
        count = math.ceil((length - overlap) / (tile - overlap))
        size = math.ceil((length + (count - 1) * overlap) / count)
        starts = [round(i * (length - size) / (count - 1)) for i in range(count)]
        return [(start, start + size) for start in starts]

    return [(top, left, bottom, right) for top, bottom in spans(height) for left, right in spans(width)]


def _ramp(
    top: int, left: int, bottom: int, right: int, height: int, width: int, overlap: int
) -> torch.Tensor:
    """A tile's blend weights: rising linearly over `overlap` pixels on each side that meets another
    tile (a side on the picture's edge keeps full weight), never zero."""

    def axis(n: int, start_inner: bool, end_inner: bool) -> torch.Tensor:
        weights = torch.ones(n)
        ramp = torch.linspace(1.0 / (overlap + 1), 1.0, overlap) if overlap else torch.ones(0)
        k = min(overlap, n)
        if start_inner and k:
            weights[:k] = torch.minimum(weights[:k], ramp[:k])
        if end_inner and k:
            weights[n - k :] = torch.minimum(weights[n - k :], ramp[:k].flip(0))
        return weights

    rows = axis(bottom - top, top > 0, bottom < height)
    cols = axis(right - left, left > 0, right < width)
    return (rows[:, None] * cols[None, :])[None, None]


def _to_tensor(picture: Image.Image) -> torch.Tensor:
    import numpy as np

    array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def _to_image(pixels: torch.Tensor) -> Image.Image:
    array = (pixels[0].float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def ensure_tiny_upscaler(directory: Path) -> Path:
    """A tiny random x4 Real-ESRGAN (spandrel's own RRDBNet: 8 filters, 1 block), saved once in the
    layout of RealESRGAN_x4plus.pth (basicsr's key names under "params_ema")."""
    from spandrel.architectures.ESRGAN import ESRGAN

    from engine.tiny import save_atomically

    file = directory / TINY_UPSCALER_FILE
    if file.is_file():
        return file
    torch.manual_seed(TINY_UPSCALER_SEED)
    network = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4)

    def write(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_realesrgan(network, folder / TINY_UPSCALER_FILE)

    save_atomically(directory, write)
    return file


def save_realesrgan(network: torch.nn.Module, path: Path) -> Path:
    """spandrel's ESRGAN network written as Real-ESRGAN's releases are (RealESRGAN_x4plus.pth):
    basicsr's key names under "params_ema". The tiny upscaler, the tests and the benchmarks."""
    torch.save({"params_ema": realesrgan_layout(network.state_dict())}, path)
    return path


def realesrgan_layout(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """spandrel's ESRGAN state dict (the original ESRGAN keys: model.0, model.1.sub.N.RDBk.convj.0,
    ...) under basicsr's RRDBNet names, as Real-ESRGAN's releases hold them: conv_first,
    body.N.rdbk.convj, conv_body, conv_up1/2, conv_hr, conv_last."""
    import re

    blocks = 1 + max(int(m[1]) for k in old if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k)))
    ups = sorted({int(k.split(".")[1]) for k in old if re.match(r"model\.(\d+)\.weight", k)} - {0, 1})
    # After the trunk: (upsample, conv, act) per x2, then conv_hr, act, conv_last.
    *up_convs, hr, last = ups
    new: dict[str, torch.Tensor] = {}
    for key, value in old.items():
        parts = key.split(".")
        if parts[0] != "model":
            continue
        index = int(parts[1])
        kind = parts[-1]
        if index == 0:
            new[f"conv_first.{kind}"] = value
        elif index == 1 and parts[3] == str(blocks):
            new[f"conv_body.{kind}"] = value
        elif index == 1:
            rdb, conv = parts[4].lower(), parts[5]
            new[f"body.{parts[3]}.{rdb}.{conv}.{kind}"] = value
        elif index in up_convs:
            new[f"conv_up{up_convs.index(index) + 1}.{kind}"] = value
        elif index == hr:
            new[f"conv_hr.{kind}"] = value
        elif index == last:
            new[f"conv_last.{kind}"] = value
    return new
