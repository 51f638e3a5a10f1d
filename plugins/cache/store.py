"""Where cache entries live: the store interface, and the embedded SQLite store.

An entry is keyed by a keyed hash of the username (never the name itself) and holds the
argon2id hash of the peppered password, the sealed identity, the time of the last live login
and the count of offline failures. Every operation is one statement, atomic on its own, so
that several threads and worker processes can share a store without read-modify-write races.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

from gateway.sqlitedb import connect_wal, create_private

__all__ = ["Entry", "FORGOTTEN_FOR", "FUTURE_TOLERANCE", "SQLiteStore", "Store", "StoreError", "TAKEN", "AT_LIMIT",
           "GONE"]

#: Results of :meth:`Store.take_failure`.
TAKEN, AT_LIMIT, GONE = 1, 0, -1
#: Seconds an entry may be stamped after the reader's (or writer's) clock. Beyond it the entry
#: came from a clock far ahead: offline answers ignore it and a write replaces it, or it would
#: refuse every later write (a changed password) until that clock's time arrives.
FUTURE_TOLERANCE = 300.0
#: Seconds a "forgotten at T" marker outlives a refusal. A write stamped before T is refused
#: meanwhile: a worker stamps a live login, hashes (bounded by the attempt deadline and the
#: hashing slot wait, seconds), then writes; a refusal seen by another worker in between must
#: not be undone by that write. Markers older than this are pruned at every forget, so a spray
#: of refused names holds at most (refusals per second x FORGOTTEN_FOR) small rows.
FORGOTTEN_FOR = 300.0


class StoreError(Exception):
    """The store could not be reached or refused the operation (the cache then stays out)."""


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    kid: str
    password_hash: str = field(repr=False)
    sealed: bytes = field(repr=False)
    stored_at: float
    failures: int = 0


class Store(Protocol):
    #: Where the store is, for logs and self-tests (no credentials in it).
    location: str

    def get(self, key: str) -> Entry | None:
        """The entry for *key*, or None."""

    def put(self, entry: Entry) -> bool:
        """Insert, or replace an entry stored no later than ``entry.stored_at`` (the failure count
        starts again from ``entry.failures``); an entry stored later is kept. True when written.

        Conditional in one atomic step: two workers storing one user at nearly the same time
        must never leave the older timestamp (issue 9 item 4), or the entry looks due for
        ``refresh_after`` and is hashed again. An entry stored more than
        :data:`FUTURE_TOLERANCE` after ``entry.stored_at`` is replaced (a clock far ahead)."""

    def delete(self, key: str) -> bool:
        """Remove the entry; True when there was one."""

    def forget(self, key: str, at: float, older_only: bool = False) -> bool:
        """Delete the entry because the directory refused the user at time *at* (or the operator
        purged it then), and keep a marker for :data:`FORGOTTEN_FOR` seconds so that a write
        stamped before *at* is refused (:meth:`put` returns False). True when there was an entry
        (and it was deleted).

        *older_only* (a forget retried after it failed, maybe long after *at*): an entry stamped
        after *at*, no more than :data:`FUTURE_TOLERANCE` later, is kept: a live login after the
        refusal stored it, as the marker would have let it."""

    def forget_all(self, at: float) -> int:
        """Delete every entry because the operator purged the whole cache at time *at*, and keep
        one store-wide marker for :data:`FORGOTTEN_FOR` seconds so that a write stamped before
        *at*, whatever its key, is refused (:meth:`put` returns False), as :meth:`forget` does
        for one key: a live login already hashing when the purge ran must not write its entry
        back afterwards. Returns how many entries were deleted."""

    def take_failure(self, key: str, limit: int) -> int:
        """Atomically count one offline attempt against *key* before it is verified: TAKEN when
        fewer than *limit* were counted (and now one more is), AT_LIMIT, or GONE (no entry)."""

    def give_back_failure(self, key: str) -> bool:
        """Undo one :meth:`take_failure` (the password was right). False when the entry is gone
        (deleted meanwhile: a refusal seen by another worker while the password was hashed)."""

    def scan(self) -> Iterator[Entry]:
        """Every entry, in no particular order."""

    def purge(self, older_than: float | None = None) -> int:
        """Delete entries stored before the time *older_than* (all when None); returns how many.
        Leaves no marker: writes under way land afterwards (the operator's purge uses
        :meth:`forget_all`)."""

    def probe(self) -> str:
        """Write, read back and delete a probe entry; a short description. Raises StoreError."""

    def close(self) -> None:
        """Release connections (the store may be used again afterwards)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key       TEXT PRIMARY KEY,
    kid       TEXT NOT NULL,
    hash      TEXT NOT NULL,
    sealed    BLOB NOT NULL,
    stored_at REAL NOT NULL,
    failures  INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_stored_at ON entries (stored_at);
