"""Browser sessions and short-lived login state, shared by every worker (and instance).

Decides whether a session cookie names a live session: its HMAC must verify (``cookie.key``
from the state directory), its server-side record must exist, be younger than
``sessions.absolute`` and have been used within ``sessions.idle``. Reads ``login.sessions``.

The cookie is ``ID.MAC`` with a 256-bit random id; the store keys records by SHA-256 of the id,
so a copy of the store gives no usable cookie. Ids are only ever made here, at login (a new one
each time, the old session deleted): a cookie planted before login never becomes a session
(no fixation).

Two stores: SQLite in the state directory (one machine: every worker opens the same file, in
WAL mode) and Redis (several instances). They also keep *pending* logins (a validated
AuthnRequest waiting for the user to sign in, single use) and *seen* ids (replay refusal).
Times are wall-clock seconds (``time.time()``): they are compared across processes and hosts.

A session reused for a new answer has its account checked again (:meth:`SessionManager.rechecked`,
the lookup itself is :mod:`.web`'s), at most every :data:`RECHECK_INTERVAL` seconds; the time of
the last check and the subject the directory knows the account by are kept in the session's
record, so every worker and instance sees them.

Parked requests are bounded: :class:`SessionManager` refuses a park (:class:`ParkRefused`) when
the door's per-address budget is spent (:attr:`SessionManager.admit_park`, :mod:`.web`) or when
``sessions.max_pending`` (:data:`MAX_PARKED` by default) requests are parked in the whole store
(:meth:`SessionManager.hold`, what a logout continues with, is bounded the same way). A pending
record's expiry must be a finite number: a NaN or an infinity is refused with ``ValueError`` (a
caller that did not check its input), never stored. The expired records are purged at
most once a minute, in batches of :data:`PURGE_BATCH` rows on a connection of the purge's own, in
a thread: never on the event loop.

Sessions are bounded too (review: one valid password made 2,386 sessions a minute): a subject
has at most ``sessions.max_per_user`` live sessions; a sign-in beyond it ends the subject's oldest
(:meth:`SessionManager.create`). A session ends with every record that belongs to it (its
participants, its SessionIndex record) whatever ends it: a logout, the cap, the purge of sessions
past ``absolute`` *or* idle past ``idle`` (SQLite), the key's expiry (Redis: each key of a session
expires at its idle or absolute end, whichever comes first, renewed by each use). A SQLite change
is one transaction, a Redis one a Lua script. A SQLite file made by this version gives the freed pages back
(``auto_vacuum = INCREMENTAL``); an older file keeps its size and reuses them (docs/login.md).

The Redis store's calls block the worker's event loop (the door's handlers make them): each is
bounded by ``sessions.redis_timeout`` and, after a call that could not reach Redis, a circuit
breaker refuses every call at once for :data:`BREAKER_WINDOW` seconds, then lets one through to
try (review: a hung Redis held the loop for the 2 s socket timeout per request, one request after
another, ``/healthz`` and ``/auth`` waiting behind them). A refused call raises the store's usual
error, answered 503.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import contextvars
import hashlib
import hmac
import functools
import json
import logging
import math
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from gateway import Identity
from gateway.health import redis_location
from gateway.redis_deadline import CallDeadline, bounded_connection_class
from gateway.redis_eviction import EvictingRedis, EvictionWatch
from gateway.logs import printable
from gateway.sqlitedb import connect_wal, result_code
from gateway import throttle_stores
from gateway.throttle_stores import _STEP, _STEP_MARGIN_MS, _boot_clock

from .settings import SessionSettings

__all__ = ["BREAKER_WINDOW", "CLOCK_TOLERANCE", "MAX_PARKED", "PURGE_BATCH", "RECHECK_INTERVAL", "STORE_ERRORS",
           "ParkRefused", "RedisStore", "Session", "SessionManager", "SqliteStore", "identity_from_json",
           "identity_to_json", "same", "within"]


log = logging.getLogger("authgw.plugin.login")

#: Requests parked at once in the whole store (every worker, every instance of a Redis store),
#: beyond which a new one is refused (503, ``login.too_many_pending``) and nothing is parked: a
#: parked request is at most about 8 KB, so the pending requests of a flood from more addresses
#: than the per-address budget holds take at most about 160 MB. Each worker counts them again after
#: :data:`_COUNT_EVERY` parks of its own or :data:`_COUNT_INTERVAL` seconds, so the bound is
#: passed by at most ``_COUNT_EVERY`` parks per worker.
MAX_PARKED = 20_000
_COUNT_EVERY = 100
_COUNT_INTERVAL = 10.0
#: Seconds a client refused for the total bound is asked to wait (``Retry-After``).
_FULL_RETRY_AFTER = 30
#: Rows the SQLite purge deletes per statement (one short write transaction each, found by the
#: ``pending(expires)`` index): other workers' writes wait for one batch at most, not the purge.
PURGE_BATCH = 500
#: Free pages one ``PRAGMA incremental_vacuum`` statement may give back to the file system (each
#: statement its own short write transaction: measured at most about 12 ms, while 30,000 purged
#: 6 KB records took a 176 MB file down to 17 MB, in about 7 s in the purge's thread).
_VACUUM_STEP = 100
#: The WAL file is cut back to this size after a checkpoint (it grows with a burst of writes).
_JOURNAL_SIZE_LIMIT = 16 << 20
#: SQLite's primary result codes for a lock another connection holds.
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6
#: The Redis sorted set of the parked requests' keys, scored by their expiry (the total bound).
_PARKED_SET = "authgw:login:parked"
#: The SQL expression a session row's subject is found by (the ``sessions_subject`` index is on
#: it: a query must spell it the same way to use the index).
_SUBJECT = "json_extract(data, '$.identity.subject')"


#: True while a sync form of a :class:`SessionManager` operation runs it (:meth:`SessionManager._now`).
_AT_ONCE: contextvars.ContextVar[bool] = contextvars.ContextVar("authgw_login_sessions_at_once", default=False)


class ParkRefused(Exception):
    """A request that was not parked: its client's budget is spent (429,
    ``login.too_many_requests``) or the store holds :data:`MAX_PARKED` requests (503,
    ``login.too_many_pending``). Answered by :meth:`.web.LoginDoor.guarded`."""

    def __init__(self, status: int, reason: str, retry_after: int, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.status = status
        self.reason = reason
        self.retry_after = max(1, int(retry_after))
        self.detail = detail


def _store_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)
    try:
        import redis

        errors += (redis.RedisError,)
    except ImportError:  # authgw[redis] not installed: only SQLite can fail
        pass
    return errors


#: What a store raises when it cannot be used (a locked or full disk, Redis down or timing out).
STORE_ERRORS = _store_errors()


def identity_to_json(identity: Identity) -> dict[str, Any]:
    return {"subject": identity.subject, "username": identity.username, "method": identity.method,
            "display_name": identity.display_name, "email": identity.email, "groups": list(identity.groups),
            "authenticated_at": identity.authenticated_at}


def identity_from_json(data: dict[str, Any]) -> Identity:
    return Identity(subject=data["subject"], username=data["username"], method=data["method"],
                    display_name=data.get("display_name", ""), email=data.get("email", ""),
                    groups=tuple(data.get("groups", ())), authenticated_at=data["authenticated_at"])


#: Seconds a session's account check stands: a session reused for a new answer (a SAML Response,
#: a WS-Fed token, an OIDC code, a userinfo answer) within this time of the last check is not
#: checked again; its first reuse after sign-in always is. (A constant for now: it would be a
#: ``login.sessions`` setting.)
RECHECK_INTERVAL = 60.0
#: Seconds a stored time may lie ahead of this host's clock (another host's clock runs a little
#: ahead of it, sharing a Redis store). Further ahead, the clock stepped back (an NTP correction
#: of a clock that ran fast): a session's age, a sign-in's and an account check's would be
#: negative, and each would count as fresh for as long as the step (review of time).
CLOCK_TOLERANCE = 60.0


def within(age: float, limit: float) -> bool:
    """Whether *age* (now less a stored time) is at most *limit*, and not negative by more than
    :data:`CLOCK_TOLERANCE` (a time from the future is past every limit)."""
    return -CLOCK_TOLERANCE <= age <= limit


@dataclass(frozen=True)
class Session:
    key: str            # SHA-256 of the cookie id (the store's key)
    identity: Identity
    created: float
    index: str          # SAML SessionIndex: random, not the cookie id
    checked: float = 0.0            # when the directory last vouched for the account (0: never)
    directory: str | None = None    # the subject the directory knows the account by; None: unknown to it
    asked: bool = True              # False: the directory could not answer at sign-in (not asked yet)
    answered_by: str = ""           # the backend that vouched at sign-in (Decision.answered_by): a relay's connector


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _record(identity: Identity, index: str, checked: float, directory: str | None, asked: bool = True,
            answered_by: str = "") -> dict[str, Any]:
    record = {"identity": identity_to_json(identity), "index": index, "checked": checked, "directory": directory,
              "asked": asked}
    if answered_by:
        record["answered_by"] = answered_by
    return record


def _finite(expires: float) -> float:
    """*expires*, a pending record's expiry: a NaN or an infinity is a caller's error (its input
    was not checked), refused here before anything is stored, the same in both stores. SQLite
    kept an infinity for good (no purge deletes it) and silently dropped a NaN (stored as NULL,
    against ``NOT NULL``, ignored: read as a replay); Redis could not be given a TTL (a
    ``ValueError`` or ``OverflowError`` deep in the store, a 500)."""
    if isinstance(expires, bool) or not isinstance(expires, (int, float)) or not math.isfinite(expires):
        raise ValueError(f"a pending record's expiry must be a finite number of seconds, not {expires!r}")
    return expires


def _usable(key) -> bool:
    """Whether *key*, from a request (a ``req`` or ``then`` id, a SessionIndex, an
    ``InResponseTo``), can name a record: ids made here are at most 64 printable ASCII
    characters. Anything else names nothing, and is not handed to the store: a lone surrogate
    (a form in ``charset=utf-7``) cannot be encoded for SQLite or Redis (a 500; review of the
    sessions)."""
    return isinstance(key, str) and 0 < len(key) <= 64 and key.isascii() and key.isprintable()


def same(a: str, b: str) -> bool:
    """Constant-time equality of two strings from anywhere (``hmac.compare_digest`` refuses
    non-ASCII ``str``: a hostile cookie must not turn into a 500)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def _refill(row, burst: float, rate: float, now: float) -> float:
    """The tokens of a bucket last written as *row* (``(tokens, at)``, or ``None``: full) at
    *now*: refilled at *rate* a second up to *burst*. A time before the last write (a clock
    stepped back, another host's) refills nothing, and makes nothing look fuller."""
    if row is None:
        return float(burst)
    tokens, at = float(row[0]), float(row[1])
    return min(float(burst), tokens + max(0.0, now - at) * rate)


