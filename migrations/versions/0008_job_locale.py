"""the Discord locale a job's public messages are written in

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 12:50:00

A job's queued, progress and result messages are public: they follow the server's language
(`guild_locale`; the asker's in a DM). Jobs stored before this revision have none: English.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("locale", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("locale")
