"""The SQLite throttle store's routine checkpoint and ``authgw check``'s hint (items left by the
last stop's review of the throttle).

* SQLite checkpoints the WAL itself at a commit once it passes 1,000 pages (some 4 MiB), and the
  store's reservations commit on the event loop: under a flood of new names each such commit
  copied 4 MiB into the file on the loop (5-19 ms, every request of the worker stalled). The
  loop's connection now makes no checkpoint (``wal_autocheckpoint`` 0); its commit that takes the
  WAL past that size starts one on a thread, and the WAL is still brought back under it.
* ``authgw check`` told the operator of a SQLite store whose WAL a reader held past its bound to
  "start Redis or check throttle.redis", and that logins would get 503 (they get 429). It now
  names the file, the reader, and that attempts are refused until it lets go.

Real SQLite files and readers, a real two-worker ``authgw serve``, a real ``authgw check``.
"""

from __future__ import annotations

import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor

from support.gateway import authgw, static_users, write_conf
from support.net import wait_for
from test_stop46_throttle_ready import (MAX_WAL, Reader, ballast, on_the_loop, readyz,  # noqa: F401 - fixture
                                        sqlite_throttle, wal_size)

from gateway.settings import ThrottleSettings
from gateway.throttle import Throttle
from gateway.throttle_stores import SQLiteStore

#: The size SQLite would have checkpointed the WAL at, and what a reset WAL is cut back to.
KEPT = SQLiteStore._WAL_KEPT_BYTES
FLOOD_CAP = 5000  # a flood goes no further than this, whatever happens


def spray_address(i: int) -> str:
    return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


def failures(path) -> int:
    db = sqlite3.connect(path, timeout=10)
    try:
        return db.execute("SELECT count(*) FROM failure WHERE key != 'test-probe'").fetchone()[0]
    finally:
        db.close()


def checkpointed_back(path) -> bool:
    """Whether the WAL is back under :data:`KEPT`: a write of the test's own, which makes no
    checkpoint, resets a WAL that was checkpointed whole and cuts the file back to that size (as
    the store's writes do: ``journal_size_limit`` is per connection)."""
    db = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        db.execute("PRAGMA wal_autocheckpoint = 0")
        db.execute(f"PRAGMA journal_size_limit = {KEPT}")
        db.execute("INSERT INTO failure (key, at, ticket) VALUES ('test-probe', 0, 'test')")
    finally:
        db.close()
    return wal_size(path) <= KEPT


# -- the routine checkpoint, off the event loop -------------------------------------------------------

def test_the_event_loop_s_connection_makes_no_checkpoint_at_a_commit(tmp_path, sqlite_throttle):
    assert on_the_loop(lambda: sqlite_throttle.admit("alice", "198.51.100.7")) is not None
    assert sqlite_throttle.admit("bob", "198.51.100.7") is not None  # off the loop: the threads' connection
    connections = sqlite_throttle.store._conns
    assert connections[True].execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    # the threads' connection keeps SQLite's own: it is what makes one that did not complete again
    assert connections[False].execute("PRAGMA wal_autocheckpoint").fetchone() == (1000,)


def test_a_flood_on_the_loop_has_the_wal_checkpointed_back_under_its_size_on_a_thread(tmp_path, sqlite_throttle):
    path = tmp_path / "throttle.sqlite3"

    def flood() -> int:  # on the loop, until a commit takes the WAL past the size
        i = 0
        while wal_size(path) <= KEPT and i < FLOOD_CAP:
            assert sqlite_throttle.admit(f"spray-{i}", spray_address(i)) is not None
            i += 1
        return i

    guesses = on_the_loop(flood)
    # Before, SQLite's checkpoint at the loop's commit kept it under the size (on the loop).
    assert wal_size(path) > KEPT, f"{guesses} guesses on the loop left the WAL at {wal_size(path)} bytes"
    # No call of the store since: the checkpoint that commit started brings the WAL back. (A
    # write of the test's own during it would be left for the store's next commit to checkpoint.)
    checkpoint = sqlite_throttle.store._checkpointing
    wait_for(lambda: not checkpoint.locked(), timeout=20, what="the store's checkpoint thread done")
    assert checkpointed_back(path), f"the WAL is still {wal_size(path)} bytes"
    assert failures(path) == 3 * guesses  # user, pair and client: nothing forgotten