def _wait(tokens: float, rate: float) -> float:
    """Seconds until a bucket holding *tokens* holds one (``0.0``: it does)."""
    return 0.0 if tokens >= 1.0 else (1.0 - tokens) / rate


class SqliteStore:
    """One SQLite file; each worker opens its own connection (SQLite locks across processes).

    The worker's connection is used on its event loop: once the file is set up (5 s, as every
    worker may make it at once), it waits at most :attr:`BUSY_TIMEOUT` for a lock another
    process holds, then the store is unavailable (the door's 503). It waited 5 s per call, on
    the loop: a lock held (an operator's ``sqlite3`` shell mid-transaction, a backup) froze every
    request of the worker, ``/auth`` included (the throttle's store had the same; review of
    reliability). Half a second covers a sibling worker descheduled inside its transaction.

    The door's budgets are checked at every request that parks or answers, before anything
    else: their spends (:meth:`take_token_off_loop`, :meth:`give_back_token_off_loop`) are
    tried on the loop on a connection that never waits, and when the lock is held, made again on
    the store's budget thread, which waits up to :attr:`BUDGET_WAIT` in all (then the door's
    503), as the throttle's store does. They waited :attr:`BUSY_TIMEOUT` on the loop, and the
    worker answered nothing meanwhile, ``/healthz`` and ``/auth`` included (items left by stop 46).
    The door's session writes are made the same way (:meth:`call`, waiting up to
    :attr:`STORE_WAIT`): the touch of every request carrying a session cookie, a park, a
    sign-in's session, a single-use take waited :attr:`BUSY_TIMEOUT` on the loop each (items
    left by stop 47). Their sync forms (:class:`SessionManager`'s methods without the ``a``)
    still wait where they run, for callers that cannot await (a command, a unit test).

    The loop's connection makes no checkpoint (``wal_autocheckpoint`` 0): SQLite's own, at the
    commit that takes the WAL past 1,000 pages, copied 4 MiB into the file on the loop, every
    request of the worker waiting (items left by stop 47; the throttle's store had the same).
    Its commit that leaves the WAL past :data:`_JOURNAL_SIZE_LIMIT` starts one (``PASSIVE``) on
    the store's thread instead, one at a time per process (:meth:`_checkpoint_soon`). The WAL
    file's size measures what it holds past that limit: a WAL reset is cut back to the limit at
    its first commit (every connection of this store has it) and grows past it only when its
    frames do. While it is past, every call is made on the store's thread (as for a lock held),
    behind that checkpoint, on a connection that keeps SQLite's checkpoint at a commit: one that
    did not complete (a reader holding a snapshot, another process's or the purge's checkpoint
    under way) is made again there, never skipped for good, and the first write after a
    complete one resets the WAL and cuts the file back.
    """

    BUSY_TIMEOUT = 0.5
    #: Seconds a budget check waits for a lock held elsewhere, off the event loop (queued behind
    #: other checks included), before the store is unavailable (503): longer than the loop's
    #: :attr:`BUSY_TIMEOUT`, since the wait holds up only the request that waits.
    BUDGET_WAIT = 2.0
    #: The same for a session operation (:meth:`call`).
    STORE_WAIT = 2.0

    def __init__(self, path: Path, *, boot_clock=None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        #: ``() -> (boot id, seconds since that boot)`` (:func:`gateway.throttle_stores._boot_clock`):
        #: what the budgets' time passes with (:meth:`_bucket_now`).
        self._boot_clock = boot_clock or _boot_clock
        #: The connection a store method uses in this thread, when not the worker's (:meth:`db`).
        self._bound = threading.local()
        self._db = connect_wal(path, timeout=5.0, check_same_thread=False)  # every worker at once
        path.chmod(0o600)
        # A new file (no tables yet) gives freed pages back: the WAL switch made its header, so the
        # setting takes with a VACUUM of the empty file. An older file keeps auto_vacuum off
        # (docs/login.md): its freed pages are reused, it does not shrink.
        if self.db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
            self.db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            self.db.execute("VACUUM")
        self.db.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
        #: The purge's own connection (:meth:`purge` runs in a thread while the worker's event
        #: loop uses :attr:`db`; a connection is never used by two threads at once).
        self._purger: sqlite3.Connection | None = None
        #: ``sessions.idle``: the purge deletes sessions unused for longer (:meth:`lifetimes`,
        #: set by :class:`SessionManager`); ``None``: only sessions older than ``absolute`` are.
        self.idle: float | None = None
        self.db.execute("CREATE TABLE IF NOT EXISTS sessions (key TEXT PRIMARY KEY, data TEXT NOT NULL, "
                        "created REAL NOT NULL, seen REAL NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS pending (key TEXT PRIMARY KEY, data TEXT NOT NULL, "
                        "expires REAL NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS participants (session TEXT NOT NULL, party TEXT NOT NULL, "
                        "data TEXT NOT NULL, PRIMARY KEY (session, party))")
        # The purge finds the expired rows by it (a file made before it gets it here).
        self.db.execute("CREATE INDEX IF NOT EXISTS pending_expires ON pending (expires)")
        self.db.execute("CREATE INDEX IF NOT EXISTS sessions_created ON sessions (created)")  # its purge too
        # The purge of idle sessions, and a subject's sessions (the cap, ``sessions.max_per_user``).
        self.db.execute("CREATE INDEX IF NOT EXISTS sessions_seen ON sessions (seen)")
        self.db.execute(f"CREATE INDEX IF NOT EXISTS sessions_subject ON sessions ({_SUBJECT}, created)")
        # The door's budgets (:meth:`take_token`), shared by every worker; ``full``: when the bucket
        # is full again (the purge deletes it then: a full bucket is the same as none).
        self.db.execute("CREATE TABLE IF NOT EXISTS buckets (key TEXT PRIMARY KEY, tokens REAL NOT NULL, "
                        "at REAL NOT NULL, full REAL NOT NULL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS buckets_full ON buckets (full)")
        # Where this boot's seconds start in the buckets' time (:meth:`_bucket_now`).
        self.db.execute("CREATE TABLE IF NOT EXISTS bucket_clock (id INTEGER PRIMARY KEY CHECK (id = 0), "
                        "boot TEXT NOT NULL, offset REAL NOT NULL)")
        self.db.execute(f"PRAGMA busy_timeout = {int(self.BUSY_TIMEOUT * 1000)}")  # set up: the loop's wait now
        #: The connections of :meth:`_off_loop` (the budgets, the door's session calls): ``True`` the
        #: event loop's, which never waits for a lock; ``False`` the store thread's, which waits.
        loop_db = self._connect(5.0)  # set up as self.db, then:
        loop_db.execute("PRAGMA busy_timeout = 0")
        loop_db.execute("PRAGMA wal_autocheckpoint = 0")  # made on the store's thread (class docstring)
        self._budget_db: dict[bool, sqlite3.Connection] = {True: loop_db}
        self._budget_thread: concurrent.futures.ThreadPoolExecutor | None = None
        #: The checkpoint the loop's commits started on the store's thread, if any (:meth:`_checkpoint_soon`).
        self._checkpointing: concurrent.futures.Future | None = None

    def _connect(self, timeout: float) -> sqlite3.Connection:
        """Another connection to the file (:meth:`_off_loop`'s), with the worker's WAL size limit:
        ``journal_size_limit`` is a connection's own, applied by the connection whose commit first
        follows a WAL reset. These connections make nearly every write, and without it a WAL a
        reader or a burst had grown (82 MiB) was never cut back (review of stop 47's diff)."""
        db = connect_wal(self.path, timeout=timeout, check_same_thread=False)
        try:
            db.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
        except BaseException:
            db.close()
            raise
        return db

    def lifetimes(self, idle: float, absolute: float) -> None:
        """The sessions' lifetimes (``sessions.idle``, ``sessions.absolute``), for the purge."""
        self.idle = idle

    @property
    def db(self) -> sqlite3.Connection:
        """The connection the store's methods use: the worker's, which waits up to
        :attr:`BUSY_TIMEOUT`, unless :meth:`call` bound another to this thread for the call."""
        bound = getattr(self._bound, "db", None)
        return self._db if bound is None else bound

    @contextlib.contextmanager
    def _bound_to(self, db: sqlite3.Connection):
        self._bound.db = db
        try:
            yield
        finally:
            self._bound.db = None

    async def call(self, method, *args):
        """``method(*args)``, a method of this store, never waiting on the event loop for a lock
        another process holds (:meth:`_off_loop`, up to :attr:`STORE_WAIT`). Each method is one
        statement or one transaction: a try refused for the lock changed nothing."""
        return await self._off_loop(self.STORE_WAIT, method, *args)

    @staticmethod
    @contextlib.contextmanager
    def _transaction(db: sqlite3.Connection):
        """One write transaction on *db* (an autocommit connection): every statement in it or
        none; ``IMMEDIATE`` takes the write lock at once (other workers wait, busy timeout)."""
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back itself (a full disk)
                db.execute("ROLLBACK")
            raise

    @staticmethod
    def _drop_rows_of(db: sqlite3.Connection, ended: list[tuple[str, str]]) -> None:
        """Delete the rows that belong to the sessions *ended* (``(key, data)`` of session rows
        just deleted): their participants and their SessionIndex record, when it still names
        that session (a re-authentication carries the index to the new session)."""
        if not ended:
            return
        db.executemany("DELETE FROM participants WHERE session = ?", [(key,) for key, _ in ended])
        indexes = []
        for key, data in ended:
            index = json.loads(data).get("index")
            if isinstance(index, str) and index:
                indexes.append(("idx:" + index, key))
        db.executemany("DELETE FROM pending WHERE key = ? AND json_extract(data, '$.key') = ?", indexes)

    def put_session(self, key: str, data: dict, now: float) -> None:
        self.db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)", (key, json.dumps(data), now, now))

    def get_session(self, key: str) -> tuple[dict, float, float] | None:
        row = self.db.execute("SELECT data, created, seen FROM sessions WHERE key = ?", (key,)).fetchone()
        return (json.loads(row[0]), row[1], row[2]) if row else None

    def touch_session(self, key: str, now: float) -> None:
        self.db.execute("UPDATE sessions SET seen = ? WHERE key = ?", (now, key))

    def update_session(self, key: str, data: dict) -> None:
        self.db.execute("UPDATE sessions SET data = ? WHERE key = ?", (json.dumps(data), key))

    def delete_session(self, key: str) -> None:
        """Delete the session and the rows that belong to it (participants, its SessionIndex
        record), in one transaction."""
        with self._transaction(self.db) as db:
            rows = db.execute("DELETE FROM sessions WHERE key = ? RETURNING key, data", (key,)).fetchall()
            db.execute("DELETE FROM participants WHERE session = ?", (key,))
            self._drop_rows_of(db, rows)

    def limit_subject(self, subject: str, keep: str, most: int, now: float, idle: float,
                      absolute: float) -> list[tuple[str, dict[str, dict]]]:
        """End the oldest sessions of *subject* beyond *most* (the session *keep*, just made, is
        always one of those kept), and its sessions that are over (idle, too old) with them; in
        one transaction, so that workers signing the same subject in at once keep *most* in all.
        Returns the sessions ended that were live: ``(key, participants)``."""
        ended: list[tuple[str, dict[str, dict]]] = []
        with self._transaction(self.db) as db:
            # Oldest and newest are in the order the sessions were written (rowid: SQLite gives a
            # new row a rowid above every row there), not by their ``created`` time: that is taken
            # before the writes, which may wait for the lock while another worker signs the same
            # subject in several times, and a session written last but dated first was kept as
            # "newer" by none and over the cap by all (5 against 4 in the worker race test).
            rows = db.execute(f"SELECT key, created, seen, rowid FROM sessions WHERE {_SUBJECT} = ? "
                              "ORDER BY rowid DESC", (subject,)).fetchall()
            mine = next((rowid for key, _created, _seen, rowid in rows if key == keep), None)
            if mine is None:
                return ended  # ended already by a newer sign-in's limit: nothing of this one to do
            kept, doomed = 1, []
            for key, created, seen, rowid in rows:
                if key == keep:
                    continue
                live = now - created <= absolute and now - seen <= idle
                # A session written after *keep* (another worker's sign-in of the same subject, not
                # limited yet) is never ended here: its own limit ends this one if need be (two
                # sign-ins at once ended each other's new session).
                if rowid > mine or (live and kept < most):
                    kept += 1
                    continue
                doomed.append(key)
                if live:
                    parties = db.execute("SELECT party, data FROM participants WHERE session = ?", (key,)).fetchall()
                    ended.append((key, {party: json.loads(data) for party, data in parties}))
            gone = []
            for key in doomed:
                gone += db.execute("DELETE FROM sessions WHERE key = ? RETURNING key, data", (key,)).fetchall()
            self._drop_rows_of(db, gone)
        return ended

    def put_participant(self, key: str, party: str, data: dict) -> None:
        # One row per (session, party), replaced: a transient NameID changes with each answer.
        self.db.execute("INSERT OR REPLACE INTO participants VALUES (?, ?, ?)", (key, party, json.dumps(data)))

    def get_participants(self, key: str) -> dict[str, dict]:
        rows = self.db.execute("SELECT party, data FROM participants WHERE session = ?", (key,)).fetchall()
        return {party: json.loads(data) for party, data in rows}

    def put_pending(self, key: str, data: dict, expires: float) -> bool:
        """Store *data* under *key* unless the key is taken (then ``False``: a replay).
        *expires* must be a finite number (:func:`_finite`)."""
        _finite(expires)
        cursor = self.db.execute("INSERT OR IGNORE INTO pending VALUES (?, ?, ?)", (key, json.dumps(data), expires))
        return cursor.rowcount == 1

    def take_pending(self, key: str, now: float) -> dict | None:
        row = self.db.execute("DELETE FROM pending WHERE key = ? RETURNING data, expires",
                              (key,)).fetchone()
        return json.loads(row[0]) if row and row[1] > now else None

    def get_pending(self, key: str, now: float) -> dict | None:
        row = self.db.execute("SELECT data, expires FROM pending WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row and row[1] > now else None

    def get_pendings(self, keys: list[str], now: float) -> dict[str, dict]:
        """:meth:`get_pending` of several keys in one statement (on the primary key's index)."""
        if not keys:
            return {}
        rows = self.db.execute(f"SELECT key, data, expires FROM pending WHERE key IN ({', '.join('?' * len(keys))})",
                               keys).fetchall()
        return {key: json.loads(data) for key, data, expires in rows if expires > now}

    def _bucket_now(self, db: sqlite3.Connection, wall: float, *, write: bool) -> float | None:
        """The buckets' time: this machine's boot clock plus this boot's offset, set (*write*, in
        a transaction) by the first spend of a boot from *wall*, or from the latest bucket when
        *wall* is behind it. Not the wall clock (as the throttle's SQLite store): a step of it
        forward refilled every bucket at once (and the purge deleted them all), a step back left
        every bucket as empty as it was for the step's length (review of the shared budgets).
        *write* false and this boot not set yet: ``None``. Without a boot id: *wall*."""
        boot, uptime = self._boot_clock()
        if boot is None:
            return wall
        row = db.execute("SELECT boot, offset FROM bucket_clock WHERE id = 0").fetchone()
        if row is not None and row[0] == boot:
            return uptime + row[1]
        if not write:
            return None
        (latest,) = db.execute("SELECT max(at) FROM buckets").fetchone()
        start = wall if latest is None else max(wall, latest)
        db.execute("INSERT OR REPLACE INTO bucket_clock (id, boot, offset) VALUES (0, ?, ?)", (boot, start - uptime))
        return start

    def take_token(self, key: str, burst: float, rate: float, now: float | None, spend: bool = True) -> float:
        """Spend a token of the bucket *key* (:func:`_refill`); see :meth:`SessionManager.take_token`.
        One write transaction when a token is spent, a read otherwise. *now*: ``None``, the
        buckets' own time (:meth:`_bucket_now`, what the door uses); a number, that time.
        On the worker's connection: a lock held elsewhere is waited for where this runs (up to
        :attr:`BUSY_TIMEOUT`); in a worker, :meth:`take_token_off_loop`."""
        return self._take(self.db, key, burst, rate, now, spend)

    def give_back_token(self, key: str, burst: float, rate: float, now: float | None) -> None:
        """Give back a token :meth:`take_token` spent from the bucket *key*, in one write
        transaction (a spend of another worker meanwhile is counted, not overwritten); see
        :meth:`SessionManager.give_back_token`. A bucket full again (or gone with the purge)
        gets nothing: it never holds more than *burst*. On the worker's connection, as
        :meth:`take_token`; in a worker, :meth:`give_back_token_off_loop`."""
        self._give_back(self.db, key, burst, rate, now)

    async def take_token_off_loop(self, key: str, burst: float, rate: float, spend: bool = True) -> float:
        """:meth:`take_token` at the buckets' own time, never waiting on the event loop
        (:meth:`_off_loop`)."""
        return await self._off_loop(self.BUDGET_WAIT, self._on_bound, self._take, key, burst, rate, None, spend)

    async def give_back_token_off_loop(self, key: str, burst: float, rate: float) -> None:
        """:meth:`give_back_token` at the buckets' own time, never waiting on the event loop."""
        await self._off_loop(self.BUDGET_WAIT, self._on_bound, self._give_back, key, burst, rate, None)

    def _on_bound(self, work, *args):
        """``work(db, *args)`` on the connection bound to this thread (the budgets' steps)."""
        return work(self.db, *args)

    async def _off_loop(self, wait: float, work, *args):
        """``work(*args)`` on the loop's connection, which never waits; when another process
        holds the lock (an operator's ``sqlite3`` shell mid-transaction, a backup, a sibling
        worker inside its transaction) nothing was changed, and it is made again on the store's
        thread, which waits up to *wait* seconds from now, then raises the lock's
        ``sqlite3.OperationalError`` (a store error: the door's 503). A read never waits for a
        writer (WAL): it is answered on the loop. While the WAL is past its limit every call is
        made on the thread, behind the checkpoint (class docstring)."""
        if not self._wal_past_limit():
            try:
                with self._bound_to(self._budget_db[True]):
                    result = work(*args)
            except sqlite3.OperationalError as exc:
                if result_code(exc) not in (_SQLITE_BUSY, _SQLITE_LOCKED):
                    raise
            else:
                if self._wal_past_limit():  # this commit took it past: the loop's connection makes no checkpoint
                    self._checkpoint_soon()
                return result
        deadline = time.monotonic() + wait
        return await asyncio.get_running_loop().run_in_executor(
            self._store_thread(), functools.partial(self._waited, deadline, work, *args))

    def _store_thread(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._budget_thread is None:
            # One thread: calls that wait for the lock queue behind each other, each within its
            # own deadline, and hold none of the loop's default executor (SAML signing, reloads).
            self._budget_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="login-store")
        return self._budget_thread

    def _wal_past_limit(self) -> bool:
        """Whether the WAL holds more than :data:`_JOURNAL_SIZE_LIMIT` (class docstring)."""
        try:
            return os.stat(f"{self.path}-wal").st_size > _JOURNAL_SIZE_LIMIT
        except OSError:  # none yet; a directory gone is the next call's to report
            return False

    def _checkpoint_soon(self) -> None:
        """Checkpoint the WAL on the store's thread, unless the last one started is still queued
        or under way. The same thread as the calls that wait for a lock, not one of its own: those
        wait only while another process holds the write lock, when this worker's commits cannot
        grow the WAL, so a checkpoint queued behind them is not late; one ahead of them takes
        from their wait only the time of a PASSIVE checkpoint (it waits for no lock): copying
        the 16 MiB of WAL it is started at (measured 2 to 28 ms). And the calls made while the WAL
        is past the limit must follow it there (the first write after it resets the WAL)."""
        if self._checkpointing is not None and not self._checkpointing.done():
            return
        try:
            self._checkpointing = self._store_thread().submit(self._checkpoint)
        except RuntimeError:  # the store is closing: nothing to keep small
            pass

    def _checkpoint(self) -> None:
        """A PASSIVE checkpoint on the store thread's connection: it copies what it can now
        (up to a reader's snapshot; none while another checkpoint of the file runs) and waits
        for no lock. What it leaves is copied by a later one (class docstring)."""
        try:
            self._thread_db(5.0).execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except (sqlite3.Error, OSError) as exc:  # the file's trouble is the next write's to report
            log.debug("login: a checkpoint of %s failed: %s", self.path, exc)

    def _thread_db(self, timeout: float) -> sqlite3.Connection:
        """The store thread's connection (made at its first use, *timeout* for setting it up)."""
        db = self._budget_db.get(False)
        if db is None:
            db = self._budget_db[False] = self._connect(timeout)
        return db

    def _waited(self, deadline: float, work, *args):
        """``work(*args)`` on the store thread's connection, waiting for the lock until
        *deadline* (monotonic) at most."""
        left = deadline - time.monotonic()
        if left <= 0:  # queued behind calls that waited their whole time: the lock is still held
            raise sqlite3.OperationalError(f"{self.path}: database is locked (the store's calls waited their "
                                           "time behind it)")
        db = self._thread_db(left)
        db.execute(f"PRAGMA busy_timeout = {max(1, int(left * 1000))}")
        with self._bound_to(db):
            return work(*args)

    def _take(self, db: sqlite3.Connection, key: str, burst: float, rate: float, now: float | None,
              spend: bool) -> float:
        """:meth:`take_token` on the connection *db*."""
        if not spend:
            row = db.execute("SELECT tokens, at FROM buckets WHERE key = ?", (key,)).fetchone()
            if now is None:
                wall = time.time()
                now = self._bucket_now(db, wall, write=False)
                if now is None:  # no spend this boot yet: as the first spend will date it
                    now = wall if row is None else max(wall, float(row[1]))
            return _wait(_refill(row, burst, rate, now), rate)
        with self._transaction(db):
            if now is None:
                now = self._bucket_now(db, time.time(), write=True)
            tokens = _refill(db.execute("SELECT tokens, at FROM buckets WHERE key = ?", (key,)).fetchone(),
                             burst, rate, now)
            if tokens < 1.0:
                return _wait(tokens, rate)
            tokens -= 1.0
            db.execute("INSERT OR REPLACE INTO buckets VALUES (?, ?, ?, ?)",
                       (key, tokens, now, now + (burst - tokens) / rate))
        return 0.0

    def _give_back(self, db: sqlite3.Connection, key: str, burst: float, rate: float, now: float | None) -> None:
        """:meth:`give_back_token` on the connection *db*."""
        with self._transaction(db):
            if now is None:
                now = self._bucket_now(db, time.time(), write=True)
            row = db.execute("SELECT tokens, at FROM buckets WHERE key = ?", (key,)).fetchone()
            if row is None:
                return
            tokens = min(float(burst), _refill(row, burst, rate, now) + 1.0)
            if tokens >= burst:  # full: the same as no row
                db.execute("DELETE FROM buckets WHERE key = ?", (key,))
                return
            at = max(now, float(row[1]))  # a clock stepped back does not date the bucket earlier
            db.execute("INSERT OR REPLACE INTO buckets VALUES (?, ?, ?, ?)",
                       (key, tokens, at, at + (burst - tokens) / rate))

    def count_parked(self, now: float) -> int:
        """Parked requests in the file (expired ones not purged yet included: a bound errs on
        the safe side); counted on the primary key's index, by every worker's rows."""
        return self.db.execute("SELECT COUNT(*) FROM pending WHERE key >= 'p:' AND key < 'p;'").fetchone()[0]

    def purge(self, now: float, oldest: float) -> int:
        """Delete expired pending records and sessions; returns the pending records deleted.

        Sessions created before *oldest* (``absolute``) and sessions not used for :attr:`idle`
        seconds are deleted with the rows that belong to them (participants, SessionIndex
        records).

        Made to run in a thread (:meth:`SessionManager._maybe_purge`): on a connection of its
        own, in batches of :data:`PURGE_BATCH` rows (each statement its own short transaction,
        the ``pending(expires)`` index finding them; a batch of sessions and their rows one
        transaction, found by the ``sessions(created)`` or ``sessions(seen)`` index), then the
        freed pages are given back to the file system, :data:`_VACUUM_STEP` at a time, where
        the file allows it."""
        if self._purger is None:
            self._purger = connect_wal(self.path, timeout=5.0, check_same_thread=False)
            self._purger.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
        db = self._purger
        removed = 0
        while True:
            batch = db.execute("DELETE FROM pending WHERE rowid IN (SELECT rowid FROM pending WHERE expires < ? "
                               "LIMIT ?)", (now, PURGE_BATCH)).rowcount
            removed += batch
            if batch < PURGE_BATCH:
                break
        over = [("created", oldest)] + ([("seen", now - self.idle)] if self.idle is not None else [])
        for column, before in over:
            while True:
                with self._transaction(db):
                    ended = db.execute(f"DELETE FROM sessions WHERE rowid IN (SELECT rowid FROM sessions WHERE "
                                       f"{column} < ? LIMIT ?) RETURNING key, data", (before, PURGE_BATCH)).fetchall()
                    self._drop_rows_of(db, ended)
                if len(ended) < PURGE_BATCH:
                    break
        # Full buckets, by the buckets' time (*now* before a spend of this boot set it).
        full_at = self._bucket_now(db, now, write=False)
        full_at = now if full_at is None else full_at
        while db.execute(
                "DELETE FROM buckets WHERE rowid IN (SELECT rowid FROM buckets WHERE full < ? LIMIT ?)",
                (full_at, PURGE_BATCH)).rowcount == PURGE_BATCH:
            pass
        # Participants left behind: by an earlier version, or noted just as their session ended.
        db.execute("DELETE FROM participants WHERE session NOT IN (SELECT key FROM sessions)")
        if db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:  # INCREMENTAL: a file made by this version
            while db.execute("PRAGMA freelist_count").fetchone()[0] > 0:
                # Every row must be stepped through: each step frees a page.
                db.execute(f"PRAGMA incremental_vacuum({_VACUUM_STEP})").fetchall()
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # the file is cut at the checkpoint
        return removed

    def close(self) -> None:
        if self._budget_thread is not None:
            self._budget_thread.shutdown(wait=True)  # a check under way ends within BUDGET_WAIT
        for db in self._budget_db.values():
            db.close()
        if self._purger is not None:
            self._purger.close()
        self._db.close()


#: The Redis keys of the login door: ``s:KEY`` a session (``[data, created, seen]``), ``sp:KEY``
#: its participants (a hash), ``p:idx:INDEX`` its SessionIndex record (``{"key": KEY}``),
#: ``u:SHA1(subject)`` the subject's sessions (a sorted set of keys by creation, for
#: ``sessions.max_per_user``), ``p:...`` the other short-lived records.
_PREFIX = "authgw:login:"

#: Lua: whether the SessionIndex record *idx* still names the session *key* (a re-authentication
#: carries the index to the new session: the old one's end must not take it).
_NAMES = """
local function names(idx, key)
  local held = redis.call('GET', idx)
  if not held then return false end
  local ok, ref = pcall(cjson.decode, held)
  return ok and type(ref) == 'table' and ref.key == key
end
"""
#: Lua: end the session *key*: its record, its participants, its SessionIndex record (if it
#: still names it) and its place in its subject's set; returns the record as it was (or false).
_END = _NAMES + """
local function finish(prefix, key)
  local name = prefix .. 's:' .. key
  local raw = redis.call('GET', name)
  redis.call('DEL', name, prefix .. 'sp:' .. key)
  if not raw then return false end
  local ok, rec = pcall(cjson.decode, raw)
  if not ok or type(rec) ~= 'table' or type(rec[1]) ~= 'table' then return raw end
  local data = rec[1]
  if type(data.index) == 'string' and data.index ~= '' and names(prefix .. 'p:idx:' .. data.index, key) then
    redis.call('DEL', prefix .. 'p:idx:' .. data.index)
  end
  if type(data.identity) == 'table' and type(data.identity.subject) == 'string' then
    redis.call('ZREM', prefix .. 'u:' .. redis.sha1hex(data.identity.subject), key)
  end
  return raw
end
"""
#: Delete a session and what belongs to it, atomically. KEYS: the record, its participants
#: (the keys derived from the record are named in the script). ARGV: prefix, key.
_DELETE = _END + """
finish(ARGV[1], ARGV[2])
return 1
"""
#: A new session joins its subject's set; beyond ARGV[3] live sessions the oldest of that
#: subject end (never the new one). Its SessionIndex record and participants get the session's
#: expiry. Returns ``{key, {party, ...}}`` per session ended. KEYS: the new record.
#: ARGV: prefix, key, most, the set's expiry (s: ``absolute``), the session's creation time
#: (its score, raised above every member's: the set is in the order the sessions joined).
_LIMIT = _END + """
local prefix, key, most = ARGV[1], ARGV[2], tonumber(ARGV[3])
local raw = redis.call('GET', KEYS[1])
if not raw then return {} end
local data = cjson.decode(raw)[1]
local set = prefix .. 'u:' .. redis.sha1hex(data.identity.subject)
-- Scored in the order the sessions join (this script, atomic): above every member, so that the
-- one joining is the newest and the cap holds exactly. Its ``created`` time is taken before its
-- writes; another worker may sign the subject in several times meanwhile (SQLite: rowid order).
local score = tonumber(ARGV[5])
local top = redis.call('ZREVRANGE', set, 0, 0, 'WITHSCORES')
if top[2] and tonumber(top[2]) >= score then score = tonumber(top[2]) + 0.001 end
redis.call('ZADD', set, score, key)
redis.call('EXPIRE', set, ARGV[4])
local ms = redis.call('PTTL', KEYS[1])
if ms > 0 then
  redis.call('PEXPIRE', prefix .. 'sp:' .. key, ms)
  if type(data.index) == 'string' and names(prefix .. 'p:idx:' .. data.index, key) then
    redis.call('PEXPIRE', prefix .. 'p:idx:' .. data.index, ms)
  end
end
local kept, ended = 1, {}
if redis.call('ZCARD', set) <= most then return ended end  -- the usual case: nothing to look at
local listed = redis.call('ZREVRANGE', set, 0, -1)
for _, other in ipairs(listed) do
  if other ~= key then
    if redis.call('EXISTS', prefix .. 's:' .. other) == 0 then
      redis.call('ZREM', set, other)
    elseif kept < most then
      kept = kept + 1
    else
      local parties = redis.call('HKEYS', prefix .. 'sp:' .. other)
      finish(prefix, other)
      table.insert(ended, {other, parties})
    end
  end
end
return ended
"""
#: Compare-and-set: the new record replaces the old only if the old is still there, unchanged.
#: The JSON is made in Python (cjson would turn ``[]`` into ``{}`` and round the times).
#: ARGV[3]: the new expiry in seconds (a use: the participants and the SessionIndex record,
#: KEYS[2] and KEYS[3], get it too), or 0 to keep the record's (an account check is no use).
_SWAP = _NAMES + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local ttl = tonumber(ARGV[3])
if ttl == 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 1
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ttl)
redis.call('EXPIRE', KEYS[2], ttl)
if KEYS[3] and names(KEYS[3], ARGV[4]) then redis.call('EXPIRE', KEYS[3], ttl) end
return 1
"""
#: A participant is noted only while its session lives, and expires with it.
_PARTICIPANT = """
local ms = redis.call('PTTL', KEYS[1])
if ms == -2 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if ms > 0 then redis.call('PEXPIRE', KEYS[2], ms) else redis.call('EXPIRE', KEYS[2], ARGV[3]) end
return 1
"""
#: The Redis hash of the buckets' clock (``offset``, ``hold``, ...: the throttle's
#: :data:`gateway.throttle_stores._STEP` keeps it): the buckets' time is Redis's ``TIME`` plus
#: ``offset``, with every step of Redis's clock forward an instance measured taken out of it.
_CLOCK = "authgw:login:clock"
#: Lua, the start of :data:`_TOKEN` and :data:`_GIVE_BACK`. KEYS[1] the bucket, KEYS[2] the
#: clock; ARGV[1] burst, ARGV[2] rate, ARGV[3] the latest time (ms) the caller can account for
#: (-1: none), ARGV[4] how much longer than its refill a bucket's key lives (ms). A time past
#: ARGV[3] is a step of Redis's clock forward: ``{-2, now, offset}`` and nothing changed (the
#: caller takes the step out of the offset and asks again). While a step that may have lost
#: keys holds the buckets (``hold``, cut to a refill if Redis's clock stepped back since):
#: ``{-3, ...}``. A bucket dated after now (Redis's clock stepped back) is dated now: it
#: refills from now, not from the end of the step. Then ``tokens`` is the bucket's, refilled.
_CLOCKED = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local clock = redis.call('HMGET', KEYS[2], 'offset', 'hold')
local offset = tonumber(clock[1]) or 0
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + offset
local bound = tonumber(ARGV[3])
if bound >= 0 and ms > bound then return {-2, '0', ms, offset} end
local burst, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
local refill = math.ceil(burst / rate * 1000)
local hold = tonumber(clock[2]) or 0
if hold > ms + refill then
  hold = ms + refill
  redis.call('HSET', KEYS[2], 'hold', hold)
end
if ms < hold then return {-3, '0', ms, offset} end
local now = ms / 1000
local tokens, at = burst, nil
local v = redis.call('HMGET', KEYS[1], 't', 'a')
if v[1] and v[2] then
  at = math.min(now, tonumber(v[2]))
  tokens = math.min(burst, tonumber(v[1]) + (now - at) * rate)
end
local function keep(left)
  redis.call('HSET', KEYS[1], 't', tostring(left), 'a', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((burst - left) / rate * 1000) + 1000 + tonumber(ARGV[4]))
end
"""
#: Lua: :meth:`RedisStore.take_token`, atomically, on the buckets' clock (:data:`_CLOCKED`:
#: Redis's own, so the instances' clocks do not matter, with its steps forward taken out).
#: ARGV[5]: '1' spend, '0' only the wait. ``{1, wait}``, or a code of :data:`_CLOCKED`.
_TOKEN = _CLOCKED + """
if tokens < 1 then
  if at and tonumber(v[2]) > now then keep(tokens) end  -- dated now: refilled from now on
  return {1, tostring((1 - tokens) / rate), ms, offset}
end
if ARGV[5] == '1' then keep(tokens - 1) end
return {1, '0', ms, offset}
"""
#: Lua: :meth:`RedisStore.give_back_token`, atomically (as :data:`_TOKEN`). A bucket full again
#: (its key gone) gets nothing back.
_GIVE_BACK = _CLOCKED + """
if not at then return {1, '0', ms, offset} end
tokens = math.min(burst, tokens + 1)
if tokens >= burst then redis.call('DEL', KEYS[1]) else keep(tokens) end
return {1, '0', ms, offset}
"""
#: Compare-and-set attempts before a touch or update gives way to the writes that won.
_REWRITE_TRIES = 5
#: Seconds a session Redis that did not answer (``sessions.redis_timeout``) or refused the
#: connection is left alone: every call fails at once meanwhile (the request is answered 503, as
#: when Redis fails), then one call is let through to try it (review: each call blocked the
#: worker's event loop for the whole socket timeout, one request after another, until the
#: worker watchdog killed the worker with every request it held).
BREAKER_WINDOW = 5.0
#: ``sessions.redis_timeout`` when the store is made without it (the health probe's store).
DEFAULT_REDIS_TIMEOUT = 0.5


