"""Asynchronous (FedBuff) jobs: ``async_updates`` (every accepted update, in arrival order, with the global version
it trained from and the version it went into; NULL: still in the buffer, -1: left out as too stale) and ``async_work`` (which devices hold work
now, for the concurrency cap).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    tables = sa.inspect(op.get_bind()).get_table_names()
    if "async_updates" not in tables:
        op.create_table("async_updates",
                        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
                        sa.Column("job_id", sa.String, nullable=False),
                        sa.Column("upload_id", sa.String, nullable=False),
                        sa.Column("device_id", sa.String, nullable=False),
                        sa.Column("base_version", sa.Integer, nullable=False),
                        sa.Column("n_examples", sa.Integer, nullable=False),
                        sa.Column("metrics", sa.JSON, nullable=False),
                        sa.Column("blob", sa.String, nullable=False),
                        sa.Column("received_at", sa.Float, nullable=False),
                        sa.Column("bytes", sa.Integer, nullable=False),
                        sa.Column("version", sa.Integer),
                        sa.UniqueConstraint("job_id", "upload_id", name="uq_async_updates_upload"))
        op.create_index("ix_async_updates_buffer", "async_updates", ["job_id", "version"])
    if "async_work" not in tables:
        op.create_table("async_work",
                        sa.Column("job_id", sa.String, primary_key=True),
                        sa.Column("device_id", sa.String, primary_key=True),
                        sa.Column("upload_id", sa.String, nullable=False),
                        sa.Column("base_version", sa.Integer, nullable=False),
                        sa.Column("issued_at", sa.Float, nullable=False),
                        sa.Column("expires_at", sa.Float, nullable=False))


def downgrade() -> None:
    op.drop_table("async_work")
    op.drop_index("ix_async_updates_buffer", table_name="async_updates")
    op.drop_table("async_updates")
