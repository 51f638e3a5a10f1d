"""The relay's durable state: connections, tickets (hashed), enrolled connectors, revocations.

One relay instance keeps it in SQLite under the state directory (``relay/relay.sqlite3``), which
the ``authgw relay ...`` commands and the serving process share. Tickets are stored as SHA-256
of the token only (256-bit random tokens: a fast hash suffices, as for API tokens); using one is
a single conditional UPDATE, so two enrolments racing for one ticket cannot both win.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Connector", "SQLiteStore", "TicketRefused", "token_hash"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS connections (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tickets (hash TEXT PRIMARY KEY, connection TEXT NOT NULL, connector TEXT NOT NULL,
                                    expires REAL NOT NULL, used REAL);
CREATE TABLE IF NOT EXISTS connectors (id TEXT PRIMARY KEY, connection TEXT NOT NULL, serial TEXT NOT NULL,
                                       not_after REAL NOT NULL, enrolled REAL NOT NULL, revoked REAL,
                                       version TEXT NOT NULL DEFAULT '', last_seen REAL,
                                       online_until REAL);
"""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


class TicketRefused(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Connector:
    id: str
    connection: str
    serial: str
    not_after: float
    enrolled: float
    revoked: float | None
    version: str
    last_seen: float | None
    online_until: float | None


class SQLiteStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        with self._db() as db:
            db.executescript(_SCHEMA)
        path.chmod(0o600)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            self._local.db = db
        return db

    # -- connections and tickets ----------------------------------------------------------------

    def add_connection(self, name: str) -> bool:
        cur = self._db().execute("INSERT OR IGNORE INTO connections VALUES (?, ?)", (name, time.time()))
        return cur.rowcount == 1

    def connections(self) -> list[str]:
        return [row[0] for row in self._db().execute("SELECT name FROM connections ORDER BY name")]

    def add_ticket(self, connection: str, token: str, connector: str, expires: float) -> None:
        self._db().execute("INSERT INTO tickets VALUES (?, ?, ?, ?, NULL)",
                           (token_hash(token), connection, connector, expires))

    def ticket(self, token: str, now: float) -> tuple[str, str, float]:
        """``(connection, connector id, expires)`` of a usable ticket, else :class:`TicketRefused`."""
        row = self._db().execute("SELECT connection, connector, expires, used FROM tickets WHERE hash = ?",
                                 (token_hash(token),)).fetchone()
        if row is None:
            raise TicketRefused("ticket_unknown", "no such ticket; ask the relay operator for a new one")
        if row[3] is not None:
            raise TicketRefused("ticket_used", "this ticket was already used; each ticket enrols one connector")
        if row[2] < now:
            raise TicketRefused("ticket_expired", "this ticket has expired; ask the relay operator for a new one")
        return row[0], row[1], row[2]

    def use_ticket(self, token: str, now: float) -> tuple[str, str]:
        """Mark the ticket used, exactly once; returns ``(connection, connector id)``."""
        connection, connector, _ = self.ticket(token, now)
        cur = self._db().execute("UPDATE tickets SET used = ? WHERE hash = ? AND used IS NULL AND expires >= ?",
                                 (now, token_hash(token), now))
        if cur.rowcount != 1:  # lost a race with another enrolment
            raise TicketRefused("ticket_used", "this ticket was already used; each ticket enrols one connector")
        return connection, connector

    # -- connectors -------------------------------------------------------------------------------

    def record_connector(self, connector: str, connection: str, serial: int, not_after: float) -> None:
        self._db().execute(
            "INSERT INTO connectors (id, connection, serial, not_after, enrolled) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET serial = excluded.serial, not_after = excluded.not_after",
            (connector, connection, f"{serial:x}", not_after, time.time()))

    def connector(self, connector: str) -> Connector | None:
        row = self._db().execute("SELECT * FROM connectors WHERE id = ?", (connector,)).fetchone()
        return Connector(*row) if row else None

    def connectors(self) -> list[Connector]:
        return [Connector(*row) for row in self._db().execute("SELECT * FROM connectors ORDER BY connection, id")]

    def revoke(self, connector: str) -> bool:
        cur = self._db().execute("UPDATE connectors SET revoked = ? WHERE id = ? AND revoked IS NULL",
                                 (time.time(), connector))
        return cur.rowcount == 1

    def revoked(self) -> set[str]:
        return {row[0] for row in self._db().execute("SELECT id FROM connectors WHERE revoked IS NOT NULL")}

    def seen(self, connector: str, version: str, online_until: float) -> None:
        self._db().execute("UPDATE connectors SET version = ?, last_seen = ?, online_until = ? WHERE id = ?",
                           (version[:64], time.time(), online_until, connector))

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
