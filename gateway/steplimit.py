"""Per-step concurrency: one hanging backend cannot hold every chain thread (issue 10).

A chain step that already runs on ``limits.step_concurrency`` threads (default half of
``threads``), the oldest of them for more than a second, is stuck rather than busy: further
attempts do not wait for it. The step is noted ``UNAVAILABLE`` (reason ``step_saturated``) and
the chain goes on to the next step, exactly as when the step's backend is down. The other steps,
and the hot cache (which answers on the event loop), keep answering while one backend hangs.
A busy but healthy step (every call short) is never skipped: its attempts queue as before.

Reads ``threads``, ``limits.step_concurrency`` and ``chain``.
"""

from __future__ import annotations

import logging
import threading
import time

import pluggy

from gateway.model import Outcome

__all__ = ["bound_steps"]

log = logging.getLogger("authgw.chain")

_STUCK_AFTER = 1.0  # seconds: far above any healthy step (ms), far below the deadline (5 s)
_LOG_EVERY = 10.0  # seconds between two "saturated" warnings of one step


class _StepGuard:
    def __init__(self, function, step: str, limit: int, index: int) -> None:
        self.function = function
        self.step = step
        self.limit = limit
        self.index = index  # where pluggy passes ``attempt`` (arguments are positional)
        self.lock = threading.Lock()
        self.running: dict[int, float] = {}  # call id -> monotonic start
        self.calls = 0
        self.last_warning: float | None = None

    def __call__(self, *args):
        now = time.monotonic()
        with self.lock:
            if len(self.running) >= self.limit and now - min(self.running.values()) > _STUCK_AFTER:
                warn = self.last_warning is None or now - self.last_warning >= _LOG_EVERY
                if warn:
                    self.last_warning = now
                call = None
            else:
                self.calls += 1
                call = self.calls
                self.running[call] = now
        if call is None:
            if warn:
                log.warning("chain step %r holds %d threads, the oldest for over %.0f s "
                            "(limits.step_concurrency); attempts skip it as unavailable",
                            self.step, self.limit, _STUCK_AFTER)
            args[self.index].note(Outcome.UNAVAILABLE, step=self.step, reason="step_saturated")
            return None
        try:
            return self.function(*args)
        finally:
            with self.lock:
                del self.running[call]


def bound_steps(pm: pluggy.PluginManager, chain: list[str], limit: int) -> None:
    """Guard the ``gateway_authenticate`` of every chain step (not hook wrappers)."""
    for impl in pm.hook.gateway_authenticate.get_hookimpls():
        if impl.plugin_name in chain and not (impl.wrapper or impl.hookwrapper) and "attempt" in impl.argnames:
            guard = _StepGuard(impl.function, impl.plugin_name, limit, impl.argnames.index("attempt"))
            impl.function = guard
