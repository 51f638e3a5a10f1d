"""The Redis store: one cache shared by several gateway instances on several machines.

Each entry is a hash ``PREFIX + ROWKEY`` with fields ``kid``, ``hash``, ``sealed``, ``at``
(stored at) and ``fail``; the server expires it ``max_age`` after the live login that wrote it
(``PEXPIREAT``), so an abandoned entry disappears even if no gateway ever purges. Writes (never
over an entry stored later) and the offline failure counter are Lua scripts, which Redis runs
atomically. Instances sharing one Redis compare each other's ``time.time()``: keep their clocks
synchronised (NTP), as ``max_age`` already requires.

Needs the ``redis`` package (``pip install 'authgw[redis]'``), imported only when configured.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from gateway.plugins.cache.store import (AT_LIMIT, FORGOTTEN_FOR, FUTURE_TOLERANCE, GONE, TAKEN, Entry,
                                         StoreError)
from gateway.redis_deadline import CallDeadline, bounded_connection_class
from gateway.redis_eviction import EvictionWatch, refused

__all__ = ["RedisStore"]

_ROW = re.compile(rb"^[0-9a-f]{64}$")

# KEYS[1] entry; ARGV[1] limit. -1: no entry, 0: at the limit, 1: counted.
_TAKE = """
local f = redis.call('HGET', KEYS[1], 'fail')
if not f then return -1 end
if tonumber(f) >= tonumber(ARGV[1]) then return 0 end
redis.call('HINCRBY', KEYS[1], 'fail', 1)
return 1
"""
# KEYS[1] entry, KEYS[2] its "forgotten at" marker, KEYS[3] the store-wide "purged at" marker;
# ARGV: at, expire_ms, kid, hash, sealed, fail, tolerance. Never writes an entry stamped before
# either marker (a refusal, or the operator's purge, meanwhile); replaces the entry unless the
# one held was stored later (two instances storing one user at once keep the newer), but not
# more than FUTURE_TOLERANCE later (a clock far ahead); 1: written.
_PUT = """
local forgotten = redis.call('GET', KEYS[2])
if forgotten and tonumber(forgotten) >= tonumber(ARGV[1]) then return 0 end
local purged = redis.call('GET', KEYS[3])
if purged and tonumber(purged) >= tonumber(ARGV[1]) then return 0 end
local at = redis.call('HGET', KEYS[1], 'at')
if at and tonumber(at) > tonumber(ARGV[1]) and tonumber(at) <= tonumber(ARGV[1]) + tonumber(ARGV[7]) then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'kid', ARGV[3], 'hash', ARGV[4], 'sealed', ARGV[5], 'at', ARGV[1], 'fail', ARGV[6])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return 1
"""
# KEYS[1] entry, KEYS[2] marker; ARGV: at, marker lifetime in ms, older_only ("1": keep an entry
# stamped after `at`, up to ARGV[4] seconds later: a retried forget), tolerance. Keeps the latest
# refusal time; the server expires the marker (bounded growth whatever the number of refused
# names). DEL comes first: a Redis at its maxmemory with noeviction refuses a script's first
# write if it would add memory (SET, `OutOfMemoryError`), never DEL, and once the script has
# written the marker's SET is let through too. With the marker first, a full Redis kept the
# entry of a password the directory had refused (review of the Redis stores).
_FORGET = """
local deleted = 0
local at = redis.call('HGET', KEYS[1], 'at')
local stamped = at and tonumber(at)
if ARGV[3] ~= '1' or not stamped or stamped <= tonumber(ARGV[1])
   or stamped > tonumber(ARGV[1]) + tonumber(ARGV[4]) then
  deleted = redis.call('DEL', KEYS[1])
