"""The baton a worker's threads pass the event loop with (workers/baton.py), on plain
threads: who holds it, the standby's take-over of a holder stuck in a request, parking
when idle, and the end that lets every thread go."""

from __future__ import annotations

import threading
import time
from typing import Dict

import pytest

from luafcgid.workers.baton import Baton
from tests.support import wait_until

# Every test waits for the standby's looks, in real time.
pytestmark = pytest.mark.slow


class Taker:
    """A thread calling ``baton.take(me)``; ``result`` is what take returned."""

    def __init__(self, baton: Baton, me: int) -> None:
        self.result: Dict[str, bool] = {}
        self.thread = threading.Thread(target=lambda: self.result.update(took=baton.take(me)),
                                       daemon=True)
        self.thread.start()

    def returned(self) -> bool:
        return "took" in self.result


def start_request(baton: Baton) -> float:
    """What the holder does as it starts a request (ThreadWorker.run_ready)."""
    with baton.lock:
        since = baton.running_since = time.monotonic()
        if baton.parked:
            baton.unpark()
    return since


def held_and_watched(baton: Baton) -> Taker:
    """Thread 1 (this one) holds the baton; thread 2, returned, stands by."""
    assert baton.take(1) and baton.holder == 1
    standby = Taker(baton, 2)
    wait_until(lambda: baton.standby == 2, timeout=5, what="thread 2 to stand by")
    return standby


def end_request(baton: Baton) -> None:
    with baton.lock:
        baton.running_since = 0.0


def test_the_first_thread_holds_the_next_stands_by_the_others_wait() -> None:
    baton = Baton(handoff_after=0.01)
    second = held_and_watched(baton)
    third = Taker(baton, 3)
    time.sleep(0.1)  # long enough for several looks of the standby
    assert not second.returned() and not third.returned()
    assert (baton.holder, baton.standby) == (1, 2)
    baton.end()


def test_the_standby_takes_over_a_holder_stuck_past_handoff_after() -> None:
    baton = Baton(handoff_after=0.02)
    standby = held_and_watched(baton)
    started = start_request(baton)  # ... and thread 1 never comes back from it
    wait_until(standby.returned, timeout=5, what="the standby to take the baton")
    assert standby.result["took"] is True
    assert time.monotonic() - started >= 0.02
    # Thread 2 holds the loop and nobody stands by; thread 1, back from its request, sees
    # it no longer holds the baton and becomes the standby.
    assert (baton.holder, baton.standby, baton.running_since) == (2, 0, 0.0)
    old_holder = Taker(baton, 1)
    wait_until(lambda: baton.standby == 1, timeout=5, what="thread 1 to stand by")
    assert not old_holder.returned()
    baton.end()


def test_a_thread_waiting_behind_the_standby_becomes_the_next_standby() -> None:
    baton = Baton(handoff_after=0.02)
    second = held_and_watched(baton)
    third = Taker(baton, 3)
    start_request(baton)
    wait_until(second.returned, timeout=5, what="thread 2 to take the baton")
    wait_until(lambda: baton.standby == 3, timeout=5, what="thread 3 to stand by")
    assert baton.holder == 2 and not third.returned()
    baton.end()


def test_a_holder_whose_requests_end_in_time_keeps_the_baton() -> None:
    baton = Baton(handoff_after=0.5)
    standby = held_and_watched(baton)
    until = time.monotonic() + 1.5  # three hand-off periods of short requests
    while time.monotonic() < until:
        start_request(baton)
        time.sleep(0.001)
        end_request(baton)
    assert baton.holder == 1 and not standby.returned()
    baton.end()


def test_the_standby_parks_when_idle_and_a_starting_request_wakes_it() -> None:
    baton = Baton(handoff_after=0.01, park_after_polls=3)
    standby = held_and_watched(baton)
    wait_until(lambda: baton.parked, timeout=5, what="the idle standby to park")
    # Parked, it looks no more: a request stuck without waking it is not taken over.
    with baton.lock:
        baton.running_since = time.monotonic()
    time.sleep(0.2)  # twenty hand-off periods
    assert baton.holder == 1 and not standby.returned()
    end_request(baton)
    start_request(baton)  # the holder's way: it wakes the parked standby
    assert not baton.parked
    wait_until(standby.returned, timeout=5, what="the woken standby to take over")
    assert baton.holder == 2
    baton.end()


def test_end_lets_every_thread_go_the_parked_standby_too() -> None:
    baton = Baton(handoff_after=0.01, park_after_polls=2)
    assert baton.take(1)
    takers = [Taker(baton, number) for number in (2, 3, 4)]
    wait_until(lambda: baton.parked, timeout=5, what="the standby to park")
    assert not any(taker.returned() for taker in takers)
    baton.end()
    for taker in takers:
        taker.thread.join(5)
        assert taker.result == {"took": False}
    assert baton.take(5) is False  # and from then on
