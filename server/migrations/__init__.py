"""The coordinator's schema revisions (Alembic), run by ``edgeft.server.schema.upgrade``."""
