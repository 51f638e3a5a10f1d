"""Per-step concurrency: one hanging backend cannot hold every chain thread (issue 10).

A chain step that already runs on ``limits.step_concurrency`` threads (default half of
``threads``) and has finished none of its calls for half the deadline is stuck rather than busy:
further attempts do not wait for it. What they get instead is the step's own answer for a
backend that is down, which only the step knows:

* a step that declares ``passes_when_unavailable = True`` (a directory that notes ``UNAVAILABLE``
  when its server is down: the built-in ldap, kerberos, client_cert and relay steps) is noted
  ``UNAVAILABLE`` (reason ``step_saturated``) and the chain goes on to the next step, exactly as
  when its backend is down. The other steps, and the hot cache (which answers on the event
  loop), keep answering while one backend hangs;
* any other step may be a policy (a deny list) that would refuse: skipping it could let in a
  user it would stop. The attempt is refused ``UNAVAILABLE`` (``step_saturated``, a 503) without
  asking the steps after it.

A busy but healthy step is not skipped while its calls keep finishing, even slowly on a starved
machine: its attempts queue as before. (When not one call finishes within half the deadline, an
attempt waiting for that step would have missed its deadline anyway.)

Reads ``threads``, ``limits.step_concurrency``, ``deadline`` and ``chain``.
"""

from __future__ import annotations

import logging
import threading
import time

import pluggy

from gateway.model import Decision, Outcome

__all__ = ["bound_steps"]

log = logging.getLogger("authgw.chain")

_LOG_EVERY = 10.0  # seconds between two "saturated" warnings of one step


class _StepGuard:
    def __init__(self, function, step: str, limit: int, index: int, stuck_after: float, passes: bool) -> None:
        self.function = function
        self.passes = passes  # skipped as unavailable (True) or the attempt refused (False)
        self.stuck_after = stuck_after
        self.step = step
        self.limit = limit
        self.index = index  # where pluggy passes ``attempt`` (arguments are positional)
        self.lock = threading.Lock()
        self.running: dict[int, float] = {}  # call id -> monotonic start
        self.calls = 0
        self.last_done: float | None = None  # when a call last finished (None: none yet)
        self.last_warning: float | None = None

    def __call__(self, *args):
        now = time.monotonic()
        with self.lock:
            if len(self.running) >= self.limit and self._stuck(now):
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
                log.warning("chain step %r holds %d threads and finished no call for over %.0f s "
                            "(limits.step_concurrency); %s", self.step, self.limit, self.stuck_after,
                            "attempts skip it as unavailable" if self.passes else
                            "attempts are refused as unavailable (it may refuse: no later step answers for it)")
            if not self.passes:
                return Decision.deny(Outcome.UNAVAILABLE, step=self.step, reason="step_saturated")
            args[self.index].note(Outcome.UNAVAILABLE, step=self.step, reason="step_saturated")
            return None
        try:
            return self.function(*args)
        finally:
            with self.lock:
                del self.running[call]
                self.last_done = time.monotonic()

    def _stuck(self, now: float) -> bool:
        """No progress for ``stuck_after``: no call finished since then, and the oldest running
        call started before then (under the lock)."""
        progress = min(self.running.values())
        if self.last_done is not None and self.last_done > progress:
            progress = self.last_done
        return now - progress > self.stuck_after


def bound_steps(pm: pluggy.PluginManager, chain: list[str], limit: int, deadline: float) -> None:
    """Guard the ``gateway_authenticate`` of every chain step (not hook wrappers). A step is
    stuck after half the *deadline* without progress: an attempt queued behind it could not
    finish in time anyway, while a starved machine's slow but moving calls are not cut off."""
    for impl in pm.hook.gateway_authenticate.get_hookimpls():
        if impl.plugin_name in chain and not (impl.wrapper or impl.hookwrapper) and "attempt" in impl.argnames:
            passes = getattr(pm.get_plugin(impl.plugin_name), "passes_when_unavailable", False) is True
            guard = _StepGuard(impl.function, impl.plugin_name, limit, impl.argnames.index("attempt"), deadline / 2,
                               passes)
            impl.function = guard
