"""job lifecycle: delivery as a state (pending/delivered/expired), the asking interaction's id

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

DELIVERY = sa.Enum("PENDING", "DELIVERED", "EXPIRED", name="delivery", native_enum=False, length=16)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("delivery", DELIVERY, nullable=False, server_default="PENDING"))
        batch.add_column(sa.Column("delivery_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("interaction_id", sa.BigInteger(), nullable=True))
    jobs = sa.table("jobs", sa.column("delivered", sa.Boolean()), sa.column("delivery", DELIVERY))
    op.execute(jobs.update().where(jobs.c.delivered.is_(True)).values(delivery="DELIVERED"))
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("delivered")
        batch.create_index(batch.f("ix_jobs_delivery"), ["delivery"], unique=False)
        batch.create_unique_constraint("uq_jobs_interaction_id", ["interaction_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("delivered", sa.Boolean(), nullable=False, server_default=sa.false()))
    jobs = sa.table("jobs", sa.column("delivered", sa.Boolean()), sa.column("delivery", DELIVERY))
    op.execute(jobs.update().where(jobs.c.delivery == "DELIVERED").values(delivered=True))
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("uq_jobs_interaction_id", type_="unique")
        batch.drop_index(batch.f("ix_jobs_delivery"))
        batch.drop_column("interaction_id")
        batch.drop_column("delivered_at")
        batch.drop_column("delivery_attempts")
        batch.drop_column("delivery")
