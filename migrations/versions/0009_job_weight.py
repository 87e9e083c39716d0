"""a job's fair-share weight: its asker's roles' rule when it was stored

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 12:40:00

The queue serves members by GPU time over weight (bot/services/fair_queue.py); a job keeps the
weight it was admitted with, so a restart rebuilds the same order. Older jobs: 1.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("weight", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("weight")
