"""JobStore: every read and write of jobs and their images, one short transaction each.

Status changes are conditional updates (JobStatus documents the lifecycle): a transition whose
starting state no longer holds changes nothing and says so, so a late or repeated report (a restarted
bot, a worker that was only cut off) can never reopen or rewrite a finished job.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.store.database import Database
from bot.store.models import FINISHED, UNFINISHED, Delivery, Image, Job, JobKind, JobStatus, User, utcnow


@dataclass(frozen=True)
class NewJob:
    user_id: int
    user_name: str
    guild_id: int | None
    channel_id: int | None
    kind: JobKind
    request: dict[str, Any]
    parent_id: int | None = None
    application_id: int | None = None
    interaction_id: int | None = None
    interaction_token: str | None = None
    result_message_id: int | None = None


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


def _insert_user_if_missing(session: AsyncSession, user_id: int, name: str) -> Any:
    # Two first jobs of a new user can arrive together: "insert or ignore", in each backend's dialect.
    from sqlalchemy.dialects import postgresql, sqlite

    assert session.bind is not None
    dialect = postgresql if session.bind.dialect.name == "postgresql" else sqlite
    return (
        dialect.insert(User).values(id=user_id, name=name[:100]).on_conflict_do_nothing(index_elements=["id"])
    )


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # admission

    async def admit(self, new: NewJob, quota: Quota) -> Admission:
        """Check the user and every limit and store the job, all in one transaction that no other
        admission (of this process or another) can interleave with: 20 requests at once take exactly
        the slots there are. Committed before anyone is told the job is queued."""
        async with self.db.serialized() as session:
            if new.interaction_id is not None:
                replayed = await session.scalar(select(Job).where(Job.interaction_id == new.interaction_id))
                if replayed is not None:
                    return Admission(replayed, replayed=True)
            await session.execute(_insert_user_if_missing(session, new.user_id, new.user_name))
            user = await session.get(User, new.user_id)
            assert user is not None
            if user.banned:
                return Admission(None, "banned")
            waiting = await self._count(session, Job.status == JobStatus.QUEUED)
            if waiting >= quota.waiting:
                return Admission(None, "queue_full", waiting, quota.waiting)
            cap = user.max_queued or quota.per_user
            mine = await self._count(session, Job.user_id == new.user_id, Job.status.in_(UNFINISHED))
            if mine >= cap:
                return Admission(None, "user_cap", mine, cap)
            since = utcnow() - timedelta(seconds=quota.window_s)
            recent = await self._count(session, Job.user_id == new.user_id, Job.created_at >= since)
            if recent >= quota.per_window:
                return Admission(None, "rate", recent, quota.per_window)
            job = Job(
                user_id=new.user_id,
                guild_id=new.guild_id,
                channel_id=new.channel_id,
                kind=new.kind,
                parent_id=new.parent_id,
                request=new.request,
                status=JobStatus.QUEUED,
                attempts=0,
                application_id=new.application_id,
                interaction_id=new.interaction_id,
                interaction_token=new.interaction_token,
                interaction_at=utcnow() if new.interaction_token else None,
                result_message_id=new.result_message_id,
                delivery=Delivery.PENDING,
                delivery_attempts=0,
                images=[],
            )
            session.add(job)
        return Admission(job)

    @staticmethod
    async def _count(session: AsyncSession, *where: Any) -> int:
        return int(await session.scalar(select(func.count()).select_from(Job).where(*where)) or 0)

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
            result = await session.execute(
                update(Job)
                .where(Job.status == JobStatus.RUNNING, Job.id.not_in(list(keep)))
                .values(status=JobStatus.QUEUED, started_at=None)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    async def finish(
        self,
        job_id: int,
        status: JobStatus,
        *,
        images: Sequence[StoredImage] = (),
        timings: dict[str, Any] | None = None,
        error: str | None = None,
        worker: str | None = None,
    ) -> Job | None:
        """An unfinished job -> done | failed | cancelled, with its images; None if it had finished."""
        assert status.finished
        async with self.db.write() as session:
            values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "timings": timings}
            if error is not None:
                values["error"] = error[:2000]
            if worker is not None:
                values["worker"] = worker
            if images:
                values["recipe"] = images[0].recipe
            result = await session.execute(
                update(Job).where(Job.id == job_id, Job.status.in_(UNFINISHED)).values(**values)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None
            for image in images:
                session.add(Image(job_id=job_id, **image.__dict__))
        return await self.get(job_id)

    async def _transition(self, job_id: int, allowed: Collection[JobStatus], **values: Any) -> bool:
        async with self.db.write() as session:
            result = await session.execute(
                update(Job).where(Job.id == job_id, Job.status.in_(list(allowed))).values(**values)
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

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
        self, user_id: int, guild_id: int | None, page: int, per_page: int
    ) -> tuple[list[Job], int]:
        """One page of a user's jobs in this guild, newest first, and the total count."""
        where = [Job.user_id == user_id, Job.guild_id == guild_id]
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

    async def since(self, since: datetime) -> Sequence[Job]:
        """Jobs created since then (for /admin stats; a day of jobs is small)."""
        async with self.db.session() as session:
            result = await session.execute(select(Job).where(Job.created_at >= since))
            return result.scalars().all()

    async def _set(self, job_id: int, **values: Any) -> None:
        async with self.db.write() as session:
            await session.execute(update(Job).where(Job.id == job_id).values(**values))
