"""The coordinator's schema as edgeft 0.1 made it (before schema versions), table by table.

edgeft 0.1 made its tables with ``metadata.create_all``, which adds the tables a database lacks and leaves the
others alone; this revision does the same, so a state folder of any 0.1 commit (tables, no ``alembic_version``)
upgrades through it like a new database.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def tables() -> dict[str, tuple]:
    """Every table of revision 0001: its columns and constraints, frozen here (later revisions change them)."""
    text, number, real, json = sa.String, sa.Integer, sa.Float, sa.JSON
    return {
        "devices": (sa.Column("id", text, primary_key=True), sa.Column("capabilities", json, nullable=False),
                    sa.Column("registered_at", real, nullable=False), sa.Column("last_seen", real, nullable=False),
                    sa.Column("metrics", json, nullable=False)),
        "jobs": (sa.Column("id", text, primary_key=True), sa.Column("bundle_digest", text, nullable=False),
                 sa.Column("rounds", number, nullable=False), sa.Column("current_round", number, nullable=False),
                 sa.Column("status", text, nullable=False), sa.Column("message", text, nullable=False)),
        "job_bundles": (sa.Column("job_id", text, primary_key=True), sa.Column("rank", number, primary_key=True),
                        sa.Column("digest", text, nullable=False)),
        "job_engines": (sa.Column("job_id", text, primary_key=True), sa.Column("engine", text, primary_key=True),
                        sa.Column("position", number, nullable=False), sa.Column("digest", text, nullable=False)),
        "rounds": (sa.Column("job_id", text, primary_key=True), sa.Column("number", number, primary_key=True),
                   sa.Column("status", text, nullable=False), sa.Column("selected", json, nullable=False),
                   sa.Column("opened_at", real, nullable=False), sa.Column("deadline", real, nullable=False),
                   sa.Column("closed_at", real), sa.Column("message", text, nullable=False)),
        "updates": (sa.Column("job_id", text, nullable=False), sa.Column("round", number, nullable=False),
                    sa.Column("device_id", text, nullable=False), sa.Column("upload_id", text, nullable=False),
                    sa.Column("n_examples", number, nullable=False), sa.Column("metrics", json, nullable=False),
                    sa.Column("blob", text, nullable=False), sa.Column("received_at", real, nullable=False),
                    sa.Column("bytes", number, nullable=False), sa.UniqueConstraint("job_id", "round", "device_id")),
        "adapters": (sa.Column("job_id", text, primary_key=True), sa.Column("version", number, primary_key=True),
                     sa.Column("blob", text, nullable=False), sa.Column("created_at", real, nullable=False)),
        "evaluations": (sa.Column("job_id", text, primary_key=True), sa.Column("round", number, primary_key=True),
                        sa.Column("metrics", json, nullable=False), sa.Column("created_at", real, nullable=False)),
        "downloads": (sa.Column("job_id", text, nullable=False), sa.Column("round", number, nullable=False),
                      sa.Column("device_id", text, nullable=False), sa.Column("bytes", number, nullable=False),
                      sa.Column("sent_at", real, nullable=False), sa.UniqueConstraint("job_id", "round", "device_id")),
        "aggregations": (sa.Column("job_id", text, primary_key=True), sa.Column("round", number, primary_key=True),
                         sa.Column("state_blob", text), sa.Column("report", json, nullable=False),
                         sa.Column("created_at", real, nullable=False)),
        "tokens": (sa.Column("id", text, primary_key=True), sa.Column("job_id", text, nullable=False),
                   sa.Column("sha256", text, nullable=False, unique=True), sa.Column("note", text, nullable=False),
                   sa.Column("created_at", real, nullable=False), sa.Column("expires_at", real),
                   sa.Column("revoked_at", real)),
        "enrolments": (sa.Column("device_id", text, primary_key=True), sa.Column("job_id", text, primary_key=True),
                       sa.Column("token_id", text, nullable=False), sa.Column("enrolled_at", real, nullable=False)),
        "rejections": (sa.Column("job_id", text, primary_key=True), sa.Column("reason", text, primary_key=True),
                       sa.Column("count", number, nullable=False), sa.Column("last_message", text, nullable=False),
                       sa.Column("last_at", real, nullable=False)),
    }


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    for name, parts in tables().items():
        if name not in existing:
            op.create_table(name, *parts)


def downgrade() -> None:
    for name in reversed(list(tables())):
        op.drop_table(name)
