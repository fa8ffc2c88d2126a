"""Schema versions (edgeft.server.schema, Alembic): a new database, a state made before schema versions, an older
revision and a newer one, on SQLite and on PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, create_engine, inspect

from edgeft.errors import StateError
from edgeft.server.artifacts import ArtifactStore
from edgeft.server.auth import TokenStore
from edgeft.server.schema import current, revisions, upgrade
from edgeft.server.state import open_state
from edgeft.server.store import metadata, open_database

from conftest_server import agent, enrol, start


def url_of(database: str | None, tmp_path) -> str:
    """The backend's URL: the given PostgreSQL database, or the SQLite file of a state folder in ``tmp_path``."""
    (tmp_path / "state").mkdir(exist_ok=True)
    return database or f"sqlite:///{tmp_path / 'state' / 'state.db'}"


def previous_release_schema(url: str) -> None:
    """The tables edgeft 0.1 made (``metadata.create_all`` of its store, before schema versions): today's tables
    without ``alembic_version``, without the index revision 0002 added, the leases table of 0003, the
    asynchronous jobs' tables of 0004 and the running sums of 0005 (a table, a column of ``updates``)."""
    old = MetaData()
    for table in metadata.tables.values():
        if table.name not in ("leases", "async_updates", "async_work", "running_sums"):
            table.to_metadata(old)
    old.tables["enrolments"].indexes.clear()
    engine = create_engine(url)
    old.create_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE updates DROP COLUMN running_sum")
    engine.dispose()


def test_a_new_database_gets_exactly_the_schema_of_the_code(database, tmp_path):
    engine = open_database(url_of(database, tmp_path))
    try:
        with engine.connect() as conn:
            assert current(conn) == revisions()[-1] == "0005"
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        assert upgrade(engine) == ("0005", "0005")  # a second start changes nothing
    finally:
        engine.dispose()


def test_a_state_from_before_schema_versions_is_upgraded_and_its_job_runs(database, tmp_path, tiny_bundle, shards):
    url = url_of(database, tmp_path)
    previous_release_schema(url)
    engine = create_engine(url)
    _, token = TokenStore(engine).create("banking", note="made by the previous release")  # its data stays
    engine.dispose()
    (tmp_path / "old.token").write_text(token + "\n")
    server, port, coordinator = start(tmp_path, tiny_bundle, rounds=1, minimum=1, database=database)
    try:
        with coordinator.engine.connect() as conn:
            assert current(conn) == "0005"
            assert "ix_enrolments_job_id" in {i["name"] for i in inspect(conn).get_indexes("enrolments")}
            assert inspect(conn).has_table("leases") and inspect(conn).has_table("async_updates")
        assert [t.note for t in coordinator.tokens.list()] == ["made by the previous release"]
        proc = agent(port, shards[0], tmp_path / "device", tmp_path / "old.token")
        coordinator.wait_until_finished(timeout=120)
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0 and "job banking finished" in output, output
        assert len(coordinator.round_updates("banking", 1)) == 1
    finally:
        server.stop(grace=None)
        coordinator.close()


def test_an_older_revision_is_upgraded_and_a_newer_one_is_refused(database, tmp_path, caplog):
    url = url_of(database, tmp_path)
    artifacts = ArtifactStore(tmp_path / "artifacts")
    engine = open_database(url, upgrade=False)
    upgrade(engine, "0001")
    engine.dispose()
    with caplog.at_level("INFO", logger="edgeft.server"):
        state = open_state(url, artifacts)
    with state.engine.begin() as conn:
        assert current(conn) == "0005"
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")  # as a newer edgeft leaves it
    state.engine.dispose()
    assert "from schema revision 0001 to 0005" in caplog.text
    with pytest.raises(StateError, match=r"schema revision 0099, which this edgeft does not know \(its revisions: "
                                         r"0001, 0002, 0003, 0004, 0005; newest 0005\): a newer edgeft upgraded it\. "
                                         r"Run that newer"):
        open_state(url, artifacts)
    engine = create_engine(url)  # refused means untouched
    with engine.connect() as conn:
        assert current(conn) == "0099"
    engine.dispose()


def test_a_lost_database_beside_stored_artifacts_is_refused(database, tmp_path):
    artifacts = ArtifactStore(tmp_path / "artifacts")
    artifacts.put_tensors({"w": np.zeros(2, np.float32)})
    with pytest.raises(StateError, match="the database was lost"):
        open_state(url_of(database, tmp_path), artifacts)

