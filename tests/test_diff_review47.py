"""Review of stop 47's own diff (f80930d..): what it broke, found against real SQLite files.

- The login door's session store moved its writes off the worker's connection (the one that
  waits, on the event loop) onto two new ones (:meth:`SqliteStore._off_loop`: the loop's that
  never waits, the store thread's that does). ``journal_size_limit`` is a connection's own, and
  SQLite cuts the WAL back to it at the first commit after a reset, on the connection that makes
  that commit: the new connections had none, so a WAL grown by a burst while a reader held a
  snapshot (a backup, a ``sqlite3`` shell inside a transaction) stayed at its largest (82 MiB for
  1,500 records of 20 kB) however long the door kept writing; the worker's connection cut it to
  16 MiB (``_JOURNAL_SIZE_LIMIT``) at its next write before.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

from gateway.plugins.login.sessions import _JOURNAL_SIZE_LIMIT, SessionManager, SqliteStore
from gateway.plugins.login.settings import SessionSettings

#: Records written while a reader holds its snapshot: each of ~20 kB, some 55 MiB of WAL in all.
_BURST = 1000
_RECORD = "x" * 20_000


def _wal(path: Path) -> int:
    return Path(f"{path}-wal").stat().st_size


async def _grow_wal(path: Path, manager: SessionManager) -> None:
    """Park records through the door's path while a reader holds a snapshot: the WAL cannot be
    checkpointed and grows past the size limit."""
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM pending").fetchone()
        for i in range(_BURST):
            await manager.apark_as(f"burst-{i}", {"data": _RECORD}, 3600)
    finally:
        reader.execute("ROLLBACK")
        reader.close()
    assert _wal(path) > 2 * _JOURNAL_SIZE_LIMIT


def _manager(path: Path) -> tuple[SqliteStore, SessionManager]:
    store = SqliteStore(path)
    manager = SessionManager(SessionSettings(), store, b"k" * 32)
    manager._last_purge = time.time()  # the purge's own connection has the limit: not part of this
    return store, manager


def test_the_doors_writes_cut_a_grown_wal_back_to_its_limit(tmp_path):
    path = tmp_path / "sessions.sqlite3"
    store, manager = _manager(path)

    async def run() -> None:
        await _grow_wal(path, manager)
        # The reader has let go: the door's next writes checkpoint the WAL (at a commit) and
        # reset it; the first commit after the reset cuts the file back.
        for i in range(3):
            assert await manager.afirst_use("after", f"id-{i}", 60)

    try:
        asyncio.run(run())
        assert _wal(path) <= _JOURNAL_SIZE_LIMIT, f"the WAL stayed at {_wal(path) >> 20} MiB"
    finally:
        store.close()


def test_a_write_made_on_the_store_thread_cuts_a_grown_wal_back_too(tmp_path):
    path = tmp_path / "sessions.sqlite3"
    store, manager = _manager(path)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    async def run() -> None:
        await _grow_wal(path, manager)
        assert await manager.afirst_use("after", "checkpoint", 60)  # its commit checkpoints the WAL
        # The write lock held elsewhere for a moment: the next write is made on the store's thread,
        # and it is the first commit after the WAL's reset.
        holder.execute("BEGIN IMMEDIATE")
        threading.Timer(0.3, lambda: holder.execute("ROLLBACK")).start()
        assert await manager.afirst_use("after", "on the thread", 60)
        assert store._budget_db.get(False) is not None, "the write was not made on the store's thread"

    try:
        asyncio.run(run())
        assert _wal(path) <= _JOURNAL_SIZE_LIMIT, f"the WAL stayed at {_wal(path) >> 20} MiB"
    finally:
        holder.close()
        store.close()
