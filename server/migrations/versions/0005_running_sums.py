"""Running sums (``edgeft.server.running_sums``): ``running_sums`` (a replica's flushed sum of the updates it folded
as they came: its blob and how many update rows it covers) and ``updates.running_sum`` (the sum covering a row;
NULL: the closing streams the row's blob).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if "running_sums" not in inspector.get_table_names():
        op.create_table("running_sums",
                        sa.Column("id", sa.String, primary_key=True),
                        sa.Column("job_id", sa.String, nullable=False),
                        sa.Column("round", sa.Integer, nullable=False),
                        sa.Column("blob", sa.String, nullable=False),
                        sa.Column("updates", sa.Integer, nullable=False),
                        sa.Column("holder", sa.String, nullable=False),
                        sa.Column("created_at", sa.Float, nullable=False))
    if "running_sum" not in {c["name"] for c in inspector.get_columns("updates")}:
        op.add_column("updates", sa.Column("running_sum", sa.String))


def downgrade() -> None:
    with op.batch_alter_table("updates") as batch:
        batch.drop_column("running_sum")
    op.drop_table("running_sums")
