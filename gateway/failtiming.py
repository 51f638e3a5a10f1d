"""Uniform failure time: a refused password takes as long wherever the chain stopped.

Decides how long to hold back a refused password attempt (``INVALID_CREDENTIALS``,
``USER_NOT_FOUND``, ``ACCOUNT_STATE``) before answering, so that the answer's time does not tell
an unknown user (who goes on to later steps, e.g. ``static``'s dummy argon2 verify) from a wrong
password (which stops at ``ldap``). Reads ``failure_timing: {enabled, floor, percentile,
max_floor}``.

The floor is *adaptive* by default: the worker keeps the last :data:`SAMPLES` unpadded durations
of refusals per kind, (step, outcome, reason), and pads every refusal to the highest per-kind
``percentile`` (the slowest way to fail), capped at ``max_floor`` and at the attempt's deadline.
An attacker cannot pull the floor down: the slow kind's samples only change when that slow kind
happens. A kind is a reason, not a (step, outcome): ``ldap`` refuses a password holding a NUL at
once with the outcome of a wrong password, which costs a bind, and refusals of the first kind,
sent by the dozen, diluted the samples of the second until unknown users answered in a search's
time and known ones in a bind's (review of the front door).
A configured ``floor`` (seconds) is used as a minimum. Successes are never delayed.
"""

from __future__ import annotations

import threading
from collections import deque

__all__ = ["FailureTiming", "SAMPLES"]

#: Samples kept per kind of refusal.
SAMPLES = 64
#: Samples a kind needs before it sets the floor (one slow outlier is not a floor).
_MIN_SAMPLES = 5


class FailureTiming:
    def __init__(self, *, enabled: bool = True, floor: float = 0.0, percentile: float = 0.9,
                 max_floor: float = 1.0) -> None:
        self.enabled = enabled
        self.floor = floor
        self.percentile = percentile
        self.max_floor = max_floor
        self._lock = threading.Lock()
        self._samples: dict[tuple[str, ...], deque[float]] = {}
        self._levels: dict[tuple[str, ...], float] = {}  # each kind's percentile, once it has enough samples
        self._target = floor

    def record(self, kind: tuple[str, ...], duration: float) -> None:
        """An unpadded refusal of *kind* took *duration* seconds."""
        if not self.enabled:
            return
        with self._lock:
            if kind not in self._samples and len(self._samples) >= 256:  # steps x reasons: bounded
                return
            samples = self._samples.setdefault(kind, deque(maxlen=SAMPLES))
            samples.append(duration)
            if len(samples) >= _MIN_SAMPLES:  # only this kind's level changed: sorted alone
                ordered = sorted(samples)
                self._levels[kind] = ordered[min(len(ordered) - 1, int(len(ordered) * self.percentile))]
            self._target = min(max(self.floor, max(self._levels.values(), default=0.0)), self.max_floor)

    def delay(self, elapsed: float, time_left: float) -> float:
        """Seconds to wait before answering a refusal that took *elapsed* seconds."""
        if not self.enabled:
            return 0.0
        return max(0.0, min(self._target - elapsed, time_left - 0.05))
