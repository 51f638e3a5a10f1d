"""gateway.checks.run_selftest, the one way ``authgw check`` and the console's configuration log
run a self-test: its result, a failure naming what it raised, a failure when it hangs."""

from __future__ import annotations

import threading

import gateway.checks
from gateway.checks import CheckResult, CheckStatus, SelfTest, run_selftest


def _raise() -> CheckResult:
    raise OSError("connection refused")


def test_a_result_an_exception_and_a_hang(monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(gateway.checks, "SELFTEST_TIMEOUT", 1.0)  # read at each call
    assert run_selftest(SelfTest("t.ok", lambda: CheckResult.ok("fine"))) == CheckResult.ok("fine")
    raised = run_selftest(SelfTest("t.raises", _raise))
    assert (raised.status, raised.detail) == (CheckStatus.FAIL, "the test raised OSError: connection refused")
    try:
        hung = run_selftest(SelfTest("t.hangs", lambda: CheckResult.ok("late") if release.wait(30) else None))
    finally:
        release.set()  # the runner's thread ends; the result it brings is not used
    assert hung == CheckResult.fail("no answer within 1s", "a backend hangs or a timeout is too long")
