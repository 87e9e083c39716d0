"""step caching: every stored request names the cache it was drawn with ("none" before caching)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

jobs = sa.table("jobs", sa.column("id", sa.Integer), sa.column("request", sa.JSON))


def upgrade() -> None:
    # A request without a cache would take its preset's cache on /rerun: a preset given one later
    # would change the pixels of a job drawn before caching existed.
    connection = op.get_bind()
    rows = connection.execute(sa.select(jobs.c.id, jobs.c.request)).all()
    for job_id, request in rows:
        if isinstance(request, dict) and request.get("cache") is None:
            connection.execute(
                jobs.update().where(jobs.c.id == job_id).values(request={**request, "cache": "none"})
            )


def downgrade() -> None:
    # The older request model forbids unknown keys: the cache goes (jobs drawn with one lose it).
    connection = op.get_bind()
    rows = connection.execute(sa.select(jobs.c.id, jobs.c.request)).all()
    for job_id, request in rows:
        if isinstance(request, dict) and "cache" in request:
            kept = {k: v for k, v in request.items() if k != "cache"}
            connection.execute(jobs.update().where(jobs.c.id == job_id).values(request=kept))
