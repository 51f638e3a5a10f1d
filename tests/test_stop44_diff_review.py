"""Review of this stop's diff (fc92ae5..HEAD): what its changes broke, each pinned here.

- ``run_selftest`` started a thread per test (a hung one held the one-thread pool). A plugin that
  keeps something per thread kept one more each run: the offline cache's SQLite store a
  connection (three descriptors) until it is closed, and the link client runs the serving
  gateway's self-tests at each request of the relay. A runner thread is used again now.
- The static users file's reload no longer holds other logins; they went on with the users as
  they were while the reload made the dummy hash of a new parameter set (seconds): a user the
  edit removed kept logging in meanwhile. The new users apply as soon as they are read.
"""

from __future__ import annotations

import base64
import threading
import time

import pytest
from support.gateway import replace_file, users_yaml, write_conf
from support.net import wait_for

import gateway.checks
from gateway.checks import CheckResult, CheckStatus, SelfTest, run_selftest
from gateway.plugins.cache.store import SQLiteStore


@pytest.fixture
def store(tmp_path):
    store = SQLiteStore(tmp_path / "cache" / "offline.sqlite3")
    yield store
    store.close()


def test_self_test_runs_keep_one_connection_of_a_per_thread_store(store):
    """The cache plugin's ``cache.store`` test is ``store.probe()``, on the serving gateway's
    store when the link client runs it: ten runs, one connection, as on the one-thread pool."""
    threads = set()

    def probe() -> CheckResult:
        threads.add(threading.get_ident())
        return CheckResult.ok(store.probe())

    for _ in range(10):
        assert run_selftest(SelfTest("cache.store", probe)).status is CheckStatus.PASS
    assert len(threads) == 1
    assert len(store._connections) == 1


def test_a_hung_test_holds_no_other_and_is_not_started_again(monkeypatch):
    monkeypatch.setattr(gateway.checks, "SELFTEST_TIMEOUT", 0.5)
    release = threading.Event()
    ended = threading.Event()
    starts = []

    def hangs() -> CheckResult:
        starts.append(threading.get_ident())
        try:
            release.wait(30)
            return CheckResult.ok("late")
        finally:
            ended.set()

    try:
        hung = run_selftest(SelfTest("t.hangs", hangs))
        assert (hung.status, hung.detail) == (CheckStatus.FAIL, "no answer within 0s")
        other = threading.get_ident
        ran = run_selftest(SelfTest("t.other", lambda: CheckResult.ok(str(other()))))
        assert ran == CheckResult.ok(ran.detail) and int(ran.detail) != starts[0]  # another thread
        again = run_selftest(SelfTest("t.hangs", hangs))
        assert again.detail == "its last run has not ended yet (no answer)"
        assert len(starts) == 1
    finally:
        release.set()
    assert ended.wait(10)
    for _ in range(100):  # the runner marks its run ended just after the test returns
        result = run_selftest(SelfTest("t.hangs", hangs))
        if result.detail != "its last run has not ended yet (no answer)":
            break
        time.sleep(0.02)
    assert result == CheckResult.ok("late") and len(starts) == 2


def test_a_test_raising_system_exit_is_a_failure_and_its_runner_goes_on():
    def exits() -> CheckResult:
        raise SystemExit(3)

    failed = run_selftest(SelfTest("t.exits", exits))
    assert (failed.status, failed.detail) == (CheckStatus.FAIL, "the test raised SystemExit: 3")
    assert run_selftest(SelfTest("t.after", lambda: CheckResult.ok("fine"))) == CheckResult.ok("fine")


# -- the static users file's reload -------------------------------------------------------------

_SALT = base64.b64encode(b"s" * 16).decode().rstrip("=")
_TAG = base64.b64encode(b"t" * 32).decode().rstrip("=")



def test_a_user_an_edit_removed_logs_in_no_more_while_the_reload_makes_its_dummy(conf_dir, start_gateway,
                                                                                  demo_hash):
    """The edit removes bob and adds erin, whose parameters cost about a hundred logins' hashing
    for the new dummy. A login of bob's while that dummy is made (the edit read, the reload not
    ended) was answered from the users as they were: 200."""
    write_conf(conf_dir, {
        "gateway.yaml": "chain: [static]\nthrottle: {enabled: false}\ndeadline: 120\n",
        "static.yaml": "static:\n  users_file: users/u.yaml\n  reload_interval: 0.05\n",
        "users/u.yaml": users_yaml({"alice": demo_hash, "bob": demo_hash}),
    })
    gateway = start_gateway(conf_dir)
    assert gateway.auth("bob", "demo-password").status == 200
    erin = f"$argon2id$v=19$m=19456,t=200,p=1${_SALT}${_TAG}"
    replace_file(conf_dir / "users" / "u.yaml", users_yaml({"alice": demo_hash, "erin": erin}))
    time.sleep(0.2)  # past reload_interval: the next login checks the file
    reloader = threading.Thread(target=lambda: gateway.auth("nobody", "anything-at-all", timeout=120))
    reloader.start()
    try:
        wait_for(lambda: "different argon2 parameters" in gateway.output(), 30, interval=0.02,
                 what="the edit to be read", log=gateway.output)
        time.sleep(0.2)
        status = gateway.auth("bob", "demo-password", timeout=120).status
        reloading = "reloaded: 2 users" not in gateway.output()
        assert gateway.auth("alice", "demo-password", timeout=120).status == 200
    finally:
        reloader.join(130)
    assert reloading, "the reload ended before bob's login: nothing was shown"
    assert status == 401
    wait_for(lambda: "reloaded: 2 users" in gateway.output(), 60, interval=0.1, what="the reload", log=gateway.output)
    assert gateway.auth("bob", "demo-password").status == 401
