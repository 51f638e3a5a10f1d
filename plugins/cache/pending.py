"""Refusals the store did not take: kept in the state directory until a retry lands.

When the directory refuses a user's cached password (or the account), the cache deletes the
entry and leaves a "forgotten at T" marker (:meth:`Store.forget <gateway.plugins.cache.store.
Store.forget>`). When the store does not answer (Redis down, frozen or timing out; a SQLite file
that cannot be written), every other worker and gateway instance sharing the store could still
answer that password offline. So the row key and T are kept here, in
``STATE_DIR/cache-forgets.sqlite3`` (one table, shared by the instance's workers: a restart or
another worker still knows of them), and :class:`~gateway.plugins.cache.offline.OfflineCache`
retries them on a thread of its own (``authgw-cache-forget``) until the store takes them, or
until the entry they aim at can no longer be answered anyway (``max_age`` plus
:data:`~gateway.plugins.cache.store.FUTURE_TOLERANCE` after T). While one is kept here, no worker
of this instance answers that user offline. At most :data:`LIMIT` are kept (a spray of refused
names during a store outage): beyond it the oldest go, logged at ERROR.

Nothing here names a user: row keys are keyed hashes of the username, as in the store.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

from gateway.plugins.cache.store import StoreError
from gateway.sqlitedb import connect_wal, create_private

__all__ = ["LIMIT", "PENDING_FILE", "PendingForgets"]

PENDING_FILE = "cache-forgets.sqlite3"
#: Refusals kept at most (about 100 bytes each).
LIMIT = 100_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    key TEXT PRIMARY KEY,
    at  REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_at ON pending (at);
"""


class PendingForgets:
    """One SQLite file in WAL mode, one connection per process (opened after the fork, only once
    the file exists or a refusal must be kept), every statement its own transaction."""

    def __init__(self, path: Path, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.location = f"sqlite:{self.path}"
        self.busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()

    def _db(self, create: bool) -> sqlite3.Connection | None:
        """The connection (lock held); None when the file does not exist and *create* is false."""
        if os.getpid() != self._pid:  # a forked child never uses its parent's connection
            self._pid, self._conn = os.getpid(), None
        if self._conn is not None:
            return self._conn
        if not create and not self.path.exists():
            return None
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        create_private(self.path)
        conn = connect_wal(self.path, timeout=self.busy_timeout, check_same_thread=False)
        conn.executescript(_SCHEMA)
        self._conn = conn
        return conn

    def _run(self, create: bool, work):
        with self._lock:
            try:
                conn = self._db(create)
                return work(conn) if conn is not None else None
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(f"{self.location}: {exc.__class__.__name__}: {exc}") from exc

    def add(self, key: str, at: float) -> int:
        """Keep *key*, refused at *at* (the later time if kept already); returns how many of the
        oldest were dropped to stay within :data:`LIMIT`."""
        def work(db: sqlite3.Connection) -> int:
            db.execute("INSERT INTO pending (key, at) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                       "at = max(pending.at, excluded.at)", (key, at))
            over = db.execute("SELECT count(*) FROM pending").fetchone()[0] - LIMIT
            if over <= 0:
                return 0
            return db.execute("DELETE FROM pending WHERE key IN (SELECT key FROM pending ORDER BY at LIMIT ?)",
                              (over,)).rowcount
        return self._run(True, work)

    def landed(self, key: str, at: float) -> None:
        """The store took the refusal of *key* at *at*: forget it here (unless refused later again)."""
        self._run(False, lambda db: db.execute("DELETE FROM pending WHERE key = ? AND at <= ?", (key, at)))

    def held(self, key: str) -> float | None:
        """The time *key* was refused, if it is kept here."""
        def work(db: sqlite3.Connection) -> float | None:
            row = db.execute("SELECT at FROM pending WHERE key = ?", (key,)).fetchone()
            return row[0] if row else None
        return self._run(False, work)

    def due(self, limit: int) -> list[tuple[str, float]]:
        """The *limit* oldest refusals kept, oldest first."""
        return self._run(False, lambda db: [(k, a) for k, a in db.execute(
            "SELECT key, at FROM pending ORDER BY at LIMIT ?", (limit,))]) or []

    def expire(self, before: float) -> int:
        """Drop refusals made before *before* (their entries cannot be answered any more)."""
        return self._run(False, lambda db: db.execute("DELETE FROM pending WHERE at < ?", (before,)).rowcount) or 0

    def count(self) -> int:
        return self._run(False, lambda db: db.execute("SELECT count(*) FROM pending").fetchone()[0]) or 0

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None and os.getpid() == self._pid:
            try:
                conn.close()
            except sqlite3.Error:
                pass
