"""How many offline entries the store holds, counted off the hot path for the readiness line.

``gateway_readiness`` must not do I/O, so this worker counts on its own daemon thread: once at
start-up, then soon after it learns or forgets a user (at most every :data:`MIN_GAP` seconds),
and every :data:`REFRESH_EVERY` seconds anyway (other workers and gateways share the store, and
Redis expires entries itself). Readiness reads the last count and when it was taken. No config.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["EntryTally", "MIN_GAP", "REFRESH_EVERY"]

#: Seconds between two counts at the least (a burst of logins costs one count, not one each).
MIN_GAP = 2.0
#: Seconds between two counts at the most.
REFRESH_EVERY = 60.0


class EntryTally:
    def __init__(self, count: Callable[[], int], log) -> None:
        self._count = count
        self._log = log
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: (entries, wall-clock time counted), or None before the first count worked.
        self.last: tuple[int, float] | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="authgw-cache-tally", daemon=True)
        self._thread.start()

    def changed(self) -> None:
        """The store gained or lost an entry: count again soon (never here, on the attempt)."""
        self._changed.set()

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._changed.clear()
            try:
                self.last = (self._count(), time.time())
            except Exception as exc:  # the store's state is reported by the store line itself
                self._log.debug("credential cache: counting entries failed: %s", exc)
            if self._stop.wait(MIN_GAP):
                break
            self._changed.wait(REFRESH_EVERY)
