"""``denylist``: refuse listed users and client networks before any directory is asked.

Decides
    ``ACCOUNT_STATE`` with reason ``denylist.user`` for a password attempt whose username
    matches one of ``users`` (shell-style patterns, case-insensitive), and with
    ``denylist.network`` for any attempt from a client inside ``networks``.
Abstains
    for everyone else, so the next step of the chain decides.
Settings (``denylist:`` in conf.d)
    ``users`` (list of patterns), ``networks`` (list of CIDRs).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import threading

import gateway
from gateway import Attempt, CheckResult, Decision, Outcome, PluginContext, PluginSettings, SelfTest, hookimpl


class DenylistSettings(PluginSettings):
    users: list[str] = []
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []


class DenylistPlugin:
    Settings = DenylistSettings

    def __init__(self, settings: DenylistSettings, context: PluginContext) -> None:
        self.settings = settings
        self.name = context.name
        self.log = context.log
        # Compiled once at start-up, not per attempt.
        patterns = [fnmatch.translate(p.casefold()) for p in settings.users]
        self._regex = re.compile("|".join(patterns)) if patterns else None
        self._lock = threading.Lock()
        self.refused = 0

    @hookimpl
    def gateway_authenticate(self, attempt: Attempt) -> Decision | None:
        if any(attempt.client in network for network in self.settings.networks):
            return self._refuse("denylist.network")
        username = attempt.username
        if username is not None and self._regex is not None and self._regex.fullmatch(username.casefold()):
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
