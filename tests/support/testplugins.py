"""Small plugins for core tests: a configurable chain step, and plugins that break the contract.

Each is a real plugin class; tests reach them through entry points (in-process via
``support.chainhelp.build`` or as installed distributions via ``support.fakedist``).
"""

from __future__ import annotations

import threading
import time
from typing import Literal

from gateway import (Attempt, BackendUnavailable, Decision, Identity, Outcome, PluginContext, PluginSettings,
                     hookimpl)

#: (plugin name, hook) in call order, for tests that pin the order of hook calls.
CALLS: list[tuple[str, str]] = []


class StepSettings(PluginSettings):
    action: Literal["abstain", "not_found", "unavailable", "invalid", "account_state", "success",
                    "raise", "sleep", "not_a_decision", "bytes", "crlf", "strings"] = "abstain"
    sleep: float = 0.0
    challenge: str | None = None
    #: with ``success``: the username of the identity (default: the one presented)
    success_as: str | None = None


class Step:
    """A chain step that does what its settings say, and records every hook call."""

    Settings = StepSettings

    def __init__(self, settings: StepSettings, context: PluginContext) -> None:
        self.settings = settings
        self.name = context.name

    @hookimpl
    def gateway_precheck(self, attempt: Attempt) -> None:
        CALLS.append((self.name, "gateway_precheck"))

    @hookimpl
    def gateway_authenticate(self, attempt: Attempt) -> Decision | None:
        CALLS.append((self.name, "gateway_authenticate"))
        action = self.settings.action
        if action == "not_found":
            attempt.note(Outcome.USER_NOT_FOUND, step=self.name, reason=f"{self.name}.user_not_found")
        elif action == "unavailable":
            attempt.note(Outcome.UNAVAILABLE, step=self.name, reason=f"{self.name}.unreachable")
        elif action == "invalid":
            return Decision.deny(Outcome.INVALID_CREDENTIALS, step=self.name, reason=f"{self.name}.invalid")
        elif action == "account_state":
            return Decision.deny(Outcome.ACCOUNT_STATE, step=self.name, reason=f"{self.name}.locked")
        elif action == "success":
            user = self.settings.success_as or attempt.username or "anonymous"
            return Decision.allow(Identity(subject=f"{self.name}:{user}", username=user, method=self.name,
                                           groups=("g1", "g2")), step=self.name)
        elif action == "raise":
            raise RuntimeError("boom from a test plugin")
        elif action == "sleep":
            time.sleep(self.settings.sleep)
        elif action == "not_a_decision":
            return "yes"  # type: ignore[return-value]
        return None

    @hookimpl
    def gateway_challenges(self, attempt: Attempt) -> str | None:
        return self.settings.challenge

    @hookimpl
    def gateway_auth_finished(self, attempt: Attempt, decision: Decision) -> None:
        CALLS.append((self.name, "gateway_auth_finished"))


class DirectorySettings(StepSettings):
    lookup: Literal["found", "unknown", "unavailable", "disabled"] = "found"


class Directory(Step):
    """A :class:`Step` that also answers ``gateway_lookup_user`` as its ``lookup`` setting says:
    the user found (or found disabled), unknown (``None``), or the directory unavailable."""

    Settings = DirectorySettings

    @hookimpl
    def gateway_lookup_user(self, username: str) -> Identity | None:
        CALLS.append((self.name, "gateway_lookup_user"))
        lookup = self.settings.lookup
        if lookup == "unknown":
            return None
        if lookup == "unavailable":
            raise BackendUnavailable(f"{self.name}.unreachable")
        return Identity(subject=f"{self.name}:{username}", username=username, method=self.name,
                        account_state=f"{self.name}.disabled" if lookup == "disabled" else "")


class Wrapper:
    """A non-step plugin wrapping the chain, as the credential cache does."""

    def __init__(self, settings: PluginSettings, context: PluginContext) -> None:
        self.name = context.name

    @hookimpl(wrapper=True)
    def gateway_authenticate(self, attempt: Attempt):
        CALLS.append((self.name, "gateway_authenticate:before"))
        decision = yield
        CALLS.append((self.name, f"gateway_authenticate:after:{decision.outcome.value}"))
        return decision


