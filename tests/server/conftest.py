"""Fixtures for the coordinator tests."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from conftest_server import shards  # noqa: F401
from edgeft.server.config import S3Settings
from edgeft.testing import postgres, seaweedfs

BUCKET = "edgeft-test"


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


@pytest.fixture(scope="session")
def seaweed():
    """A throwaway SeaweedFS server with its S3 gateway for the session (edgeft.testing.seaweedfs) and the bucket
    BUCKET; skipped where none can run."""
    reason = seaweedfs.missing()
    if reason is not None:
        pytest.skip(reason)
    server = seaweedfs.SeaweedS3()
    try:
        server.start()
        server.create_bucket(BUCKET)
        server.client().put_object(Bucket=BUCKET, Key="warm-up", Body=b"")  # its first volumes grow now
        yield server
    finally:
        server.close()


@pytest.fixture()
def s3_artifacts(seaweed) -> dict:
    """[server] settings for a new, empty prefix of the session's bucket: artifacts and s3."""
    return {"artifacts": f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}",
            "s3": S3Settings(endpoint_url=seaweed.endpoint, region=seaweedfs.REGION,
                             access_key_id=seaweedfs.ACCESS_KEY, secret_access_key=seaweedfs.SECRET_KEY)}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request) -> str | None:
    """The coordinator's [server] database alone, once per backend (for tests of the database only): None (the
    SQLite file in its state folder) and a new PostgreSQL database."""
    return None if request.param == "sqlite" else request.getfixturevalue("postgres_url")


@pytest.fixture(params=["sqlite+folder", pytest.param("postgres+s3", marks=[pytest.mark.postgres, pytest.mark.s3])])
def backend(request) -> dict:
    """Where the coordinator keeps its state, once per backend, as [server] settings: the SQLite file and the
    artifact folder in its state folder (the defaults: no settings), and a new PostgreSQL database with a new
    prefix of a SeaweedFS bucket."""
    if request.param == "sqlite+folder":
        return {}
    return {"database": request.getfixturevalue("postgres_url"), **request.getfixturevalue("s3_artifacts")}


@pytest.fixture(scope="session")
def fault_report(tmp_path_factory) -> Path:
    """The fault-injection scenarios' JSON report (``faults.record``), in pytest's base temporary folder."""
    return tmp_path_factory.getbasetemp() / "fault_report.json"


class ManualClock:
    """A clock (time.monotonic's stand-in) that the test moves by setting ``t``."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture()
def clock() -> ManualClock:
    return ManualClock()
