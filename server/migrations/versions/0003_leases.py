"""Leases for coordinator replicas (``edgeft.server.lease``): one row per piece of work that one replica does at a
time (closing a round, evaluating a global adapter), its holder and when it expires.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "leases" not in sa.inspect(op.get_bind()).get_table_names():
        op.create_table("leases", sa.Column("name", sa.String, primary_key=True),
                        sa.Column("holder", sa.String, nullable=False),
                        sa.Column("expires_at", sa.Float, nullable=False),
                        sa.Column("taken_at", sa.Float, nullable=False))


def downgrade() -> None:
    op.drop_table("leases")
