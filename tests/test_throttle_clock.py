"""The memory throttle store and the wall clock (review of time): its counts were dated by
``time.time()``, so an NTP step forward of a window (a clock that ran slow, corrected) freed
every guess at once, and a step back kept a lockout for as long as the step. They live in one
process: they are dated by the monotonic clock now, which steps do not move. The real
``Throttle`` over its real memory store; only the wall clock is stood in for."""

from __future__ import annotations

import time

from gateway.model import Outcome
from gateway.settings import ThrottleSettings
from gateway.throttle import Throttle


def test_a_wall_clock_step_frees_no_guess_of_the_memory_store(monkeypatch):
    throttle = Throttle(ThrottleSettings(store="memory", user_failures=3, user_client_failures=3, window=600))
    wall = [time.time()]
    monkeypatch.setattr(time, "time", lambda: wall[0])

    def guess() -> bool:
        ticket = throttle.admit("alice", "198.51.100.7")
        if ticket is None:
            return False
        throttle.settle(ticket, Outcome.INVALID_CREDENTIALS)
        return True

    # the wall clock cannot be stepped under a test: the store must not be dated by it at all
    assert throttle._clock is time.monotonic
    assert [guess() for _ in range(4)] == [True, True, True, False]
    wall[0] += 601  # the clock stepped a window forward: no time passed, no guess is freed
    assert not guess()
    throttle.close()


def test_the_sqlite_store_shared_across_workers_and_boots_is_given_the_wall_clock_to_start_a_boot(tmp_path):
    """The monotonic clock starts again at each boot: the store is given wall-clock seconds, which
    only set where a boot's seconds start; it dates failures by the boot clock
    (test_throttle_review3.py)."""
    throttle = Throttle(ThrottleSettings(store="sqlite"), state_dir=tmp_path, workers=2)
    assert throttle._clock is time.time
    throttle.close()
