"""A fair limit on CPU-bound work done at once (password hashes), for chain threads.

The chain has many threads because most steps wait on the network (``threads``, 16 by default),
but an argon2id check is CPU work: sixteen of them at once on two cores each take eight times
as long, and a login that arrives behind them shares the CPU with all sixteen. Run no more at
once than the machine has cores, let the others wait **in arrival order**, and have each check
that its attempt is still wanted when its turn comes (:func:`gateway.pool.check_wanted`): after
a burst, the checks queued for clients that left are then skipped instead of run, and the next
login is answered in one check's time (issue 10). ``threading.Semaphore`` will not do: it wakes
its waiters in no particular order, so under load some logins wait many times longer than others.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from typing import Iterator

__all__ = ["FairSlots", "usable_cpus"]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. under ``taskset``)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class FairSlots:
    """At most *size* holders at once; waiters are served first come, first served.

    A slot is handed directly from the thread that releases it to the longest waiter, so a
    newcomer never overtakes a thread already waiting.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("FairSlots needs at least one slot")
        self.size = size
        self._free = size
        self._lock = threading.Lock()
        self._waiting: collections.deque[threading.Lock] = collections.deque()

    def acquire(self, timeout: float | None = None) -> bool:
        """Take a slot, waiting at most *timeout* seconds (None: as long as it takes)."""
        with self._lock:
            if self._free:
                self._free -= 1
                return True
            turn = threading.Lock()
            turn.acquire()
            self._waiting.append(turn)
        if turn.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            return True
        with self._lock:
            try:
                self._waiting.remove(turn)
            except ValueError:  # release() handed this waiter the slot as its wait ended
                return True
        return False

    def release(self) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().release()  # the slot passes on, never becomes free
            elif self._free < self.size:
                self._free += 1
            else:
                raise RuntimeError("FairSlots released more often than acquired")

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def waiting(self) -> int:
        """Threads waiting for a slot now (for tests and metrics)."""
        return len(self._waiting)
