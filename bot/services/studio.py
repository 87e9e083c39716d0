"""Studio: admits jobs (bans, validation, rate limits, caps), stores them, queues them; history and reruns."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import ValidationError

from bot.observability import Metrics
from bot.services.errors import LimitReached, NotAllowed, NotFound, UserError
from bot.services.limits import RateLimiter
from bot.services.queue import JobQueue
from bot.store.admin import AdminStore
from bot.store.jobs import JobStore, NewJob
from bot.store.models import Job, JobKind
from engine.api import MAX_SEED, GenerationRequest, LoraChoice
from engine.errors import RequestError, first_problem
from engine.resolve import RequestResolver
from fluxbot.settings import LimitSettings

HISTORY_PAGE = 10
VARIATIONS = 4


@dataclass(frozen=True)
class Requester:
    """Who asks, and where the answer goes."""

    user_id: int
    user_name: str = ""
    guild_id: int | None = None
    channel_id: int | None = None
    application_id: int | None = None
    interaction_token: str | None = None
    message_id: int | None = None  # the message that will show progress and the result
    is_admin: bool = False


@dataclass(frozen=True)
class Ticket:
    job_id: int
    position: int
    eta_s: float
    seed: int
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class HistoryPage:
    jobs: list[Job]
    page: int
    pages: int
    total: int


class Studio:
    def __init__(
        self,
        resolver: RequestResolver,
        jobs: JobStore,
        admin: AdminStore,
        queue: JobQueue,
        limits: LimitSettings,
        metrics: Metrics,
    ) -> None:
        self.metrics = metrics
        self.resolver = resolver
        self.jobs = jobs
        self.admin = admin
        self.queue = queue
        self.limits = limits
        self.limiter = RateLimiter(limits.jobs_per_window, limits.window_s)
        self.accepting = True  # False while shutting down

    def set_limits(self, limits: LimitSettings) -> None:
        self.limits = limits
        self.limiter.configure(limits.jobs_per_window, limits.window_s)

    def validate(self, **fields: object) -> GenerationRequest:
        """Build a request from command options; a bad option becomes a UserError naming it."""
        try:
            request = GenerationRequest.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            self.metrics.rejections.labels("validation").inc()
            raise UserError(first_problem(exc)) from exc
        try:
            self.resolver.resolve(request)
        except RequestError as exc:
            self.metrics.rejections.labels("validation").inc()
            raise UserError(str(exc)) from exc
        return request

    async def imagine(
        self,
        who: Requester,
        request: GenerationRequest,
        kind: JobKind = JobKind.IMAGINE,
        parent_id: int | None = None,
    ) -> Ticket:
        try:
            user_cap = await self._check_allowed(who)
        except NotAllowed:
            self.metrics.rejections.labels("banned").inc()
            raise
        try:
            resolved = self.resolver.resolve(request)
        except RequestError as exc:
            self.metrics.rejections.labels("validation").inc()
            raise UserError(str(exc)) from exc
        try:
            self._check_caps(who, user_cap)
        except LimitReached:
            self.metrics.rejections.labels("queue_cap").inc()
            raise
        if not await self.limiter.try_acquire(who.user_id):
            self.metrics.rejections.labels("rate_limit").inc()
            window = (
                f"{self.limits.window_s:g} s"
                if self.limits.window_s < 120
                else f"{self.limits.window_s / 60:g} min"
            )
            raise LimitReached(
                f"Slow down: at most {self.limits.jobs_per_window} jobs per {window}. Try again shortly."
            )
        # Everything that decides the pixels is pinned, so /rerun repeats the image even after
        # an admin changes a preset's defaults.
        pinned = request.model_copy(
            update={
                "preset": resolved.preset,
                "size": f"{resolved.width}x{resolved.height}",
                "seed": resolved.seeds[0],
                "steps": resolved.steps,
                "guidance": resolved.guidance,
                "loras": tuple(
                    LoraChoice(name=lo.name, weight=lo.weight)
                    for lo in resolved.loras
                    if lo.name in {c.name for c in request.loras}
                ),
            }
        )
        job = await self.jobs.create(
            NewJob(
                user_id=who.user_id,
                user_name=who.user_name,
                guild_id=who.guild_id,
                channel_id=who.channel_id,
                kind=kind,
                request=pinned.model_dump(mode="json"),
                parent_id=parent_id,
                application_id=who.application_id,
                interaction_token=who.interaction_token,
                result_message_id=who.message_id,
            )
        )
        entry = self.queue.push(job)
        return Ticket(job.id, entry.position, entry.eta_s, resolved.seeds[0], resolved.warnings)

    async def reroll(self, who: Requester, job_id: int) -> Ticket:
        """Same recipe, new seed, as a new job of whoever asked."""
        parent = await self._job(job_id)
        request = GenerationRequest.model_validate(parent.request).model_copy(update={"seed": None})
        return await self.imagine(who, request, JobKind.REROLL, parent.id)

    async def rerun(self, who: Requester, job_id: int, seed: int | None = None) -> Ticket:
        """The stored job again; without a seed it is the identical image."""
        parent = await self._job(job_id)
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise UserError(f"seed must be between 0 and {MAX_SEED}")
        request = GenerationRequest.model_validate(parent.request)
        if seed is not None:
            request = request.model_copy(update={"seed": seed})
        return await self.imagine(who, request, JobKind.RERUN, parent.id)

    async def variations(self, who: Requester, job_id: int) -> Ticket:
        """A batch of images from the seeds right after the original's."""
        parent = await self._job(job_id)
        request = GenerationRequest.model_validate(parent.request)
        seed = ((request.seed or 0) + 1) % (MAX_SEED + 1)
        batch = min(VARIATIONS, self.resolver.max_batch_size)
        return await self.imagine(
            who, request.model_copy(update={"seed": seed, "batch_size": batch}), JobKind.VARIATION, parent.id
        )

    async def history(self, user_id: int, guild_id: int | None, page: int = 1) -> HistoryPage:
        if page < 1:
            raise UserError("page must be 1 or more")
        jobs, total = await self.jobs.history(user_id, guild_id, page, HISTORY_PAGE)
        pages = max(1, math.ceil(total / HISTORY_PAGE))
        if page > pages and total:
            raise UserError(f"there are only {pages} pages")
        return HistoryPage(jobs, page, pages, total)

    async def cancel(self, who: Requester, job_id: int) -> None:
        job = await self._job(job_id)
        if job.user_id != who.user_id and not who.is_admin:
            raise NotAllowed("You can only cancel your own jobs.")
        by = "an admin" if job.user_id != who.user_id else "its owner"
        if not await self.queue.cancel(job_id, by):
            raise UserError(f"Job {job_id} is not queued or running (it is {job.status}).")

    async def _job(self, job_id: int) -> Job:
        job = await self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"There is no job {job_id}.")
        return job

    async def _check_allowed(self, who: Requester) -> int | None:
        """Refuse banned users; returns the user's own queue cap, if an admin set one."""
        if not self.accepting:
            raise LimitReached("fluxbot is restarting; try again in a minute.")
        user = await self.admin.user(who.user_id)
        if user is not None and user.banned:
            raise NotAllowed("You can't use fluxbot: an admin has banned you.")
        return user.max_queued if user is not None else None

    def _check_caps(self, who: Requester, user_cap: int | None) -> None:
        if len(self.queue) >= self.limits.max_queue:
            raise LimitReached(
                f"The queue is full ({self.limits.max_queue} jobs). Try again in a few minutes."
            )
        queued = self.queue.queued_for(who.user_id)
        cap = user_cap or self.limits.max_queued_per_user
        if queued >= cap:
            raise LimitReached(f"You have {queued} jobs queued (max {cap}). Try again when one finishes.")
