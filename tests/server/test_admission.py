"""Admission by load (server.admission): the rate work is given at while uploads queue, by hand."""

from __future__ import annotations

from edgeft.server.admission import (BACKOFF, GROWTH, INITIAL_PER_S, MIN_PER_S, SLOW_START_GROWTH, Admission, CallLoad,
                                     InProgress, issue_limit)


def test_issue_limit_follows_the_rate_taken_in_while_busy_and_grows_back_after():
    assert issue_limit(True, 50.0, 80.0, 100.0) == BACKOFF * 50.0  # busy: a little below what was taken in
    assert issue_limit(True, 0.4, 80.0, 10.0) == MIN_PER_S  # never below the floor
    assert issue_limit(True, 0.0, 80.0, 12.0) == 12.0  # a queue while nothing was taken in: no evidence, no change
    assert issue_limit(False, 40.0, 44.0, 45.0) == 45.0 * GROWTH  # not busy, the work given came back: it grows
    assert issue_limit(False, 40.0, 44.0, 45.0, SLOW_START_GROWTH) == 90.0  # ... doubles before calls first queued
    assert issue_limit(False, 30.0, 44.0, 45.0) == 45.0  # not back yet (taken in under 0.8 of it): it waits
    # not busy, under half the limit given: it follows the demand down, to twice what was asked, never below where
    # it starts (nor above where it was), and is never lifted
    assert issue_limit(False, 50.0, 60.0, 400.0) == 120.0
    assert issue_limit(False, 50.0, 20.0, 400.0) == INITIAL_PER_S
    assert issue_limit(False, 5.0, 2.0, 20.0) == 20.0


def test_call_load_is_the_mean_number_of_calls_waiting_over_a_span(clock):
    load = CallLoad(clock)
    start = load.reading()
    load.change(1)
    clock.t = 4.0
    load.change(1)
    clock.t = 6.0
    load.change(-1)
    clock.t = 10.0
    at, area = load.reading()
    assert (area - start[1]) / (at - start[0]) == (4 * 1 + 2 * 2 + 4 * 1) / 10  # 1.2 calls waiting on average


def test_in_progress_counts_the_calls_beyond_its_free_ones_as_waiting():
    load = CallLoad()
    uploads = InProgress(load, free=2)
    with uploads, uploads:
        assert load.waiting == 0  # two in progress, both free
        with uploads, uploads, uploads:
            assert load.waiting == 3
        assert load.waiting == 0
    assert uploads.count == 0 and load.waiting == 0


def test_admission_gives_work_at_the_rate_taken_in_while_busy_then_follows_the_demand(clock):
    load = CallLoad(clock)
    admission = Admission("job", load, busy_at=4.0, window_s=10.0)
    admission.limit, admission._tokens, admission._queued = 1000.0, 1000.0, True  # past its slow start (below)
    assert all(admission.admit() for _ in range(500))  # not busy: the limit does not bind
    load.change(5)  # 5 uploads wait for a thread the whole window: busy (from 4)
    for _ in range(200):  # 20 updates a second taken in
        admission.taken.add()
    clock.t = 10.0
    # the window rolls: the limit is 0.9 * 20 = 18 a second, and the bucket holds a second's tokens at most
    assert sum(admission.admit() for _ in range(100)) == 18
    assert admission.limit == BACKOFF * 20.0
    clock.t = 11.0
    assert sum(admission.admit() for _ in range(100)) == 18  # a second's tokens
    clock.t = 12.0
    assert sum(admission.admit() for _ in range(100)) == 18
    load.change(-5)  # the queue drained
    for second in range(13, 20):  # the limit binds: 18 given each second, and the work given comes back
        clock.t = float(second)
        assert sum(admission.admit() for _ in range(100)) == 18
    for _ in range(180):
        admission.taken.add()
    clock.t = 20.0
    admission.admit()  # a window not busy in which the work given came back: the limit grows
    assert admission.limit == BACKOFF * 20.0 * GROWTH
    for second in range(21, 30):  # the fleet asks for 3 tasks a second: far under the limit, which is kept
        clock.t = float(second)
        assert sum(admission.admit() for _ in range(3)) == 3
    clock.t = 30.0
    assert admission.admit() is True and admission.limit == BACKOFF * 20.0 * GROWTH  # (2 * 3.1 < INITIAL_PER_S)


def test_admission_starts_slow_and_doubles_as_the_work_given_comes_back(clock):
    """A crowd asking at once gets INITIAL_PER_S tasks a second, not all the work there is; the limit doubles each
    window in which the uploads came back without a queue, and stays while they have not."""
    load = CallLoad(clock)
    admission = Admission("job", load, busy_at=4.0, window_s=10.0)
    given = 0
    for second in range(10):  # a crowd asks: a second's tokens, then INITIAL_PER_S a second
        clock.t = float(second)
        given += sum(admission.admit() for _ in range(1000))
    assert given == INITIAL_PER_S * 10
    for second in range(10, 20):  # the crowd asks on; the uploads come back at the rate given, no queue
        clock.t = float(second)
        assert sum(admission.admit() for _ in range(1000)) == INITIAL_PER_S
        assert admission.limit == INITIAL_PER_S  # at 10 s nothing had come back yet (devices train): it waited
        for _ in range(int(INITIAL_PER_S)):
            admission.taken.add()
    clock.t = 20.0
    admission.admit()
    assert admission.limit == INITIAL_PER_S * SLOW_START_GROWTH
    load.change(5)  # calls queue: the limit follows what was taken in, and the slow start is over
    for _ in range(300):
        admission.taken.add()
    clock.t = 30.0
    admission.admit()
    assert admission.limit == BACKOFF * 30.0
    load.change(-5)
    for second in range(30, 40):  # the queue drained; the crowd asks on and the work given comes back
        clock.t = float(second)
        assert 26 <= sum(admission.admit() for _ in range(1000)) <= 27  # 27 tokens a second
        for _ in range(27):
            admission.taken.add()
    clock.t = 40.0
    admission.admit()
    assert admission.limit == BACKOFF * 30.0 * GROWTH
