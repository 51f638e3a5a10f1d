"""``denylist``: refuse listed users and client networks before any directory is asked.

Decides
    ``ACCOUNT_STATE`` with reason ``denylist.user`` for a password attempt whose username
    matches one of ``users`` (shell-style patterns, case-insensitive), and with
    ``denylist.network`` for any attempt from a client inside ``networks``.
Abstains
    for everyone else, so the next step of the chain decides.
Settings (``denylist:`` in conf.d)
    ``users`` (list of patterns), ``users_file`` (more patterns, one a line, re-read when the
    file changes: add a user without a restart), ``networks`` (list of CIDRs).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import threading

import gateway
from gateway import (Attempt, CheckResult, ConfigPath, Decision, Outcome, PluginContext, PluginSettings,
                     SelfTest, hookimpl)


class DenylistSettings(PluginSettings):
    users: list[str] = []
    users_file: ConfigPath | None = None
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []


def _compile(patterns: list[str]) -> re.Pattern | None:
    return re.compile("|".join(fnmatch.translate(p.casefold()) for p in patterns)) if patterns else None


class DenylistPlugin:
    Settings = DenylistSettings

    def __init__(self, settings: DenylistSettings, context: PluginContext) -> None:
        self.settings = settings
        self.name = context.name
        self.log = context.log
        # Compiled once at start-up (and when users_file changes), not per attempt.
        self._regex = _compile(settings.users)
        self._lock = threading.Lock()
        self._file_stamp: tuple[int, int] | None = None
        self._loaded = False
        self.refused = 0

    def _current(self) -> re.Pattern | None:
        """The patterns, re-read from users_file when its size or time changed (a stat per attempt)."""
        path = self.settings.users_file
        if path is None:
            return self._regex
        try:
            st = os.stat(path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if self._loaded and stamp == self._file_stamp:
            return self._regex
        lines = path.read_text(encoding="utf-8").splitlines() if stamp is not None else []
        patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        with self._lock:
            self._regex, self._file_stamp, self._loaded = _compile(self.settings.users + patterns), stamp, True
        return self._regex

    @hookimpl
    def gateway_authenticate(self, attempt: Attempt) -> Decision | None:
        if any(attempt.client in network for network in self.settings.networks):
            return self._refuse("denylist.network")
        username = attempt.username
        regex = self._current()
        if username is not None and regex is not None and regex.fullmatch(username.casefold()):
            return self._refuse("denylist.user")
        return None

    def _refuse(self, reason: str) -> Decision:
        with self._lock:
            self.refused += 1
        return Decision.deny(Outcome.ACCOUNT_STATE, step=self.name, reason=reason)

    @hookimpl
    def gateway_selftests(self) -> list[SelfTest]:
        def entries() -> CheckResult:
            count = len(self.settings.users) + len(self.settings.networks)
            if not count:
                return CheckResult.warn("the denylist is empty", "list users or networks, or remove the step")
            return CheckResult.ok(f"{len(self.settings.users)} user patterns, "
                                  f"{len(self.settings.networks)} networks (gateway {gateway.__version__})")

        return [SelfTest(f"{self.name}.entries", entries)]
