"""The console's shared state: one-time login tokens, sessions and configuration-log runs.

A small SQLite file in the state directory (``console.sqlite``, 0600), so that every worker of
``authgw serve --workers N`` and the ``authgw console`` command see the same tokens, sessions and
runs. Only SHA-256 digests of tokens, session ids and session path prefixes are stored: the file
alone lets nobody in. Expiry uses wall-clock time (``time.time``): it is compared across
processes, where ``time.monotonic`` values mean nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from gateway.sqlitedb import create_private, refuse_planted

__all__ = ["PREFIX", "ConsoleStore", "Session", "TestRow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (digest TEXT PRIMARY KEY, expires REAL NOT NULL);
-- The listening sockets (inodes, comma-separated) `authgw console` saw when it printed a link.
CREATE TABLE IF NOT EXISTS token_sockets (digest TEXT PRIMARY KEY, inodes TEXT NOT NULL);
-- Sessions before path prefixes had a host-wide cookie (any port of 127.0.0.1 received it): they end.
DROP TABLE IF EXISTS sessions;
CREATE TABLE IF NOT EXISTS console_sessions (digest TEXT PRIMARY KEY, path TEXT NOT NULL, created REAL NOT NULL,
                                             expires REAL NOT NULL);
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
    keeps neither."""
    return _digest("csrf\0" + session_id)


def _path_digest(path_token: str) -> str:
    return _digest("path\0" + path_token)


#: The URL path of every page of a session: ``/s/<path token>/``, the session cookie's ``Path``.
PREFIX = "/s/"


@dataclass(frozen=True, slots=True)
class Session:
    """A live session. *prefix* (``/s/<token>/``) is a secret of its own, not derived from the
    session id: a browser sends the cookie only under it, so a server on another port of the
    same host (cookies ignore ports, RFC 6265 8.5) never receives the cookie, and the cookie
    replayed without the prefix opens nothing."""

    digest: str
    csrf: str
    prefix: str


@dataclass(frozen=True, slots=True)
class TestRow:
    __test__ = False  # not a pytest class

    seq: int
    name: str
    status: str  # pending, running, pass, warn, fail, skip
    detail: str
    hint: str


class ConsoleStore:
    """The console's one-time links, sessions and self-test runs, in SQLite: a connection per
    call, which waits at most :attr:`BUSY_TIMEOUT` for a lock another process holds (a sibling
    worker's call, a backup), then raises; the console answers its 503 page for that (it was a
    500 with a traceback). Half a second on the worker's event loop was tried (review of the
    console: a request any web page can make a browser send, ``GET /login/<anything>``, is a
    DELETE there): eight saves at once on two workers, each starting a self-test run whose
    thread writes its rows, then waited longer than that on a loaded machine, and a save was
    refused (a clean-clone run of this stop). The wait on the loop is left, as for the login
    door's store before its bound (docs/security.md).
    """

    BUSY_TIMEOUT = 5.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ready = False

    def _connect(self) -> sqlite3.Connection:
        if not self._ready:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            create_private(self.path)
        refuse_planted(self.path)
        conn = sqlite3.connect(self.path, timeout=self.BUSY_TIMEOUT, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(self.BUSY_TIMEOUT * 1000)}")
        if not self._ready:
            conn.executescript(_SCHEMA)
            self._ready = True
        return conn

    # -- one-time login links --------------------------------------------------------------------

    def new_login_token(self, ttl: float, sockets: frozenset[int] = frozenset()) -> str:
        """A new one-time login token, valid *ttl* seconds, tied to the listening *sockets*
        (inodes; none: not tied, where the system does not name them)."""
        token = secrets.token_urlsafe(32)
        now = time.time()
        digest = _digest(token)
        with closing(self._connect()) as conn, conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM tokens WHERE expires <= ?", (now,))
            conn.execute("DELETE FROM token_sockets WHERE digest NOT IN (SELECT digest FROM tokens)")
            conn.execute("INSERT INTO tokens VALUES (?, ?)", (digest, now + ttl))
            if sockets:
                conn.execute("INSERT OR REPLACE INTO token_sockets VALUES (?, ?)",
                             (digest, ",".join(map(str, sorted(sockets)))))
        return token

    def redeem_login_token(self, token: str) -> frozenset[int] | None:
        """Once for a valid token, the listening sockets it is tied to (empty: not tied); else
        ``None``. The DELETE is the one atomic step every worker races on."""
        digest = _digest(token)
        with closing(self._connect()) as conn, conn:
            conn.execute("BEGIN IMMEDIATE")
            if conn.execute("DELETE FROM tokens WHERE digest = ? AND expires > ?", (digest, time.time())).rowcount != 1:
                return None
            rows = conn.execute("DELETE FROM token_sockets WHERE digest = ? RETURNING inodes", (digest,)).fetchall()
        return frozenset(int(inode) for (text,) in rows for inode in text.split(",") if inode.isdigit())

    # -- sessions --------------------------------------------------------------------------------

    def new_session(self, ttl: float, lifetime: float) -> tuple[str, Session]:
        """A new session: its id (the cookie's value) and the session, whose ``prefix`` holds a
        second random token (256 bits each). It ends after *ttl* seconds without use, and
        *lifetime* seconds after now however much it is used."""
        session_id, path_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        session = Session(_digest(session_id), _csrf(session_id), f"{PREFIX}{path_token}/")
        now = time.time()
        with closing(self._connect()) as conn:
            conn.execute("DELETE FROM console_sessions WHERE expires <= ?", (now,))
            conn.execute("INSERT INTO console_sessions VALUES (?, ?, ?, ?)",
                         (session.digest, _path_digest(path_token), now, now + min(ttl, lifetime)))
        return session_id, session

    def session(self, session_id: str, path_token: str, ttl: float, lifetime: float) -> Session | None:
        """The live session for a cookie value and the path token of the URL, or None. The idle
        expiry is pushed on, never past *lifetime* seconds after the session began (a stolen
        or forgotten session does not live for ever by being used)."""
        digest, now = _digest(session_id), time.time()
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT path, created FROM console_sessions WHERE digest = ? AND expires > ?",
                               (digest, now)).fetchone()
            if row is None:
                return None
            path, created = row
            # Constant time: the path token is a secret the client must show, as a password is.
            if not hmac.compare_digest(path.encode(), _path_digest(path_token).encode()):
                return None
            if created + lifetime <= now:
                conn.execute("DELETE FROM console_sessions WHERE digest = ?", (digest,))
                return None
            conn.execute("UPDATE console_sessions SET expires = ? WHERE digest = ?",
                         (min(now + ttl, created + lifetime), digest))
        return Session(digest, _csrf(session_id), f"{PREFIX}{path_token}/")

    def end_session(self, session: Session) -> None:
        with closing(self._connect()) as conn:
            conn.execute("DELETE FROM console_sessions WHERE digest = ?", (session.digest,))

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
