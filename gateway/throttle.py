"""Failure throttling per user and per client address.

Counts failed attempts in a sliding window. A user or a client address that reached its limit
is refused (``THROTTLED``, HTTP 429) before the chain runs, so that the gateway cannot be used to
guess passwords quickly or to push accounts into the directory's own lockout. A success clears
the user's count. State is per worker process (see docs/design.md).
"""

from __future__ import annotations

import threading
import time
from collections import deque

from gateway.settings import ThrottleSettings

__all__ = ["Throttle"]

_MAX_KEYS = 100_000


class Throttle:
    def __init__(self, settings: ThrottleSettings, clock=time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        horizon = now - self.settings.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def _keys(self, username: str | None, client: str | None) -> list[tuple[str, int]]:
        keys = [] if client is None else [(f"c:{client}", self.settings.client_failures)]
        if username is not None:
            keys.append((f"u:{username.casefold()}", self.settings.user_failures))
        return keys

    def blocked(self, username: str | None, client: str | None) -> bool:
        if not self.settings.enabled:
            return False
        now = self._clock()
        with self._lock:
            for key, limit in self._keys(username, client):
                times = self._recent(key, now)
                if times is not None and len(times) >= limit:
                    return True
        return False

    def record_failure(self, username: str | None, client: str | None) -> None:
        if not self.settings.enabled:
            return
        now = self._clock()
        with self._lock:
            if len(self._failures) >= _MAX_KEYS:  # bounded memory under a spray of addresses
                for key in list(self._failures)[: _MAX_KEYS // 10]:
                    del self._failures[key]
            for key, limit in self._keys(username, client):
                times = self._failures.setdefault(key, deque(maxlen=limit))
                times.append(now)

    def record_success(self, username: str | None) -> None:
        if username is not None:
            with self._lock:
                self._failures.pop(f"u:{username.casefold()}", None)
