"""Fixtures for the coordinator tests."""

from __future__ import annotations

import pytest

from conftest_server import shards  # noqa: F401
from edgeft.testing import postgres


@pytest.fixture(scope="session")
def postgres_cluster():
    """A throwaway PostgreSQL server for the session (edgeft.testing.postgres); skipped where none can run."""
    reason = postgres.missing()
    if reason is not None:
        pytest.skip(reason)
    cluster = postgres.PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture()
def postgres_url(postgres_cluster) -> str:
    """The SQLAlchemy URL of a new, empty PostgreSQL database."""
    return postgres_cluster.create_database()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request) -> str | None:
    """The coordinator's [server] database, once per backend: None (the SQLite file in its state folder) and a
    new PostgreSQL database."""
    return None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
