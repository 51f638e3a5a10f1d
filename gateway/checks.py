"""Records plugins return from hooks: self-tests, readiness, extra listeners, HTTP routes, CLI
commands; and :func:`run_selftest`, how ``authgw check`` and the console run one self-test."""

from __future__ import annotations

import argparse
import enum
import os
import queue
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

__all__ = ["CheckResult", "CheckStatus", "Command", "ComponentState", "Listener", "Route", "SelfTest",
           "SELFTEST_TIMEOUT", "run_selftest"]

#: Seconds one self-test may take before it counts as failed (a backend that hangs).
SELFTEST_TIMEOUT = 15.0


class CheckStatus(enum.Enum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What one self-test found. ``hint`` tells the operator what to check when it did not pass."""

    status: CheckStatus
    detail: str
    hint: str = ""

    @classmethod
    def ok(cls, detail: str) -> CheckResult:
        return cls(CheckStatus.PASS, detail)

    @classmethod
    def warn(cls, detail: str, hint: str = "") -> CheckResult:
        return cls(CheckStatus.WARN, detail, hint)

    @classmethod
    def fail(cls, detail: str, hint: str = "") -> CheckResult:
        return cls(CheckStatus.FAIL, detail, hint)


@dataclass(frozen=True, slots=True)
class SelfTest:
    """A named connectivity or configuration test a plugin offers.

    ``run`` is blocking and is called from a worker thread; it should finish within a few seconds
    and return a :class:`CheckResult` (an exception it raises counts as a failure). Names are
    dotted and start with the plugin's name, e.g. ``ldap.tcp[dc1.example.com:636]``.
    """

    name: str
    run: Callable[[], CheckResult]
    #: Tests that come later in the same plugin are skipped when this one fails.
    prerequisite: bool = False


#: Tests that gave no answer within their time, by name, with the thread still running them and
#: the event their end sets: not started again while it runs, so that a backend that hangs costs
#: one thread per test, not one per run.
_hung: dict[str, tuple[threading.Thread, threading.Event]] = {}
#: Runner threads waiting for a test, the most recent last (guarded by ``_hung_lock``).
_idle: list[_Runner] = []
#: The most runner threads kept waiting: one per caller running tests at the same moment.
MAX_IDLE_RUNNERS = 2
_hung_lock = threading.Lock()
_HANG_HINT = "a backend hangs or a timeout is too long"


class _Runner(threading.Thread):
    """A daemon thread that runs self-tests one after another, and is used again for the next
    test once one has ended (:data:`_idle`). A test that hangs keeps its runner; the next test
    gets another. A thread per test instead cost what a plugin keeps per thread, for as long as
    the plugin lives: the offline cache's SQLite store keeps a connection (three descriptors) per
    thread until it is closed, and the link client runs the self-tests of the serving gateway at
    each request of the relay, one more connection each time (review of this stop's diff)."""

    def __init__(self) -> None:
        super().__init__(name="authgw-selftest", daemon=True)
        self._jobs: queue.SimpleQueue[tuple[SelfTest, dict[str, Any], threading.Event]] = queue.SimpleQueue()

    def submit(self, test: SelfTest, box: dict[str, Any], done: threading.Event) -> None:
        self._jobs.put((test, box, done))

    def run(self) -> None:
        while True:
            test, box, done = self._jobs.get()
            self.name = f"authgw-selftest {test.name}"[:60]
            _run_into(test, box)
            self.name = "authgw-selftest"
            with _hung_lock:  # idle before the caller is told: its next test finds this thread
                keep = len(_idle) < MAX_IDLE_RUNNERS
                if keep:
                    _idle.append(self)
            done.set()
            if not keep:
                return


def _runner() -> _Runner:
    """An idle runner, or a new one (the caller holds ``_hung_lock``)."""
    while _idle:
        runner = _idle.pop()
        if runner.is_alive():  # not one of a parent process (threads do not survive a fork)
            return runner
    runner = _Runner()
    runner.start()
    return runner


def _after_fork() -> None:
    global _hung_lock
    _hung_lock = threading.Lock()
    _idle.clear()
    _hung.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def run_selftest(test: SelfTest) -> CheckResult:
    """*test*'s result; a failure after :data:`SELFTEST_TIMEOUT` when it hangs, a failure naming
    what it raised or returned when that is no :class:`CheckResult`.

    Each test runs on a daemon runner thread (:class:`_Runner`) that no hung test holds. On a
    shared one-thread pool, a test that hung held the pool: every test after it failed "no
    answer" without having run, and ``authgw check`` never ended, waiting for the pool's thread
    at exit (review of the configuration and the command line). A test whose last run still
    hangs is not started again."""
    box: dict[str, Any] = {}
    done = threading.Event()
    with _hung_lock:
        earlier = _hung.get(test.name)
        if earlier is not None and earlier[0].is_alive() and not earlier[1].is_set():
            return CheckResult.fail("its last run has not ended yet (no answer)", _HANG_HINT)
        _hung.pop(test.name, None)
        runner = _runner()
    runner.submit(test, box, done)
    if not done.wait(SELFTEST_TIMEOUT):
        with _hung_lock:
            _hung[test.name] = (runner, done)
        return CheckResult.fail(f"no answer within {SELFTEST_TIMEOUT:.0f}s", _HANG_HINT)
    if "error" in box:
        exc = box["error"]
        return CheckResult.fail(f"the test raised {exc.__class__.__name__}: {exc}")
    result = box.get("result")
    if not isinstance(result, CheckResult):  # `authgw check` ended in an AttributeError on None
        return CheckResult.fail(f"the test returned {type(result).__name__}, not a CheckResult")
    return result


def _run_into(test: SelfTest, box: dict[str, Any]) -> None:
    try:
        box["result"] = test.run()
    except BaseException as exc:  # noqa: BLE001 - even SystemExit: a failed test, not the caller's exit
        box["error"] = exc


@dataclass(frozen=True, slots=True)
class ComponentState:
    """One backend component's health as ``/readyz`` and ``authgw check`` show it."""

    name: str
    ready: bool
    detail: str = ""
    #: This component can answer password logins for the chain's steps when none of them can
    #: (an offline credential cache): while it is ready, steps being down leave ``/readyz`` true.
    fallback: bool = False
    #: The step cannot answer while this component is down, whatever its other components say
    #: (one revocation source under ``hard-fail``); without it, one ready component is enough
    #: (one directory server of several).
    required: bool = False
    #: When a certificate this component depends on ends (Unix time), for the console's expiry
    #: warning; None when it has none.
    valid_until: float | None = None


@dataclass(frozen=True, slots=True)
class Listener:
    """An extra listening socket a plugin needs, served by the same front doors.

    The main use is a TLS listener that asks for client certificates: TLS requests a certificate
    per connection, not per path, so certificate logins get a listener of their own.

    A listener with ``own_routes`` serves only the :class:`Route` records that name it (a
    localhost console, a relay's mutual-TLS link endpoint), not the front doors.

    :ivar name: unique, e.g. ``client_cert.tls``.
    :ivar address: ``HOST:PORT`` (IPv6 as ``[::1]:PORT``).
    :ivar ssl_context: builds the server-side :class:`ssl.SSLContext`; called in every worker.
        ``None`` (or a callable returning ``None``) serves plain HTTP.
    :ivar own_routes: serve only the routes that name this listener.
    """

    name: str
    address: str
    ssl_context: Callable[[], ssl.SSLContext | None] | None
    own_routes: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    """An HTTP route a plugin adds (``gateway_http_routes``): a login page, a metadata document,
    a WebSocket endpoint.

    :ivar method: ``GET``, ``POST``, ... or ``*``.
    :ivar path: an aiohttp route path, e.g. ``/saml/sso`` or ``/p/{token}``.
    :ivar handler: ``async def handler(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse``.
    :ivar listener: ``None`` to serve it with the front doors (the ``listen:`` sockets and every
        extra listener without ``own_routes``), or the name of one extra listener to serve it
        there only.
    """

    method: str
    path: str
    handler: Callable[[Any], Awaitable[Any]]
    listener: str | None = None


@dataclass(frozen=True, slots=True)
class Command:
    """An ``authgw NAME ...`` sub-command a plugin adds (for example ``authgw cache list``).

    :ivar add_arguments: called with the sub-command's :class:`argparse.ArgumentParser`.
    :ivar run: called with the parsed arguments once the plugin is built (not started: call
        what you need yourself); returns the exit code.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
