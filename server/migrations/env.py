"""Alembic's environment for the coordinator's schema: always run from ``edgeft.server.schema.upgrade`` inside
its transaction (the connection comes in ``config.attributes``); there is no offline (SQL script) mode."""

from __future__ import annotations

from alembic import context

from edgeft.server.store import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("edgeft's migrations run from edgeft.server.schema.upgrade(engine), not the alembic command")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
