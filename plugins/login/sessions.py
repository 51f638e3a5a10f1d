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
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import sqlite3
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from gateway import Identity
from gateway.health import redis_location
from gateway.sqlitedb import connect_wal

from .settings import SessionSettings

__all__ = ["RECHECK_INTERVAL", "STORE_ERRORS", "RedisStore", "Session", "SessionManager", "SqliteStore", "identity_from_json", "identity_to_json", "same"]


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


@dataclass(frozen=True)
class Session:
    key: str            # SHA-256 of the cookie id (the store's key)
    identity: Identity
    created: float
    index: str          # SAML SessionIndex: random, not the cookie id
    checked: float = 0.0            # when the directory last vouched for the account (0: never)
    directory: str | None = None    # the subject the directory knows the account by; None: unknown to it
    asked: bool = True              # False: the directory could not answer at sign-in (not asked yet)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _record(identity: Identity, index: str, checked: float, directory: str | None, asked: bool = True) -> dict[str, Any]:
    return {"identity": identity_to_json(identity), "index": index, "checked": checked, "directory": directory,
            "asked": asked}


def same(a: str, b: str) -> bool:
    """Constant-time equality of two strings from anywhere (``hmac.compare_digest`` refuses
    non-ASCII ``str``: a hostile cookie must not turn into a 500)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


class SqliteStore:
    """One SQLite file; each worker opens its own connection (SQLite locks across processes)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = connect_wal(path, timeout=5.0, check_same_thread=False)  # every worker at once
        path.chmod(0o600)
        self.db.execute("CREATE TABLE IF NOT EXISTS sessions (key TEXT PRIMARY KEY, data TEXT NOT NULL, "
                        "created REAL NOT NULL, seen REAL NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS pending (key TEXT PRIMARY KEY, data TEXT NOT NULL, "
                        "expires REAL NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS participants (session TEXT NOT NULL, party TEXT NOT NULL, "
                        "data TEXT NOT NULL, PRIMARY KEY (session, party))")

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
        self.db.execute("DELETE FROM sessions WHERE key = ?", (key,))
        self.db.execute("DELETE FROM participants WHERE session = ?", (key,))

    def put_participant(self, key: str, party: str, data: dict) -> None:
        # One row per (session, party), replaced: a transient NameID changes with each answer.
        self.db.execute("INSERT OR REPLACE INTO participants VALUES (?, ?, ?)", (key, party, json.dumps(data)))

    def get_participants(self, key: str) -> dict[str, dict]:
        rows = self.db.execute("SELECT party, data FROM participants WHERE session = ?", (key,)).fetchall()
        return {party: json.loads(data) for party, data in rows}

    def put_pending(self, key: str, data: dict, expires: float) -> bool:
        """Store *data* under *key* unless the key is taken (then ``False``: a replay)."""
        cursor = self.db.execute("INSERT OR IGNORE INTO pending VALUES (?, ?, ?)", (key, json.dumps(data), expires))
        return cursor.rowcount == 1

    def take_pending(self, key: str, now: float) -> dict | None:
        row = self.db.execute("DELETE FROM pending WHERE key = ? RETURNING data, expires",
                              (key,)).fetchone()
        return json.loads(row[0]) if row and row[1] > now else None

    def get_pending(self, key: str, now: float) -> dict | None:
        row = self.db.execute("SELECT data, expires FROM pending WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row and row[1] > now else None

    def purge(self, now: float, oldest: float) -> None:
        self.db.execute("DELETE FROM pending WHERE expires < ?", (now,))
        self.db.execute("DELETE FROM sessions WHERE created < ?", (oldest,))
        self.db.execute("DELETE FROM participants WHERE session NOT IN (SELECT key FROM sessions)")

    def close(self) -> None:
        self.db.close()


#: Compare-and-set: the new record replaces the old only if the old is still there, unchanged.
#: The JSON is made in Python (cjson would turn ``[]`` into ``{}`` and round the times).
_SWAP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""
#: Compare-and-set attempts before a touch or update gives way to the writes that won.
_REWRITE_TRIES = 5


class RedisStore:
    """The same records in Redis, with server-side expiry (several gateway instances)."""

    def __init__(self, url: str, ttl: float) -> None:
        import redis  # authgw[redis]

        self.redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.ttl = int(ttl) + 1
        self.location = redis_location(url)  # for readiness and errors: no password
        self._swap = self.redis.register_script(_SWAP)

    def ping(self) -> str:
        """The health probe's question (raises on failure; at most the 2 s socket timeout)."""
        self.redis.ping()
        return f"{self.location}: answers"

    def put_session(self, key: str, data: dict, now: float) -> None:
        self.redis.set(f"authgw:login:s:{key}", json.dumps([data, now, now]), ex=self.ttl)

    def get_session(self, key: str) -> tuple[dict, float, float] | None:
        raw = self.redis.get(f"authgw:login:s:{key}")
        return tuple(json.loads(raw)) if raw else None

    def touch_session(self, key: str, now: float) -> None:
        self._rewrite(key, lambda data, created, seen: [data, created, now])

    def update_session(self, key: str, data: dict) -> None:
        self._rewrite(key, lambda _, created, seen: [data, created, seen])

    def _rewrite(self, key: str, change: Callable[[dict, float, float], list]) -> None:
        """Replace the record under *key* with ``change(data, created, seen)``, as SQLite's
        ``UPDATE`` does: never recreating a record deleted meanwhile (a GET then a SET would
        bring back a session that a concurrent logout ended, its cookie valid again), nor
        overwriting a concurrent touch or update (the write is a compare-and-set, retried)."""
        name = f"authgw:login:s:{key}"
        for _ in range(_REWRITE_TRIES):
            raw = self.redis.get(name)
            if raw is None:
                return
            if self._swap(keys=[name], args=[raw, json.dumps(change(*json.loads(raw))), self.ttl]):
                return
        # Every try lost to other workers' writes of this session: a touch is theirs as well; an
        # account check not stored is made again at the session's next use.

    def delete_session(self, key: str) -> None:
        self.redis.delete(f"authgw:login:s:{key}", f"authgw:login:sp:{key}")

    def put_participant(self, key: str, party: str, data: dict) -> None:
        # A hash per session (one field per party), expiring with the session's longest life.
        pipe = self.redis.pipeline()
        pipe.hset(f"authgw:login:sp:{key}", party, json.dumps(data))
        pipe.expire(f"authgw:login:sp:{key}", self.ttl)
        pipe.execute()

    def get_participants(self, key: str) -> dict[str, dict]:
        raw = self.redis.hgetall(f"authgw:login:sp:{key}")
        return {party.decode(): json.loads(data) for party, data in raw.items()}

    def put_pending(self, key: str, data: dict, expires: float) -> bool:
        return bool(self.redis.set(f"authgw:login:p:{key}", json.dumps(data),
                                   ex=max(1, int(expires - time.time()) + 1), nx=True))

    def take_pending(self, key: str, now: float) -> dict | None:
        raw = self.redis.getdel(f"authgw:login:p:{key}")
        return json.loads(raw) if raw else None

    def get_pending(self, key: str, now: float) -> dict | None:
        raw = self.redis.get(f"authgw:login:p:{key}")
        return json.loads(raw) if raw else None

    def purge(self, now: float, oldest: float) -> None:
        pass  # Redis expires keys itself

    def close(self) -> None:
        self.redis.close()


class SessionManager:
    """Cookies, CSRF tokens and the store, for one worker."""

    def __init__(self, settings: SessionSettings, store, cookie_key: bytes) -> None:
        self.settings = settings
        self.store = store
        self._key = cookie_key
        self._last_purge = None  # wall-clock time of the last purge; None until the first

    # -- signing ---------------------------------------------------------------------------------

    def _mac(self, purpose: str, value: str) -> str:
        mac = hmac.new(self._key, f"{purpose}:{value}".encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:24]).decode().rstrip("=")

    def _unsign(self, cookie: str | None) -> str | None:
        if not cookie or len(cookie) > 200:
            return None
        value, _, mac = cookie.partition(".")
        return value if value and same(mac, self._mac("session", value)) else None

    # -- sessions --------------------------------------------------------------------------------

    def create(self, identity: Identity, old_cookie: str | None = None, *,
               directory: str | None = None, asked: bool = True) -> tuple[str, Session]:
        """A new session (and cookie value) for *identity*; the previous one, if any, ends.

        The services the previous session answered (its Single Logout participants) are carried
        into the new one, so that a logout still reaches them: a re-authentication (``ForceAuthn``,
        ``prompt=login``, ``max_age``) of the same subject keeps its SessionIndex too (the SPs
        name the session by it); another subject's sign-in gets a new one, and the old index no
        longer names a session. *directory* is the subject the directory knows the account by
        (:meth:`rechecked`), *asked* false when the directory could not answer at sign-in; the
        account is checked again at the session's first reuse."""
        now = time.time()
        index, carried = "", {}
        old = self._unsign(old_cookie)
        if old:
            old_key = _digest(old)
            record = self.store.get_session(old_key)
            if record is not None:
                carried = self.store.get_participants(old_key)
                old_index = record[0]["index"]
                self.store.take_pending("idx:" + old_index, now)
                if record[0]["identity"]["subject"] == identity.subject:
                    index = old_index
            self.store.delete_session(old_key)
        self._maybe_purge(now)
        value = secrets.token_urlsafe(32)
        key = _digest(value)
        index = index or "_" + secrets.token_hex(16)
        self.store.put_session(key, _record(identity, index, 0.0, directory, asked), now)
        for party, data in carried.items():
            self.store.put_participant(key, party, data)
        # SAML Single Logout names the session by its SessionIndex (a cross-site POST has no cookie).
        self.store.put_pending("idx:" + index, {"key": key}, now + self.settings.absolute)
        return f"{value}.{self._mac('session', value)}", Session(key, identity, now, index, 0.0, directory, asked)

    def get(self, cookie: str | None) -> Session | None:
        """The live session the cookie names, or ``None`` (bad MAC, unknown, idle or too old)."""
        value = self._unsign(cookie)
        if value is None:
            return None
        key = _digest(value)
        session = self._live(key)
        if session is not None:
            self.store.touch_session(key, time.time())
        return session

    def by_index(self, index: str) -> Session | None:
        """The live session with this SessionIndex (an OIDC ``sid``), not counted as a use."""
        key = self.key_of_index(index) if isinstance(index, str) else None
        return self._live(key) if key is not None else None

    def _live(self, key: str) -> Session | None:
        record = self.store.get_session(key)
        if record is None:
            return None
        data, created, seen = record
        now = time.time()
        if now - created > self.settings.absolute or now - seen > self.settings.idle:
            self.store.delete_session(key)
            return None
        return Session(key, identity_from_json(data["identity"]), created, data["index"],
                       data.get("checked", 0.0), data.get("directory"), data.get("asked", True))

    # -- the account behind a session ----------------------------------------------------------------

    @staticmethod
    def recheck_due(session: Session) -> bool:
        return time.time() - session.checked >= RECHECK_INTERVAL

    def rechecked(self, session: Session, found: Identity | None) -> Session | None:
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
        self.store.update_session(session.key, _record(identity, session.index, now, directory))
        return replace(session, identity=identity, checked=now, directory=directory, asked=True)

    def end_index(self, index: str) -> bool:
        """End the session with this SAML SessionIndex; ``True`` when there was one."""
        record = self.store.take_pending("idx:" + index, time.time()) if 0 < len(index) <= 64 else None
        if record is not None:
            self.store.delete_session(record["key"])
        return record is not None

    def end(self, cookie: str | None) -> None:
        value = self._unsign(cookie)
        if value:
            self.store.delete_session(_digest(value))

    # -- Single Logout: who was told about a session -------------------------------------------------

    def add_participant(self, session: Session, party: str, data: dict) -> None:
        """Note that *party* (a SAML SP's entity id) got an answer in *session*, with *data* as
        issued (NameID, its format, SessionIndex): logout is propagated to it with exactly these."""
        self.store.put_participant(session.key, party, data)

    def key_of_index(self, index: str) -> str | None:
        """The store key of the live session with this SAML SessionIndex, or ``None``."""
        record = self.store.get_pending("idx:" + index, time.time()) if 0 < len(index) <= 64 else None
        return record["key"] if record is not None else None

    def participants(self, key: str) -> dict[str, dict]:
        return self.store.get_participants(key)

    def end_key(self, key: str, index: str | None) -> None:
        """End the session stored under *key* (its participants are forgotten with it)."""
        self.store.delete_session(key)
        if index:
            self.store.take_pending("idx:" + index, time.time())

    def _maybe_purge(self, now: float) -> None:
        if self._last_purge is None or now - self._last_purge > 60:
            self._last_purge = now
            self.store.purge(now, now - self.settings.absolute)

    # -- pending logins and replay ----------------------------------------------------------------

    def park(self, data: dict, lifetime: float) -> str:
        """Keep *data* (a validated request) for the user's login; returns its single-use id.

        Requests are parked for anyone, before any sign-in: the expired ones are purged here too
        (at most once a minute), not only when a session is made, or a flood of requests nobody
        finishes would grow the SQLite file without end (review)."""
        now = time.time()
        self._maybe_purge(now)
        key = secrets.token_urlsafe(24)
        self.store.put_pending("p:" + key, data, now + lifetime)
        return key

    def unpark(self, key: str) -> dict | None:
        if not key or len(key) > 64:
            return None
        return self.store.take_pending("p:" + key, time.time())

    def peek(self, key: str) -> dict | None:
        """The parked data without using it up (a page that only shows the form)."""
        if not key or len(key) > 64:
            return None
        return self.store.get_pending("p:" + key, time.time())

    def park_as(self, key: str, data: dict, lifetime: float) -> None:
        """Keep *data* under a key the caller made (a random message ID it sent), single use."""
        self.store.put_pending("m:" + key, data, time.time() + lifetime)

    def unpark_as(self, key: str) -> dict | None:
        if not key or len(key) > 64:
            return None
        return self.store.take_pending("m:" + key, time.time())

    def first_use(self, namespace: str, ident: str, lifetime: float) -> bool:
        """``True`` the first time *ident* is seen within *lifetime* seconds (replay refusal)."""
        return self.store.put_pending(f"seen:{namespace}:{_digest(ident)}", {}, time.time() + lifetime)

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
