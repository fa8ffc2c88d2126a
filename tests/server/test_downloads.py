"""Task bytes sent, counted in memory and written in batches (edgeft.server.downloads), on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from edgeft.errors import Unavailable
from edgeft.server.downloads import Downloads
from edgeft.server.state import State
from edgeft.server.store import open_database


def test_counts_are_written_at_a_flush_once_per_device_and_round_and_kept_when_the_database_fails(database,
                                                                                                    tmp_path):
    state = State(open_database(database or f"sqlite:///{tmp_path / 'state.db'}"))
    try:
        state.create_job("job", "digest", 5, 1, "blob0", {}, {})
        counts = Downloads(state)
        counts.add("job", 1, "d1", 100)
        counts.add("job", 1, "d1", 999)  # the same device and round again: the first count stays
        counts.add("job", 1, "d2", 200)
        assert state.job_record("job")["downloads"] == {}  # nothing written before the flush
        counts.flush()
        assert state.job_record("job")["downloads"] == {(1, "d1"): 100, (1, "d2"): 200}
        counts.add("job", 1, "d1", 555)  # stored already: the stored count stays
        counts.add("job", 2, "d1", 300)
        real = state.record_downloads

        def unavailable(rows):  # noqa: ANN001, ANN202
            raise Unavailable("the coordinator's database is unavailable; retry later")

        state.record_downloads = unavailable
        with pytest.raises(Unavailable):
            counts.flush()
        state.record_downloads = real
        counts.flush()  # what the failed flush held is written now
        assert state.job_record("job")["downloads"] == {(1, "d1"): 100, (1, "d2"): 200, (2, "d1"): 300}
    finally:
        state.engine.dispose()
