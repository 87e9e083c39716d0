"""ImageFiles: the PNGs under <data_dir>/images, named by job id, and the input images (uploads, and
results that Vary/Upscale/Edit draw from) under <data_dir>/inputs, named by their sha256. Blocking:
call off the event loop."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from bot.store.jobs import StoredImage
from engine.api import Recipe
from engine.errors import RequestError
from engine.input_image import InputImage


def png_path(job_id: int, index: int) -> Path:
    """Relative to the data dir. Generated name only: no user text ever reaches the filesystem."""
    return Path("images") / f"{job_id // 1000:04d}" / f"{job_id}-{index}.png"


def input_path(sha256: str) -> Path:
    """Relative to the data dir; content-addressed, so the same picture is stored once."""
    return Path("inputs") / sha256[:2] / f"{sha256}.png"


class ImageFiles:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def save(self, job_id: int, index: int, data: bytes, recipe: Recipe) -> StoredImage:
        """Write atomically (temp file, fsync, rename): a crash never leaves half a PNG under the name."""
        relative = png_path(job_id, index)
        self._write(relative, data)
        return stored_image(index, relative.as_posix(), data, recipe)

    def save_input(self, image: InputImage) -> str:
        relative = input_path(image.sha256)
        if not (self.data_dir / relative).is_file():
            self._write(relative, image.png)
        return relative.as_posix()

    def read_input(self, sha256: str) -> bytes:
        """An input image's PNG; the engine checks it against the hash again before drawing."""
        try:
            return (self.data_dir / input_path(sha256)).read_bytes()
        except OSError as exc:
            raise RequestError(
                "the input image {image}... is no longer stored ({problem})",
                image=sha256[:12],
                problem=exc.strerror,
            ) from None

    def _write(self, relative: Path, data: bytes) -> None:
        path = self.data_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".part")
        try:
            os.fchmod(fd, 0o644)  # mkstemp makes it private; PNGs are read by the bot and other workers
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def read(self, relative: str) -> bytes:
        return (self.data_dir / relative).read_bytes()

    def writable(self) -> bool:
        """Can a PNG be written now? (Permissions, a read-only mount, a full disk: a real write tells.)"""
        folder = self.data_dir / "images"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
                pass
        except OSError:
            return False
        return True


def stored_image(index: int, relative: str, data: bytes, recipe: Recipe) -> StoredImage:
    return StoredImage(
        index=index,
        path=relative,
        sha256=hashlib.sha256(data).hexdigest(),
        width=recipe.width,
        height=recipe.height,
        seed=recipe.seed,
        recipe=recipe.model_dump(mode="json"),
    )
