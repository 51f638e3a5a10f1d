"""Workers opening one new SQLite store at the same moment (gateway/sqlitedb.py).

Found by a full CI run: two workers of `authgw serve --workers 2` created the login sessions'
file together, one got ``database is locked`` from ``PRAGMA journal_mode=WAL`` (SQLite answers
that at once, without its busy timeout, when two connections switch a file together), and the
gateway stopped. Measured here with plain ``sqlite3`` before the fix: 7 failures in 120 opens.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys

import pytest

from gateway.sqlitedb import connect_wal

PROCESSES = 6
ROUNDS = 15


def _open(path: str, barrier, results) -> None:
    barrier.wait(10)
    try:
        conn = connect_wal(path, timeout=5.0)
        conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
        results.put(conn.execute("PRAGMA journal_mode").fetchone()[0])
    except Exception as exc:  # reported to the test, which shows it
        results.put(repr(exc))


def test_processes_opening_a_new_file_together_all_get_it_in_wal_mode(tmp_path):
    context = multiprocessing.get_context("fork")
    seen: list[str] = []
    for round_ in range(ROUNDS):  # bounded: 90 opens, each on a fresh file
        barrier, results = context.Barrier(PROCESSES), context.Queue()
        path = str(tmp_path / f"store-{round_}.sqlite3")
        processes = [context.Process(target=_open, args=(path, barrier, results)) for _ in range(PROCESSES)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(30)
        seen += [results.get(timeout=10) for _ in processes]
    assert seen == ["wal"] * (PROCESSES * ROUNDS), [s for s in seen if s != "wal"][:3]


def test_a_file_already_in_wal_mode_is_not_switched_again(tmp_path):
    path = tmp_path / "store.sqlite3"
    first = connect_wal(path)
    first.execute("BEGIN IMMEDIATE")  # another worker holds a write lock for a moment
    try:
        second = connect_wal(path, timeout=0.2)  # no exclusive lock needed: it is WAL already
        assert second.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        first.execute("ROLLBACK")


def test_an_error_other_than_locked_is_raised_at_once(tmp_path):
    (tmp_path / "not-a-db").write_bytes(b"this is not a SQLite file" * 100)
    try:
        connect_wal(tmp_path / "not-a-db")
    except sqlite3.DatabaseError as exc:
        assert "locked" not in str(exc)
    else:
        raise AssertionError("a file that is not a database was opened")


def _lock_state(path) -> str:
    """Whether another process can take a write lock on *path* at once."""
    code = ("import sqlite3, sys\nc = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)\n"
            "try:\n    c.execute('BEGIN IMMEDIATE')\n    print('free')\nexcept sqlite3.OperationalError:\n"
            "    print('locked')\n")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          timeout=30).stdout.strip()


def test_a_new_store_on_the_same_file_keeps_another_threads_lock(tmp_path) -> None:
    """A reload makes a new store object on the file another thread is writing: opening it must
    not close a descriptor of the file, which drops every POSIX lock of the process (SQLite's
    "How To Corrupt" 2.2). Seen as "disk I/O error" in console self-test runs during saves."""
    from gateway.plugins.console.store import ConsoleStore

    path = tmp_path / "console.sqlite"
    ConsoleStore(path).new_run()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert _lock_state(path) == "locked"
        ConsoleStore(path)._connect().close()  # the reloaded plugin's store, first use
        assert _lock_state(path) == "locked", "opening the store again released this process's lock"
    finally:
        holder.rollback()
        holder.close()
    assert _lock_state(path) == "free"


def test_create_private_makes_a_private_file_and_leaves_an_existing_one(tmp_path) -> None:
    from gateway.sqlitedb import create_private

    path = tmp_path / "db.sqlite"
    create_private(path)
    assert path.exists() and path.stat().st_mode & 0o777 == 0o600
    path.write_bytes(b"kept")
    path.chmod(0o640)
    create_private(path)
    assert path.read_bytes() == b"kept" and path.stat().st_mode & 0o777 == 0o640


def test_a_planted_link_or_fifo_is_refused_before_sqlite_opens_it(tmp_path) -> None:
    from gateway.sqlitedb import refuse_planted

    path = tmp_path / "store.sqlite3"
    refuse_planted(path)  # nothing there yet: SQLite creates it
    connect_wal(path).close()
    refuse_planted(path)  # its own files, -wal and -shm included
    other = tmp_path / "other"
    other.write_bytes(b"")
    for planted, what in ((lambda name: name.symlink_to(other), "a symbolic link"),
                          (lambda name: os.mkfifo(name), "not a regular file")):
        for suffix in ("", "-wal", "-shm", "-journal"):
            name = tmp_path / f"store.sqlite3{suffix}"
            if name.exists() or name.is_symlink():
                name.unlink()
            planted(name)
            with pytest.raises(sqlite3.DatabaseError, match=f"{name} is {what}"):
                connect_wal(path)
            name.unlink()
    assert other.read_bytes() == b""
    # A second name is not refused: hard-link backups (cp -al, rsnapshot) of the state directory make them.
    connect_wal(path).close()
    os.link(path, tmp_path / "backup.sqlite3")
    connect_wal(path).close()