class _Breaker:
    """The circuit breaker of a :class:`RedisStore`: closed while Redis answers; open for
    :data:`BREAKER_WINDOW` seconds after a call failed to reach it (a timeout, a refused or lost
    connection), every call meanwhile refused at once; then half open: the next call is let
    through (one at a time), its success closes the breaker, its failure opens it again. A
    worker's event loop thus waits for a hung Redis once per window, not once per request. The
    outage is logged once at ERROR when it opens and once at WARNING when it closes. Thread-safe
    (the door's handlers, the purge's thread)."""

    def __init__(self, location: str, window: float = BREAKER_WINDOW) -> None:
        self.location = location
        self.window = window
        self._lock = threading.Lock()
        self._retry_at: float | None = None  # monotonic time of the next try; None: closed
        self._probing = False  # a call let through to try Redis is under way
        self._since = 0.0      # monotonic start of the outage
        self._refused = 0      # calls refused at once in this outage

    @property
    def closed(self) -> bool:
        return self._retry_at is None

    def admit(self) -> bool:
        """Whether a call may ask Redis; ``True`` when it is the probe of a half-open breaker.
        Raises ``redis.ConnectionError`` (a store error: the request is answered 503) while open."""
        if self._retry_at is None:  # the common case, without the lock
            return False
        with self._lock:
            if self._retry_at is None:
                return False
            now = time.monotonic()
            if now >= self._retry_at and not self._probing:
                self._probing = True
                return True
            self._refused += 1
            failed = now - self._since
        import redis

        raise redis.ConnectionError(f"{self.location}: not asked: unavailable for {failed:.1f} s "
                                    f"(tried again at most every {self.window:.0f} s)")

    def failed(self, probe: bool, exc: BaseException) -> None:
        """A call did not reach Redis: the breaker opens (again) for a window."""
        now = time.monotonic()
        with self._lock:
            first = self._retry_at is None
            if first:
                self._since, self._refused = now, 0
            self._retry_at = now + self.window
            if probe:
                self._probing = False
        if first:
            log.error("login session store unavailable (fail closed: sign-ins and answers are refused, 503): "
                      "%s: %s: %s. Not asked for %.0f s, then tried again by one request at a time; logged once "
                      "per outage", self.location, exc.__class__.__name__, exc, self.window)

    def answered(self, probe: bool) -> None:
        """Redis answered a call (whatever it answered): the end of an outage, if there was one."""
        if self._retry_at is None and not probe:  # the common case, without the lock
            return
        with self._lock:
            if probe:
                self._probing = False
            if self._retry_at is None:
                return
            lasted, refused = time.monotonic() - self._since, self._refused
            self._retry_at, self._refused = None, 0
        log.warning("login session store %s answers again after %.0f s; %d request(s) were refused at once "
                    "meanwhile (503)", self.location, lasted, refused)

    def abandoned(self, probe: bool) -> None:
        """A call ended otherwise (an error before or after Redis, not of the connection): the
        breaker stays as it is; a probe's turn goes to the next call."""
        if probe:
            with self._lock:
                self._probing = False


