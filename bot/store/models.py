"""Every table fluxbot keeps. Alembic (migrations/) owns how they change; nothing here is SQLite-only."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ColumnElement,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    or_,
)
from sqlalchemy import false as sa_false
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from engine.spec import DrawSpec


def utcnow() -> datetime:
    return datetime.now(UTC)


class SpecJSON(TypeDecorator[DrawSpec]):
    """A DrawSpec stored as its JSON (the same text in SQLite and Postgres), read back validated: code
    reads typed fields, never `request["size"]` by string key."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: DrawSpec | None, dialect: Dialect) -> Any:
        return None if value is None else value.model_dump(mode="json")

    def process_result_value(self, value: Any, dialect: Dialect) -> DrawSpec | None:
        return None if value is None else DrawSpec.model_validate(value)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        list[Any]: JSON,
        DrawSpec: SpecJSON,
    }


class JobStatus(enum.StrEnum):
    """Where a job is in its one lifecycle. Persisted; only JobStore's transitions change it.

        queued ──> running ──> done | failed | cancelled   (terminal: then delivered once, see Delivery)
          │  ^        │
          │  └────────┘   back in line: its engine stopped under it (crash, shutdown, a dead worker)
          └──> cancelled | failed                           (never started)

    `running` means "handed to an engine": the in-process thread, or an arq worker.
    """

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED})
UNFINISHED = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})


class Delivery(enum.StrEnum):
    """Whether a finished job's outcome reached the user (a job that is not finished is `pending`).

    pending ──> delivered                      (the message with the PNG, the error or the cancel note)
       └──────> expired                        (not deliverable within delivery_horizon_s: given up)
    """

    PENDING = "pending"
    DELIVERED = "delivered"
    EXPIRED = "expired"


class JobKind(enum.StrEnum):
    """How a job came to be (provenance, shown and recorded); what it draws is its spec's `mode`."""

    IMAGINE = "imagine"  # from text, or from an attached image (img2img)
    REROLL = "reroll"
    RERUN = "rerun"
    VARIATION = "variation"  # the next seeds ("4 more seeds")
    VARY_SUBTLE = "vary_subtle"  # img2img from a result, low strength
    VARY_STRONG = "vary_strong"
    UPSCALE = "upscale"  # 2x resize, then a light img2img redraw
    EDIT = "edit"  # an instruction edit (FLUX.1 Kontext, FLUX.2/FLUX.3 references)
    INPAINT = "inpaint"  # the masked part of a picture repainted (FLUX.1 Fill)
    OUTPAINT = "outpaint"  # Zoom Out / Pan: a picture's new border drawn (FLUX.1 Fill)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)  # Discord user id
    name: Mapped[str] = mapped_column(String(100), default="")
    banned: Mapped[bool] = mapped_column(Boolean, default=False)
    ban_reason: Mapped[str | None] = mapped_column(String(200))
    max_queued: Mapped[int | None] = mapped_column(Integer)  # per-user override of limits.max_queued_per_user
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("interaction_id", name="uq_jobs_interaction_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, index=True)
    guild_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    channel_id: Mapped[int | None] = mapped_column(BigInteger)
    kind: Mapped[JobKind] = mapped_column(Enum(JobKind, native_enum=False, length=16))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    spec: Mapped[DrawSpec] = mapped_column(SpecJSON)  # what it draws: resolved, seed included
    recipe: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, native_enum=False, length=16), default=JobStatus.QUEUED, index=True
    )
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # runs started (a dead worker's job runs again)
    worker: Mapped[str | None] = mapped_column(String(64))  # the engine worker that ran it; None: in-process
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Where the answer goes: the interaction's response while its token lives (15 min), else the channel.
    application_id: Mapped[int | None] = mapped_column(BigInteger)
    interaction_token: Mapped[str | None] = mapped_column(String(500))
    interaction_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The interaction that asked for it: a replayed gateway event finds its job instead of making another.
    interaction_id: Mapped[int | None] = mapped_column(BigInteger)
    result_message_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    delivery: Mapped[Delivery] = mapped_column(
        Enum(Delivery, native_enum=False, length=16), default=Delivery.PENDING, index=True
    )
    delivery_attempts: Mapped[int] = mapped_column(Integer, default=0)  # failed tries so far
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The content policy: asked in an age-restricted channel (or a DM), and the image classifier's
    # verdict on its images ({"flagged": bool, "images": [...]}; None: no classifier ran).
    age_restricted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    safety: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Discord's attachment limit where it was asked (interaction.attachment_size_limit): a larger PNG
    # goes out as a JPEG copy, the PNG stays for /rerun.
    upload_limit: Mapped[int | None] = mapped_column(BigInteger)
    # The Discord locale of its public messages (queued, progress, result): the server's, the asker's
    # in a DM; None: English. Only the language of those messages: the job itself stays English.
    locale: Mapped[str | None] = mapped_column(String(16))
    # The asker's fair-share weight when it was stored (their roles' rule); None: 1.
    weight: Mapped[float | None] = mapped_column(Float)

    images: Mapped[list[Image]] = relationship(back_populates="job", order_by="Image.index", lazy="selectin")

    @property
    def delivered(self) -> bool:
        return self.delivery == Delivery.DELIVERED

    @hybrid_property
    def posted(self) -> bool:
        """Its message is in its channel (queued, drawing or delivered; results are never ephemeral):
        what the visibility rule lets others of the guild see. One definition, in Python and in SQL."""
        return self.result_message_id is not None or self.delivery == Delivery.DELIVERED

    @posted.inplace.expression
    @classmethod
    def _posted_expression(cls) -> ColumnElement[bool]:
        return or_(cls.result_message_id.is_not(None), cls.delivery == Delivery.DELIVERED)

    @property
    def withheld(self) -> bool:
        """The classifier flagged an image and the channel is not age-restricted."""
        return bool(self.safety and self.safety.get("flagged")) and not self.age_restricted


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    index: Mapped[int] = mapped_column(Integer, default=0)
    path: Mapped[str] = mapped_column(String(500))  # relative to the data dir; generated, never user text
    sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    recipe: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="images")


class Setting(Base):
    """Admin-changed settings (limits, preset overrides, added LoRAs), one JSON value per key."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_by: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    actor_id: Mapped[int] = mapped_column(BigInteger, index=True)
    guild_id: Mapped[int | None] = mapped_column(BigInteger)
    action: Mapped[str] = mapped_column(String(50))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
