"""The transactions' turn: waiters in the order they came, urgent ones first; urgent is a thread's own."""

from __future__ import annotations

import threading
import time

from edgeft.server.turn import Turn, urgent


def test_an_urgent_taker_goes_before_the_others_waiting_and_the_others_keep_their_order():
    turn, order = Turn(), []

    def take(name: str, is_urgent: bool) -> None:
        if is_urgent:
            with urgent(), turn:
                order.append(name)
        else:
            with turn:
                order.append(name)

    threads = []
    with turn:  # held: everyone below waits
        for name, is_urgent in (("a", False), ("b", False), ("c", False), ("version", True)):
            threads.append(threading.Thread(target=take, args=(name, is_urgent)))
            threads[-1].start()
            time.sleep(0.1)  # each is waiting before the next comes
    for thread in threads:
        thread.join(timeout=10)
    assert order == ["version", "a", "b", "c"]


def test_urgent_marks_only_its_own_thread_and_ends_with_its_block():
    seen = {}

    def other() -> None:
        seen["other"] = Turn.is_urgent()

    with urgent():
        seen["inside"] = Turn.is_urgent()
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    seen["after"] = Turn.is_urgent()
    assert seen == {"inside": True, "other": False, "after": False}
