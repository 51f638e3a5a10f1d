"""Items left by stop 47 in the login door's SQLite session store (``plugins/login/sessions.py``).

- The door's writes are made on the event loop's connection (:meth:`SqliteStore._off_loop`),
  whose commits made SQLite's own checkpoint once the WAL passed 1,000 pages: up to 4 MiB copied
  into the file on the loop, every request of the worker waiting (measured: 96 checkpoints on
  the loop per 20,000 parks of 2 kB, 1.5 ms each at the median, up to 16 ms on a shared disk).
  The loop's connection now makes none (``wal_autocheckpoint`` 0): the commit that leaves the
  WAL past ``_JOURNAL_SIZE_LIMIT`` starts a PASSIVE one on the store's thread, and while it is
  past, the calls are made there, behind it.

Real SQLite files, the writes made through :class:`SessionManager`'s async methods.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from pathlib import Path

from gateway import Identity
from gateway.plugins.login.sessions import _JOURNAL_SIZE_LIMIT, SessionManager, SqliteStore
from gateway.plugins.login.settings import SessionSettings

#: A parked request's size (the door's are at most about 8 kB): 5,000 of them are some 60 MiB
#: of WAL frames, past the limit several times.
_RECORD = "x" * 8_000
_FLOOD = 5_000

ALICE = Identity(subject="alice", username="alice", method="ldap", authenticated_at=time.time())


def _manager(path: Path) -> tuple[SqliteStore, SessionManager]:
    store = SqliteStore(path)
    manager = SessionManager(SessionSettings(), store, b"k" * 32)
    manager._last_purge = time.time()  # the purge's own connection checkpoints: not part of this
    return store, manager


def _wal(path: Path) -> int:
    return Path(f"{path}-wal").stat().st_size


def _settled(store: SqliteStore) -> None:
    """Wait for the checkpoint the loop's commits started on the store's thread, if any."""
    if store._checkpointing is not None:
        store._checkpointing.result(timeout=30)


def _rows_in_the_file(path: Path, copy: Path) -> int:
    """Parked records in the database file itself: what the checkpoints copied out of the WAL
    (a copy of the file alone, opened without its WAL)."""
    shutil.copyfile(path, copy)
    db = sqlite3.connect(copy)
    try:
        return db.execute("SELECT COUNT(*) FROM pending WHERE key LIKE 'm:flood-%'").fetchone()[0]
    finally:
        db.close()


async def _flood(manager: SessionManager) -> None:
    cookie, _ = await manager.acreate(ALICE)
    for i in range(_FLOOD):
        await manager.apark_as(f"flood-{i}", {"data": _RECORD}, 3600)
        if i % 100 == 0:  # a use of a session and a sign-in now and then: the door's other writes
            assert await manager.aget(cookie) is not None
            cookie, _ = await manager.acreate(ALICE, cookie)


def _checkpointed_back(path: Path, store: SqliteStore, tmp_path: Path) -> None:
    """The WAL is back under its limit, and what it does not hold is in the file: at most the
    limit's worth of records is left to copy."""
    _settled(store)
    assert _wal(path) <= _JOURNAL_SIZE_LIMIT, f"the WAL stayed at {_wal(path) >> 20} MiB"
    missing = _FLOOD - _rows_in_the_file(path, tmp_path / "copy.sqlite3")
    assert missing * len(_RECORD) <= _JOURNAL_SIZE_LIMIT, f"{missing} records were never checkpointed"


def test_the_loop_s_connection_makes_no_checkpoint_and_a_flood_is_checkpointed_off_it(tmp_path):
    path = tmp_path / "sessions.sqlite3"
    store, manager = _manager(path)

    async def run() -> None:
        await _flood(manager)
        assert await manager.afirst_use("after", "the flood", 60)  # the first write after a checkpoint resets it

    try:
        # SQLite's checkpoint at a commit (1,000 pages) would copy 4 MiB on the event loop
        assert store._budget_db[True].execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        asyncio.run(run())
        _checkpointed_back(path, store, tmp_path)
    finally:
        store.close()


def test_a_checkpoint_a_reader_held_back_is_made_once_it_lets_go(tmp_path):
    path = tmp_path / "sessions.sqlite3"
    store, manager = _manager(path)
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    async def run() -> None:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM pending").fetchone()  # a snapshot: nothing past it can be copied
        try:
            await _flood(manager)
            assert _wal(path) > 2 * _JOURNAL_SIZE_LIMIT
            # past the limit, the calls are made on the store's thread, behind its checkpoint
            assert store._budget_db.get(False) is not None, "the writes past the limit were made on the loop"
            _settled(store)
        finally:
            reader.execute("ROLLBACK")
        # the reader gone: the next writes checkpoint what it held back, then reset the WAL
        for i in range(3):
            assert await manager.afirst_use("after", f"the reader {i}", 60)
            _settled(store)

    try:
        asyncio.run(run())
        _checkpointed_back(path, store, tmp_path)
    finally:
        reader.close()
        store.close()
