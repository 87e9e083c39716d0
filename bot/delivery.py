"""DiscordDelivery: puts job progress and results into Discord, by interaction webhook or channel message."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import discord

from bot import render
from bot.i18n import Language, Languages
from bot.mentions import owner_only
from bot.store.files import input_path
from bot.store.models import Job, JobKind, JobStatus

log = logging.getLogger(__name__)
REROLL_EMOJI = "🔁"
# Interaction tokens live 15 minutes; leave a margin for the upload itself.
TOKEN_LIFETIME = timedelta(minutes=14)
# The longest a job's messages wait for its first answer (the queued message) to go out.
ANSWER_WAIT_S = 10.0
# The interaction's own first answer, for a job whose message id never reached the store (the bot died
# right after answering): Discord's webhook API names it "@original" while the token lives.
ORIGINAL = "@original"
# Discord's attachment limit for a server without boosts (and DMs), when a job did not record its own.
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024


def jpeg_within(path: Path, limit: int) -> bytes:
    """The PNG as a JPEG of at most `limit` bytes: quality first, then size. Blocking."""
    from PIL import Image

    with Image.open(path) as opened:
        image = opened.convert("RGB")
    while True:
        for quality in (92, 85, 75, 60):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
            if buffer.tell() <= limit or min(image.size) <= 64:
                return buffer.getvalue()
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS)


class DiscordDelivery:
    """Implements JobEvents. Progress edits are throttled; the final message carries PNGs and buttons."""

    def __init__(
        self,
        languages: Languages,
        data_dir: Path,
        min_interval_s: float,
        flagged_action: str = "withhold",
        previews_everywhere: bool = True,
        edits: bool = False,
    ) -> None:
        self.client: discord.Client | None = None
        self.languages = languages  # a job's messages are public: in its server's language (job.locale)
        self.edits = edits  # the model can edit (Kontext, or FLUX.2 klein): results get an Edit button
        self.redraws = True  # FLUX.1's image-to-image: results get Vary (Subtle/Strong) and Upscale
        self.upscales = False  # an upscaler model: results get Upscale on any family
        self.outpaints = False  # FLUX.1 Fill is loaded: results get Zoom Out and Pan
        self.regions = False  # and a segmenter: results get Vary (Region)
        self.previews_everywhere = previews_everywhere
        self.data_dir = data_dir
        self.flagged_action = flagged_action  # safety.flagged_action: "withhold" or "spoiler"
        # A server's own choice (community rules); the App points it at the Studio once both exist.
        self.flagged_for: Callable[[int | None], str] = lambda guild_id: self.flagged_action
        self.min_interval_s = min_interval_s
        self._last_edit: dict[int, float] = {}
        # Recently finished jobs, to drop progress events that arrive after the result (bounded).
        self._finished: OrderedDict[int, None] = OrderedDict()
        # One lock per job: edits of one message go out in order.
        self._locks: dict[int, asyncio.Lock] = {}
        # Jobs whose first answer (the queued message) is still going out: their progress and result
        # wait for it, so a fast job never lands before, or under, its own "queued" message.
        self._holds: dict[int, asyncio.Event] = {}
        self._message_ids: dict[int, int] = {}  # that answer's message, before the store has it
        self._previews: dict[int, bytes] = {}  # the latest picture forming, not shown yet

    def bind(self, client: discord.Client) -> None:
        self.client = client

    def _lock(self, job_id: int) -> asyncio.Lock:
        return self._locks.setdefault(job_id, asyncio.Lock())

    def hold(self, job_id: int) -> None:
        """Called as soon as the job is stored, before it can start (Studio's on_stored)."""
        self._holds[job_id] = asyncio.Event()

    def release(self, job_id: int, message_id: int | None) -> None:
        """The first answer is out (or failed): the job's messages may follow."""
        if message_id is not None:
            self._message_ids[job_id] = message_id
        hold = self._holds.pop(job_id, None)
        if hold is not None:
            hold.set()

    async def _after_answer(self, job_id: int) -> None:
        hold = self._holds.get(job_id)
        if hold is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hold.wait(), ANSWER_WAIT_S)

    def _message_id(self, job: Job) -> int | None:
        return job.result_message_id or self._message_ids.get(job.id)

    def _webhook_message(self, job: Job) -> int | str | None:
        """What to edit through the interaction webhook: None once its token has expired."""
        if not self._token_valid(job):
            return None
        return self._message_id(job) or ORIGINAL

    async def started(self, job: Job) -> None:
        async with self._lock(job.id):
            await self._after_answer(job.id)
            self._last_edit[job.id] = time.monotonic()
            await self._edit_status(job, render.started(self._language(job), job))

    async def progress(
        self, job: Job, step: int, total: int, eta_s: float, preview: bytes | None = None
    ) -> None:
        now = time.monotonic()
        if preview is not None and job.id not in self._finished:
            self._previews[job.id] = preview  # shown with the next edit, whichever step that is
        if job.id in self._finished or now - self._last_edit.get(job.id, 0.0) < self.min_interval_s:
            return  # Discord allows ~5 edits per 5 s per channel: one every interval is plenty
        self._last_edit[job.id] = now
        async with self._lock(job.id):
            await self._after_answer(job.id)
            if job.id not in self._finished:
                shown = self._previews.pop(job.id, None)
                await self._edit_status(
                    job, render.progress(self._language(job), job, step, total, eta_s), shown
                )

    async def finished(self, job: Job) -> int | None:
        async with self._lock(job.id):
            await self._after_answer(job.id)
            self._finished[job.id] = None
            while len(self._finished) > 10_000:
                self._finished.popitem(last=False)
            self._last_edit.pop(job.id, None)
            self._previews.pop(job.id, None)
            message_id = await self._deliver(job)
        self._locks.pop(job.id, None)
        self._message_ids.pop(job.id, None)
        return message_id

    async def _deliver(self, job: Job) -> int | None:
        from bot.commands.buttons import result_view

        tr = self._language(job)
        view = (
            result_view(
                tr,
                job.id,
                self.edits,
                self.redraws,
                self.outpaints,
                self.regions,
                self.upscales,
                seeded=job.spec.mode != "upscale",
            )
            if job.status == JobStatus.DONE
            else None
        )
        uploads = await asyncio.to_thread(self._uploads, job)
        as_jpeg = any(isinstance(content, bytes) for _, content in uploads)
        text = render.final(tr, job, self.flagged_for(job.guild_id) if job.withheld else None, as_jpeg)
        message_id = await self._edit_or_post(job, text, view, uploads)
        if message_id is not None and job.status == JobStatus.DONE and job.channel_id:
            await self._client.http.add_reaction(job.channel_id, message_id, REROLL_EMOJI)
        return message_id

    def _language(self, job: Job) -> Language:
        return self.languages.for_locale(job.locale)

    @property
    def _client(self) -> discord.Client:
        assert self.client is not None, "DiscordDelivery.bind(client) first"
        return self.client

    def _token_valid(self, job: Job) -> bool:
        if not job.interaction_token or job.application_id is None or job.interaction_at is None:
            return False
        issued = job.interaction_at if job.interaction_at.tzinfo else job.interaction_at.replace(tzinfo=UTC)
        return datetime.now(UTC) - issued < TOKEN_LIFETIME

    async def _edit_status(self, job: Job, text: str, preview: bytes | None = None) -> None:
        message_id = self._message_id(job)
        # The picture forming, replacing the last one.
        extra: dict[str, Any] = {}
        if preview is not None and (self.previews_everywhere or job.age_restricted):
            extra["attachments"] = [
                discord.File(io.BytesIO(preview), filename=f"fluxbot-{job.id}-preview.jpg")
            ]
        try:
            if (target := self._webhook_message(job)) is not None:
                await self._edit_webhook_message(
                    job, target, content=text, allowed_mentions=owner_only(job.user_id), **extra
                )
            elif message_id and job.channel_id:
                channel = self._client.get_partial_messageable(job.channel_id)
                await channel.get_partial_message(message_id).edit(
                    content=text, allowed_mentions=owner_only(job.user_id), **extra
                )
        except discord.HTTPException as exc:  # progress is best effort; the result is not
            log.info("job %d: progress edit failed (%s)", job.id, exc.status)

    def _uploads(self, job: Job) -> list[tuple[str, Path | bytes]]:
        """What the result carries: (file name, PNG path), or JPEG bytes when the PNGs would pass the
        upload limit where the job was asked. Blocking (file sizes, JPEG encoding)."""
        if job.status != JobStatus.DONE or (job.withheld and self.flagged_for(job.guild_id) == "withhold"):
            return []
        pngs = [(f"fluxbot-{job.id}-{image.seed}", self.data_dir / image.path) for image in job.images]
        if job.kind == JobKind.INPAINT and job.spec.mask is not None:
            # The mask that was used (from words, or as uploaded) beside the result.
            pngs.append((f"fluxbot-{job.id}-mask", self.data_dir / input_path(job.spec.mask)))
        limit = job.upload_limit or DEFAULT_UPLOAD_LIMIT
        if sum(path.stat().st_size for _, path in pngs) <= limit:
            return [(name + ".png", path) for name, path in pngs]
        share = limit // max(1, len(pngs))
        return [(name + ".jpg", jpeg_within(path, share)) for name, path in pngs]

    def _files(self, job: Job, uploads: list[tuple[str, Path | bytes]]) -> list[discord.File]:
        """Fresh file objects for each attempt: discord.py closes them after a request, even a failed one."""
        return [
            discord.File(
                io.BytesIO(content) if isinstance(content, bytes) else content,
                filename=name,
                spoiler=job.withheld,  # flagged, action "spoiler": shown blurred until clicked
            )
            for name, content in uploads
        ]

    async def _edit_or_post(
        self, job: Job, text: str, view: Any, uploads: list[tuple[str, Path | bytes]]
    ) -> int | None:
        if (target := self._webhook_message(job)) is not None:
            try:
                kwargs: dict[str, Any] = {
                    "content": text,
                    "attachments": self._files(job, uploads),
                    "allowed_mentions": owner_only(job.user_id),
                }
                if view is not None:
                    kwargs["view"] = view
                message = await self._edit_webhook_message(job, target, **kwargs)
                return message.id
            except discord.NotFound:
                log.info("job %d: interaction expired; posting in the channel instead", job.id)
        if job.channel_id is None:
            raise RuntimeError(f"job {job.id} has neither a live interaction nor a channel")
        channel = self._client.get_partial_messageable(job.channel_id)
        kwargs = {
            "content": text,
            "files": self._files(job, uploads),
            "allowed_mentions": owner_only(job.user_id),
        }
        if view is not None:
            kwargs["view"] = view
        posted = await channel.send(**kwargs)
        return posted.id

    async def _edit_webhook_message(
        self, job: Job, target: int | str, **kwargs: Any
    ) -> discord.WebhookMessage:
        """A message of the interaction's webhook: by id, or "@original" (the interaction's first
        answer, while the job's message id is not stored yet), which Discord's API takes in place of
        an id and discord.py passes through, though it types the argument as an int."""
        return await self._webhook(job).edit_message(target, **kwargs)  # type: ignore[arg-type]

    def _webhook(self, job: Job) -> discord.Webhook:
        assert job.application_id is not None and job.interaction_token is not None
        return discord.Webhook.partial(job.application_id, job.interaction_token, client=self._client)