def _decoded(raw: bytes | None, kind: type):
    """The JSON record *raw* of a Redis key, if it is a *kind* (``dict`` or ``list``); else None,
    as an absent record is (logged). A value this store did not write (another application
    sharing the database, bytes that are not UTF-8) was a 500 with a traceback at every request
    naming it (review of the Redis stores)."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        value = None
    if not isinstance(value, kind):
        log.warning("login store: a record that is not one of this store's is taken as absent")
        return None
    return value


def _breaker(method):
    """A :class:`RedisStore` method guarded by its :class:`_Breaker`."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if self.eviction.problem is not None:  # a replay mark or a code could be evicted: not used
            import redis

            raise redis.ConnectionError(f"{self.location}: {self.eviction.problem}")
        probe = self.breaker.admit()
        try:
            with self.deadline.within(self.timeout):  # the whole call, not each read of it
                result = method(self, *args, **kwargs)
        except self._unreachable as exc:
            self.breaker.failed(probe, exc)
            raise
        except BaseException:
            # Redis answered with an error (a ResponseError), or the caller's data was refused:
            # not a sign of an outage, nor of its end.
            self.breaker.abandoned(probe)
            raise
        self.breaker.answered(probe)
        return result

    return guarded


class RedisStore:
    """The same records in Redis, with server-side expiry (several gateway instances).

    Its calls block (the door's handlers make them on the worker's event loop): each is bounded
    by *timeout* in all (``sessions.redis_timeout``: connecting, sending, reading the whole
    answer; no retry), and a
    :class:`_Breaker` refuses every call at once for :data:`BREAKER_WINDOW` seconds after one
    could not reach Redis. A refused call raises ``redis.ConnectionError``, as a failed one does
    (:data:`STORE_ERRORS`: the door answers 503)."""

    def __init__(self, url: str, ttl: float, timeout: float = DEFAULT_REDIS_TIMEOUT,
                 eviction: EvictionWatch | None = None) -> None:
        import redis  # authgw[redis]

        self._url = url
        #: Whether this Redis may evict keys, as the plugin's health probe last found (shared by
        #: the worker's stores): while it may, no call is made (503).
        self.eviction = eviction or EvictionWatch("login session store")
        self.ttl = int(ttl) + 1
        #: ``sessions.idle`` and ``sessions.absolute`` (:meth:`lifetimes`): a session's key expires
        #: when the first of them is reached, so Redis drops idle sessions itself.
        self.idle = self.absolute = float(ttl)
        self.location = redis_location(url)  # for readiness and errors: no password
        #: What a call that did not reach Redis raises (``BusyLoadingError`` is a ``ConnectionError``);
        #: an error Redis answered (``ResponseError``) is not one.
        self._unreachable = (redis.ConnectionError, redis.TimeoutError, OSError)
        self.breaker = _Breaker(self.location)
        #: Each call's deadline (:mod:`gateway.redis_deadline`): redis-py's socket_timeout bounds
        #: each read alone, and a Redis dribbling its answer held the event loop for seconds
        #: with every call a success to the breaker (review of this stop's diff).
        self.deadline = CallDeadline()
        self.redis = None
        #: (buckets' time in ms, boot clock) of the last answer of a budget script: what a step of
        #: Redis's clock is measured against (:meth:`_on_clock`).
        self._seen: tuple[int, float] | None = None
        self.use_timeout(timeout)

    def use_timeout(self, timeout: float) -> None:
        """Bound each call by *timeout* seconds (a new client: connections already made are
        closed)."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        if self.redis is not None:
            self.redis.close()
        self.timeout = float(timeout)
        # No retry: a retried call would block the event loop again (redis-py 6 and later retry
        # a timeout by default).
        self.redis = redis.Redis.from_url(self._url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                                          retry=Retry(NoBackoff(), 0))
        pool = self.redis.connection_pool
        pool.connection_class = bounded_connection_class(pool.connection_class, self.deadline)
        self._swap = self.redis.register_script(_SWAP)
        self._delete = self.redis.register_script(_DELETE)
        self._limit = self.redis.register_script(_LIMIT)
        self._participant = self.redis.register_script(_PARTICIPANT)
        self._token = self.redis.register_script(_TOKEN)
        self._give_back = self.redis.register_script(_GIVE_BACK)
        self._step = self.redis.register_script(_STEP)  # the throttle's, on the buckets' clock

    def lifetimes(self, idle: float, absolute: float) -> None:
        self.idle, self.absolute = idle, absolute
        self.ttl = int(absolute) + 1

    def _expiry(self, created: float, seen: float, now: float) -> int:
        """Seconds the session record (used at *seen*) lives from *now*: to its idle or its
        absolute end, whichever comes first (and a second more, as before)."""
        return max(1, math.ceil(min(seen + self.idle, created + self.absolute) - now)) + 1

    def ping(self) -> str:
        """The health probe's question (raises on failure; at most the socket timeout). Asks Redis
        whatever the breaker says: the probe runs off the event loop, and readiness reports
        what Redis answers now."""
        with self.deadline.within(self.timeout):
            self.redis.ping()
            problem = self.eviction.check(self.redis, self.location)
        if problem is not None:
            raise EvictingRedis(f"{self.location}: {problem}")
        return f"{self.location}: answers"

    @_breaker
    def put_session(self, key: str, data: dict, now: float) -> None:
        self.redis.set(f"authgw:login:s:{key}", json.dumps([data, now, now]), ex=self._expiry(now, now, now))

    @_breaker
    def get_session(self, key: str) -> tuple[dict, float, float] | None:
        record = _decoded(self.redis.get(f"authgw:login:s:{key}"), list)
        return tuple(record) if record is not None else None

    @_breaker
    def touch_session(self, key: str, now: float) -> None:
        self._rewrite(key, lambda data, created, seen: [data, created, now], now)

    @_breaker
    def update_session(self, key: str, data: dict) -> None:
        self._rewrite(key, lambda _, created, seen: [data, created, seen])

    def _rewrite(self, key: str, change: Callable[[dict, float, float], list], now: float | None = None) -> None:
        """Replace the record under *key* with ``change(data, created, seen)``, as SQLite's
        ``UPDATE`` does: never recreating a record deleted meanwhile (a GET then a SET would
        bring back a session that a concurrent logout ended, its cookie valid again), nor
        overwriting a concurrent touch or update (the write is a compare-and-set, retried).
        A touch (*now*: a use) sets the expiry of the record, its participants and its
        SessionIndex record to the session's idle or absolute end; an update keeps it."""
        name = f"authgw:login:s:{key}"
        for _ in range(_REWRITE_TRIES):
            raw = self.redis.get(name)
            if raw is None:
                return
            record = change(*json.loads(raw))
            keys, ttl = [name], 0
            if now is not None:
                ttl = self._expiry(record[1], record[2], now)
                keys.append(f"authgw:login:sp:{key}")
                index = record[0].get("index") if isinstance(record[0], dict) else None
                if isinstance(index, str) and index:
                    keys.append(f"authgw:login:p:idx:{index}")
            if self._swap(keys=keys, args=[raw, json.dumps(record), ttl, key]):
                return
        # Every try lost to other workers' writes of this session: a touch is theirs as well; an
        # account check not stored is made again at the session's next use.

    @_breaker
    def delete_session(self, key: str) -> None:
        """Delete the session and what belongs to it (participants, its SessionIndex record,
        its place in its subject's set), atomically (a Lua script)."""
        self._delete(keys=[f"authgw:login:s:{key}", f"authgw:login:sp:{key}"], args=[_PREFIX, key])

    @_breaker
    def limit_subject(self, subject: str, keep: str, most: int, now: float, idle: float,
                      absolute: float) -> list[tuple[str, dict[str, dict]]]:
        """As :meth:`SqliteStore.limit_subject`, atomically (a Lua script): the session *keep*
        joins its subject's set, the oldest beyond *most* end. (Over sessions are gone already:
        their keys expire.) The participants returned are their names only."""
        ended = self._limit(keys=[f"authgw:login:s:{keep}"],
                            args=[_PREFIX, keep, most, int(absolute) + 1, repr(now)])
        return [(other.decode(), {party.decode(): {} for party in parties}) for other, parties in ended]

    @_breaker
    def put_participant(self, key: str, party: str, data: dict) -> None:
        # A hash per session (one field per party), expiring with the session (not noted when
        # the session is gone).
        self._participant(keys=[f"authgw:login:s:{key}", f"authgw:login:sp:{key}"],
                          args=[party, json.dumps(data), self.ttl])

    @_breaker
    def get_participants(self, key: str) -> dict[str, dict]:
        raw = self.redis.hgetall(f"authgw:login:sp:{key}")
        decoded = {party.decode(errors="replace"): _decoded(data, dict) for party, data in raw.items()}
        return {party: data for party, data in decoded.items() if data is not None}

    @_breaker
    def put_pending(self, key: str, data: dict, expires: float) -> bool:
        ttl = max(1, int(_finite(expires) - time.time()) + 1)
        stored = bool(self.redis.set(f"authgw:login:p:{key}", json.dumps(data), ex=ttl, nx=True))
        if stored and key.startswith("p:"):  # a parked request: counted for the total bound
            pipe = self.redis.pipeline()
            pipe.zadd(_PARKED_SET, {key: expires})
            pipe.zremrangebyscore(_PARKED_SET, "-inf", time.time())
            pipe.expire(_PARKED_SET, max(ttl, 3600))  # gone an hour after the last park (lifetimes <= 3600 s)
            pipe.execute()
        return stored

    @_breaker
    def take_pending(self, key: str, now: float) -> dict | None:
        raw = self.redis.getdel(f"authgw:login:p:{key}")
        if raw and key.startswith("p:"):
            self.redis.zrem(_PARKED_SET, key)
        return _decoded(raw, dict)

    @_breaker
    def count_parked(self, now: float) -> int:
        """Parked requests of every instance: a sorted set of their keys by expiry, the expired
        ones dropped first (Redis expires the records themselves)."""
        pipe = self.redis.pipeline()
        pipe.zremrangebyscore(_PARKED_SET, "-inf", now)
        pipe.zcard(_PARKED_SET)
        return int(pipe.execute()[1])

    @_breaker
    def get_pending(self, key: str, now: float) -> dict | None:
        return _decoded(self.redis.get(f"authgw:login:p:{key}"), dict)

    @_breaker
    def get_pendings(self, keys: list[str], now: float) -> dict[str, dict]:
        """:meth:`get_pending` of several keys in one round trip (``MGET``)."""
        if not keys:
            return {}
        raws = self.redis.mget([f"authgw:login:p:{key}" for key in keys])
        decoded = {key: _decoded(raw, dict) for key, raw in zip(keys, raws)}
        return {key: data for key, data in decoded.items() if data is not None}

    @_breaker
    def take_token(self, key: str, burst: float, rate: float, now: float, spend: bool = True) -> float:
        """As :meth:`SqliteStore.take_token`, in one Lua script (*now* is not used: the buckets'
        clock is, :meth:`_on_clock`)."""
        return float(self._on_clock(self._token, key, burst, rate, "1" if spend else "0"))

    @_breaker
    def give_back_token(self, key: str, burst: float, rate: float, now: float) -> None:
        """As :meth:`SqliteStore.give_back_token`, in one Lua script (the buckets' clock)."""
        self._on_clock(self._give_back, key, burst, rate)

    def _on_clock(self, script, key: str, burst: float, rate: float, *more: str) -> bytes:
        """*script* (:data:`_TOKEN`, :data:`_GIVE_BACK`) on the bucket *key*, dated by Redis's
        clock as this instance measures it against its own boot clock, as the throttle's Redis
        store dates failures (:class:`gateway.throttle_stores.RedisStore`): a step of Redis's
        clock forward (NTP, a VM resumed) refilled every bucket at once, one more burst of
        guesses (a password form's, a client secret's at ``/oidc/token``) for each step; it is
        taken out of the buckets' time (``authgw:login:clock``, shared by every instance) and
        the call made again. One larger than the keys' margin (:data:`_STEP_MARGIN_MS`) may have
        expired buckets early: every check is refused (503) for a refill. A step back refills
        nothing for its length and freezes no bucket (:data:`_CLOCKED`). Only an instance that
        saw Redis before a step can tell it."""
        refill_ms = math.ceil(burst / rate * 1000)
        for _turn in range(2):
            bound, expected, asked = self._clock_bound()
            code, answer, store_ms, offset = script(keys=[f"{_PREFIX}b:{key}", _CLOCK], args=[
                repr(float(burst)), repr(float(rate)), bound, _STEP_MARGIN_MS, *more])
            if code != -2:
                break
            step = int(store_ms) - expected
            log.warning("login: the clock of the session store %s jumped ahead by %.0f s (more than this machine's "
                        "clock counted since its last answer); the step is taken out of the budgets' time, so no "
                        "budget refills with it", self.location, step / 1000)
            self._step(keys=[_CLOCK], args=[int(offset), step, refill_ms, refill_ms + 1000 + _STEP_MARGIN_MS])
        else:
            import redis

            raise redis.RedisError(f"{self.location}: its clock keeps jumping ahead")
        self._seen = (int(store_ms), asked)
        if code == -3:
            import redis

            raise redis.RedisError(f"{self.location}: its clock jumped ahead by more than the budgets' margin; "
                                   "budgets are held (503) until a refill has passed")
        return answer

    def _clock_bound(self) -> tuple[int, int, float]:
        """``(the latest store time, ms, this instance can account for, or -1; the store time it
        expects; now on the boot clock)``, as :meth:`gateway.throttle_stores.RedisStore._bound`:
        the last store time seen plus what the boot clock counted since, with room for two
        calls' time and clocks that run at rates apart."""
        now = throttle_stores._uptime()
        seen = self._seen
        if seen is None:
            return -1, -1, now
        elapsed = max(0.0, now - seen[1])
        expected = seen[0] + int(elapsed * 1000)
        return expected + int((2 * self.timeout + 1.0 + elapsed / 1000) * 1000), expected, now

    async def call(self, method, *args):
        """``method(*args)``, a method of this store, on the loop as every call of this store
        (bounded by its timeout and its breaker)."""
        return method(*args)

    async def take_token_off_loop(self, key: str, burst: float, rate: float, spend: bool = True) -> float:
        """:meth:`take_token`, on the loop as every call of this store (bounded by its timeout
        and its breaker)."""
        return self.take_token(key, burst, rate, 0.0, spend)

    async def give_back_token_off_loop(self, key: str, burst: float, rate: float) -> None:
        """:meth:`give_back_token`, on the loop as every call of this store."""
        self.give_back_token(key, burst, rate, 0.0)

    def purge(self, now: float, oldest: float) -> int:
        return 0  # Redis expires keys itself

    def close(self) -> None:
        self.redis.close()


