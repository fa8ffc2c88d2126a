"""Admission by load (server.admission): the rate work is given at while uploads queue, by hand."""

from __future__ import annotations

from edgeft.server.admission import BACKOFF, GROWTH, MIN_PER_S, Admission, UploadLoad, issue_limit


def test_issue_limit_follows_the_rate_taken_in_while_busy_and_grows_back_after():
    assert issue_limit(True, 50.0, 80.0, None) == BACKOFF * 50.0  # busy: a little below what was taken in
    assert issue_limit(True, 0.0, 80.0, 10.0) == MIN_PER_S  # nothing taken in: the floor, never zero
    assert issue_limit(False, 50.0, 44.0, 45.0) == 45.0 * GROWTH  # not busy, the limit bound: it grows
    assert issue_limit(False, 50.0, 20.0, 45.0) is None  # not busy, under half the limit given: no limit
    assert issue_limit(False, 50.0, 80.0, None) is None


def test_upload_load_is_the_mean_number_of_uploads_in_progress_over_a_span(clock):
    load = UploadLoad(clock)
    start = load.reading()
    with load.uploading():
        clock.t = 4.0
        with load.uploading():
            clock.t = 6.0
        clock.t = 10.0
    at, area = load.reading()
    assert (area - start[1]) / (at - start[0]) == (4 * 1 + 2 * 2 + 4 * 1) / 10  # 1.2 uploads on average


def test_admission_gives_work_at_the_rate_taken_in_while_busy_then_lifts_the_limit(clock):
    load = UploadLoad(clock)
    admission = Admission("job", load, busy_at=4.0, window_s=10.0)
    assert all(admission.admit() for _ in range(500))  # not busy: no limit
    uploads = [load.uploading() for _ in range(5)]
    for upload in uploads:  # 5 uploads in progress the whole window: busy (from 4)
        upload.__enter__()
    for _ in range(200):  # 20 a second taken in
        admission.taken()
    clock.t = 10.0
    assert admission.admit() is False  # the window rolls: the limit is 0.9 * 20 = 18 a second, no tokens yet
    assert admission.limit == BACKOFF * 20.0
    clock.t = 11.0
    given = sum(admission.admit() for _ in range(100))
    assert given == 18  # a second's tokens
    clock.t = 12.0
    assert sum(admission.admit() for _ in range(100)) == 18
    for upload in uploads:  # the queue drained
        upload.__exit__(None, None, None)
    for second in range(13, 20):  # the limit binds: 18 given each second
        clock.t = float(second)
        assert sum(admission.admit() for _ in range(100)) == 18
    clock.t = 20.0
    admission.admit()  # a window not busy in which the limit bound: it grows
    assert admission.limit == BACKOFF * 20.0 * GROWTH
    clock.t = 30.0  # a window in which little work was asked for: the limit is lifted
    assert admission.admit() is True and admission.limit is None
