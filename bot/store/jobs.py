"""JobStore: every read and write of jobs and their images, one short transaction each.

Status changes are conditional updates (JobStatus documents the lifecycle): a transition whose
starting state no longer holds changes nothing and says so, so a late or repeated report (a restarted
bot, a worker that was only cut off) can never reopen or rewrite a finished job.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Update, bindparam, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.store.database import Database
from bot.store.models import FINISHED, UNFINISHED, Delivery, Image, Job, JobKind, JobStatus, User, utcnow
from engine.spec import DrawSpec


@dataclass(frozen=True)
class NewJob:
    user_id: int
    user_name: str
    guild_id: int | None
    channel_id: int | None
    kind: JobKind
    spec: DrawSpec
    parent_id: int | None = None
    application_id: int | None = None
    interaction_id: int | None = None
    interaction_token: str | None = None
    result_message_id: int | None = None
    age_restricted: bool = False
    upload_limit: int | None = None
    locale: str | None = None
    weight: float = 1.0


@dataclass(frozen=True)
class Quota:
    """What one admission may take; checked and taken in one serialized transaction."""

    per_user: int  # a user's waiting + running jobs (an admin's per-user override wins)
    waiting: int  # waiting jobs across all users
    per_window: int  # jobs a user may start per window
    window_s: float


Refusal = Literal["banned", "queue_full", "user_cap", "rate"]


@dataclass(frozen=True)
class Admission:
    """A stored job, or why none was stored (with the figure that was over its limit)."""

    job: Job | None
    refused: Refusal | None = None
    count: int = 0
    limit: int = 0
    replayed: bool = False  # this interaction's job was stored before (a replayed gateway event)


@dataclass(frozen=True)
class StoredImage:
    index: int
    path: str
    sha256: str
    width: int
    height: int
    seed: int
    recipe: dict[str, Any] = field(default_factory=dict)


def _insert_users_if_missing(session: AsyncSession, names: dict[int, str]) -> Any:
    # Two first jobs of a new user can arrive together: "insert or ignore", in each backend's dialect.
    from sqlalchemy.dialects import postgresql, sqlite

    assert session.bind is not None
    dialect = postgresql if session.bind.dialect.name == "postgresql" else sqlite
    rows = [{"id": user_id, "name": name[:100]} for user_id, name in names.items()]
    return dialect.insert(User).values(rows).on_conflict_do_nothing(index_elements=["id"])


@dataclass
class _Counts:
    """What the limits count, read once per admission transaction and kept up to date inside it."""

    waiting: int
    unfinished: dict[int, int]  # per user: waiting + running
    recent: dict[int, int]  # per user: created within the rate window


def _new_job(new: NewJob) -> Job:
    return Job(
        user_id=new.user_id,
        guild_id=new.guild_id,
        channel_id=new.channel_id,
        kind=new.kind,
        parent_id=new.parent_id,
        spec=new.spec,
        status=JobStatus.QUEUED,
        attempts=0,
        application_id=new.application_id,
        interaction_id=new.interaction_id,
        interaction_token=new.interaction_token,
        interaction_at=utcnow() if new.interaction_token else None,
        result_message_id=new.result_message_id,
        age_restricted=new.age_restricted,
        upload_limit=new.upload_limit,
        locale=new.locale,
        weight=new.weight,
        delivery=Delivery.PENDING,
        delivery_attempts=0,
        images=[],
    )


async def _updated(session: AsyncSession, statement: Update) -> int:
    """Rows an UPDATE changed (what a conditional transition checks)."""
    connection = await session.connection()  # the session's own transaction; a Core result has rowcount
    return (await connection.execute(statement)).rowcount


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # admission

    async def admit(self, new: NewJob, quota: Quota) -> Admission:
        """Check the user and every limit and store the job in one transaction (see admit_many)."""
        (admission,) = await self.admit_many([(new, quota)])
        return admission

    async def admit_many(
        self, asks: Sequence[tuple[NewJob, Quota]], messages: Sequence[tuple[int, int]] = ()
    ) -> list[Admission]:
        """Check and store several requests, in order, in one transaction that no other admission
        (of this process or another) can interleave with: the limits are counted once, then taken
        request by request inside it, so 20 requests at once take exactly the slots there are.
        Committed before anyone is told a job is queued; one commit for a burst is what keeps the
        acknowledgement fast while the engine is busy. `messages`: (job id, message id) pairs to
        record in the same commit (see GroupAdmission)."""
        results: list[Admission | None] = [None] * len(asks)
        async with self.db.serialized() as session:
            if messages:
                connection = await session.connection()
                await connection.execute(
                    update(Job)
                    .where(Job.id == bindparam("job"))
                    .values(result_message_id=bindparam("message")),
                    [{"job": job_id, "message": message_id} for job_id, message_id in messages],
                )
            if not asks:
                return []
            interactions = [n.interaction_id for n, _ in asks if n.interaction_id is not None]
            stored: dict[int, Job] = {}
            if interactions:
                found = await session.scalars(select(Job).where(Job.interaction_id.in_(interactions)))
                stored = {job.interaction_id: job for job in found if job.interaction_id is not None}
            names = {n.user_id: n.user_name for n, _ in asks}
            await session.execute(_insert_users_if_missing(session, names))
            users = {u.id: u for u in await session.scalars(select(User).where(User.id.in_(names)))}
            counts = await self._counts(session, list(names), max(q.window_s for _, q in asks))
            added: list[tuple[int, Job]] = []
            for index, (new, quota) in enumerate(asks):
                if new.interaction_id is not None and new.interaction_id in stored:
                    results[index] = Admission(stored[new.interaction_id], replayed=True)
                    continue
                refusal = self._refusal(users[new.user_id], quota, counts)
                if refusal is not None:
                    results[index] = refusal
                    continue
                job = _new_job(new)
                session.add(job)
                added.append((index, job))
                if new.interaction_id is not None:
                    stored[new.interaction_id] = job  # the same interaction twice in one burst
                counts.waiting += 1
                counts.unfinished[new.user_id] += 1
                counts.recent[new.user_id] += 1
        for index, job in added:
            results[index] = Admission(job)
        return [r for r in results if r is not None]

    @staticmethod
    async def _counts(session: AsyncSession, user_ids: list[int], window_s: float) -> _Counts:
        since = utcnow() - timedelta(seconds=window_s)
        mine = Job.user_id.in_(user_ids)
        waiting = int(
            await session.scalar(select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED))
            or 0
        )
        rows = await session.execute(
            select(
                Job.user_id,
                func.count().filter(Job.status.in_(UNFINISHED)),
                func.count().filter(Job.created_at >= since),
            )
            # Only the rows that can count, so the indexes on user_id, status and created_at serve it.
            .where(mine, or_(Job.status.in_(UNFINISHED), Job.created_at >= since))
            .group_by(Job.user_id)
        )
        unfinished = dict.fromkeys(user_ids, 0)
        recent = dict.fromkeys(user_ids, 0)
        for user_id, open_jobs, new_jobs in rows:
            unfinished[user_id], recent[user_id] = int(open_jobs), int(new_jobs)
        return _Counts(waiting, unfinished, recent)

    @staticmethod
    def _refusal(user: User, quota: Quota, counts: _Counts) -> Admission | None:
        if user.banned:
            return Admission(None, "banned")
        if counts.waiting >= quota.waiting:
            return Admission(None, "queue_full", counts.waiting, quota.waiting)
        cap = user.max_queued or quota.per_user
        if counts.unfinished[user.id] >= cap:
            return Admission(None, "user_cap", counts.unfinished[user.id], cap)
        if counts.recent[user.id] >= quota.per_window:
            return Admission(None, "rate", counts.recent[user.id], quota.per_window)
        return None

    # reads

    async def get(self, job_id: int) -> Job | None:
        async with self.db.session() as session:
            return await session.get(Job, job_id)

    async def by_message(self, message_id: int) -> Job | None:
        async with self.db.session() as session:
            result = await session.execute(select(Job).where(Job.result_message_id == message_id))
            return result.scalars().first()

    async def unfinished(self) -> Sequence[Job]:
        """Queued and interrupted jobs, oldest first: what a restart must run."""
        async with self.db.session() as session:
            result = await session.execute(select(Job).where(Job.status.in_(UNFINISHED)).order_by(Job.id))
            return result.scalars().all()

    async def undelivered(self) -> Sequence[Job]:
        """Finished jobs whose outcome has not reached the user yet: what a restart must deliver."""
        async with self.db.session() as session:
            result = await session.execute(
                select(Job).where(Job.status.in_(FINISHED), Job.delivery == Delivery.PENDING).order_by(Job.id)
            )
            return result.scalars().all()

    # lifecycle transitions

    async def start(self, job_id: int) -> Job | None:
        """queued (or running, handed out again after a failed hand-out) -> running; None if finished."""
        changed = await self._transition(
            job_id, UNFINISHED, status=JobStatus.RUNNING, started_at=utcnow(), attempts=Job.attempts + 1
        )
        return await self.get(job_id) if changed else None

    async def set_worker(self, job_id: int, worker: str) -> None:
        """The engine worker that took it (scale-out); a finished job keeps what it has."""
        await self._transition(job_id, {JobStatus.RUNNING}, worker=worker)

    async def requeue(self, job_id: int) -> bool:
        """running -> queued: its engine stopped under it; it runs again."""
        return await self._transition(job_id, {JobStatus.RUNNING}, status=JobStatus.QUEUED, started_at=None)

    async def requeue_interrupted(self, keep: Collection[int] = ()) -> int:
        """After a restart: every `running` job but those still held by an engine goes back in line."""
        async with self.db.write() as session:
            return await _updated(
                session,
                update(Job)
                .where(Job.status == JobStatus.RUNNING, Job.id.not_in(list(keep)))
                .values(status=JobStatus.QUEUED, started_at=None),
            )

    async def finish(
        self,
        job_id: int,
        status: JobStatus,
        *,
        images: Sequence[StoredImage] = (),
        timings: dict[str, Any] | None = None,
        error: str | None = None,
        worker: str | None = None,
        safety: dict[str, Any] | None = None,
    ) -> Job | None:
        """An unfinished job -> done | failed | cancelled, with its images; None if it had finished."""
        assert status.finished
        async with self.db.write() as session:
            values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "timings": timings}
            if safety is not None:
                values["safety"] = safety
            if error is not None:
                values["error"] = error[:2000]
            if worker is not None:
                values["worker"] = worker
            if images:
                values["recipe"] = images[0].recipe
            statement = update(Job).where(Job.id == job_id, Job.status.in_(UNFINISHED)).values(**values)
            if await _updated(session, statement) != 1:
                return None
            for image in images:
                session.add(Image(job_id=job_id, **image.__dict__))
            if images:
                job = await session.get(Job, job_id)
                if job is not None and (job.spec.needs_enhancement or job.spec.needs_upscaler_pin):
                    job.spec = spec_as_drawn(job.spec, images[0].recipe)
        return await self.get(job_id)

    async def _transition(self, job_id: int, allowed: Collection[JobStatus], **values: Any) -> bool:
        async with self.db.write() as session:
            statement = update(Job).where(Job.id == job_id, Job.status.in_(list(allowed))).values(**values)
            return await _updated(session, statement) == 1

    # delivery

    async def set_message(self, job_id: int, message_id: int) -> None:
        """The message that shows this job (progress, then the result)."""
        await self._set(job_id, result_message_id=message_id)

    async def mark_delivered(self, job_id: int, message_id: int | None) -> None:
        values: dict[str, Any] = {"delivery": Delivery.DELIVERED, "delivered_at": utcnow()}
        if message_id is not None:
            values["result_message_id"] = message_id
        await self._set(job_id, **values)

    async def expire_delivery(self, job_id: int) -> None:
        await self._set(job_id, delivery=Delivery.EXPIRED)

    async def count_delivery_failure(self, job_id: int) -> None:
        await self._set(job_id, delivery_attempts=Job.delivery_attempts + 1)

    # lists

    async def history(
        self,
        user_id: int,
        page: int,
        per_page: int,
        *,
        guild_id: int | None = None,
        channel_ids: Collection[int] | None = None,
    ) -> tuple[list[Job], int]:
        """One page of a user's jobs, newest first, and the total count: all of them, or (with a guild
        and channels) only those posted in those channels of that guild (the visibility rule)."""
        where: list[Any] = [Job.user_id == user_id]
        if guild_id is not None:
            where += [
                Job.guild_id == guild_id,
                Job.posted,
                Job.channel_id.in_(list(channel_ids or ())),
            ]
        async with self.db.session() as session:
            total = await session.scalar(select(func.count()).select_from(Job).where(*where))
            result = await session.execute(
                select(Job)
                .where(*where)
                .order_by(Job.id.desc())
                .offset((page - 1) * per_page)
                .limit(per_page)
            )
            return list(result.scalars().all()), int(total or 0)

    async def delivered_channels(self, user_id: int, guild_id: int) -> list[int]:
        """The channels of a guild where a user's jobs were posted (for the visibility rule)."""
        async with self.db.session() as session:
            result = await session.execute(
                select(Job.channel_id)
                .where(
                    Job.user_id == user_id,
                    Job.guild_id == guild_id,
                    Job.posted,
                    Job.channel_id.is_not(None),
                )
                .distinct()
            )
            return [int(channel) for channel in result.scalars().all() if channel is not None]

    async def since(self, since: datetime) -> Sequence[Job]:
        """Jobs created since then (for /admin stats; a day of jobs is small)."""
        async with self.db.session() as session:
            result = await session.execute(select(Job).where(Job.created_at >= since))
            return result.scalars().all()

    async def _set(self, job_id: int, **values: Any) -> None:
        async with self.db.write() as session:
            await session.execute(update(Job).where(Job.id == job_id).values(**values))


def spec_as_drawn(spec: DrawSpec, recipe: Mapping[str, Any]) -> DrawSpec:
    """A job's spec after its draw: an enhanced prompt, made once, is kept with it (reruns, rerolls
    and Vary draw it again without asking the enhancer); after a failed enhancement it is the prompt
    as written that was drawn, and so is what a rerun draws. An upscale keeps its upscaler's sha256."""
    update: dict[str, Any] = {}
    files = recipe.get("upscaler_files")
    if spec.model_upscale and isinstance(files, dict) and len(files) == 1:
        # The upscaler model the job was enlarged with: a rerun refuses another one.
        update["upscaler"] = next(iter(files.values()))
    enhanced = recipe.get("enhanced_prompt")
    if isinstance(enhanced, str) and enhanced:
        update["enhanced_prompt"] = enhanced
    elif spec.enhanced_prompt is None:
        update["enhance"] = False
    return DrawSpec.model_validate_json(spec.model_copy(update=update).model_dump_json())
