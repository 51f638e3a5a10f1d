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

from gateway.health import redis_location
from gateway.redis_eviction import EvictionWatch
from gateway.sqlitedb import connect_wal

__all__ = ["Connector", "RedisStore", "SQLiteStore", "TicketRefused", "token_hash"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS connections (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tickets (hash TEXT PRIMARY KEY, connection TEXT NOT NULL, connector TEXT NOT NULL,
                                    expires REAL NOT NULL, used REAL, uses INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS connectors (id TEXT PRIMARY KEY, connection TEXT NOT NULL, serial TEXT NOT NULL,
                                       not_after REAL NOT NULL, enrolled REAL NOT NULL, revoked REAL,
                                       version TEXT NOT NULL DEFAULT '', last_seen REAL,
                                       online_until REAL, cert TEXT NOT NULL DEFAULT '');
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
    cert: str = ""  # PEM of the current certificate (another relay instance seals passwords to its key)


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
            db = connect_wal(self.path, timeout=5.0)  # every worker at once
            self._local.db = db
        return db

    # -- connections and tickets ----------------------------------------------------------------

    def add_connection(self, name: str) -> bool:
        cur = self._db().execute("INSERT OR IGNORE INTO connections VALUES (?, ?)", (name, time.time()))
        return cur.rowcount == 1

    def connections(self) -> list[str]:
        return [row[0] for row in self._db().execute("SELECT name FROM connections ORDER BY name")]

    def add_ticket(self, connection: str, token: str, connector: str, expires: float, uses: int = 1) -> None:
        """*connector* is the id the CSR must name; ``""`` for a reusable ticket (*uses* > 1),
        where each enrolment names a new id of the connection."""
        self._db().execute("INSERT INTO tickets VALUES (?, ?, ?, ?, NULL, ?)",
                           (token_hash(token), connection, connector, expires, uses))

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
        cur = self._db().execute(
            "UPDATE tickets SET uses = uses - 1, used = CASE WHEN uses <= 1 THEN ? ELSE NULL END "
            "WHERE hash = ? AND used IS NULL AND uses >= 1 AND expires >= ?", (now, token_hash(token), now))
        if cur.rowcount != 1:  # lost a race with another enrolment
            raise TicketRefused("ticket_used", "this ticket was already used; each ticket enrols one connector")
        return connection, connector

    def give_back(self, token: str) -> None:
        """Undo one :meth:`use_ticket` whose enrolment then failed (its id was taken meanwhile)."""
        self._db().execute("UPDATE tickets SET uses = uses + 1, used = NULL WHERE hash = ?", (token_hash(token),))

    # -- connectors -------------------------------------------------------------------------------

    def record_connector(self, connector: str, connection: str, serial: int, not_after: float, cert: str) -> None:
        self._db().execute(
            "INSERT INTO connectors (id, connection, serial, not_after, enrolled, cert) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET serial = excluded.serial, not_after = excluded.not_after, "
            "cert = excluded.cert", (connector, connection, f"{serial:x}", not_after, time.time(), cert))

    def add_connector(self, connector: str, connection: str, serial: int, not_after: float, cert: str) -> bool:
        """Record a new connector id; False, and nothing written, when the id exists (two
        enrolments naming one id at once: one wins, atomically)."""
        cur = self._db().execute(
            "INSERT INTO connectors (id, connection, serial, not_after, enrolled, cert) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO NOTHING", (connector, connection, f"{serial:x}", not_after, time.time(), cert))
        return cur.rowcount == 1

    def connector(self, connector: str) -> Connector | None:
        row = self._db().execute("SELECT * FROM connectors WHERE id = ?", (connector,)).fetchone()
        return Connector(*row) if row else None

    def connectors(self) -> list[Connector]:
        return [Connector(*row) for row in self._db().execute("SELECT * FROM connectors ORDER BY connection, id")]

    def revoke(self, connector: str) -> bool:
        cur = self._db().execute("UPDATE connectors SET revoked = ? WHERE id = ? AND revoked IS NULL",
                                 (time.time(), connector))
        return cur.rowcount == 1

    def standing(self) -> tuple[set[str], set[str]]:
        """(the connectors enrolled, the revoked ones among them), in one read."""
        rows = self._db().execute("SELECT id, revoked IS NOT NULL FROM connectors").fetchall()
        return {row[0] for row in rows}, {row[0] for row in rows if row[1]}

    def seen(self, connector: str, version: str, online_until: float) -> None:
        self._db().execute("UPDATE connectors SET version = ?, last_seen = ?, online_until = ? WHERE id = ?",
                           (version[:64], time.time(), online_until, connector))

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


#: One use of a ticket counted again, if the ticket is still there (HINCRBY alone would make it
#: again, as a hash without `expires`); ARGV[1] "1": a use given back, so not used up any more.
_ADD_USE = """
if redis.call('HEXISTS', KEYS[1], 'expires') == 1 then
  if ARGV[1] == '1' then redis.call('HDEL', KEYS[1], 'used') end
  return redis.call('HINCRBY', KEYS[1], 'uses', 1)
end
return false
"""


#: A linked connector's version and times, written only into a record that exists.
_SEEN = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'version', ARGV[1], 'last_seen', ARGV[2], 'online_until', ARGV[3])
end
return 1
"""


class RedisStore:
    """The same registry in Redis, for several relay instances (``relay: {redis: ...}``).

    ``PREFIX connections`` (set), ``PREFIX ticket:<sha256>`` (hash, expiring a day after the
    ticket), ``PREFIX connector:<id>`` (hash) and ``PREFIX connectors`` (set). Using a ticket is
    ``HSETNX used``: of two instances racing, one wins.
    """

    def __init__(self, settings, eviction: EvictionWatch | None = None) -> None:
        import redis

        self.prefix = settings.key_prefix
        self.settings = settings
        self.redis = redis.Redis.from_url(settings.url, password=settings.password.reveal() if settings.password else None,
                                          socket_timeout=settings.timeout, socket_connect_timeout=settings.timeout,
                                          decode_responses=True)
        self.location = redis_location(settings.url)  # for readiness and errors: no password
        #: What the health probe last found of this Redis's eviction policy; the probe's own
        #: client shares the serving store's (:attr:`evicting`).
        self._eviction = eviction or EvictionWatch(
            "relay store", error_line="{what} {location}: enrolment is refused until its eviction policy is fixed: "
            "{problem}", fixed_line="{what} {location}: its eviction policy keeps keys again; enrolment is open")
        self._add_use = self.redis.register_script(_ADD_USE)  # made here, sent to Redis on first use
        self._seen = self.redis.register_script(_SEEN)

    def ping(self) -> str:
        """The health probe's round trip (``PING``, within ``redis.timeout``). Raises with the
        location and the error's class only: what ``/readyz`` shows holds no secret."""
        try:
            self.redis.ping()
            problem = self._eviction.check(self.redis, self.location)
        except Exception as exc:  # noqa: BLE001 - refused, timed out, wrong password: all "down"
            raise ConnectionError(f"{self.location}: {exc.__class__.__name__}") from None
        if problem is not None:  # tickets' uses, the CA key, routes: not ready (the log says it once)
            raise ConnectionError(f"{self.location}: {problem}")
        return f"{self.location}: answers"

    @property
    def eviction(self) -> EvictionWatch:
        return self._eviction

    @property
    def evicting(self) -> str | None:
        """Why this Redis may evict the registry's keys (the last probe's finding), else None."""
        return self._eviction.problem

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def add_connection(self, name: str) -> bool:
        return self.redis.sadd(self._k("connections"), name) == 1

    def connections(self) -> list[str]:
        return sorted(self.redis.smembers(self._k("connections")))

    def add_ticket(self, connection: str, token: str, connector: str, expires: float, uses: int = 1) -> None:
        key = self._k("ticket", token_hash(token))
        self.redis.hset(key, mapping={"connection": connection, "connector": connector, "expires": repr(expires),
                                      "uses": uses})
        self.redis.expireat(key, int(expires) + 86400)  # kept a day to tell "expired" from "unknown"

    def ticket(self, token: str, now: float) -> tuple[str, str, float]:
        row = self.redis.hgetall(self._k("ticket", token_hash(token)))
        try:
            expires = float(row["expires"])
            connection, connector = row["connection"], row["connector"]
        except (KeyError, ValueError):
            # none, or not a whole ticket (a hash of `uses` alone, made by HINCRBY on a ticket
            # evicted between the read and the use): unknown, not a KeyError (500) at each request
            raise TicketRefused("ticket_unknown", "no such ticket; ask the relay operator for a new one") from None
        if "used" in row:
            raise TicketRefused("ticket_used", "this ticket was already used; each ticket enrols one connector")
        if expires < now:
            raise TicketRefused("ticket_expired", "this ticket has expired; ask the relay operator for a new one")
        return connection, connector, expires

    def use_ticket(self, token: str, now: float) -> tuple[str, str]:
        connection, connector, _ = self.ticket(token, now)
        key = self._k("ticket", token_hash(token))
        left = self.redis.hincrby(key, "uses", -1)  # atomic: of racing enrolments, only `uses` win
        if left < 0:
            self._add_use(keys=[key], args=["0"])  # back to 0: a use given back (give_back) counts again
            raise TicketRefused("ticket_used", "this ticket was already used; each ticket enrols one connector")
        if left == 0:
            self.redis.hset(key, "used", repr(now))
        return connection, connector

    def give_back(self, token: str) -> None:
        """As :meth:`SQLiteStore.give_back`: one script, so a ticket that expired meanwhile is not
        made again as a hash of ``uses`` alone."""
        self._add_use(keys=[self._k("ticket", token_hash(token))], args=["1"])


    def record_connector(self, connector: str, connection: str, serial: int, not_after: float, cert: str) -> None:
        key = self._k("connector", connector)
        self.redis.hsetnx(key, "enrolled", repr(time.time()))
        self.redis.hset(key, mapping={"connection": connection, "serial": f"{serial:x}", "not_after": repr(not_after),
                                      "cert": cert})
        self.redis.sadd(self._k("connectors"), connector)

    def add_connector(self, connector: str, connection: str, serial: int, not_after: float, cert: str) -> bool:
        """As :meth:`SQLiteStore.add_connector`: the id is claimed by HSETNX, atomically."""
        key = self._k("connector", connector)
        if self.redis.sismember(self._k("connectors"), connector):
            # Listed, its record gone (evicted, lost with Redis's data): the id was enrolled,
            # perhaps revoked, and a connector naming it is not new. Enrolled again, a revoked
            # id came back unrevoked (review of the relay, items left).
            return False
        if not self.redis.hsetnx(key, "connection", connection):
            return False
        self.redis.hset(key, mapping={"enrolled": repr(time.time()), "serial": f"{serial:x}",
                                      "not_after": repr(not_after), "cert": cert})
        self.redis.sadd(self._k("connectors"), connector)
        return True

    def connector(self, connector: str) -> Connector | None:
        row = self.redis.hgetall(self._k("connector", connector))
        return self._row(connector, row) if row else None

    @staticmethod
    def _row(connector: str, row: dict) -> Connector | None:
        """The record, or None for one without its enrolment's fields: a Redis that lost its data
        (restarted without persistence) kept only what the link wrote since, and every look-up
        of that connector raised KeyError, a 500 at each of its links (review of this stop)."""
        def number(name: str) -> float | None:
            return float(row[name]) if name in row else None

        if not {"connection", "serial", "not_after", "enrolled"} <= row.keys():
            return None
        return Connector(connector, row["connection"], row["serial"], float(row["not_after"]), float(row["enrolled"]),
                         number("revoked"), row.get("version", ""), number("last_seen"), number("online_until"),
                         row.get("cert", ""))

    def connectors(self) -> list[Connector]:
        found = [self.connector(c) for c in sorted(self.redis.smembers(self._k("connectors")))]
        return sorted((c for c in found if c is not None), key=lambda c: (c.connection, c.id))

    def revoke(self, connector: str) -> bool:
        if not self.redis.exists(self._k("connector", connector)):
            return False
        return bool(self.redis.hsetnx(self._k("connector", connector), "revoked", repr(time.time())))

    def standing(self) -> tuple[set[str], set[str]]:
        """(the connectors with a whole enrolment record, the revoked ones), in one round trip
        after the list: an id whose record a Redis lost is not enrolled (:meth:`_row`)."""
        ids = sorted(self.redis.smembers(self._k("connectors")))
        pipe = self.redis.pipeline()
        for connector in ids:
            pipe.hmget(self._k("connector", connector), "connection", "serial", "not_after", "enrolled", "revoked")
        enrolled, revoked = set(), set()
        for connector, fields in zip(ids, pipe.execute(raise_on_error=False)):
            if isinstance(fields, Exception):
                if str(fields).startswith("WRONGTYPE"):
                    # A record of another Redis type is no record (not enrolled: its links are
                    # closed). Raised, it failed the whole read, every round, and no revocation
                    # of any connector was applied (review of stop 46).
                    continue
                raise fields
            if all(value is not None for value in fields[:4]):
                enrolled.add(connector)
            if fields[4] is not None:
                revoked.add(connector)
        return enrolled, revoked

    def seen(self, connector: str, version: str, online_until: float) -> None:
        """Only on a record that exists (a Lua script): a bare HSET made one of these fields
        alone when the record was gone (a Redis that lost its data)."""
        self._seen(keys=[self._k("connector", connector)], args=[version[:64], repr(time.time()), repr(online_until)])

    def shared_ca(self, key_pem: bytes, cert_pem: bytes) -> tuple[bytes, bytes, bool]:
        """The relay CA all instances use, and whether this call wrote it: the first instance's
        (SET NX), so that a connector enrolled at one instance is trusted by all; when Redis
        lost it, the first instance to ask again writes its own back (never over another).
        Redis then holds the CA key: protect it as the CA itself (ACL user, TLS, no shared
        database). Raises ValueError for a value that is no relay CA."""
        import json as _json

        key = self._k("ca")
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(key, _json.dumps({"key": key_pem.decode(), "cert": cert_pem.decode()}), nx=True)
        pipe.get(key)
        written, value = pipe.execute(raise_on_error=False)
        for answer in (written, value):
            if isinstance(answer, Exception):
                if str(answer).startswith("WRONGTYPE"):
                    # Another Redis type under the key (a hash, a list): no relay CA, as garbage
                    # is. Raised as the registry's error, it skipped every round's revocations
                    # and stopped `authgw relay revoke` (review of stop 46).
                    raise ValueError(f"{self.location}: the key {key} holds no relay CA") from None
                raise answer
        try:
            stored = _json.loads(value)
            return stored["key"].encode(), stored["cert"].encode(), bool(written)
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError):
            raise ValueError(f"{self.location}: the key {key} holds no relay CA") from None

    def close(self) -> None:
        self.redis.close()
