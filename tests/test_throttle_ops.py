"""Throttling as operators run it, through real ``authgw serve`` processes (and a real
redis-server): the store chosen for the workers actually run (``--workers``), counts kept over a
reload, a frozen Redis store answered within the deadline and logged once, and ``authgw check``
failing while the store is down. Review findings 1, 2, 3 and 10 (/tmp/review-ops/report.md)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from support.gateway import GatewayProcess, authgw, static_users, write_conf
from support.net import free_port, wait_for
from support.proc import children
from support.redis import RedisServer

USERS = ("alice", "bob", "carol", "dave")


def conf(path: Path, demo_hash: str, **core) -> Path:
    settings = {"chain": ["static"], "health": {"probe_interval": 3600}, **core}
    return write_conf(path, {"gateway.yaml": json.dumps(settings),
                             **static_users({name: demo_hash for name in USERS})})


def guesses(gw: GatewayProcess, user: str, count: int) -> list[int]:
    return [gw.auth(user, f"wrong-{user}-{i}").status for i in range(count)]


def reloaded(gw: GatewayProcess, times: int, workers: int = 1) -> None:
    """SIGHUP the gateway (its master) and wait until every worker says it reloaded, *times*
    reloads in all."""
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: gw.output().count(" reloaded ") >= times * workers, 30, what=f"reload {times}", log=gw.output)


def test_the_workers_flag_decides_the_store_for_start_reloads_and_replacements(tmp_path, demo_hash, start_gateway):
    # conf.d says nothing of workers (1); `--workers 3` runs three. `auto` must be sqlite for all
    # of them, or each worker counts on its own and the budget is three times the limit.
    gw = start_gateway(conf(tmp_path / "c", demo_hash), workers=3)
    statuses = guesses(gw, "alice", 30)
    assert statuses.count(401) == 3 and statuses.count(429) == 27, statuses
    assert (gw.state_dir / "throttle.sqlite3").exists()

    reloaded(gw, 1, workers=3)  # each worker builds the new configuration for 3 workers too
    statuses = guesses(gw, "bob", 30)
    assert statuses.count(401) == 3, ("after a reload", statuses)

    master = gw.proc.pid
    before = children(master)
    os.kill(before[0], signal.SIGKILL)  # a worker of our gateway: its master starts a replacement
    wait_for(lambda: len(set(children(master)) - set(before)) == 1 and len(children(master)) == 3, 30,
             what="a replacement worker", log=gw.output)
    wait_for(lambda: gw.output().count("authgw worker") >= 4, 30, what="the replacement serving", log=gw.output)
    statuses = guesses(gw, "carol", 45)
    assert statuses.count(401) == 3, ("with a replacement worker", statuses)


def test_a_reload_keeps_the_counts_of_the_memory_store(tmp_path, demo_hash, start_gateway):
    gw = start_gateway(conf(tmp_path / "c", demo_hash))  # one worker: `auto` is memory
    seen = []
    for round_ in range(1, 4):
        seen += guesses(gw, "alice", 5)
        reloaded(gw, round_)
    assert seen.count(401) == 3, seen  # user_client_failures: 3, however many reloads
    assert guesses(gw, "alice", 2) == [429, 429]
    assert gw.auth("alice", "demo-password").status == 429, "throttled still, right password or not"
    assert gw.auth("bob", "demo-password").status == 200

    # A change of store cannot carry the counts: the log says so.
    (gw.conf_dir / "gateway.yaml").write_text(json.dumps({"chain": ["static"], "health": {"probe_interval": 3600},
                                                          "throttle": {"store": "sqlite"}}))
    reloaded(gw, 4)
    assert "password-guess counts start afresh" in gw.output()
    assert guesses(gw, "alice", 4).count(401) == 3


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        if server.running:
            os.kill(server.pid, signal.SIGCONT)
        server.stop()


def test_a_frozen_redis_store_is_answered_within_the_deadline_and_logged_once(tmp_path, demo_hash, redis,
                                                                             start_gateway):
    deadline = 2.0
    gw = start_gateway(conf(tmp_path / "c", demo_hash, deadline=deadline,
                            throttle={"store": "redis", "redis": {"url": redis.url, "timeout": 0.5}}))
    assert gw.auth("alice", "demo-password").status == 200
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def attempt(i: int) -> None:
        started = time.monotonic()
        try:
            status = gw.auth(USERS[i % 3], "demo-password", timeout=60).status
        except OSError as exc:
            status = repr(exc)
        with lock:
            results.append((status, time.monotonic() - started))

    os.kill(redis.pid, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(200)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
    finally:
        os.kill(redis.pid, signal.SIGCONT)
    assert len(results) == 200
    assert {status for status, _took in results} == {503}, sorted({str(s) for s, _ in results})
    slowest = max(took for _status, took in results)
    assert slowest < deadline + 2, f"the slowest 503 took {slowest:.1f}s; the deadline is {deadline}s"
    errors = [line for line in gw.output().splitlines() if "ERROR" in line and "throttle store" in line]
    assert 1 <= len(errors) <= 3, f"{len(errors)} ERROR lines for one outage:\n" + "\n".join(errors[:5])
    # The store answers again: logins go on, and the end of the outage is logged.
    wait_for(lambda: gw.auth("dave", "demo-password").status == 200, 15, what="a login after the outage",
             log=gw.output)
    assert "throttle store answers again" in gw.output()


def test_a_redis_timeout_not_below_the_deadline_is_refused(tmp_path, demo_hash):
    directory = conf(tmp_path / "c", demo_hash, deadline=2,
                     throttle={"store": "redis", "redis": {"url": "redis://127.0.0.1:6379/0", "timeout": 3}})
    result = authgw("config", "check", "--config", str(directory), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2, result
    assert "throttle.redis.timeout" in result.stderr and "deadline" in result.stderr, result.stderr


def test_check_fails_while_the_redis_throttle_store_is_down(tmp_path, demo_hash, redis):
    def check(url: str):
        directory = conf(tmp_path / f"c{url.rsplit(':', 1)[1].split('/')[0]}", demo_hash,
                         throttle={"store": "redis", "redis": {"url": url}})
        return authgw("check", "--config", str(directory), "--state-dir", str(tmp_path / "state"))

    down = check(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    assert down.returncode == 1, down.stdout + down.stderr  # every password login would get 503
    assert "FAIL  gateway.throttle_store" in down.stdout and "1 failed" in down.stdout, down.stdout
    up = check(redis.url)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "PASS  gateway.throttle_store" in up.stdout


def test_a_burst_of_logins_is_not_taken_for_a_store_outage(tmp_path, demo_hash, redis, start_gateway):
    """Every password attempt asks the store; a page of assets behind Basic auth is many at
    once. With one thread for the store, 40 logins at once used to find its queue (4 x threads)
    full: 503 ``throttle_unavailable``, an ERROR saying the store was down, and /readyz not
    ready, while Redis was fine (review of the day's changes)."""
    users = [f"user{i}" for i in range(40)]
    directory = write_conf(tmp_path / "c", {
        "gateway.yaml": json.dumps({"chain": ["static"], "threads": 1, "health": {"probe_interval": 3600},
                                    "limits": {"queue": 100, "queue_wait": 60}, "deadline": 30,
                                    "throttle": {"store": "redis", "redis": {"url": redis.url},
                                                 "client_failures": 1000}}),
        **static_users({name: demo_hash for name in users})})
    gw = start_gateway(directory)
    results: list[int | str] = []
    lock = threading.Lock()
    ready = threading.Barrier(len(users))

    def attempt(user: str) -> None:
        ready.wait(timeout=30)
        try:
            status = gw.auth(user, "demo-password", timeout=60).status
        except OSError as exc:
            status = repr(exc)
        with lock:
            results.append(status)

    threads = [threading.Thread(target=attempt, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    output = gw.output()
    assert "throttle store unavailable" not in output and "throttle_unavailable" not in output, output[-2000:]
    assert sorted(set(map(str, results))) == ["200"], results


def test_a_sqlite_store_that_cannot_be_opened_is_unavailable_not_an_error(tmp_path, demo_hash, start_gateway):
    """The store's file could not be created (the state directory gone, no file descriptor left
    in a worker started during a flood): the OSError escaped as a bare 500, with no audit line and
    no outage logged. It is the store unavailable: 503 ``throttle_unavailable``, audited, and the
    next attempt once the file can be opened goes on."""
    # The file cannot be made: a directory holds its name. (The health round opens the store at
    # start since the state directory review, so a state directory moved away after start no
    # longer keeps it from opening.)
    state = tmp_path / "state0"  # start_gateway's for its first gateway
    blocker = state / "throttle.sqlite3"
    blocker.mkdir(parents=True, mode=0o700)
    state.chmod(0o700)
    gw = start_gateway(conf(tmp_path / "c", demo_hash, throttle={"store": "sqlite"}))
    assert gw.state_dir == state
    answer = gw.auth("alice", "demo-password")
    assert answer.status == 503, (answer.status, answer.body)
    lines = wait_for(gw.audit, 10, interval=0.05, what="an audit line", log=gw.output)
    assert [(line["outcome"], line["reason"]) for line in lines] == [("unavailable", "throttle_unavailable")]
    assert "throttle store" in gw.output() and "Traceback" not in gw.output()
    assert gw.get("/readyz").status == 503  # and readiness says so (it said ready before)
    blocker.rmdir()
    assert gw.auth("alice", "demo-password").status == 200
    assert (state / "throttle.sqlite3").is_file()


def test_a_lock_held_on_the_sqlite_store_is_waited_for_off_the_loop(tmp_path, demo_hash, start_gateway):
    """Review of reliability: a write lock held on throttle.sqlite3 (an operator's sqlite3 shell
    mid-transaction, a backup tool, a sibling stopped inside a transaction) made each password
    attempt wait for it on the event loop (5 s, then 0.5 s): /healthz and every other request of
    the worker waited behind them, one attempt at a time. An attempt that finds the lock held now
    waits for it on a thread: the loop goes on serving, and the attempts are answered once the
    lock is let go; one held past the attempt's deadline is an outage (503, fail closed)."""
    import concurrent.futures
    import sqlite3

    def in_flight() -> float | None:
        for line in gw.get("/metrics").body.decode().splitlines():
            if line.startswith("authgw_attempts_in_flight "):
                return float(line.rsplit(" ", 1)[1])
        return None

    gw = start_gateway(conf(tmp_path / "c", demo_hash, throttle={"store": "sqlite"}))
    assert gw.auth("alice", "demo-password").status == 200  # the store exists, in WAL
    holder = sqlite3.connect(gw.state_dir / "throttle.sqlite3", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            logins = [pool.submit(gw.auth, "alice", "demo-password", timeout=60) for _ in range(3)]
            # The loop answers /metrics while the three wait for the lock together (on the loop
            # they waited one after another, and none of them could be answered before the lock
            # is let go: they are still waiting here).
            wait_for(lambda: in_flight() == 3, 30, interval=0.05, what="three attempts waiting at once")
            assert gw.get("/healthz").status == 200
            # Those still waiting are answered once the lock is let go; one whose wait ran out
            # first (5 s: a very slow machine) is an outage, as below.
            waiting = [login for login in logins if not login.done()]
            holder.execute("ROLLBACK")
            assert [login.result().status for login in waiting] == [200] * len(waiting)
            assert {login.result().status for login in logins if login not in waiting} <= {503}
        holder.execute("BEGIN IMMEDIATE")  # held past the attempt's deadline (5 s): an outage
        assert gw.auth("alice", "demo-password", timeout=60).status == 503
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()
    assert gw.auth("alice", "demo-password").status == 200
    reasons = {line["reason"] for line in gw.audit() if line["outcome"] == "unavailable"}
    assert reasons == {"throttle_unavailable"}, reasons


def test_a_link_planted_for_the_sqlite_store_is_not_followed(tmp_path, demo_hash, start_gateway):
    """SQLite opens the store, and the ``-wal`` and ``-shm`` files beside it, by name, and
    follows links: one planted in the state directory had the failure counts written into the
    file it named (here another file of the gateway's user). It is refused, named in the log,
    and the store is unavailable (fail closed) until the link is gone (review of the state
    directory, left from the last stop)."""
    state = tmp_path / "state0"  # start_gateway's for its first gateway
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"")  # empty: SQLite would take it for a new database and write one there
    (state / "throttle.sqlite3").symlink_to(victim)
    gw = start_gateway(conf(tmp_path / "c", demo_hash, throttle={"store": "sqlite"}))
    answer = gw.auth("alice", "wrong")
    assert answer.status == 503, (answer.status, answer.body)
    assert f"{state / 'throttle.sqlite3'} is a symbolic link" in gw.output(), gw.output()[-3000:]
    assert victim.read_bytes() == b""
    assert gw.get("/readyz").status == 503

    (state / "throttle.sqlite3").unlink()  # the -wal and -shm files: test_sqlitedb.py
    assert gw.auth("alice", "wrong").status == 401  # counted in a file of its own
    assert gw.auth("alice", "demo-password").status == 200
    assert (state / "throttle.sqlite3").is_file() and not (state / "throttle.sqlite3").is_symlink()
    assert victim.read_bytes() == b""


def test_the_sqlite_store_never_waits_for_a_lock_on_an_event_loop(tmp_path):
    """The store's own side of the test above: on an event loop's thread a held lock is
    StoreLocked at once, with nothing written (the call is made again off the loop); on another
    thread the call waits for the lock, and is made once it is let go."""
    import asyncio
    import sqlite3

    from gateway.throttle_stores import SQLiteStore, StoreLocked

    store = SQLiteStore(tmp_path / "throttle.sqlite3")
    assert store.reserve([("u:k", 5)], "t1", time.time(), 60)
    holder = sqlite3.connect(tmp_path / "throttle.sqlite3", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")

    async def on_a_loop() -> bool:
        return store.reserve([("u:k", 5)], "t2", time.time(), 60)

    try:
        with pytest.raises(StoreLocked):
            asyncio.run(on_a_loop())
        threading.Timer(0.2, holder.execute, ("ROLLBACK",)).start()  # within BUSY_TIMEOUT (5 s)
        assert store.reserve([("u:k", 5)], "t3", time.time(), 60)  # off a loop: waits, then made
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
    tickets = [row[0] for row in holder.execute("SELECT ticket FROM failure ORDER BY ticket")]
    assert tickets == ["t1", "t3"]
    assert asyncio.run(on_a_loop())  # the lock free: on the loop at once
    holder.close()
    store.close()