class SessionManager:
    """Cookies, CSRF tokens and the store, for one worker.

    Each operation that may write to the store is a coroutine, ``a`` and its name (``aget``,
    ``apark``, ``acreate`` ..., as Django's async ORM names its own): the door's handlers await
    it, and the store makes each of its calls without holding the event loop for a lock held
    elsewhere (:meth:`SqliteStore.call`). Its sync form (``get``, ``park``, ``create`` ...) is
    the same code made where it runs (:meth:`_now`), for a caller that cannot await. The reads
    (:meth:`peek`, :meth:`participants`, :meth:`keys_of_indexes`) are sync only: in WAL mode a
    reader never waits for a writer.
    """

    def __init__(self, settings: SessionSettings, store, cookie_key: bytes) -> None:
        self.settings = settings
        self.store = store
        store.lifetimes(settings.idle, settings.absolute)  # the purge (SQLite), the keys' expiry (Redis)
        if isinstance(store, RedisStore) and store.timeout != settings.redis_timeout:
            store.use_timeout(settings.redis_timeout)  # each call's bound (the breaker's window is fixed)
        self._key = cookie_key
        self._last_purge = None  # wall-clock time of the last purge; None until the first
        self._purging: asyncio.Task | None = None  # the purge running in a thread, if any
        #: Called before a request is parked; raises :class:`ParkRefused` when its client's budget
        #: is spent (set by :class:`.web.LoginDoor`, which knows the request's client address).
        self.admit_park: Callable[[], None] | None = None
        self.max_parked = settings.max_pending
        self._parked = 0          # parked requests in the store: last count + this worker's parks since
        self._uncounted = 0       # this worker's parks since the last count
        self._counted_at = 0.0    # wall-clock time of the last count (0: count at the next park)

    async def _call(self, method, *args):
        """``method(*args)``, a method of the store: at once where it runs when a sync form drives
        this (:meth:`_now`), else by the store's :meth:`~SqliteStore.call` (SQLite: off the event
        loop when the lock is held; Redis: on the loop, bounded by its deadline and breaker)."""
        if _AT_ONCE.get():
            return method(*args)
        return await self.store.call(method, *args)

    @staticmethod
    def _now(operation):
        """The result of *operation*, a coroutine of this class, run to its end here: every store
        call in it is made at once (:data:`_AT_ONCE`), so it never suspends."""
        token = _AT_ONCE.set(True)
        try:
            operation.send(None)
        except StopIteration as done:
            return done.value
        finally:
            _AT_ONCE.reset(token)
        operation.close()
        raise RuntimeError("a session operation waited in its sync form")

    # -- signing ---------------------------------------------------------------------------------

    def public_sid(self, index: str, client_id: str) -> str:
        """The OpenID Connect ``sid`` of the session with SessionIndex *index*, as *client_id* is
        told it: a keyed hash, its own for each client, never the index itself. The index is
        what an unsigned SAML LogoutRequest proves a session by (with the NameID, which is often
        the id_token's ``preferred_username``): anyone holding one of a user's id_tokens ended
        that user's whole session at ``/saml/slo``, from any client (review of the login door)."""
        return "_" + self._mac("oidc-sid", f"{client_id}\0{index}")

    def party_index(self, index: str, party: str) -> str:
        """The SAML SessionIndex *party* (an SP's entity id, a WS-Federation realm) is told for the
        session with index *index*: the index and a keyed hash of it for that party, its own for
        each. An unsigned LogoutRequest proves a session by its index (with the NameID, often the
        user name): every party was told the same one, so whoever held any one of a user's
        assertions or WS-Federation tokens ended that user's whole session as another SP, and
        drove the logout round of the others (review of the login door). :meth:`told_index`
        finds the session's own index again; the SLO endpoint requires the value told to the SP
        that asks."""
        tag = self._mac("saml-index", f"{party}\0{index}")[:22]
        return f"{index}.{tag}"

    @staticmethod
    def told_index(told: str) -> str:
        """The session's own index in a SessionIndex :meth:`party_index` made (or one issued
        before, which is the index itself)."""
        return told.partition(".")[0]

    def _mac(self, purpose: str, value: str) -> str:
        mac = hmac.new(self._key, f"{purpose}:{value}".encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:24]).decode().rstrip("=")

    def _unsign(self, cookie: str | None) -> str | None:
        if not cookie or len(cookie) > 200:
            return None
        value, _, mac = cookie.partition(".")
        return value if value and same(mac, self._mac("session", value)) else None

    # -- sessions --------------------------------------------------------------------------------

    async def acreate(self, identity: Identity, old_cookie: str | None = None, *,
                      directory: str | None = None, asked: bool = True, answered_by: str = "") -> tuple[str, Session]:
        """A new session (and cookie value) for *identity*; the previous one, if any, ends.

        The services the previous session answered (its Single Logout participants) are carried
        into the new one, so that a logout still reaches them: a re-authentication (``ForceAuthn``,
        ``prompt=login``, ``max_age``) of the same subject keeps its SessionIndex too (the SPs
        name the session by it); another subject's sign-in gets a new one, and the old index no
        longer names a session. *directory* is the subject the directory knows the account by
        (:meth:`rechecked`), *asked* false when the directory could not answer at sign-in; the
        account is checked again at the session's first reuse. *answered_by* is the backend that
        vouched for the sign-in (``Decision.answered_by``): the session ends when it is revoked."""
        now = time.time()
        index, carried = "", {}
        old = self._unsign(old_cookie)
        if old:
            old_key = _digest(old)
            record = await self._call(self.store.get_session, old_key)
            if record is not None:
                carried = await self._call(self.store.get_participants, old_key)
                old_index = record[0]["index"]
                await self._call(self.store.take_pending, "idx:" + old_index, now)
                if record[0]["identity"]["subject"] == identity.subject:
                    index = old_index
            await self._call(self.store.delete_session, old_key)
        self._maybe_purge(now)
        value = secrets.token_urlsafe(32)
        key = _digest(value)
        index = index or "_" + secrets.token_hex(16)
        # SAML Single Logout names the session by its SessionIndex (a cross-site POST has no
        # cookie). Written before the session: another worker's limit may end the session the
        # moment it exists, and takes its index record with it only if that is there already
        # (written after, it stayed behind, naming no session).
        await self._call(self.store.put_pending, "idx:" + index, {"key": key}, now + self.settings.absolute)
        await self._call(self.store.put_session, key, _record(identity, index, 0.0, directory, asked, answered_by),
                         now)
        for party, data in carried.items():
            await self._call(self.store.put_participant, key, party, data)
        await self._limit(identity, key, now)
        return (f"{value}.{self._mac('session', value)}",
                Session(key, identity, now, index, 0.0, directory, asked, answered_by))

    def create(self, identity: Identity, old_cookie: str | None = None, *,
               directory: str | None = None, asked: bool = True, answered_by: str = "") -> tuple[str, Session]:
        """:meth:`acreate`, made where it runs (:meth:`_now`)."""
        return self._now(self.acreate(identity, old_cookie, directory=directory, asked=asked, answered_by=answered_by))

    async def _limit(self, identity: Identity, key: str, now: float) -> None:
        """At most ``sessions.max_per_user`` live sessions per subject: beyond it the oldest of
        the subject's sessions end (the new one, *key*, never does), each with its rows, as
        :meth:`end_key` ends one. No browser is there to take them through the Single Logout
        round: their participants are not told (logged), as when a session expires."""
        most = self.settings.max_per_user
        ended = await self._call(self.store.limit_subject, identity.subject, key, most, now, self.settings.idle,
                                 self.settings.absolute)
        if not ended:
            return
        told = sorted({party for _, parties in ended for party in parties})
        log.info("login: %d older session(s) of %s ended (sessions.max_per_user: %d)%s", len(ended),
                 printable(identity.subject), most,
                 f"; not told (no Single Logout round): {printable(', '.join(told))}" if told else "")

    async def aget(self, cookie: str | None, *, touch: bool = True) -> Session | None:
        """The live session the cookie names, or ``None`` (bad MAC, unknown, idle or too old);
        a use of it (its idle time starts again) unless *touch* is false: a sign-out does not
        need the write (a Redis refusing writes, full under ``noeviction``, refused the touch,
        and the session it was to end lived on)."""
        value = self._unsign(cookie)
        if value is None:
            return None
        key = _digest(value)
        session = await self._live(key)
        if session is not None and touch:
            await self._call(self.store.touch_session, key, time.time())
        return session

    def get(self, cookie: str | None, *, touch: bool = True) -> Session | None:
        """:meth:`aget`, made where it runs (:meth:`_now`)."""
        return self._now(self.aget(cookie, touch=touch))

    async def aby_index(self, index: str) -> Session | None:
        """The live session with this SessionIndex (an OIDC ``sid``), not counted as a use."""
        key = self.key_of_index(index) if isinstance(index, str) else None
        return await self._live(key) if key is not None else None

    def by_index(self, index: str) -> Session | None:
        """:meth:`aby_index`, made where it runs (:meth:`_now`)."""
        return self._now(self.aby_index(index))

    async def _live(self, key: str) -> Session | None:
        record = await self._call(self.store.get_session, key)
        if record is None:
            return None
        try:
            data, created, seen = record
            now = time.time()
            live = within(now - created, self.settings.absolute) and within(now - seen, self.settings.idle)
            session = Session(key, identity_from_json(data["identity"]), created, data["index"],
                              data.get("checked", 0.0), data.get("directory"), data.get("asked", True),
                              str(data.get("answered_by", ""))) if live else None
        except (ValueError, TypeError, KeyError, AttributeError):
            # not a record this store wrote (see _decoded): no session, and it goes
            log.warning("login: a session record that cannot be read is deleted")
            session = None
        if session is None:
            await self._call(self.store.delete_session, key)
        return session

    # -- the account behind a session ----------------------------------------------------------------

    @staticmethod
    def recheck_due(session: Session) -> bool:
        return not -CLOCK_TOLERANCE <= time.time() - session.checked < RECHECK_INTERVAL

    async def arechecked(self, session: Session, found: Identity | None) -> Session | None:
        """*session* after the directory answered *found* (a ``gateway_lookup_user`` answer for
        its user): ``None`` when the account is gone (unknown now, though the directory knew it
        in this session; known by another subject: a new account with the old name) or may not
        sign in (``account_state``); the caller ends the session. Else the session with the
        profile (groups, name, email) as the directory has it now, the check's time stored.
        An account the directory did not know at sign-in (a Kerberos or certificate identity no
        directory holds, an LDAP plugin without a service account) cannot be checked: it stays.
        When the directory could not answer at sign-in (down: the credential cache signed the
        user in), nothing tells a deleted account from one no directory ever held: unknown now,
        the session ends (fail closed; a Kerberos or certificate user signs in again at once)."""
        now = time.time()
        if found is None:
            if session.directory is not None or not session.asked:
                return None
            directory, identity = None, session.identity
        elif found.account_state or (session.directory is not None and found.subject != session.directory):
            return None
        else:
            directory = found.subject
            identity = replace(session.identity, display_name=found.display_name, email=found.email,
                               groups=tuple(found.groups))
        await self._call(self.store.update_session, session.key, _record(identity, session.index, now, directory,
                                                       answered_by=session.answered_by))
        return replace(session, identity=identity, checked=now, directory=directory, asked=True)

    def rechecked(self, session: Session, found: Identity | None) -> Session | None:
        """:meth:`arechecked`, made where it runs (:meth:`_now`)."""
        return self._now(self.arechecked(session, found))

    async def aend_index(self, index: str) -> bool:
        """End the session with this SAML SessionIndex; ``True`` when there was one."""
        record = await self._call(self.store.take_pending, "idx:" + index, time.time()) if _usable(index) else None
        if record is not None:
            await self._call(self.store.delete_session, record["key"])
        return record is not None

    def end_index(self, index: str) -> bool:
        """:meth:`aend_index`, made where it runs (:meth:`_now`)."""
        return self._now(self.aend_index(index))

    async def aend(self, cookie: str | None) -> None:
        value = self._unsign(cookie)
        if value:
            await self._call(self.store.delete_session, _digest(value))

    def end(self, cookie: str | None) -> None:
        """:meth:`aend`, made where it runs (:meth:`_now`)."""
        return self._now(self.aend(cookie))

    # -- Single Logout: who was told about a session -------------------------------------------------

    async def aadd_participant(self, session: Session, party: str, data: dict) -> None:
        """Note that *party* (a SAML SP's entity id) got an answer in *session*, with *data* as
        issued (NameID, its format, SessionIndex): logout is propagated to it with exactly these."""
        await self._call(self.store.put_participant, session.key, party, data)

    def add_participant(self, session: Session, party: str, data: dict) -> None:
        """:meth:`aadd_participant`, made where it runs (:meth:`_now`)."""
        return self._now(self.aadd_participant(session, party, data))

    def key_of_index(self, index: str) -> str | None:
        """The store key of the live session with this SAML SessionIndex, or ``None``."""
        return self.keys_of_indexes([index]).get(index)

    def keys_of_indexes(self, indexes: list[str]) -> dict[str, str]:
        """The store keys of the live sessions with these SAML SessionIndexes (index -> key), in
        one store round trip whatever their number (the caller bounds it: a LogoutRequest holds
        at most :data:`.logout.MAX_SESSION_INDEXES`), each index looked up once."""
        wanted = list(dict.fromkeys(index for index in indexes if _usable(index)))
        found = self.store.get_pendings(["idx:" + index for index in wanted], time.time())
        return {index: record["key"] for index in wanted
                if isinstance(record := found.get("idx:" + index), dict) and isinstance(record.get("key"), str)}

    def participants(self, key: str) -> dict[str, dict]:
        return self.store.get_participants(key)

    async def aend_key(self, key: str, index: str | None) -> None:
        """End the session stored under *key* (its participants are forgotten with it)."""
        await self._call(self.store.delete_session, key)
        if index:
            await self._call(self.store.take_pending, "idx:" + index, time.time())

    def end_key(self, key: str, index: str | None) -> None:
        """:meth:`aend_key`, made where it runs (:meth:`_now`)."""
        return self._now(self.aend_key(key, index))

    async def take_token(self, budget: str, key: str, burst: float, rate: float, *, spend: bool = True) -> float:
        """Spend a token of *key*'s bucket of the budget named *budget* (*burst* at most, refilled
        at *rate* a second): ``0.0`` when one was spent, else the seconds until one can be (nothing
        spent). *spend* false: only that wait, nothing spent. The bucket is in the store, shared by
        every worker (and, with Redis, every instance): a bucket per worker gave a flood N times the
        budget with ``--workers N`` (review of the login door: 48 parks and 59 wrong secrets
        where 30 was the budget, on two workers). A store that cannot be used raises its error
        (:data:`STORE_ERRORS`: the door answers 503, nothing is spent or counted as free). A lock
        held on the SQLite store is waited for off the event loop
        (:meth:`SqliteStore.take_token_off_loop`)."""
        if spend:
            self._maybe_purge(time.time())  # full buckets go with the expired records
        return await self.store.take_token_off_loop(_digest(f"{budget} {key}"), burst, rate, spend)

    async def give_back_token(self, budget: str, key: str, burst: float, rate: float) -> None:
        """Give back a token :meth:`take_token` spent from *key*'s bucket of *budget*, in one
        atomic step of the store (another worker's spend meanwhile is kept), never filling it past
        *burst*. For a budget of failures spent before the attempt it counts (so that concurrent
        attempts in several workers cannot all pass a check on its last token, review of stop
        46), given back when the attempt succeeds. A store error propagates (the token stays
        spent: fail closed). Off the event loop, as :meth:`take_token`."""
        await self.store.give_back_token_off_loop(_digest(f"{budget} {key}"), burst, rate)

    def take_token_now(self, budget: str, key: str, burst: float, rate: float, *, spend: bool = True) -> float:
        """:meth:`take_token` for a caller that cannot await it: a lock held on the SQLite store
        is waited for where it runs, on the event loop in a worker (up to
        :attr:`SqliteStore.BUSY_TIMEOUT`)."""
        if spend:
            self._maybe_purge(time.time())
        # None: the store's own time (SQLite's passes with the boot clock, Redis's is Redis's)
        return self.store.take_token(_digest(f"{budget} {key}"), burst, rate, None, spend)

    def _maybe_purge(self, now: float) -> None:
        """Purge expired records, at most once a minute. In a worker (an event loop running) the
        purge runs in a thread and this returns at once; one purge at a time per worker."""
        if self._last_purge is not None and now - self._last_purge <= 60:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:  # no event loop to keep free (a command, a unit test)
            self._last_purge = now
            self.store.purge(now, now - self.settings.absolute)
            self._counted_at = 0.0
            return
        if self._purging is not None and not self._purging.done():
            return
        self._last_purge = now
        self._purging = loop.create_task(self._purge_in_thread(now, now - self.settings.absolute))

    async def _purge_in_thread(self, now: float, oldest: float) -> None:
        try:
            removed = await asyncio.to_thread(self.store.purge, now, oldest)
            if removed:
                log.info("login: purged %d expired pending records", removed)
        except STORE_ERRORS as exc:  # tried again a minute later; the requests are not affected
            log.warning("login: the purge of expired records failed: %s: %s", exc.__class__.__name__, exc)
        finally:
            self._counted_at = 0.0  # the parked requests are counted again at the next park

    def _check_total(self, now: float) -> None:
        """Refuse a park when :attr:`max_parked` requests are parked in the store (counted
        again after :data:`_COUNT_EVERY` parks of this worker or :data:`_COUNT_INTERVAL` seconds;
        every second while full, so that a place freed is seen)."""
        due = _COUNT_INTERVAL if self._parked < self.max_parked else 1.0
        if self._uncounted >= _COUNT_EVERY or now - self._counted_at >= due:
            self._parked, self._uncounted, self._counted_at = self.store.count_parked(now), 0, now
        if self._parked >= self.max_parked:
            raise ParkRefused(503, "login.too_many_pending", _FULL_RETRY_AFTER,
                              f"{self._parked} requests parked, at most {self.max_parked}")

    # -- pending logins and replay ----------------------------------------------------------------

    async def apark(self, data: dict, lifetime: float) -> str:
        """Keep *data* (a validated request) for the user's login; returns its single-use id.

        Requests are parked for anyone, before any sign-in, so parking is bounded (review: a
        flood of requests nobody finishes grew the SQLite file by gigabytes): the client's budget
        (:attr:`admit_park`), then the total (:attr:`max_parked`); either raises
        :class:`ParkRefused` and nothing is parked. The expired ones are purged here too (at most
        once a minute, off the event loop), not only when a session is made."""
        if self.admit_park is not None:
            self.admit_park()
        now = time.time()
        self._maybe_purge(now)
        self._check_total(now)
        key = secrets.token_urlsafe(24)
        await self._call(self.store.put_pending, "p:" + key, data, now + lifetime)
        self._parked += 1
        self._uncounted += 1
        return key

    def park(self, data: dict, lifetime: float) -> str:
        """:meth:`apark`, made where it runs (:meth:`_now`)."""
        return self._now(self.apark(data, lifetime))

    async def ahold(self, data: dict, lifetime: float) -> str:
        """Keep *data* for a later request of the same browser under a single-use id, apart from
        the parked requests (``h:``: ``/login?req=`` never reads it): what an OIDC logout
        continues with at a GET (the browser's cookie), or once the user confirmed it. Bounded
        as :meth:`park` is: the client's budget, then the total (not counted in it)."""
        if self.admit_park is not None:
            self.admit_park()
        now = time.time()
        self._check_total(now)
        key = secrets.token_urlsafe(24)
        await self._call(self.store.put_pending, "h:" + key, data, now + lifetime)
        return key

    def hold(self, data: dict, lifetime: float) -> str:
        """:meth:`ahold`, made where it runs (:meth:`_now`)."""
        return self._now(self.ahold(data, lifetime))

    async def arelease(self, key: str) -> dict | None:
        """The data :meth:`hold` kept under *key*, once."""
        if not _usable(key):
            return None
        return await self._call(self.store.take_pending, "h:" + key, time.time())

    def release(self, key: str) -> dict | None:
        """:meth:`arelease`, made where it runs (:meth:`_now`)."""
        return self._now(self.arelease(key))

    async def aunpark(self, key: str) -> dict | None:
        if not _usable(key):
            return None
        return await self._call(self.store.take_pending, "p:" + key, time.time())

    def unpark(self, key: str) -> dict | None:
        """:meth:`aunpark`, made where it runs (:meth:`_now`)."""
        return self._now(self.aunpark(key))

    def peek(self, key: str) -> dict | None:
        """The parked data without using it up (a page that only shows the form)."""
        if not _usable(key):
            return None
        return self.store.get_pending("p:" + key, time.time())

    async def apark_as(self, key: str, data: dict, lifetime: float) -> None:
        """Keep *data* under a key the caller made (a random message ID it sent), single use."""
        await self._call(self.store.put_pending, "m:" + key, data, time.time() + lifetime)

    def park_as(self, key: str, data: dict, lifetime: float) -> None:
        """:meth:`apark_as`, made where it runs (:meth:`_now`)."""
        return self._now(self.apark_as(key, data, lifetime))

    async def aunpark_as(self, key: str) -> dict | None:
        if not _usable(key):
            return None
        return await self._call(self.store.take_pending, "m:" + key, time.time())

    def unpark_as(self, key: str) -> dict | None:
        """:meth:`aunpark_as`, made where it runs (:meth:`_now`)."""
        return self._now(self.aunpark_as(key))

    async def afirst_use(self, namespace: str, ident: str, lifetime: float) -> bool:
        """``True`` the first time *ident* is seen within *lifetime* seconds (replay refusal)."""
        return await self._call(self.store.put_pending, f"seen:{namespace}:{_digest(ident)}", {},
                                time.time() + lifetime)

    def first_use(self, namespace: str, ident: str, lifetime: float) -> bool:
        """:meth:`afirst_use`, made where it runs (:meth:`_now`)."""
        return self._now(self.afirst_use(namespace, ident, lifetime))

    # -- CSRF --------------------------------------------------------------------------------------

    def csrf_pair(self, cookie: str | None) -> tuple[str, str]:
        """The CSRF cookie to (re)set and the form token that goes with it (double submit,
        the token bound to the cookie by HMAC so a planted cookie alone is useless)."""
        seed = cookie if cookie and 16 <= len(cookie) <= 64 and cookie.isascii() else secrets.token_urlsafe(24)
        return seed, self._mac("csrf", seed)

    def csrf_ok(self, cookie: str | None, token: str | None) -> bool:
        if not cookie or not token or len(cookie) > 64 or len(token) > 64:
            return False
        return same(token, self._mac("csrf", cookie))
