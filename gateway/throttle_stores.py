"""Where throttling counts live: this process, a SQLite file shared by the workers of a machine,
or Redis shared by instances. Reads ``throttle.store`` and ``throttle.redis``.

Every store keeps, per key, the times of the reservations (failures) made in the last
``window`` seconds, each tagged with its attempt's ticket, and offers three operations:
``reserve`` (check every key against its limit and add the ticket to all of them, atomically),
``drop`` (take one ticket back) and ``clear`` (forget keys). The memory store's times are the
monotonic clock's (one process); the SQLite store's are the store's own seconds, which pass with
the machine's boot clock and not with wall-clock steps (:class:`SQLiteStore`); the Redis store,
shared by machines, uses Redis's clock instead of each instance's, with its steps forward taken
out (:data:`_RESERVE`).
"""

from __future__ import annotations

import heapq
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Protocol

from gateway.aio import in_loop_thread
from gateway.health import redis_location
from gateway.logs import RateLimitedWarning
from gateway.redis_deadline import CallDeadline, bounded_connection_class
from gateway.redis_eviction import EvictionWatch
from gateway.settings import ThrottleSettings
from gateway.sqlitedb import connect_wal, create_private, result_code

__all__ = ["MemoryStore", "RedisStore", "SQLiteStore", "StoreLocked", "StoreUnavailable", "ThrottleStore", "open_store",
           "store_kind"]

_MAX_KEYS = 100_000
#: How the throttle's per-user counters start (gateway.throttle.Throttle.ticket: ``u``, ``p``
#: for a user and client pair, ``c`` for a client).
_USER_PREFIX = "u"

log = logging.getLogger("authgw.throttle")


class StoreUnavailable(Exception):
    """The shared throttle store did not answer; the attempt is refused (fail closed)."""


class ThrottleStore(Protocol):
    blocking: bool

    def reserve(self, keys: list[tuple[str, int]], ticket: str, now: float, window: float) -> bool: ...
    def drop(self, keys: list[str], ticket: str) -> None: ...
    def unknown_user(self, key: str) -> None: ...
    def clear(self, keys: list[str]) -> None: ...
    def close(self) -> None: ...


def store_kind(settings: ThrottleSettings, state_dir: Path | None, workers: int) -> str:
    """The store ``throttle.store`` means for a process of *workers* workers: ``auto`` is
    ``memory`` for one worker and ``sqlite`` for several. *workers* is the effective count
    (``authgw serve --workers`` or ``workers:``), not conf.d's alone: a flag of 4 with the
    default ``workers: 1`` gave each worker a memory store and a budget of its own."""
    kind = settings.store
    if kind == "auto":
        kind = "sqlite" if workers > 1 and state_dir is not None else "memory"
    return kind


def open_store(settings: ThrottleSettings, state_dir: Path | None, workers: int) -> ThrottleStore:
    kind = store_kind(settings, state_dir, workers)
    if kind == "redis":
        r = settings.redis
        assert r is not None  # the settings model requires it with store: redis
        return RedisStore(r.url, prefix=r.key_prefix, password=r.password.reveal() if r.password else None,
                          timeout=r.timeout, window=settings.window)
    if kind == "sqlite":
        if state_dir is None:
            raise ValueError("throttle.store: sqlite needs a state directory")
        return SQLiteStore(state_dir / "throttle.sqlite3")
    return MemoryStore()