class BrokenNotify:
    """A plugin whose ``gateway_auth_finished`` raises (a third party's bug)."""

    def __init__(self, settings: PluginSettings, context: PluginContext) -> None:
        self.name = context.name

    @hookimpl
    def gateway_auth_finished(self, attempt: Attempt, decision: Decision) -> None:
        CALLS.append((self.name, "gateway_auth_finished"))
        raise RuntimeError("boom from a test plugin's gateway_auth_finished")

    @hookimpl
    def gateway_shutdown(self) -> None:
        CALLS.append((self.name, "gateway_shutdown"))
        raise RuntimeError("boom from a test plugin's gateway_shutdown")


class DecisionOnly:
    """A ``gateway_auth_finished`` that declares only the argument it uses (pluggy allows it)."""

    def __init__(self, settings: PluginSettings, context: PluginContext) -> None:
        self.name = context.name

    @hookimpl
    def gateway_auth_finished(self, decision: Decision) -> None:
        CALLS.append((self.name, f"gateway_auth_finished:{decision.outcome.value}"))

    @hookimpl
    def gateway_shutdown(self) -> None:
        CALLS.append((self.name, "gateway_shutdown"))


class ExitNotify:
    """A ``gateway_auth_finished`` that raises SystemExit (a plugin calling sys.exit)."""

    def __init__(self, settings: PluginSettings, context: PluginContext) -> None:
        self.name = context.name

    @hookimpl
    def gateway_auth_finished(self, attempt: Attempt, decision: Decision) -> None:
        raise SystemExit(3)


class WrapsNotify:
    """A wrapper on ``gateway_auth_finished``: refused at load (the core calls it one by one)."""

    def __init__(self, settings: PluginSettings, context: PluginContext) -> None:
        pass

    @hookimpl(wrapper=True)
    def gateway_auth_finished(self, attempt: Attempt, decision: Decision):
        return (yield)


class RaisingProperty:
    """A plugin with a property that starts raising after it was loaded (a dropped connection,
    say): the test sets ``broken``."""

    broken = False

    def __init__(self, settings: PluginSettings, context: PluginContext) -> None:
        pass

    @property
    def status(self) -> str:
        if RaisingProperty.broken:
            raise ConnectionResetError("the property's backend went away")
        return "fine"

    @hookimpl
    def gateway_startup(self) -> None:
        pass


class BadOffers:
    """``gateway_challenges`` and friends answering what they must not, by settings."""

    Settings = StepSettings  # action: "raise", "bytes", "crlf", "strings"

    def __init__(self, settings: StepSettings, context: PluginContext) -> None:
        self.action = settings.action
        self.name = context.name

    @hookimpl
    def gateway_challenges(self, attempt: Attempt):
        if self.action == "raise":
            raise RuntimeError("boom from gateway_challenges")
        return {"bytes": b"Custom realm", "crlf": "Custom realm\r\nSet-Cookie: x=1"}.get(self.action)

    @hookimpl
    def gateway_readiness(self):
        return ["ready"] if self.action == "strings" else []

    @hookimpl
    def gateway_selftests(self):
        raise RuntimeError("boom from gateway_selftests")

    @hookimpl
    def gateway_commands(self):
        raise RuntimeError("boom from gateway_commands")


class Relayed(Step):
    """A step that answers with an identity another gateway proved (as the relay step does:
    the identity's ``method`` names the connector's step, not this one)."""

    @hookimpl
    def gateway_authenticate(self, attempt: Attempt) -> Decision | None:
        CALLS.append((self.name, "gateway_authenticate"))
        user = attempt.username or "anonymous"
        return Decision.allow(Identity(subject=f"remote:{user}", username=user, method="ldap"), step=self.name)