def test_a_two_worker_gateway_keeps_the_wal_under_its_size_through_a_flood(tmp_path, demo_hash, start_gateway):
    directory = write_conf(tmp_path / "c", {
        "gateway.yaml": json.dumps({"chain": ["static"], "trusted_proxies": ["127.0.0.1/32"],
                                    "failure_timing": {"enabled": False},
                                    "throttle": {"store": "sqlite", "window": 600}}),
        **static_users({"alice": demo_hash})})
    gw = start_gateway(directory, workers=2)
    path = gw.state_dir / "throttle.sqlite3"

    def spray(i: int) -> int:
        return gw.auth(f"spray-{i}", "guess", {"X-Forwarded-For": spray_address(i)}).status

    statuses: list[int] = []
    with ThreadPoolExecutor(8) as pool:  # both workers' loops commit, past the size more than once
        while len(statuses) < 1500:
            statuses += pool.map(spray, range(len(statuses), len(statuses) + 50))
    assert set(statuses) == {401}, sorted(set(statuses))
    assert failures(path) == 3 * len(statuses)  # nothing forgotten
    more = iter(range(len(statuses), len(statuses) + 100))

    def checkpointed() -> bool:  # a guess more resets a WAL checkpointed whole, and cuts it back
        return spray(next(more)) == 401 and wal_size(path) <= KEPT

    wait_for(checkpointed, timeout=30, what="the WAL checkpointed back under 4 MiB", log=gw.output)
    assert readyz(gw)[0] == 200
    assert gw.auth("alice", "demo-password").status == 200


# -- authgw check's hint for a SQLite store -----------------------------------------------------------

def test_authgw_check_names_the_sqlite_file_and_its_reader_when_the_wal_is_full(tmp_path, demo_hash):
    conf = write_conf(tmp_path / "c", {
        "gateway.yaml": json.dumps({"chain": ["static"], "throttle": {"store": "sqlite", "window": 600}}),
        **static_users({"alice": demo_hash})})
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = state / "throttle.sqlite3"

    def check():
        """``authgw check``: its result, the throttle store's line and the line after it."""
        result = authgw("check", "--config", str(conf), "--state-dir", str(state))
        lines = [*result.stdout.splitlines(), ""]
        at = next((i for i, text in enumerate(lines) if "gateway.throttle_store" in text), len(lines) - 1)
        return result, lines[at], lines[min(at + 1, len(lines) - 1)]

    result, line, _ = check()  # the file made by the check itself
    assert line.startswith("PASS") and str(path) in line, result.stdout + result.stderr

    store = Throttle(ThrottleSettings(store="sqlite"), state_dir=state, workers=2)
    store.admit("alice", "198.51.100.7")
    store.close()
    reader = Reader(path)  # a backup, a sqlite3 shell inside a transaction
    try:
        ballast(path, MAX_WAL + 2 * 1024 * 1024)
        result, line, hint = check()
        assert result.returncode == 1, result.stdout + result.stderr
        assert line.startswith("FAIL") and "429" in line and "503" not in line, result.stdout
        assert hint.strip().startswith("hint:") and "Redis" not in hint, result.stdout
        assert f"{path}-wal" in hint and "reader" in hint and "sqlite3 shell" in hint and "backup" in hint, hint
        assert "refused until it lets go" in hint, hint
    finally:
        reader.release()
    result, line, _ = check()  # the reader let go: the probe checkpoints the WAL itself
    assert line.startswith("PASS"), result.stdout + result.stderr
    assert wal_size(path) <= MAX_WAL