class MemoryStore:
    """One worker's counts (``workers: 1``).

    At most :data:`_MAX_KEYS` counters (bounded memory under a spray of names and addresses).
    When that many are live, the oldest tenth of the counters that hold a **single** failure and
    are not an existing user's are dropped (at most once a second): a (user, client) pair's or a
    client's, whose user count still holds, or the count of a name no directory knows
    (:meth:`unknown_user`). Those are what a spray of new names and addresses leaves. A user's
    count is never dropped while the user may exist (dropping the oldest single ones let a
    guesser wipe a victim's first failure with a spray, again and again), nor is any count of
    two failures or more; when those alone fill the store, a reservation that needs a new
    counter is refused (throttled) until counters expire. (Refusing at once when full, the rule
    before, let a spray of ~50,000 guesses refuse every login, however right the password, for
    the whole window.)
    """

    blocking = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, deque[tuple[float, str]]] = {}
        self._next_sweep = 0.0  # when full: the earliest time to look for expired counters again
        self._unknown: set[str] = set()  # user counters of names no directory knows (droppable)
        self._warn = RateLimitedWarning(log)  # a spray must not fill the log either

    def reserve(self, keys: list[tuple[str, int]], ticket: str, now: float, window: float) -> bool:
        horizon = now - window
        with self._lock:
            for key, limit in keys:
                times = self._keys.get(key)
                while times and times[0][0] <= horizon:
                    times.popleft()
                if times is not None and len(times) >= limit:
                    return False
            new = sum(1 for key, _limit in keys if key not in self._keys)
            if new and len(self._keys) + new > _MAX_KEYS:
                if now >= self._next_sweep:  # at most once a second: a sweep reads every counter
                    self._next_sweep = now + 1.0
                    for key in [k for k, v in self._keys.items() if not v or v[-1][0] <= horizon]:
                        del self._keys[key]
                        self._unknown.discard(key)
                    if len(self._keys) + new > _MAX_KEYS:
                        self._drop_single_failures()
                if len(self._keys) + new > _MAX_KEYS:
                    self._warn("full", "throttle: %d live counters, users' counts and counters of two failures or "
                               "more (the memory store's limit); password attempts that need a new one are "
                               "refused until counters expire", len(self._keys))
                    return False
            for key, _limit in keys:
                self._keys.setdefault(key, deque()).append((now, ticket))
        return True

    def _drop_single_failures(self) -> None:
        """Drop the oldest tenth of the store's size among counters of one failure (lock held)."""
        single = heapq.nsmallest(max(1, _MAX_KEYS // 10),
                                 ((times[0][0], key) for key, times in self._keys.items()
                                  if len(times) == 1 and (not key.startswith(_USER_PREFIX) or key in self._unknown)))
        for _at, key in single:
            del self._keys[key]
            self._unknown.discard(key)
        if single:
            self._warn("dropped", "throttle: the memory store is full (%d counters: a spray of new names or "
                       "addresses); dropped the %d oldest counters of a single failure of a client or of a name no "
                       "directory knows; users' counts are kept (said at most every 60 s; `throttle.store: sqlite` "
                       "or `redis` holds more)", len(self._keys) + len(single), len(single))

    def unknown_user(self, key: str) -> None:
        """*key*, a user's counter, is of a name no directory knows (its attempt's outcome
        ``USER_NOT_FOUND``): with one failure, it may be dropped when the store is full."""
        with self._lock:
            if key in self._keys:
                self._unknown.add(key)

    def drop(self, keys: list[str], ticket: str) -> None:
        with self._lock:
            for key in keys:
                times = self._keys.get(key)
                if times:
                    kept = deque(entry for entry in times if entry[1] != ticket)
                    if kept:
                        self._keys[key] = kept
                    else:
                        del self._keys[key]
                        self._unknown.discard(key)

    def clear(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                self._keys.pop(key, None)
                self._unknown.discard(key)

    def close(self) -> None:
        pass


def _read_boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


_BOOT_ID = _read_boot_id()
#: The boot clock: CLOCK_BOOTTIME where there is one (a suspended host's sleep passes too).
_UPTIME = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def _boot_clock() -> tuple[str | None, float]:
    """This boot's id and seconds since it (:class:`SQLiteStore`): ``(None, 0.0)`` without a boot id."""
    if _BOOT_ID is None:
        return None, 0.0
    return _BOOT_ID, time.clock_gettime(_UPTIME)


class StoreLocked(StoreUnavailable):
    """A call made on the event loop found the store's lock held by another process, or found
    that it would be long (a checkpoint of a WAL a reader held back: :meth:`SQLiteStore._run`),
    and was not made (nothing to undo): the caller makes it again off the loop, where waiting
    stalls nothing."""


#: SQLite's primary result codes for a lock held elsewhere, and for a file that may not grow.
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_FULL = 5, 6, 13


def _lock_held(exc: sqlite3.Error) -> bool:
    return result_code(exc) in (_SQLITE_BUSY, _SQLITE_LOCKED)


class _CapReached(Exception):
    """A reservation's rows did not fit in the SQLite store's :attr:`SQLiteStore.MAX_BYTES`."""


class SQLiteStore:
    """Counts shared by the workers of one machine: ``throttle.sqlite3`` in the state directory.

    Two connections per process (opened after the fork), WAL, ``BEGIN IMMEDIATE`` around each
    reservation so that check-and-add is atomic across workers. A transaction is a few dozen
    microseconds, so it runs on the event loop, on a connection that never waits: a lock another
    process holds (a sibling inside its transaction, an operator's ``sqlite3`` shell, a backup)
    raises :class:`StoreLocked`, and the caller makes the call again on a thread, on the other
    connection, which waits up to :attr:`BUSY_TIMEOUT` (and the attempt's deadline). The loop
    waited for the lock itself, 5 s and then 0.5 s per call: a lock held froze every request of
    the worker, ``/healthz`` included, per password attempt (review of reliability). Then the
    store is unavailable (fail closed, 503).

    Failures are dated in the store's own seconds, not the wall clock's: within one boot they
    pass with the kernel's boot clock (``CLOCK_BOOTTIME``, the same for every process of the
    machine, suspend included, never stepped), offset to the wall clock once per boot (the
    ``clock`` row); a new boot goes on from the wall clock, or from the store's latest failure
    when the wall clock is behind it. Dated by :func:`time.time`, a wall-clock step forward of a
    window freed every guess at once, and a step back of hours (an RTC or NTP correction)
    refused the users it had throttled for those hours (review of the throttle). Without a boot
    id (not Linux) the wall clock dates them, as before.

    The file holds :attr:`MAX_BYTES` at most (SQLite's ``max_page_count``, set on every
    connection): a flood of new names and addresses grew it without bound, as many rows as
    guesses admitted within the window (three each; 30 days at most). When a reservation does not
    fit, the expired failures are deleted and it is tried once more; when it still does not fit,
    it is refused (throttled, 429) and said in the log (at most once a minute) until failures
    expire. No live count is ever deleted to make room, so no guesser is freed of one; the price
    is that a flood filling the store refuses every password attempt, a right one too, until its
    failures expire. The memory store drops single failures of clients and unknown names when it
    is full (:class:`MemoryStore`); here the cap is some 1.5 million rows, half a million
    guesses. Expired failures are found by their own index (``failure_at``): a purge of the
    whole file ran on the event loop every minute.

    The WAL (``throttle.sqlite3-wal``) is bounded too, at :attr:`MAX_WAL_BYTES`. SQLite cannot
    checkpoint past a reader's snapshot, so while one is held (a backup, an operator's
    ``sqlite3`` shell inside a transaction) every transaction is appended to the WAL: a flood of
    new names grew it by some 28 KB a guess, 1.4 GB for 50,000 guesses with a database of 27 MB,
    past the cap on the file and on to a full disk (items left by the review of the throttle).
    When the WAL is past its bound, a reservation first checkpoints it (``TRUNCATE``, without
    waiting for readers); when that cannot empty it, the attempt is refused (429) as when the
    file is full, and said in the log, until the reader lets go. ``journal_size_limit`` gives
    the disk back once a WAL is reset. The health probe (:meth:`ping`) says so too, and tries
    the checkpoint itself: ``/readyz`` is false while the WAL is full, and true again once a
    checkpoint empties it, with no password attempt needed (a load balancer sends none then).

    A WAL larger than :attr:`_WAL_KEPT_BYTES` is one a reader held back (or a large purge
    wrote), and its checkpoint copies all of it into the file: some 90 ms for 64 MiB
    (``TRUNCATE``), 60 ms for the checkpoint SQLite makes itself at a commit once the reader let
    go, 15 ms for 15 MiB. Each stalled every request of the worker when made on the event loop
    (items left by the review of the throttle), so while the WAL is that large the loop's calls
    raise :class:`StoreLocked` and are made on the store's threads, as for a lock held; on the
    loop a checkpoint copies no more than SQLite's ordinary one at a commit (4 MiB).

    Nor does the loop make that ordinary one: SQLite checkpoints at a commit once the WAL passes
    1,000 pages, and under a flood of new names that stalled the loop 5-19 ms every 4 MiB of
    WAL (items left by the last stop). The loop's connection makes none (``wal_autocheckpoint``
    0): the loop's commit that takes the WAL past :attr:`_WAL_KEPT_BYTES` starts one
    (``PASSIVE``) on a thread, one at a time per process (:meth:`_checkpoint_soon`). The file's
    size measures what the WAL holds because ``journal_size_limit`` is that same size: a WAL
    reset is cut back to it at its first commit and grows past it only when its frames do. Until
    a checkpoint resets it the loop's calls are made on the threads (above), whose connection
    keeps SQLite's checkpoint at a commit: one that did not complete (a reader, another
    process's checkpoint) is made again there, never skipped for good.
    """

    blocking = False
    BUSY_TIMEOUT = 5.0
    _PURGE_EVERY = 60.0
    #: The largest the file (WAL aside) may grow: some 180 bytes a row with its two indexes.
    MAX_BYTES = 256 * 1024 * 1024
    #: The largest the WAL may grow while a reader keeps it from being checkpointed (it stays
    #: some 4 MiB otherwise); past it reservations are refused. A sixth of the file's cap: a
    #: full purge of expired failures can write tens of MiB in one transaction.
    MAX_WAL_BYTES = 64 * 1024 * 1024
    #: What a WAL is truncated to when it is reset (SQLite's ``journal_size_limit``), and the
    #: most a call on the event loop may find in it: SQLite's own checkpoint at a commit keeps it
    #: under 4 MiB (1,000 pages); larger, a reader held it back and its checkpoint is long.
    _WAL_KEPT_BYTES = 4 * 1024 * 1024
    #: Seconds between two tries of a checkpoint a reader blocked (each writes out what it can).
    _CHECKPOINT_EVERY = 1.0

    def __init__(self, path: Path, *, boot_clock=None) -> None:
        self.path = path
        #: ``() -> (boot id, seconds since that boot)``, or ``(None, 0.0)`` where unknown.
        self._boot_clock = boot_clock or _boot_clock
        self._pid = -1
        #: Per process: ``True`` the event loop's connection (no wait), ``False`` the threads'.
        self._conns: dict[bool, sqlite3.Connection] = {}
        self._locks = {True: threading.Lock(), False: threading.Lock()}
        self._purged_at: float | None = None
        self._checkpoint_tried: float | None = None  # monotonic time of the last blocked checkpoint
        self._checkpointing = threading.Lock()  # held while this process's checkpoint thread runs
        self._warn = RateLimitedWarning(log)

    def _db(self, on_loop: bool) -> sqlite3.Connection:
        conn = self._conns.get(on_loop)
        if conn is None:
            create_private(self.path)  # private from the first byte
            conn = connect_wal(self.path, timeout=0.0 if on_loop else self.BUSY_TIMEOUT,  # every worker at once
                               check_same_thread=False)
            try:
                conn.execute("PRAGMA synchronous=NORMAL")  # counts may be lost by a power cut, not corrupted
                conn.execute("CREATE TABLE IF NOT EXISTS failure (key TEXT NOT NULL, at REAL NOT NULL, "
                             "ticket TEXT NOT NULL)")
                conn.execute("CREATE INDEX IF NOT EXISTS failure_key ON failure (key, at)")
                conn.execute("CREATE INDEX IF NOT EXISTS failure_at ON failure (at)")
                conn.execute("CREATE TABLE IF NOT EXISTS clock (id INTEGER PRIMARY KEY CHECK (id = 0), "
                             "boot TEXT NOT NULL, offset REAL NOT NULL)")
                # Per connection; never below the file's size (SQLite keeps a larger file's as its cap).
                (page_size,) = conn.execute("PRAGMA page_size").fetchone()
                conn.execute(f"PRAGMA max_page_count = {max(1, self.MAX_BYTES // page_size)}")
                conn.execute(f"PRAGMA journal_size_limit = {min(self._WAL_KEPT_BYTES, self.MAX_WAL_BYTES)}")
                if on_loop:  # its checkpoint at a commit copies up to 4 MiB: made on a thread (_checkpoint_soon)
                    conn.execute("PRAGMA wal_autocheckpoint = 0")
            except BaseException:
                conn.close()  # tried again at the next call
                raise
            self._conns[on_loop] = conn
        return conn

    def _wal_bytes(self) -> int:
        try:
            return os.stat(f"{self.path}-wal").st_size
        except OSError:  # none yet; a directory gone is the transaction's to say
            return 0

    def _wal_full(self) -> bool:
        """Whether the WAL is past :attr:`MAX_WAL_BYTES` and a checkpoint, tried at most every
        :attr:`_CHECKPOINT_EVERY` seconds and never waiting, cannot bring it back under. Raises
        :class:`StoreLocked` on the event loop when a checkpoint is due (made off the loop)."""
        if self._wal_bytes() <= self.MAX_WAL_BYTES:
            self._checkpoint_tried = None
            return False
        tried, now = self._checkpoint_tried, time.monotonic()
        if tried is None or not 0 <= now - tried < self._CHECKPOINT_EVERY:
            if in_loop_thread():
                raise StoreLocked(f"throttle store {self.path}: its WAL is checkpointed off the event loop")
            self._checkpoint_tried = now
            try:
                self._run(self._checkpoint, transaction=False)
            except StoreUnavailable:  # a writer or a reader holds it: still full
                pass
        return self._wal_bytes() > self.MAX_WAL_BYTES

    @staticmethod
    def _checkpoint(db: sqlite3.Connection) -> None:
        # TRUNCATE waits for readers through the busy handler: not here (an attempt waits)
        (timeout,) = db.execute("PRAGMA busy_timeout").fetchone()
        db.execute("PRAGMA busy_timeout = 0")
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            db.execute(f"PRAGMA busy_timeout = {int(timeout)}")

    def _checkpoint_soon(self) -> None:
        """Checkpoint the WAL on a thread if it is past the size SQLite would have checkpointed
        at, unless this process's checkpoint thread is running already (class docstring)."""
        if self._wal_bytes() <= self._WAL_KEPT_BYTES or not self._checkpointing.acquire(blocking=False):
            return
        try:
            threading.Thread(target=self._checkpoint_off_loop, name="authgw-throttle-checkpoint", daemon=True).start()
        except RuntimeError:  # no thread to be had: the threads' connection checkpoints at its next commit
            self._checkpointing.release()

    def _checkpoint_off_loop(self) -> None:
        try:
            self._run(self._passive_checkpoint, transaction=False)
        except StoreUnavailable:  # the file's trouble is the next reservation's to report
            pass
        finally:
            self._checkpointing.release()

    @staticmethod
    def _passive_checkpoint(db: sqlite3.Connection) -> None:
        # PASSIVE waits for no reader nor writer: it copies what it can (none if another process
        # is checkpointing), and the threads' connection tries again at its commits (class docstring)
        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _run(self, work, *, transaction: bool = True):
        if self._pid != os.getpid():  # a fork: the parent's connections are not this process's to use
            self._conns, self._pid = {}, os.getpid()
            self._locks = {True: threading.Lock(), False: threading.Lock()}
            self._checkpointing = threading.Lock()  # the parent's checkpoint thread is not here
        # On an event loop's thread: the connection that never waits. Its lock is only taken on a
        # loop's thread, so it is free unless another loop of this process has it: off the loop then.
        on_loop = in_loop_thread()
        if on_loop and self._wal_bytes() > self._WAL_KEPT_BYTES:  # its checkpoint is long: class docstring
            raise StoreLocked(f"throttle store {self.path}: its WAL is past {self._WAL_KEPT_BYTES // (1024 * 1024)} "
                              "MiB; the call is made off the event loop")
        lock = self._locks[on_loop]
        if not lock.acquire(blocking=not on_loop):
            raise StoreLocked(f"throttle store {self.path}: in use by another event loop of this process")
        db = None
        try:
            db = self._db(on_loop)
            if not transaction:
                return work(db)
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
            except BaseException:
                if db.in_transaction:  # SQLite ends some failed transactions itself (SQLITE_FULL)
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            if on_loop:  # the loop's connection makes no checkpoint itself (_db)
                self._checkpoint_soon()
            return result
        except (sqlite3.Error, OSError) as exc:  # OSError: the state directory gone, no file descriptor left
            if on_loop and isinstance(exc, sqlite3.Error) and _lock_held(exc):
                raise StoreLocked(f"throttle store {self.path}: locked by another process") from exc
            if db is not None and result_code(exc) == _SQLITE_FULL and self._at_cap(db):
                raise _CapReached() from exc  # not the disk: that is an outage (below)
            raise StoreUnavailable(f"throttle store {self.path}: {exc}") from exc
        finally:
            lock.release()

    @staticmethod
    def _at_cap(db: sqlite3.Connection) -> bool:
        """Whether the file is at its ``max_page_count`` (a reservation may need a few pages
        more than are left), rather than the disk full."""
        try:
            (pages,) = db.execute("PRAGMA page_count").fetchone()
            (cap,) = db.execute("PRAGMA max_page_count").fetchone()
        except sqlite3.Error:
            return False
        return pages + 16 >= cap

    def _now(self, db: sqlite3.Connection, wall: float) -> float:
        """The store's time (in a transaction): the boot clock plus this boot's offset, set by
        the first call of a boot from *wall*, or from the latest failure when *wall* is behind it."""
        boot, uptime = self._boot_clock()
        if boot is None:
            return wall
        row = db.execute("SELECT boot, offset FROM clock WHERE id = 0").fetchone()
        if row is not None and row[0] == boot:
            return uptime + row[1]
        (latest,) = db.execute("SELECT max(at) FROM failure").fetchone()
        start = wall if latest is None else max(wall, latest)
        db.execute("INSERT OR REPLACE INTO clock (id, boot, offset) VALUES (0, ?, ?)", (boot, start - uptime))
        return start

    def reserve(self, keys: list[tuple[str, int]], ticket: str, now: float, window: float) -> bool:
        """As the other stores, except that *now* (the wall clock) only sets the store's time at
        the first call of a boot (:meth:`_now`)."""

        def work(db: sqlite3.Connection, full: bool = False) -> bool:
            store_now = self._now(db, now)
            horizon = store_now - window
            if full or self._purged_at is None or not 0 <= store_now - self._purged_at <= self._PURGE_EVERY:
                db.execute("DELETE FROM failure WHERE at <= ?", (horizon,))
                self._purged_at = store_now
            for key, limit in keys:
                (count,) = db.execute("SELECT count(*) FROM failure WHERE key = ? AND at > ?",
                                      (key, horizon)).fetchone()
                if count >= limit:
                    return False
            db.executemany("INSERT INTO failure (key, at, ticket) VALUES (?, ?, ?)",
                           [(key, store_now, ticket) for key, _limit in keys])
            return True

        if self._wal_full():
            self._warn("wal", "throttle: the SQLite store's WAL %s-wal is past %d MiB and cannot be checkpointed: a "
                       "reader holds an old snapshot of the file (a backup, a sqlite3 shell inside a transaction); "
                       "password attempts are refused (429) until it lets go; no count is forgotten",
                       self.path, self.MAX_WAL_BYTES // (1024 * 1024))
            return False
        try:
            return self._run(work)
        except _CapReached:
            pass
        try:
            return self._run(lambda db: work(db, full=True))  # the expired failures make room, if any
        except _CapReached:
            self._warn("full", "throttle: the SQLite store %s is full (%d MiB: a flood of new names or addresses); "
                       "password attempts are refused (429) until failures expire; no count is forgotten",
                       self.path, self.MAX_BYTES // (1024 * 1024))
            return False

    def unknown_user(self, key: str) -> None:
        """Nothing: this store keeps every count until it expires (only the memory store drops)."""

    def drop(self, keys: list[str], ticket: str) -> None:
        if keys:
            self._run(lambda db: db.executemany("DELETE FROM failure WHERE key = ? AND ticket = ?",
                                                [(key, ticket) for key in keys]))

    def clear(self, keys: list[str]) -> None:
        if keys:
            self._run(lambda db: db.executemany("DELETE FROM failure WHERE key = ?", [(key,) for key in keys]))

    def ping(self) -> str:
        """Whether the file serves (the core's health probe): a store that cannot be read or
        written refuses every password login (503), and ``/readyz`` said ready (review of the
        state directory); nor does one whose WAL is full (:meth:`_wal_full`, tried here too),
        which refuses every one (429). Raises :class:`StoreUnavailable`, naming the file."""
        self._run(lambda db: db.execute("SELECT 1 FROM failure LIMIT 1").fetchall())
        if self._wal_full():
            raise StoreUnavailable(f"throttle store {self.path}: its WAL is past "
                                   f"{self.MAX_WAL_BYTES // (1024 * 1024)} MiB and a reader keeps it from being "
                                   "checkpointed; password attempts are refused (429) until it lets go")
        return f"{self.path}: answers"

    def explain(self, exc: StoreUnavailable) -> tuple[str, str]:
        """What a failed :meth:`ping` means for logins, and what the operator can do about it
        (``authgw check``): it told an operator of this store to start Redis."""
        if self._wal_bytes() > self.MAX_WAL_BYTES:
            return (str(exc),  # it says so: 429 until the reader lets go
                    f"a reader holds an old snapshot of {self.path}, so its WAL ({self.path}-wal) cannot be "
                    "checkpointed: a backup or a sqlite3 shell inside a transaction on that file; end it (let the "
                    "backup finish, or COMMIT or quit the shell). Password attempts are refused until it lets "
                    "go, then the store serves again by itself; no count is lost")
        return (f"{exc}; every password login would be refused (503, throttle_unavailable)",
                f"check {self.path}: the state directory must be the gateway user's and writable, the disk not "
                "full, and no other process may hold a transaction on the file (a sqlite3 shell) for long")

    def close(self) -> None:
        if self._pid == os.getpid():
            for conn in self._conns.values():
                conn.close()
        self._conns = {}


# KEYS[1]: the ticket's tombstone; KEYS[2]: the store's clock (a hash); KEYS[2 + i]: the
# counters; ARGV[1] window (ms), ARGV[2] ticket, ARGV[3] the latest store time the caller can
# account for (ms, -1: none), ARGV[4] the counters' lifetime (ms), ARGV[4 + i] limit of KEYS[2 + i].
#
# The time is the store's: Redis's own (TIME) plus the clock hash's ``offset``, not the caller's:
# instances whose clocks differ would otherwise place their failures apart, and one running ahead
# by a window would drop every other instance's counts at its next guess. Effects replication
# (Redis 7's only mode) lets a script that writes read TIME; on Redis 5 and 6 `replicate_commands`
# turns it on. Redis's clock may step forward (NTP, a VM resumed): every failure would then be
# behind the window at once. So the caller sends ARGV[3], the store time it last saw plus what
# its own boot clock counted since (and a tolerance): a store time past it is a step, answered
# -2 without a change, and the caller takes the step out of the offset (:data:`_STEP`) and asks
# again (a call Redis runs late, after its caller gave up, may answer -2 too: nothing is changed
# but by a caller that reads the answer). Key expiry is Redis's clock too: counters live ARGV[4],
# two windows and :data:`_STEP_MARGIN_MS`, so that a step up to a window and that margin loses no
# live count; a larger one may have, and the clock's ``hold`` then refuses every reservation (-3)
# for a window, by which time any count lost would have expired anyway.
# The tombstone is set by :meth:`RedisStore._retract` for a call the gateway gave up on: a call
# that Redis runs late (it sat in a socket buffer while Redis was frozen, or in the network) then
# adds nothing (-1), whichever of the two Redis runs first. A failure dated after now was counted
# before Redis's clock stepped back: it is dated now, so that it lasts a window more at most (it
# lasted the step more: hours for a clock corrected by hours); a hold is cut to a window likewise.
_RESERVE = """
if redis.replicate_commands then redis.replicate_commands() end
if redis.call('EXISTS', KEYS[1]) == 1 then return {-1, 0, 0} end
local t = redis.call('TIME')
local clock = redis.call('HMGET', KEYS[2], 'offset', 'hold')
local offset = tonumber(clock[1]) or 0
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + offset
local bound = tonumber(ARGV[3])
if bound >= 0 and now > bound then return {-2, now, offset} end
local window = tonumber(ARGV[1])
local hold = tonumber(clock[2]) or 0
if hold > now + window then
  redis.call('HSET', KEYS[2], 'hold', now + window)
  hold = now + window
end
if now < hold then return {-3, now, offset} end
local horizon = now - window
for i = 3, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', horizon)
  local ahead = redis.call('ZRANGEBYSCORE', KEYS[i], '(' .. now, '+inf')
  for _, member in ipairs(ahead) do
    redis.call('ZADD', KEYS[i], now, member)
  end
  if redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[2 + i]) then return {0, now, offset} end
end
for i = 3, #KEYS do
  redis.call('ZADD', KEYS[i], now, ARGV[2])
  redis.call('PEXPIRE', KEYS[i], ARGV[4])
end
return {1, now, offset}
"""

# KEYS[1]: the store's clock; ARGV[1] the offset the step was seen with, ARGV[2] the step (ms),
# ARGV[3] the window (ms), ARGV[4] the counters' lifetime (ms). Takes the step out of the offset
# unless another instance did (the offset changed). Steps within one lifetime add up (a key set
# before the first lives through both): past the margin a key may be gone, so the reservations
# are held for a window (1 returned; 0: already taken out).
_STEP = """
if redis.replicate_commands then redis.replicate_commands() end
local c = redis.call('HMGET', KEYS[1], 'offset', 'debt', 'debt_at')
local offset = tonumber(c[1]) or 0
if offset ~= tonumber(ARGV[1]) then return 0 end
local t = redis.call('TIME')
local step = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local life = tonumber(ARGV[4])
offset = offset - step
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + offset
local debt = tonumber(c[2]) or 0
if not c[3] or now - tonumber(c[3]) > life then debt = 0 end
debt = debt + step
redis.call('HSET', KEYS[1], 'offset', offset, 'debt', debt, 'debt_at', now)
if debt > life - window then redis.call('HSET', KEYS[1], 'hold', now + window) end
return 1
"""

# KEYS[1]: the store's clock; ARGV[1] the window (ms), -1 unknown. What is left of the clock's
# ``hold`` in ms (0: none), for the health probe (:meth:`RedisStore.ping`): every reservation is
# refused meanwhile. A hold more than a window ahead (Redis's clock stepped back since) is cut
# to a window, as :data:`_RESERVE` does: no reservation may come to cut it while ``/readyz``
# keeps the load balancer's logins away.
_HELD = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local clock = redis.call('HMGET', KEYS[1], 'offset', 'hold')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + (tonumber(clock[1]) or 0)
local hold = tonumber(clock[2]) or 0
local window = tonumber(ARGV[1])
if window >= 0 and hold > now + window then
  redis.call('HSET', KEYS[1], 'hold', now + window)
  hold = now + window
end
if now < hold then return hold - now end
return 0
"""

#: How much longer than the window a counter lives (ms): a forward step of Redis's clock up to
#: this loses no key (:data:`_RESERVE`).
_STEP_MARGIN_MS = 5 * 60 * 1000


def _uptime() -> float:
    """This machine's boot clock (seconds): what the Redis store measures Redis's clock against."""
    return time.clock_gettime(_UPTIME)


#: Tickets of failed calls that may still land, kept to be taken back (:meth:`RedisStore._retract`).
_MAX_UNSURE = 10_000
#: Tickets taken back per round trip.
_RETRACT_BATCH = 256
#: How long a tombstone outlives its ticket's failed call at least (ms): a call that sat in the
#: network (a partition; the kernel retransmits a closed socket's data for minutes) still finds it.
_TOMBSTONE_MIN_MS = 15 * 60 * 1000


class RedisStore:
    """Counts shared by gateway instances: one sorted set per key (member ticket, score time),
    expiring two windows and a margin after its latest failure (:data:`_RESERVE`). The check-and-add is one Lua script, which Redis runs atomically.
    Needs the ``redis`` package (``authgw[redis]``).

    ``timeout`` bounds each call whole (connecting, sending, every read of the answer), not each
    socket read alone (:mod:`gateway.redis_deadline`).

    A call that failed (no answer in time, a connection lost) may still be run by Redis: a Redis
    frozen for a moment runs what sat in its socket buffers when it wakes, after the attempt was
    answered 503. Such a reservation must count as no guess, so the ticket is remembered
    (:meth:`_unsure`, at most :data:`_MAX_UNSURE`) and taken back once Redis answers again: a
    tombstone that makes the reservation's late run add nothing, and a ``ZREM`` of what it
    added if it ran already (:meth:`_retract`, before the next reservation and at each health
    probe). No clock is compared: Redis's order of the two decides, and either is right.

    Failures are dated by Redis's clock, measured against this machine's boot clock: a step of
    Redis's clock forward (more than the boot clock counted since the last answer) is taken out
    of the store's time, kept in Redis (``PREFIX clock``) for every instance, instead of expiring
    every count at once; one past the counters' margin refuses (503) for a window (:data:`_RESERVE`).
    Only an instance that saw the store before the step can tell it: one started after it cannot.
    The health probe (:meth:`ping`) reports the store down while that hold lasts, on every
    instance that shares it: ``/readyz`` said ready again at the next probe, and a load balancer
    kept sending logins that were all refused.
    """

    blocking = True

    def __init__(self, url: str, *, prefix: str, password: str | None, timeout: float,
                 window: float | None = None) -> None:
        """*window*: ``throttle.window``, the longest a hold may last (:data:`_HELD`)."""
        try:
            import redis
        except ImportError as exc:
            raise ValueError("throttle.store: redis needs the redis package: pip install 'authgw[redis]'") from exc
        self._errors = (redis.RedisError, OSError)
        self.location = redis_location(url)  # for readiness and errors: no password
        self._prefix = prefix
        self._timeout = timeout
        self._deadline = CallDeadline()
        self._client = redis.Redis.from_url(url, password=password, socket_timeout=timeout,
                                            socket_connect_timeout=timeout, decode_responses=False)
        pool = self._client.connection_pool
        if hasattr(getattr(pool, "connection_class", None), "_connect"):  # else: socket_timeout per read
            pool.connection_class = bounded_connection_class(pool.connection_class, self._deadline)
        self._reserve = self._client.register_script(_RESERVE)
        self._step = self._client.register_script(_STEP)
        self._held = self._client.register_script(_HELD)
        self._window_ms = -1 if window is None else int(window * 1000)
        #: (store time in ms, :func:`_uptime` when it was read) of the last answer: what a step of
        #: Redis's clock is measured against (:data:`_RESERVE`). A reload hands it on.
        self.seen: tuple[int, float] | None = None
        self._unsure_lock = threading.Lock()
        self._retracting = threading.Lock()
        #: ticket -> (Redis keys, tombstone lifetime in ms), oldest first
        self._unsure_tickets: dict[str, tuple[frozenset[str], int]] = {}
        self._warn = RateLimitedWarning(log)
        #: Whether this Redis may evict the counts, as each health probe last found: while it
        #: may, the store is not used (a count evicted is a lockout gone).
        self._eviction = EvictionWatch("throttle store")

    def _call(self, what, *args):
        if self._eviction.problem is not None:
            raise StoreUnavailable(f"throttle store {self.location}: {self._eviction.problem}")
        return self._raw_call(what, *args)

    def _raw_call(self, what, *args):
        try:
            with self._deadline.within(self._timeout):
                return what(*args)
        except self._errors as exc:
            raise StoreUnavailable(f"throttle store {self.location}: {exc.__class__.__name__}") from None

    def _unsure(self, names: list[str], ticket: str, window: float | None) -> None:
        """Remember that *ticket* may be (or come to be) reserved on *names*: its call failed."""
        ttl = max(_TOMBSTONE_MIN_MS, int((window or 0) * 1000))
        with self._unsure_lock:
            known = self._unsure_tickets.get(ticket)
            if known is not None:
                self._unsure_tickets[ticket] = (known[0] | frozenset(names), max(known[1], ttl))
                return
            self._unsure_tickets[ticket] = (frozenset(names), ttl)
            dropped = 0
            while len(self._unsure_tickets) > _MAX_UNSURE:
                del self._unsure_tickets[next(iter(self._unsure_tickets))]
                dropped += 1
        if dropped:
            self._warn("unsure", "throttle: %d reservations left by failed calls to the store %s wait to be taken "
                       "back (the most kept); the oldest was forgotten: if Redis ran it, it counts as a guess "
                       "until it expires", _MAX_UNSURE, self.location)

    def _retract(self, names: list[str] | None = None) -> None:
        """Take back the reservations of failed calls (:meth:`_unsure`); raises
        :class:`StoreUnavailable` when Redis still does not answer (they stay remembered).
        With *names* (a reservation's keys: an attempt waits), only those on them, at most a
        batch: one round trip, so that an attempt after a long outage is not held up by the
        others' (the health probe takes back all of them, one thread at a time)."""
        if not self._unsure_tickets:
            return
        mine = names is None and self._retracting.acquire(blocking=False)
        if names is None and not mine:
            return  # another thread takes them all back
        try:
            with self._unsure_lock:
                entries = list(self._unsure_tickets.items())
            if names is not None:
                wanted = set(names)
                entries = [entry for entry in entries if not entry[1][0].isdisjoint(wanted)][:_RETRACT_BATCH]
            taken = 0
            for start in range(0, len(entries), _RETRACT_BATCH):
                batch = entries[start:start + _RETRACT_BATCH]

                def work(batch=batch):
                    pipe = self._client.pipeline(transaction=False)
                    for ticket, (keys, ttl) in batch:
                        pipe.set(self._tombstone(ticket), b"1", px=ttl)  # first: a later run adds nothing
                        for key in keys:
                            pipe.zrem(key, ticket)  # and what an earlier run added goes
                    pipe.execute()

                self._call(work)
                with self._unsure_lock:
                    for ticket, value in batch:
                        if self._unsure_tickets.get(ticket) is value:  # not failed again meanwhile
                            del self._unsure_tickets[ticket]
                taken += len(batch)
            if taken:
                log.info("throttle: took back %d reservations left by failed calls to the store %s (attempts "
                         "answered 503 count as no guess)", taken, self.location)
        finally:
            if mine:
                self._retracting.release()

    def _tombstone(self, ticket: str) -> str:
        return f"{self._prefix}x{ticket}"

    def _bound(self) -> tuple[int, int, float]:
        """``(the latest store time this instance can account for, or -1; the store time it expects;
        now on the boot clock)``: the last store time seen plus the boot clock's seconds since,
        with room for two calls' time (the last answer's, read after Redis's clock, and this one)
        and for clocks that run at rates apart (NTP slews by 500 ppm at most)."""
        now = _uptime()
        seen = self.seen
        if seen is None:
            return -1, -1, now
        elapsed = max(0.0, now - seen[1])
        expected = seen[0] + int(elapsed * 1000)
        return expected + int((2 * self._timeout + 1.0 + elapsed / 1000) * 1000), expected, now

    def reserve(self, keys: list[tuple[str, int]], ticket: str, now: float, window: float) -> bool:
        """As the other stores, except that *now* is the store's time, not the caller's
        (:data:`_RESERVE`). Raises :class:`StoreUnavailable` when Redis does not answer (the
        reservation it may still make is then taken back later: :meth:`_unsure`), and while a
        step of Redis's clock forward may have lost counts (for a window)."""
        names = [self._prefix + key for key, _limit in keys]
        window_ms = self._window_ms = int(window * 1000)
        life_ms = 2 * window_ms + _STEP_MARGIN_MS
        limits = [limit for _key, limit in keys]
        # One deadline for every call: ``redis.timeout`` is what an attempt waits for the store
        # in all, not per call (a Redis hanging on the take-back held an attempt twice as long).
        with self._deadline.within(self._timeout):
            try:
                self._retract(names)  # first: reservations of refused attempts must not count against this one
            except StoreUnavailable as exc:
                # Redis down: the reservation below fails too. Redis refusing only the taking
                # back (an ACL without SET, say) must not refuse every password attempt (review
                # of this stop's diff): they stay to be taken back, and may count until they expire.
                self._warn("retract", "throttle: reservations left by failed calls to the store %s not taken back "
                           "yet: %s", self.location, exc)
            for _turn in range(2):
                bound, expected, asked = self._bound()
                args = [window_ms, ticket, bound, life_ms, *limits]
                try:
                    code, store_now, offset = self._call(
                        lambda args=args: self._reserve(keys=[self._tombstone(ticket), self._clock_key, *names],
                                                        args=args))
                except StoreUnavailable:
                    self._unsure(names, ticket, window)
                    raise
                if code != -2:
                    break
                # Redis's clock is ahead of what passed here: a step forward. Taken out of the store's
                # time (the counts stay within their window), then asked again.
                step = int(store_now) - expected
                self._warn("step", "throttle: the clock of the store %s jumped ahead by %.0f s (more than this "
                           "machine's clock counted since its last answer); the step is taken out of the "
                           "store's time, so no count expires early", self.location, step / 1000)
                step_args = [int(offset), step, window_ms, life_ms]
                self._call(lambda step_args=step_args: self._step(keys=[self._clock_key], args=step_args))
            else:
                raise StoreUnavailable(f"throttle store {self.location}: its clock keeps jumping ahead")
            if code == -1:
                return False
            self.seen = (int(store_now), asked)
            if code == -3:
                self._warn("hold", "throttle: the clock of the store %s jumped ahead by more than the counts "
                           "outlive their window: counts may have expired early; password attempts are refused "
                           "(503) until a window has passed", self.location)
                raise StoreUnavailable(f"throttle store {self.location}: its clock jumped ahead; counts are "
                                       f"held for a window")
            return code == 1

    @property
    def _clock_key(self) -> str:
        return f"{self._prefix}clock"

    def unknown_user(self, key: str) -> None:
        """Nothing: this store keeps every count until it expires (only the memory store drops)."""

    def drop(self, keys: list[str], ticket: str) -> None:
        """Take *ticket* back from *keys*; when Redis does not answer, it is taken back later
        (:meth:`_unsure`), and :class:`StoreUnavailable` raised."""
        if keys:
            names = [self._prefix + key for key in keys]

            def work():
                pipe = self._client.pipeline(transaction=False)
                for name in names:
                    pipe.zrem(name, ticket)
                pipe.execute()
            try:
                self._call(work)
            except StoreUnavailable:
                self._unsure(names, ticket, None)
                raise

    def clear(self, keys: list[str]) -> None:
        if keys:
            self._call(self._client.delete, *(self._prefix + key for key in keys))

    def ping(self) -> str:
        """Whether Redis answers and keeps its keys (the core's health probe,
        :mod:`gateway.health`): the location, or raises :class:`StoreUnavailable`, also for a
        Redis that may evict the counts (:func:`.eviction_problem`; the store is then not used
        until a probe finds otherwise). Bounded by ``throttle.redis.timeout``.
        Then takes back the reservations of failed calls (:meth:`_retract`), so that they go
        without waiting for the next password attempt; best effort. Last, raises while a step
        of Redis's clock holds every reservation (:data:`_HELD`)."""
        self._raw_call(self._client.ping)
        problem = self._raw_call(self._eviction.check, self._client, self.location)
        if problem is not None:
            raise StoreUnavailable(f"throttle store {self.location}: {problem}")
        try:
            self._retract()
        except StoreUnavailable as exc:
            log.debug("throttle: reservations of failed calls not taken back yet: %s", exc)
        window_ms = self._window_ms
        held = self._raw_call(lambda: self._held(keys=[self._clock_key], args=[window_ms]))
        if int(held) > 0:
            raise StoreUnavailable(f"throttle store {self.location}: its clock jumped ahead; password attempts are "
                                   f"refused (503) for {int(held) / 1000:.0f} s more")
        return f"{self.location}: answers"

    def close(self) -> None:
        self._client.close()
