"""Versions of the coordinator's database schema, with Alembic (``edgeft/server/migrations``), run from code: users
need no alembic.ini and no command.

Every coordinator start brings its database to this edgeft's schema (``HEAD``) in one transaction: a new database
gets every table; a database made before schema versions existed (tables, no ``alembic_version``: edgeft 0.1's
state folders) and one at an older revision are upgraded; one at a revision this edgeft does not know (a newer
edgeft upgraded it) is refused with StateError naming both revisions and what to do. On PostgreSQL a transaction
advisory lock makes coordinators that start together upgrade one after the other.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine

from edgeft.errors import StateError

log = logging.getLogger("edgeft.server")
MIGRATIONS = Path(__file__).resolve().with_name("migrations")
ADVISORY_LOCK = 0x65646765667431  # PostgreSQL advisory lock key of schema upgrades ("edgeft1")


def _config(connection: Connection | None = None):  # noqa: ANN202
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def revisions() -> list[str]:
    """This edgeft's schema revisions, oldest first."""
    from alembic.script import ScriptDirectory

    return [script.revision for script in reversed(list(ScriptDirectory.from_config(_config()).walk_revisions()))]


def current(conn: Connection) -> str | None:
    """The database's schema revision; None when it has none (new, or made before schema versions)."""
    from alembic.runtime.migration import MigrationContext

    heads = MigrationContext.configure(conn).get_current_heads()
    return heads[0] if heads else None


def upgrade(engine: Engine, target: str = "head") -> tuple[str | None, str]:
    """Bring the database's schema to ``target`` (default: this edgeft's newest) in one transaction; returns the
    revisions (before, after). StateError when the database is at a revision this edgeft does not know."""
    from alembic import command

    known = revisions()
    target = known[-1] if target == "head" else target
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # coordinators starting together upgrade one at a time
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK})")
        before = current(conn)
        where = engine.url.render_as_string(hide_password=True)
        if before is not None and before not in known:
            raise StateError(f"the state database {where} has schema revision {before}, which this edgeft does not "
                             f"know (its revisions: {', '.join(known)}; newest {known[-1]}): a newer edgeft upgraded "
                             "it. Run that newer edgeft release (or a later one) on this state, or restore the "
                             "database from a backup made before the upgrade; edgeft never downgrades a schema")
        if before == target:
            return before, target
        if before is None and inspect(conn).has_table("jobs"):
            log.warning("the state database %s was made before schema versions (edgeft 0.1); upgrading it to "
                        "revision %s", where, target)
        elif before is not None:
            log.warning("upgrading the state database %s from schema revision %s to %s", where, before, target)
        command.upgrade(_config(conn), target)
    return before, target