CREATE TABLE IF NOT EXISTS forgotten (
    key TEXT PRIMARY KEY,
    at  REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS forgotten_at ON forgotten (at);
PRAGMA user_version = 1;
"""
_PROBE_KEY = "probe"
#: The key of :meth:`SQLiteStore.forget_all`'s store-wide marker in the ``forgotten`` table: row
#: keys are 64 hex digits, so it never names a row.
_EVERY_KEY = "*"


class SQLiteStore:
    """A SQLite database in WAL mode (readers never block the one writer; a crash mid-write
    leaves the last committed state), one connection per thread and process, every statement
    its own transaction, ``busy_timeout`` for the moments another process holds the write lock."""

    def __init__(self, path: Path, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.location = f"sqlite:{self.path}"
        self.busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._local = threading.local()
        self._pid = os.getpid()
        self._connections: list[sqlite3.Connection] = []
        self._schema_ready = False

    # -- connections ------------------------------------------------------------------------------

    def _prepare_file(self) -> None:
        """Create the database file 0600 before SQLite does (it would use the umask); SQLite
        gives its -wal and -shm files the database file's permissions.

        Called with the lock held and only while this process has no connection to the file:
        closing any descriptor of a file drops every POSIX lock the process holds on it, which
        would silently release other connections' locks (SQLite "How To Corrupt", section 2.2).
        """
        if self._connections:
            return
        try:
            mode = stat.S_IMODE(os.stat(self.path).st_mode)
        except FileNotFoundError:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            create_private(self.path)
            return
        if mode & 0o077:
            os.chmod(self.path, 0o600)

    def _connect(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:
            # A forked child must not use its parent's connections (SQLite FAQ "threadsafe"
            # and "fork"): forget them without closing, and start afresh.
            with self._lock:
                self._pid = os.getpid()
                self._connections = []
                self._local = threading.local()
                self._schema_ready = False
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        try:
            with self._lock:
                self._prepare_file()
                # every worker at once: the switch to WAL is retried (gateway/sqlitedb.py)
                conn = connect_wal(self.path, timeout=self.busy_timeout, check_same_thread=False)
                conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable across process crashes
                if not self._schema_ready:
                    conn.executescript(_SCHEMA)
                    self._schema_ready = True
                self._connections.append(conn)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{self.location}: {exc.__class__.__name__}: {exc}") from exc
        self._local.conn = conn
        return conn

    def _run(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        conn = self._connect()
        try:
            return conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.location}: {exc.__class__.__name__}: {exc}") from exc

    # -- the interface ----------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        row = self._run("SELECT key, kid, hash, sealed, stored_at, failures FROM entries WHERE key = ?",
                        (key,)).fetchone()
        return Entry(row[0], row[1], row[2], bytes(row[3]), row[4], row[5]) if row else None

    def put(self, entry: Entry) -> bool:
        # The upsert's WHERE makes the write conditional inside SQLite's write lock: no window
        # between reading the stored time and writing. The SELECT's WHERE refuses a write
        # stamped before a refusal's marker, whether it would insert or update (the WHERE also
        # keeps SQLite's INSERT ... SELECT ... ON CONFLICT parse unambiguous). The store-wide
        # marker of an operator's purge refuses it the same way.
        return self._run("INSERT INTO entries (key, kid, hash, sealed, stored_at, failures) SELECT ?, ?, ?, ?, ?, ? "
                         "WHERE NOT EXISTS (SELECT 1 FROM forgotten WHERE key IN (?, ?) AND at >= ?) "
                         "ON CONFLICT (key) DO UPDATE SET kid = excluded.kid, hash = excluded.hash, "
                         "sealed = excluded.sealed, stored_at = excluded.stored_at, failures = excluded.failures "
                         "WHERE excluded.stored_at >= entries.stored_at OR entries.stored_at > excluded.stored_at + ?",
                         (entry.key, entry.kid, entry.password_hash, entry.sealed, entry.stored_at,
                          entry.failures, entry.key, _EVERY_KEY, entry.stored_at, FUTURE_TOLERANCE)).rowcount > 0

    def delete(self, key: str) -> bool:
        return self._run("DELETE FROM entries WHERE key = ?", (key,)).rowcount > 0

    def forget(self, key: str, at: float, older_only: bool = False) -> bool:
        # Marker first: a write that slips in between the two statements is then either refused
        # (stamped before *at*) or removed by the delete (fail closed: a later live login
        # writes the entry again).
        self._run("DELETE FROM forgotten WHERE at < ?", (at - FORGOTTEN_FOR,))
        self._run("INSERT INTO forgotten (key, at) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET at = "
                  "max(forgotten.at, excluded.at)", (key, at))
        if older_only:
            return self._run("DELETE FROM entries WHERE key = ? AND (stored_at <= ? OR stored_at > ?)",
                             (key, at, at + FUTURE_TOLERANCE)).rowcount > 0
        return self.delete(key)

    def forget_all(self, at: float) -> int:
        # Marker first, as in forget. Per-key markers at or before *at* say no more than the
        # store-wide one and go; a later one (another instance's clock ahead) is kept. Pruned
        # with the others at the next forget, once FORGOTTEN_FOR has passed.
        self._run("DELETE FROM forgotten WHERE at <= ? AND key != ?", (at, _EVERY_KEY))
        self._run("INSERT INTO forgotten (key, at) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET at = "
                  "max(forgotten.at, excluded.at)", (_EVERY_KEY, at))
        return self._run("DELETE FROM entries WHERE key != ?", (_PROBE_KEY,)).rowcount

    def take_failure(self, key: str, limit: int) -> int:
        if self._run("UPDATE entries SET failures = failures + 1 WHERE key = ? AND failures < ?",
                     (key, limit)).rowcount:
            return TAKEN
        return AT_LIMIT if self._run("SELECT 1 FROM entries WHERE key = ?", (key,)).fetchone() else GONE

    def give_back_failure(self, key: str) -> bool:
        if self._run("UPDATE entries SET failures = failures - 1 WHERE key = ? AND failures > 0", (key,)).rowcount:
            return True
        return self._run("SELECT 1 FROM entries WHERE key = ?", (key,)).fetchone() is not None

    def scan(self) -> Iterator[Entry]:
        rows = self._run("SELECT key, kid, hash, sealed, stored_at, failures FROM entries "
                         "WHERE key != ? ORDER BY stored_at", (_PROBE_KEY,)).fetchall()
        for row in rows:
            yield Entry(row[0], row[1], row[2], bytes(row[3]), row[4], row[5])

    def purge(self, older_than: float | None = None) -> int:
        if older_than is None:
            self._run("DELETE FROM forgotten")
            return self._run("DELETE FROM entries").rowcount
        return self._run("DELETE FROM entries WHERE stored_at < ?", (older_than,)).rowcount

    def count(self, but_hash: str | None = None) -> int:
        """How many entries are stored (for the readiness line; never on an attempt's path),
        not counting those whose hash column is *but_hash*."""
        return self._run("SELECT count(*) FROM entries WHERE hash IS NOT ?", (but_hash,)).fetchone()[0]

    def probe(self) -> str:
        probe = Entry(_PROBE_KEY, "probe", "probe", b"probe", time.time())
        self.put(probe)
        back = self.get(_PROBE_KEY)
        self.delete(_PROBE_KEY)
        if back != probe:
            raise StoreError(f"{self.location}: the probe entry did not read back")
        mode = self._run("PRAGMA journal_mode").fetchone()[0]
        integrity = self._run("PRAGMA quick_check").fetchone()[0]
        if integrity != "ok":
            raise StoreError(f"{self.location}: quick_check says {integrity}")
        count = self._run("SELECT count(*) FROM entries").fetchone()[0]
        return f"{self.location}: writable, journal_mode={mode}, {count} entries"

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
            self._local = threading.local()
        if os.getpid() != self._pid:
            return
        for conn in connections:
            try:
                conn.close()
            except sqlite3.Error:
                pass