class Vouching(Step):
    """A step whose backends vouch under names, as a relay's connectors do: a success names
    ``VOUCHING["by"]`` as its ``answered_by``, and ``gateway_answerer_revoked`` answers from
    ``VOUCHING["revoked"]``, or cannot tell (raises BackendUnavailable) while
    ``VOUCHING["unknown"]``. Other actions are :class:`Step`'s."""

    @hookimpl
    def gateway_authenticate(self, attempt: Attempt) -> Decision | None:
        if self.settings.action != "success":
            return super().gateway_authenticate(attempt)
        CALLS.append((self.name, "gateway_authenticate"))
        user = attempt.username or "anonymous"
        return Decision.allow(Identity(subject=f"{self.name}:{user}", username=user, method=self.name),
                              step=self.name, answered_by=VOUCHING["by"])

    @hookimpl
    def gateway_answerer_revoked(self, answered_by: str) -> bool | None:
        CALLS.append((self.name, "gateway_answerer_revoked"))
        if not answered_by.startswith("backend-"):
            return None
        if VOUCHING["unknown"]:
            raise BackendUnavailable("the revocations were not read yet")
        return answered_by in VOUCHING["revoked"]


#: :class:`Vouching`'s backends (tests reset it).
VOUCHING: dict = {"by": "backend-1", "revoked": set(), "unknown": False}


class Refresher:
    """Starts a thread in ``gateway_startup`` and stops it in ``gateway_shutdown`` (as a key or
    list refresher does); ``RUNNING`` names the live ones."""

    RUNNING: set[str] = set()

    def __init__(self, settings: PluginSettings, context: PluginContext) -> None:
        self.stop = threading.Event()
        self.thread_name = f"test-refresher-{id(self)}"

    @hookimpl
    def gateway_startup(self) -> None:
        Refresher.RUNNING.add(self.thread_name)
        threading.Thread(target=self._run, name=self.thread_name, daemon=True).start()

    def _run(self) -> None:
        self.stop.wait()
        Refresher.RUNNING.discard(self.thread_name)

    @hookimpl
    def gateway_shutdown(self) -> None:
        self.stop.set()


class StartupRaises:
    def __init__(self, settings: PluginSettings, context: PluginContext) -> None:
        pass

    @hookimpl
    def gateway_startup(self) -> None:
        raise RuntimeError("boom from gateway_startup")


class Misspelled:
    def __init__(self, settings: PluginSettings, context: PluginContext) -> None:
        pass

    @hookimpl
    def gateway_authenticat(self, attempt: Attempt) -> None:  # the typo under test
        return None


class Unmarked:
    def __init__(self, settings: PluginSettings, context: PluginContext) -> None:
        pass

    def gateway_authenticate(self, attempt: Attempt) -> None:  # no @hookimpl
        return None


class TryFirst:
    def __init__(self, settings: PluginSettings, context: PluginContext) -> None:
        pass

    @hookimpl(tryfirst=True)
    def gateway_authenticate(self, attempt: Attempt) -> None:
        return None


class NoAuthenticate:
    def __init__(self, settings: PluginSettings, context: PluginContext) -> None:
        pass

    @hookimpl
    def gateway_startup(self) -> None:
        pass


class HangingShutdownSettings(PluginSettings):
    hang: float = 3600.0


class HangingShutdown:
    """A ``gateway_shutdown`` that does not return (an unbind on a dead link, say)."""

    Settings = HangingShutdownSettings

    def __init__(self, settings: HangingShutdownSettings, context: PluginContext) -> None:
        self.hang = settings.hang

    @hookimpl
    def gateway_shutdown(self) -> None:
        time.sleep(self.hang)


class StartupFailsInSettings(PluginSettings):
    pid_file: str
    #: seconds its start-up takes before it fails (a backend that times out)
    delay: float = 0.0


class StartupFailsIn:
    """A ``gateway_startup`` that raises in the process whose PID ``pid_file`` holds, or in
    every process when it holds ``all`` (a backend that workers cannot reach for a moment)."""

    Settings = StartupFailsInSettings

    def __init__(self, settings: StartupFailsInSettings, context: PluginContext) -> None:
        self.pid_file = settings.pid_file
        self.delay = settings.delay

    @hookimpl
    def gateway_startup(self) -> None:
        import os

        try:
            with open(self.pid_file) as f:
                failing = f.read().strip()
        except FileNotFoundError:
            return
        if failing in (str(os.getpid()), "all"):
            with open(self.pid_file + ".started", "a") as f:  # for tests that wait for it
                f.write(f"{os.getpid()}\n")
            time.sleep(self.delay)
            raise RuntimeError("backend unreachable at start-up")
