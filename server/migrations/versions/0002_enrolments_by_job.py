"""An index of enrolments by job: opening a round looks up the job's enrolled devices, which the primary key
(device_id, job_id) cannot find without reading every enrolment (tens of thousands of devices). Made only where missing (a state whose version row was lost may have it).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "ix_enrolments_job_id" not in {i["name"] for i in sa.inspect(op.get_bind()).get_indexes("enrolments")}:
        op.create_index("ix_enrolments_job_id", "enrolments", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_enrolments_job_id", table_name="enrolments")
