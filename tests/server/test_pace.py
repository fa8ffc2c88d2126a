"""Pace steering (server.pace): the wait told to devices refused work, by hand."""

from __future__ import annotations

from edgeft.server.pace import CEILING_S, FLOOR_S, Pace, retry_after


def test_retry_after_spreads_the_waiting_devices_over_the_rate_work_frees_up():
    # 200 refused polls a second, each told 10 s: 2,000 devices wait; 50 slots free a second: 40 s each
    assert retry_after(200.0, 10.0, 50.0) == 40.0
    assert retry_after(0.0, 10.0, 50.0) == FLOOR_S  # nobody waits: ask again soon
    assert retry_after(1e6, 600.0, 1.0) == CEILING_S
    assert retry_after(30.0, 2.0, 10.0, floor_s=0.5, ceiling_s=5.0) == 5.0


def test_a_pace_recomputes_the_wait_every_window_from_the_polls_refused_and_the_work_freed(clock):
    pace = Pace(min_freed_per_s=2.0, window_s=10.0, clock=clock)
    assert [pace.refused() for _ in range(3)] == [1, 1, 1]  # the first window: the floor
    for _ in range(997):
        pace.refused()
    for _ in range(50):
        pace.freed.add()
    clock.t = 10.0
    # 1,001 refused over 10 s, each told 1 s: 100 wait; 50 freed over 10 s = 5/s: 20 s, but at most twice the last
    assert pace.refused() == 2
    for _ in range(9):  # 10 refused in the next 10 s, each told 2 s: 2 wait; 10 freed: 1/s, below the floor (2/s)
        pace.refused()
    for _ in range(10):
        pace.freed.add()
    clock.t = 20.0
    assert pace.refused() == FLOOR_S  # 1.0 * 2 / 2 = 1 s
    for _ in range(599):  # 600 refused, each told 1 s: 60 wait; nothing freed: the floor rate, 2 a second: 30 s ...
        pace.refused()
    clock.t = 30.0
    assert pace.refused() == 2  # ... at most doubling
    for _ in range(599):
        pace.refused()
    clock.t = 40.0
    assert pace.refused() == 4
    for _ in range(99):  # 100 refused, each told 4 s: 40 wait, over 2 a second
        pace.refused()
    clock.t = 50.0
    assert pace.refused() == 8  # 20 s, at most doubling
    for _ in range(99):
        pace.refused()
    clock.t = 60.0
    assert pace.refused() == 16  # 10 * 8 / 2 = 40 s, at most doubling
    for _ in range(19):  # 20 refused, each told 16 s: 32 wait, over 2 a second: 16 s, below doubling
        pace.refused()
    clock.t = 70.0
    assert pace.refused() == 16
