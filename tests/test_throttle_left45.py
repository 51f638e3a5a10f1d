"""The throttle's SQLite store under a flood of new names and addresses (items left by the
reviews of the throttle).

The SQLite store (``store: sqlite``, what ``auto`` is with several workers) had no bound: every
guess admitted within the window left three rows (its user's, its pair's, its client's), so a
flood of new names and addresses grew ``throttle.sqlite3`` for as long as the window (30 days at
most), some 180 bytes a row. The file now holds ``SQLiteStore.MAX_BYTES`` at most; when full,
expired failures make room and, when there are none, the attempt is refused: no live count is
forgotten to make room, so a guesser gains nothing by the flood.

The real ``Throttle`` over a real SQLite file; only the boot clock is stood in for (to let a
window pass) and the cap made small (a flood of 256 MiB would take minutes).
"""

from __future__ import annotations

import logging
import sqlite3

import pytest

import gateway.throttle_stores as stores
from gateway.model import Outcome
from gateway.settings import ThrottleSettings
from gateway.throttle import Throttle
from gateway.throttle_stores import SQLiteStore

CLIENT = "198.51.100.7"
WINDOW = 600.0
CAP = 256 * 1024


@pytest.fixture
def boot(monkeypatch):
    """The boot clock the store dates failures by, stepped by hand: ``boot[1]`` is its seconds."""
    clock = ["boot-1", 50_000.0]
    monkeypatch.setattr(stores, "_boot_clock", lambda: tuple(clock))
    return clock


@pytest.fixture
def throttle(tmp_path, boot, monkeypatch):
    # raising=False: the store had no cap to set before this review
    monkeypatch.setattr(SQLiteStore, "MAX_BYTES", CAP, raising=False)
    settings = ThrottleSettings(store="sqlite", user_failures=3, user_client_failures=3, client_failures=30,
                                window=WINDOW)
    throttle = Throttle(settings, state_dir=tmp_path, workers=2)
    assert throttle.kind == "sqlite"
    yield throttle
    throttle.close()


def guess(throttle: Throttle, user: str, client: str) -> bool:
    """One wrong password: whether it was let through to the chain."""
    ticket = throttle.admit(user, client)
    if ticket is None:
        return False
    throttle.settle(ticket, Outcome.INVALID_CREDENTIALS)
    return True


def flood(throttle: Throttle, start: int, most: int = 6000) -> int:
    """Guesses at new names from new addresses until one is refused: how many were let through."""
    for i in range(start, start + most):
        if not guess(throttle, f"spray-{i}", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"):
            return i - start
    return most


def store_size(path) -> tuple[int, dict[str, int], int]:
    """(bytes the database holds, WAL included; rows per key; rows in all)."""
    db = sqlite3.connect(path)
    try:
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
        per_key = dict(db.execute("SELECT key, count(*) FROM failure GROUP BY key"))
    finally:
        db.close()
    return pages * page_size, per_key, sum(per_key.values())


def test_a_flood_of_new_names_fills_the_sqlite_store_to_its_cap_and_frees_no_count(tmp_path, boot, throttle,
                                                                                 caplog):
    path = tmp_path / "throttle.sqlite3"
    victim = throttle.ticket("alice", CLIENT)
    assert [guess(throttle, "alice", CLIENT) for _ in range(4)] == [True, True, True, False]

    boot[1] += 10
    with caplog.at_level(logging.WARNING, logger="authgw.throttle"):
        let_through = flood(throttle, 0)
    size, per_key, rows = store_size(path)
    assert size <= CAP, f"{let_through} guesses grew the store to {size} bytes, past its cap of {CAP}"
    assert 100 < let_through < 6000, let_through
    assert "the SQLite store" in caplog.text and "is full" in caplog.text
    # every count is whole: the victim's three, and three rows for each guess let through (a
    # refused one left none behind)
    assert per_key[victim.user] == per_key[victim.pair] == 3
    assert rows == 3 * 3 + 3 * let_through
    assert not guess(throttle, "alice", CLIENT)

    # half a window on: nothing expired, nothing is let through, nothing forgotten
    boot[1] += WINDOW / 2
    assert flood(throttle, 10_000, most=50) == 0
    assert not guess(throttle, "bob", "192.0.2.1"), "a full store let a guess through"
    assert store_size(path)[1] == per_key

    # the flood's window passes: its failures expire and make room; the cap still holds
    boot[1] += WINDOW / 2 + 11
    assert guess(throttle, "alice", CLIENT), "a store emptied by time still refused"
    assert flood(throttle, 20_000, most=200) == 200
    size, per_key, rows = store_size(path)
    assert size <= CAP and rows == 3 * 201


def test_a_full_sqlite_store_keeps_refusing_across_workers_and_reopening(tmp_path, boot, throttle):
    """A second store on the file (another worker, a reload, a restart) is capped as well, and
    refuses too: the cap is the file's, set on every connection."""
    let_through = flood(throttle, 0)
    assert let_through < 6000
    other = SQLiteStore(tmp_path / "throttle.sqlite3")
    try:
        keys = [("ufresh", 3), ("pfresh", 3), ("cfresh", 30)]
        assert not other.reserve(keys, "t-fresh", 0.0, WINDOW)
        boot[1] += WINDOW + 1
        assert other.reserve(keys, "t-later", 0.0, WINDOW)
    finally:
        other.close()
    assert store_size(tmp_path / "throttle.sqlite3")[0] <= CAP


def test_the_purge_of_expired_failures_reads_only_them(tmp_path, boot, throttle):
    """The purge (once a minute, and when the store is full) runs on the event loop: it read the
    whole file (a table scan, 0.5 s at 900,000 rows on a loaded machine), however few had expired."""
    assert guess(throttle, "alice", CLIENT)
    db = sqlite3.connect(tmp_path / "throttle.sqlite3")
    try:
        plan = " ".join(row[-1] for row in db.execute("EXPLAIN QUERY PLAN DELETE FROM failure WHERE at <= ?", (0.0,)))
    finally:
        db.close()
    assert "USING" in plan and "INDEX failure_at" in plan, plan