end
local m = redis.call('GET', KEYS[2])
if not m or tonumber(m) < tonumber(ARGV[1]) then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) end
return deleted
"""
# KEYS[1] the store-wide marker; ARGV: at, marker lifetime in ms. As _FORGET's marker, for every key.
_MARK_PURGED = """
local m = redis.call('GET', KEYS[1])
if not m or tonumber(m) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
return 1
"""
# Never creates the hash (HINCRBY on a missing key would, without an expiry); 0 when it is gone.
_GIVE_BACK = """
local f = redis.call('HGET', KEYS[1], 'fail')
if not f then return 0 end
if tonumber(f) > 0 then redis.call('HINCRBY', KEYS[1], 'fail', -1) end
return 1
"""


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class RedisStore:
    """Entries in a shared Redis.

    **Eviction.** A Redis with ``maxmemory`` and a policy that evicts (``volatile-*``, a common
    managed default, picks among keys with a time to live: every key of this store) may delete a
    "forgotten at" marker, and a write of an older login then re-creates the entry of a refused
    password, or an entry's offline failure count with it. :meth:`probe` and :meth:`ping` (the
    health round, off the event loop) ask :func:`gateway.redis_eviction.eviction_problem` through
    an :class:`~gateway.redis_eviction.EvictionWatch`, as the throttle and the login door do; while
    it answers, :attr:`unusable` says why and every read or write that could lead to an offline
    answer (:meth:`get`, :meth:`put`, :meth:`take_failure`, :meth:`give_back_failure`,
    :meth:`scan`) raises :class:`StoreError` with it: the cache answers nothing offline, as when
    Redis is down. Deleting (:meth:`delete`, :meth:`forget`, :meth:`forget_all`, :meth:`purge`)
    goes on: it never lets a password work, and a refusal must not wait. One ERROR line per
    change of the answer, per process.

    **Each command within ``redis.timeout``, in all** (:mod:`gateway.redis_deadline`): connecting,
    sending and the whole answer, at most :data:`~gateway.redis_deadline.MAX_ANSWER_BYTES` of it.
    An answer that is no Redis answer (arrays nested 200,000 deep, ``+PONG`` to the handshake) is a
    :class:`StoreError`, as Redis down is: it raised ``RecursionError`` or ``AttributeError``
    through :meth:`_call`: no worker started (``gateway_startup`` takes a StoreError only), and
    later every login and health probe logged a traceback (~150 KB each for the nested arrays)
    while ``/readyz`` said the store was ok (stop 47).
    """

    def __init__(self, url: str, *, max_age: float, key_prefix: str = "authgw:cache:", username: str | None = None,
                 password: str | None = None, timeout: float = 1.0, ca_file: Path | None = None,
                 log: logging.Logger | None = None) -> None:
        try:
            import redis
        except ImportError as exc:  # the core's loader names the extra for top-level imports only
            raise StoreError("store: redis needs the redis package: pip install 'authgw[redis]'") from exc
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._timeout = timeout
        #: The command in progress on this thread ends by it (:meth:`_call`).
        self._deadline = CallDeadline()
        parts = urlsplit(url)
        self.location = f"{parts.scheme}://{parts.hostname or ''}{':' + str(parts.port) if parts.port else ''}{parts.path}"
        self.prefix = key_prefix.encode("utf-8")
        self.max_age = max_age
        options: dict[str, Any] = dict(username=username, password=password, socket_timeout=timeout,
                                       socket_connect_timeout=timeout, health_check_interval=30,
                                       decode_responses=False)
        if parts.scheme == "rediss" and ca_file is not None:
            options["ssl_ca_certs"] = str(ca_file)
        # redis-py's pool is thread-safe and notices a fork (it checks the pid on checkout).
        self._redis = redis.Redis.from_url(url, **options)
        pool = self._redis.connection_pool
        pool.connection_class = bounded_connection_class(pool.connection_class, self._deadline)
        self._put = self._redis.register_script(_PUT)
        self._take = self._redis.register_script(_TAKE)
        self._give_back = self._redis.register_script(_GIVE_BACK)
        self._forget = self._redis.register_script(_FORGET)
        self._mark_purged = self._redis.register_script(_MARK_PURGED)
        self.log = log or logging.getLogger("authgw.plugin.cache")
        #: What the last probe or ping found of this Redis's eviction policy (one line per change).
        self._eviction = EvictionWatch(
            "credential cache: the Redis store", logger=self.log,
            error_line="{what} is not used (no offline answers) until its eviction policy is fixed: "
                       "{location}: {problem}",
            fixed_line="{what} {location} no longer evicts keys (maxmemory-policy noeviction, or no maxmemory): "
                       "used again")

    def _name(self, key: str) -> bytes:
        return self.prefix + key.encode("ascii")

    def _marker(self, key: str) -> bytes:
        # Not 64 hex digits after the prefix: scan, purge and `cache list` never take it for a row.
        return self.prefix + b"forgotten:" + key.encode("ascii")

    def _purged_marker(self) -> bytes:
        # Not a row either (see _marker); one per key prefix, so per cache sharing this Redis.
        return self.prefix + b"purged"

    @property
    def unusable(self) -> str | None:
        """Why the store is not used (its eviction policy), as the StoreError says it; None: usable
        (or not asked yet: the first probe or ping asks)."""
        problem = self._eviction.problem
        return f"{self.location}: {problem}" if problem is not None else None

    def _usable(self) -> None:
        if self.unusable is not None:
            raise StoreError(self.unusable)

    def _check_eviction(self) -> None:
        """Ask whether this Redis may evict keys (after a command that reached it), and raise
        :class:`StoreError` while it may, or when it did not answer (the last answer stands)."""
        self._call("INFO memory", self._eviction.check, self._redis, self.location)
        self._usable()

    def _call(self, what: str, function, *args, **kwargs):
        """*function* (one command: a script's NOSCRIPT reload included) within ``redis.timeout``."""
        try:
            with self._deadline.within(self._timeout):
                return function(*args, **kwargs)
        except self._errors as exc:
            raise StoreError(f"{self.location}: {what}: {exc.__class__.__name__}: {exc}") from exc

    @staticmethod
    def _entry(key: str, fields: dict[bytes, bytes]) -> Entry | None:
        try:
            return Entry(key, fields[b"kid"].decode(), fields[b"hash"].decode(), fields[b"sealed"],
                         float(fields[b"at"]), int(fields.get(b"fail", b"0")))
        except (KeyError, ValueError, UnicodeDecodeError):
            return None  # a half-written or foreign hash: not an entry

    # -- the interface ----------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        self._usable()
        fields = self._call("HGETALL", self._redis.hgetall, self._name(key))
        return self._entry(key, fields) if fields else None

    def put(self, entry: Entry) -> bool:
        # One Lua script: Redis runs it atomically, so nobody sees a partial entry and no other
        # writer slips in between the comparison and the write.
        self._usable()
        expire_ms = int((entry.stored_at + self.max_age) * 1000)
        keys = [self._name(entry.key), self._marker(entry.key), self._purged_marker()]
        return bool(int(self._call("EVALSHA", self._put, keys=keys, args=[
            repr(entry.stored_at).encode(), expire_ms, entry.kid.encode(), entry.password_hash.encode(),
            entry.sealed, str(entry.failures).encode(), repr(FUTURE_TOLERANCE).encode()])))

    def delete(self, key: str) -> bool:
        return bool(self._call("DEL", self._redis.delete, self._name(key)))

    def forget(self, key: str, at: float, older_only: bool = False) -> bool:
        return bool(int(self._call("EVALSHA", self._forget, keys=[self._name(key), self._marker(key)],
                                   args=[repr(at).encode(), int(FORGOTTEN_FOR * 1000), b"1" if older_only else b"0",
                                         repr(FUTURE_TOLERANCE).encode()])))

    def forget_all(self, at: float) -> int:
        # Marker first, as in _FORGET: a write that lands while the rows are deleted one by one
        # is either refused (stamped before *at*) or deleted with them (fail closed: a later live
        # login writes the entry again).
        self._call("EVALSHA", self._mark_purged, keys=[self._purged_marker()],
                   args=[repr(at).encode(), int(FORGOTTEN_FOR * 1000)])
        return self.purge()

    def take_failure(self, key: str, limit: int) -> int:
        self._usable()
        result = int(self._call("EVALSHA", self._take, keys=[self._name(key)], args=[limit]))
        return {1: TAKEN, 0: AT_LIMIT}.get(result, GONE)

    def give_back_failure(self, key: str) -> bool:
        self._usable()
        return bool(int(self._call("EVALSHA", self._give_back, keys=[self._name(key)], args=[])))

    def _names(self) -> Iterator[bytes]:
        pattern = _glob_escape(self.prefix.decode("utf-8")).encode("utf-8") + b"*"
        # Each SCAN is a command of its own (within redis.timeout), not the whole walk of a store
        # that may hold many entries; the names are all read before any is used, as before.
        names, cursor = [], 0
        while True:
            cursor, batch = self._call("SCAN", self._redis.scan, cursor, match=pattern, count=1000)
            names.extend(batch)
            if not int(cursor):
                break
        for name in names:
            if _ROW.match(name[len(self.prefix):]):
                yield name

    def scan(self) -> Iterator[Entry]:
        self._usable()
        for name in self._names():
            entry = self.get(name[len(self.prefix):].decode("ascii"))
            if entry is not None:
                yield entry

    def purge(self, older_than: float | None = None) -> int:
        removed = 0
        for name in self._names():
            if older_than is not None:
                at = self._call("HGET", self._redis.hget, name, b"at")
                if at is None or float(at) >= older_than:
                    continue
            removed += int(self._call("DEL", self._redis.delete, name))
        return removed

    def probe(self) -> str:
        name = self.prefix + b"probe:" + secrets.token_hex(8).encode()
        value = secrets.token_bytes(16)
        self._call("SET", self._redis.set, name, value, px=10_000)
        back = self._call("GET", self._redis.get, name)
        self._call("DEL", self._redis.delete, name)
        if back != value:
            raise StoreError(f"{self.location}: the probe key did not read back")
        version = self._version()
        started = time.monotonic()
        self._call("PING", self._redis.ping)
        took = time.monotonic() - started
        self._check_eviction()
        return (f"{self.location}: writable, redis {version}, "
                f"ping {1000 * took:.1f} ms")

    def _version(self) -> str:
        """The server's version for :meth:`probe`, or ``?`` when Redis refuses ``INFO`` to this
        user (an ACL without it): that failed the probe, a start-up ERROR and ``authgw check``
        FAIL, of a store the health round then used (review of the eviction watch)."""
        try:
            return str(self._call("INFO", self._redis.info, "server").get("redis_version", "?"))
        except StoreError as exc:
            if refused(exc.__cause__):
                return "?"
            raise

    def ping(self) -> str:
        """PING within ``redis.timeout``, then whether Redis may evict keys (``INFO memory``,
        :meth:`_check_eviction`): the health probe's question (raises StoreError)."""
        self._call("PING", self._redis.ping)
        self._check_eviction()
        return f"{self.location}: answers"

    def close(self) -> None:
        try:
            self._redis.close()
        except self._errors:
            pass
