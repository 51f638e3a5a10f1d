"""The console's shared state: one-time login tokens, sessions and configuration-log runs.

A small SQLite file in the state directory (``console.sqlite``, 0600), so that every worker of
``authgw serve --workers N`` and the ``authgw console`` command see the same tokens, sessions and
runs. Only SHA-256 digests of tokens and session ids are stored: the file alone lets nobody in.
Expiry uses wall-clock time (``time.time``): it is compared across processes, where
``time.monotonic`` values mean nothing.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from gateway.sqlitedb import create_private

__all__ = ["ConsoleStore", "Session", "TestRow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (digest TEXT PRIMARY KEY, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (digest TEXT PRIMARY KEY, csrf TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, started REAL NOT NULL, finished REAL,
                                 summary TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS results (run TEXT NOT NULL, seq INTEGER NOT NULL, name TEXT NOT NULL,
                                    status TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '',
                                    hint TEXT NOT NULL DEFAULT '', PRIMARY KEY (run, seq));
"""
#: Runs kept for the log page; older ones are deleted when a new one starts.
_KEEP_RUNS = 20
#: A run unfinished after this many seconds lost its worker (every test has a 15 s timeout).
_ABANDONED_AFTER = 600.0


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def _csrf(session_id: str) -> str:
    """A session's CSRF token: derived from its id (the HttpOnly cookie's secret), so the store
    keeps neither (its ``csrf`` column is left empty; older files' values are not used)."""
    return _digest("csrf\0" + session_id)


@dataclass(frozen=True, slots=True)
class Session:
    digest: str
    csrf: str


@dataclass(frozen=True, slots=True)
class TestRow:
    __test__ = False  # not a pytest class

    seq: int
    name: str
    status: str  # pending, running, pass, warn, fail, skip
    detail: str
    hint: str


class ConsoleStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._ready = False

    def _connect(self) -> sqlite3.Connection:
        if not self._ready:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            create_private(self.path)
        conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 5000")
        if not self._ready:
            conn.executescript(_SCHEMA)
            self._ready = True
        return conn

    # -- one-time login links --------------------------------------------------------------------

    def new_login_token(self, ttl: float) -> str:
        token = secrets.token_urlsafe(32)
        now = time.time()
        with closing(self._connect()) as conn:
            conn.execute("DELETE FROM tokens WHERE expires <= ?", (now,))
            conn.execute("INSERT INTO tokens VALUES (?, ?)", (_digest(token), now + ttl))
        return token

    def redeem_login_token(self, token: str) -> bool:
        """True once for a valid token: the DELETE is the one atomic step every worker races on."""
        with closing(self._connect()) as conn:
            cursor = conn.execute("DELETE FROM tokens WHERE digest = ? AND expires > ?", (_digest(token), time.time()))
            return cursor.rowcount == 1

    # -- sessions --------------------------------------------------------------------------------

    def new_session(self, ttl: float) -> tuple[str, Session]:
        session_id = secrets.token_urlsafe(32)
        session = Session(_digest(session_id), _csrf(session_id))
        now = time.time()
        with closing(self._connect()) as conn:
            conn.execute("DELETE FROM sessions WHERE expires <= ?", (now,))
            conn.execute("INSERT INTO sessions VALUES (?, '', ?)", (session.digest, now + ttl))
        return session_id, session

    def session(self, session_id: str, ttl: float) -> Session | None:
        """The live session for a cookie value, its expiry pushed on (idle timeout), or None."""
        digest, now = _digest(session_id), time.time()
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT 1 FROM sessions WHERE digest = ? AND expires > ?", (digest, now)).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE sessions SET expires = ? WHERE digest = ?", (now + ttl, digest))
        return Session(digest, _csrf(session_id))

    def end_session(self, session: Session) -> None:
        with closing(self._connect()) as conn:
            conn.execute("DELETE FROM sessions WHERE digest = ?", (session.digest,))

    # -- configuration-log runs ------------------------------------------------------------------

    def new_run(self) -> str:
        run = secrets.token_hex(8)
        with closing(self._connect()) as conn:
            conn.execute("INSERT INTO runs (id, started) VALUES (?, ?)", (run, time.time()))
            old = [r[0] for r in conn.execute("SELECT id FROM runs ORDER BY started DESC LIMIT -1 OFFSET ?",
                                              (_KEEP_RUNS,))]
            for stale in old:
                conn.execute("DELETE FROM results WHERE run = ?", (stale,))
                conn.execute("DELETE FROM runs WHERE id = ?", (stale,))
        return run

    def plan(self, run: str, names: list[str]) -> None:
        with closing(self._connect()) as conn:
            conn.executemany("INSERT INTO results (run, seq, name, status) VALUES (?, ?, ?, 'pending')",
                             [(run, seq, name) for seq, name in enumerate(names)])

    def record(self, run: str, seq: int, status: str, detail: str = "", hint: str = "") -> None:
        with closing(self._connect()) as conn:
            conn.execute("UPDATE results SET status = ?, detail = ?, hint = ? WHERE run = ? AND seq = ?",
                         (status, detail, hint, run, seq))

    def finish(self, run: str, summary: str) -> None:
        with closing(self._connect()) as conn:
            conn.execute("UPDATE runs SET finished = ?, summary = ? WHERE id = ?", (time.time(), summary, run))

    def run(self, run: str) -> tuple[dict, list[TestRow]] | None:
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT id, started, finished, summary FROM runs WHERE id = ?", (run,)).fetchone()
            if row is None:
                return None
            results = [TestRow(*r) for r in conn.execute(
                "SELECT seq, name, status, detail, hint FROM results WHERE run = ? ORDER BY seq", (run,))]
        info = {"id": row[0], "started": row[1], "finished": row[2], "summary": row[3]}
        if info["finished"] is None and time.time() - info["started"] > _ABANDONED_AFTER:
            info.update(finished=info["started"], summary="interrupted: the worker running it stopped; run the tests again")
        return info, results

    def latest_run(self) -> str | None:
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT id FROM runs ORDER BY started DESC LIMIT 1").fetchone()
        return row[0] if row else None
