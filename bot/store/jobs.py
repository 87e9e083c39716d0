"""JobStore: every read and write of jobs and their images, one short transaction each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.store.database import Database
from bot.store.models import Image, Job, JobKind, JobStatus, User, utcnow

UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)


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
    interaction_token: str | None = None
    result_message_id: int | None = None


@dataclass(frozen=True)
class StoredImage:
    index: int
    path: str
    sha256: str
    width: int
    height: int
    seed: int
    recipe: dict[str, Any]


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

    async def create(self, new: NewJob) -> Job:
        """Written and committed before anyone is told the job is queued."""
        async with self.db.session() as session, session.begin():
            await session.execute(_insert_user_if_missing(session, new.user_id, new.user_name))
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
                interaction_token=new.interaction_token,
                interaction_at=utcnow() if new.interaction_token else None,
                result_message_id=new.result_message_id,
                delivered=False,
            )
            session.add(job)
        return job

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
        async with self.db.session() as session:
            result = await session.execute(
                select(Job)
                .where(Job.status.in_((JobStatus.DONE, JobStatus.FAILED)), Job.delivered.is_(False))
                .order_by(Job.id)
            )
            return result.scalars().all()

    async def mark_running(self, job_id: int, worker: str | None = None) -> None:
        # Only an unfinished job starts: a worker's late "started" must not reopen a finished one.
        async with self.db.session() as session, session.begin():
            await session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status.in_(UNFINISHED))
                .values(
                    status=JobStatus.RUNNING, started_at=utcnow(), attempts=Job.attempts + 1, worker=worker
                )
            )

    async def requeue(self, job_id: int) -> None:
        await self._set(job_id, status=JobStatus.QUEUED, started_at=None)

    async def requeue_interrupted(self) -> int:
        async with self.db.session() as session, session.begin():
            result = await session.execute(
                update(Job).where(Job.status == JobStatus.RUNNING).values(status=JobStatus.QUEUED)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    async def mark_done(
        self,
        job_id: int,
        images: Sequence[StoredImage],
        timings: dict[str, Any],
        worker: str | None = None,
    ) -> Job:
        async with self.db.session() as session, session.begin():
            job = await session.get(Job, job_id)
            assert job is not None
            if worker is not None:
                job.worker = worker
            for image in images:
                session.add(Image(job_id=job_id, **image.__dict__))
            job.status = JobStatus.DONE
            job.recipe = images[0].recipe if images else None
            job.timings = timings
            job.finished_at = utcnow()
        return await self._reload(job_id)

    async def mark_failed(self, job_id: int, message: str) -> Job:
        await self._set(job_id, status=JobStatus.FAILED, error=message[:2000], finished_at=utcnow())
        return await self._reload(job_id)

    async def mark_cancelled(self, job_id: int, by: str) -> Job:
        await self._set(job_id, status=JobStatus.CANCELLED, error=f"cancelled by {by}", finished_at=utcnow())
        return await self._reload(job_id)

    async def set_message(self, job_id: int, message_id: int) -> None:
        """The message that shows this job (progress, then the result)."""
        await self._set(job_id, result_message_id=message_id)

    async def mark_delivered(self, job_id: int, message_id: int | None) -> None:
        await self._set(job_id, delivered=True, result_message_id=message_id)

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
        async with self.db.session() as session, session.begin():
            await session.execute(update(Job).where(Job.id == job_id).values(**values))

    async def _reload(self, job_id: int) -> Job:
        job = await self.get(job_id)
        assert job is not None
        return job
