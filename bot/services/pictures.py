"""Pictures going into jobs: uploads checked and stored, a job's own picture as an input, and the size
an image prompt draws at."""

from __future__ import annotations

import asyncio
import math

from bot.observability import Metrics
from bot.services.errors import NotAllowed, UserError
from bot.store.files import ImageFiles
from bot.store.models import Job, JobStatus
from engine.errors import RequestError
from engine.input_image import InputImage, normalize_input_image
from engine.presets import Preset
from fluxbot.settings import ImageSettings


class Pictures:
    def __init__(self, files: ImageFiles | None, limits: ImageSettings, metrics: Metrics) -> None:
        self.files = files
        self.limits = limits
        self.metrics = metrics

    async def upload(self, data: bytes) -> InputImage:
        """An uploaded image checked, normalized and stored (content-addressed) for a job to draw
        from; a refusal is one UserError line. Nothing else is stored for a refused image."""
        files = self._files()
        max_bytes, max_pixels = (
            int(self.limits.max_input_mb * 1e6),
            int(self.limits.max_input_megapixels * 1e6),
        )
        try:
            return await asyncio.to_thread(_kept_input, files, data, max_bytes, max_pixels)
        except RequestError as exc:
            self.metrics.rejections.labels("validation").inc()
            raise UserError("That image can't be used: {problem}.", problem=exc.message) from exc

    async def of_job(self, parent: Job, age_restricted: bool, picture: int = 1) -> InputImage:
        """A job's picture (1-based) as an input image, where it may be shown."""
        job_id = parent.id
        if parent.status != JobStatus.DONE or not parent.images:
            raise UserError(
                "Job {job} has no picture to draw from (it is {status}).",
                job=job_id,
                status=parent.status.value,
            )
        if not 1 <= picture <= len(parent.images):
            raise UserError(
                "Job {job} has {count} picture(s); pick 1 to {count}.", job=job_id, count=len(parent.images)
            )
        # A flagged picture is drawn from only where it may be shown (its own channel may have been
        # age-restricted, the presser's is not necessarily).
        if parent.safety and parent.safety.get("flagged") and not age_restricted:
            raise NotAllowed(
                "The picture of job {job} was withheld; it can't be drawn from here.", job=job_id
            )
        files = self._files()
        stored = parent.images[picture - 1]

        def as_input() -> InputImage:  # blocking: read, normalize (the recipe chunks go), store
            data = files.read(stored.path)
            return _kept_input(files, data, len(data), stored.width * stored.height)

        return await asyncio.to_thread(as_input)

    def _files(self) -> ImageFiles:
        if self.files is None:
            raise UserError("Image prompts are not set up in this fluxbot.")
        return self.files


def size_for(preset: Preset, image: InputImage) -> str:
    """Without a size option, an image prompt keeps its aspect (the preset's nearest allowed one) at the
    preset's pixel count."""
    aspects = [tuple(int(x) for x in a.split(":")) for a in preset.aspects] or [(image.width, image.height)]
    ratio = image.width / image.height
    for aw, ah in sorted(aspects, key=lambda a: abs(math.log(a[0] / a[1] / ratio))):
        width, height = preset.size_for_aspect(aw, ah)
        if preset.size_problem(width, height) is None:  # tiny grids can round the aspect off
            return f"{width}x{height}"
    return f"{preset.width}x{preset.height}"


def _kept_input(files: ImageFiles, data: bytes, max_bytes: int, max_pixels: int) -> InputImage:
    """An image checked, normalized and stored as an input (content-addressed). Blocking."""
    image = normalize_input_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    files.save_input(image)
    return image
