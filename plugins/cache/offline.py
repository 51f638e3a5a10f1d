"""Offline logins: remember live password successes, answer from them when the directory is down.

The rules (DESIGN.md section 3, docs/plugins/cache.md):

* a live SUCCESS of a password attempt, decided by a step listed in ``methods``, stores the
  argon2id hash of the peppered password and the sealed identity under the account's own
  username (``Identity.username``); logged in under another name of the account (a mail
  address, a userPrincipalName), that name's row only points at the account's, so a refusal
  under any name of an account reaches its one entry;
* a live INVALID_CREDENTIALS, ACCOUNT_STATE or USER_NOT_FOUND for a username deletes its entry,
  so a password the directory has refused never works offline again (with a short-lived
  "forgotten at" marker, so a write of an older login already under way cannot re-create it);
* only when the folded decision is UNAVAILABLE does the cache answer: the right password gives
  a SUCCESS with ``from_cache``, a wrong one INVALID_CREDENTIALS; after ``max_offline_failures``
  wrong ones the user is refused until a live login; an unknown, expired or unreadable entry
  leaves the decision UNAVAILABLE. ``max_age`` counts from the time sealed in the entry; an
  entry whose stored time differs from it was changed in the store and is deleted, and so is
  one whose password hash is not the one sealed with it; a password hash with argon2
  parameters other than the configured ones is never verified (absent);
* an entry sealed with the backend that vouched (``Decision.answered_by``: a relay's connector)
  is answered only while that backend is not revoked (``gateway_answerer_revoked``): revoked,
  the entry is deleted; while its plugin cannot tell, it is not answered.

Store errors never change a live decision; they only keep the cache out (and are logged). A
deletion the store did not take is kept in the state directory and retried until it lands
(:mod:`gateway.plugins.cache.pending`); meanwhile this instance answers that user nothing offline.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import re
import secrets
import threading
import time
import unicodedata
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from argon2 import PasswordHasher, Type
from argon2.low_level import ARGON2_VERSION
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from gateway import REFUSED_ACCOUNT_KEY, Attempt, Decision, Identity, Outcome, PasswordCredential
from gateway.logs import printable
from gateway.model import canonical_username
from gateway.plugins.cache.keys import CacheKeys, KeyFileError, hash_bound, load_keys, sealed_time
from gateway.plugins.cache.pending import LIMIT as PENDING_LIMIT, PENDING_FILE, PendingForgets
from gateway.plugins.cache.settings import CacheSettings
from gateway.plugins.cache.store import AT_LIMIT, FUTURE_TOLERANCE, GONE, Entry, SQLiteStore, Store, StoreError
from gateway.slots import FairSlots, usable_cpus

__all__ = ["ALIAS_HASH", "OfflineCache", "lowered", "make_store", "normalise", "same_name"]

SQLITE_FILE = "cache.sqlite3"
_MEMO_LIMIT = 100_000
_PURGE_EVERY = 3600.0
#: Outcomes by which a live directory says "no" to this username.
_REFUSALS = frozenset({Outcome.INVALID_CREDENTIALS, Outcome.ACCOUNT_STATE, Outcome.USER_NOT_FOUND})


#: Seconds between two rounds of retrying the deletions the store did not take (:meth:`OfflineCache.
#: retry_forgets`); the longest one round goes on (the next round continues); deletions per batch.
RETRY_EVERY = 2.0
_RETRY_ROUND = 5.0
_RETRY_BATCH = 256

_SALT_LEN, _HASH_LEN = 16, 32
#: The hash column of a row that only names the row of the account (:meth:`OfflineCache._point`).
ALIAS_HASH = "alias"
#: Refused passwords waiting to be compared with the cached one (:meth:`OfflineCache.refused`).
#: Beyond it (a flood of wrong passwords for cached users) an entry is forgotten at once, as
#: before the comparison existed: fail closed, bounded work.
_RECHECKS_QUEUED = 256
#: Lookups of a refused name's account on threads of their own at a time (:meth:`OfflineCache.
#: forget_account`); beyond it the refusal's own thread looks up.
_FINDERS = 16
_B64 = "[A-Za-z0-9+/]"  # argon2's encoding: standard base64 alphabet, no padding
_PARAMETERS = re.compile(r"\$([^$]{0,20})\$([^$]{0,20})\$([^$]{0,60})\$")


def _hash_format(memory_cost: int, time_cost: int, parallelism: int) -> re.Pattern[str]:
    """The one encoded form a hash made by this configuration can have. argon2 verifies with
    the parameters written in the hash string, which the store can change (2 GiB and seconds
    per check); only a hash made with the configured ones is verified."""
    def b64(size: int) -> str:
        return f"{_B64}{{{(size * 4 + 2) // 3}}}"

    return re.compile(rf"\$argon2id\$v={ARGON2_VERSION}\$m={memory_cost},t={time_cost},p={parallelism}"
                      rf"\${b64(_SALT_LEN)}\${b64(_HASH_LEN)}", re.ASCII)


def normalise(username: str, mode: str) -> str:
    """The username as entries are keyed. ``casefold``: :func:`lowered`, the spelling a
    directory matches names by, so that one account's spellings meet in one row and two
    accounts keep two."""
    if mode == "casefold":
        return lowered(username)
    return username


def lowered(name: str) -> str:
    """*name* as LDAP servers compare it, ignoring case: :func:`canonical_username`, ``İ`` as
    ``I``, each letter lowered on its own (``Σ`` to ``σ`` wherever it stands, not to a final
    ``ς``), then NFKC. Never full case folding (:func:`gateway.model.folded_username`), which
    makes ``ß`` ``ss`` and ``ς`` ``σ``: slapd keeps ``strasse`` and ``straße`` as two users, and
    a row keyed by the full fold was both users' (one's live login replaced the other's
    offline entry, one's refusal deleted it; review of the cache, fifth round).

    Only the letters whose lower case Unicode 3.2 already had (:func:`_lower`): slapd's case
    tables are that old, and keep ``STRAẞE`` and ``straße``, ``Ⱥnna`` and ``ⱥnna``, Cherokee and
    Georgian capitals and their small letters as two users each; lowered by today's tables they
    shared one row again (review of this session's changes). A directory that lowers more
    (a spelling keyed apart from its account's row) gets a pointer row (:meth:`OfflineCache.remember`)."""
    name = canonical_username(name)
    if name.isascii():
        return name.lower()
    name = name.replace("\u0130", "I")
    return unicodedata.normalize("NFKC", "".join(_lower(ch) for ch in name))


#: The Unicode 3.2 character database (Python keeps it for IDNA): the case tables slapd lowers by.
_UCD_3_2 = unicodedata.ucd_3_2_0


def _lower(ch: str) -> str:
    """*ch* lowered when it and its lower case were cased letters already in Unicode 3.2."""
    low = ch.lower()
    if low == ch or ch.isascii():
        return low
    if _UCD_3_2.category(ch) in ("Lu", "Lt") and all(_UCD_3_2.category(c)[0] == "L" for c in low):
        return low
    return ch


def make_store(settings: CacheSettings, state_dir: Path, log: logging.Logger | None = None) -> Store:
    if settings.store == "redis":
        from gateway.plugins.cache.redis_store import RedisStore

        redis = settings.redis
        assert redis is not None  # the settings model requires it
        return RedisStore(redis.url, max_age=settings.max_age, key_prefix=redis.key_prefix, username=redis.username,
                          password=redis.password.reveal() if redis.password else None, timeout=redis.timeout,
                          ca_file=redis.ca_file, log=log)
    return SQLiteStore(settings.sqlite.path or state_dir / SQLITE_FILE, settings.sqlite.busy_timeout)


def identity_from(document: dict, authenticated_at: float) -> Identity:
    return Identity(subject=str(document["subject"]), username=str(document["username"]),
                    method=str(document["method"]), display_name=str(document.get("display_name", "")),
                    email=str(document.get("email", "")), groups=tuple(str(g) for g in document.get("groups", ())),
                    claims=dict(document.get("claims") or {}), authenticated_at=authenticated_at)


def refused_account(attempt: Attempt, step: str) -> str | None:
    """The account *step* named as refused by its directory in *attempt* (``REFUSED_ACCOUNT_KEY``),
    or None when it named none (a third-party step: the cache looks the name up instead)."""
    return attempt.stash.get(REFUSED_ACCOUNT_KEY, {}).get(step) or None


class OfflineCache:
    def __init__(self, settings: CacheSettings, state_dir: Path, *, name: str = "cache",
                 log: logging.Logger | None = None,
                 revoked: Callable[[str], bool | None] = lambda answered_by: None,
                 account_of: Callable[[str, str], str | None] = lambda step, username: None) -> None:
        self.settings = settings
        #: ``revoked(answered_by)``: whether the backend an entry rests on was revoked since
        #: (True: the entry is deleted; None: cannot tell, no answer; False: it stands).
        self.revoked = revoked
        #: ``account_of(step, username)``: the directory's own username of the account the chain
        #: step *step* finds under *username* now (its ``gateway_lookup_user``), or None.
        self.account_of = account_of
        self.state_dir = state_dir
        self.name = name
        self.log = log or logging.getLogger(f"authgw.plugin.{name}")
        argon2 = settings.argon2
        self.hasher = PasswordHasher(time_cost=argon2.time_cost, memory_cost=argon2.memory_cost,
                                     parallelism=argon2.parallelism, hash_len=_HASH_LEN, salt_len=_SALT_LEN,
                                     type=Type.ID)
        self._hash_format = _hash_format(argon2.memory_cost, argon2.time_cost, argon2.parallelism)
        self._foreign_hash_logged = False
        self._hash_slots = FairSlots(settings.hash_concurrency or usable_cpus())  # first come, first served
        self._lock = threading.Lock()
        self._keys: CacheKeys | None = None
        self._store: Store | None = None
        self._memo_key = secrets.token_bytes(32)
        self._memo: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        #: Deletions the store did not take in this worker: row key -> time of the refusal (also
        #: kept in STATE_DIR/cache-forgets.sqlite3 for the other workers and a restart).
        self._tombstones: OrderedDict[str, float] = OrderedDict()
        self._pending = PendingForgets(state_dir / PENDING_FILE,
                                       settings.sqlite.busy_timeout if settings.store == "sqlite" else 5.0)
        self._retry_round = threading.Lock()  # one round at a time
        self._retrier_lock = threading.Lock()
        self._retrier: threading.Event | None = None  # the running retry thread's stop signal
        self._last_purge = 0.0
        #: When this worker last answered from the store (time.time(); None: not yet).
        self.last_offline_answer: float | None = None
        #: The last store error, for readiness (None when the last operation worked).
        self.store_error: str | None = None
        self._rechecks: queue.SimpleQueue[tuple[str, tuple[str, ...], object, str, str | None]] = queue.SimpleQueue()
        #: Refused passwords queued or being compared, by the user key of the name refused and of
        #: the account named as refused (offline answers wait for theirs); and how many in all.
        #: Under _recheck_done's lock.
        self._rechecking: dict[str, int] = {}
        self._queued = 0
        self._recheck_done = threading.Condition()
        #: Refusals whose account is being looked up (:meth:`forget_account`); under
        #: _recheck_done's lock. Offline answers wait for them, whoever they are for.
        self._finding = 0
        self._finders = threading.BoundedSemaphore(_FINDERS)

    # -- lazily opened state (never in the master process: it forks the workers) ---------------

    def keys(self, create: bool = True) -> CacheKeys:
        if self._keys is None:
            with self._lock:
                if self._keys is None:
                    self._keys = load_keys(self.state_dir, self.settings.pepper, self.settings.encryption_key,
                                           create=create)
        return self._keys

    @property
    def store(self) -> Store:
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = make_store(self.settings, self.state_dir, self.log)
        return self._store

    @property
    def location(self) -> str:
        """The store's location once opened, else its kind (never opens it)."""
        return self._store.location if self._store is not None else self.settings.store

    def close(self) -> None:
        with self._retrier_lock:
            stop, self._retrier = self._retrier, None
        if stop is not None:
            stop.set()  # what is left is retried at the next start (it is kept in the state directory)
        self._pending.close()
        if self._store is not None:
            self._store.close()

    def user_key(self, username: str) -> str:
        return normalise(username, self.settings.usernames)

    def row_key(self, username: str) -> str:
        return self.keys().row_key(self.user_key(username))

    def _ok(self) -> None:
        # A store that answers but is known not to be used (a Redis that may evict keys) stays
        # reported as such: deleting still works there.
        self.store_error = getattr(self._store, "unusable", None)

    def _failed(self, what: str, exc: Exception) -> None:
        self.store_error = str(exc)
        if self.store_error == getattr(self._store, "unusable", None):  # logged once by the store
            self.log.debug("credential cache: %s refused: %s", what, exc)
            return
        self.log.error("credential cache: %s failed: %s", what, exc)

    def purge_expired(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        self._last_purge = now
        removed = self.store.purge(now - self.settings.max_age)
        if removed:
            self.log.info("credential cache: purged %d entries older than max_age", removed)
        return removed

    # -- live results ---------------------------------------------------------------------------------

    def _credential_mark(self, row_key: str, password: str, identity: Identity, step: str) -> bytes:
        """What this process last stored for a row, as a keyed hash: the password and the
        profile (a changed group membership must reach the cache without waiting)."""
        profile = identity.to_json()
        profile.pop("authenticated_at", None)
        mark = hmac.new(self._memo_key, row_key.encode() + b"\0" + step.encode(), hashlib.sha256)
        mark.update(json.dumps(profile, sort_keys=True, default=str).encode())
        mark.update(b"\0" + password.encode("utf-8", "surrogatepass"))
        return mark.digest()

    def remember(self, attempt: Attempt, credential: PasswordCredential, identity: Identity, step: str,
                 answered_by: str = "") -> bool:
        """Store a live success; False when skipped or failed (the live decision stands anyway).
        *answered_by* (the backend of *step* that vouched) is sealed with it; a later success
        with the same password and profile within ``refresh_after`` keeps the entry, and the
        name of the backend that vouched first.

        The entry is the account's: it is stored under the username the directory gave
        (``identity.username``). A login under another name of the account (a mail address, a
        userPrincipalName) stores the entry there and, under the name given,
        a row that only points at it. So one account has one entry whatever name it logs in
        with: a password changed, or an account refused, under any of its names is refused
        under all (review of the cache, third round)."""
        try:
            keys = self.keys()
            name_key = self.user_key(credential.username)
            user_key = self.user_key(identity.username) if identity.username else name_key
            row_key = keys.row_key(user_key)
            alias_row = keys.row_key(name_key) if name_key != user_key else None
            now = time.time()
            mark = self._credential_mark(row_key, credential.password, identity, step)
            memo = self._memo.get(row_key)
            if memo is not None and memo[0] == mark and now - memo[1] < self.settings.refresh_after:
                # This process stored this very password and profile moments ago: skip the
                # argon2 cost if that entry, or a later one another process wrote (another
                # worker or instance that saw a live login after ours), is still in the store
                # and clean: no refusal deleted it, no offline failure needs resetting.
                current = self.store.get(row_key)
                if (current is not None and current.kid == keys.kid and current.failures == 0
                        and current.stored_at >= memo[1] and self.usable_hash(current.password_hash)):
                    if alias_row is not None:
                        # Written again only when this process has not written it within
                        # refresh_after: a pointer another process deleted meanwhile (a refusal
                        # there) stays deleted until then, which fails closed.
                        seen = self._memo.get(alias_row)
                        if (seen is None or seen[0] != _pointer_mark(identity.username)
                                or now - seen[1] >= self.settings.refresh_after) \
                                and not self._point(keys, alias_row, identity.username, step, now, credential.username):
                            self._pointer_refused(row_key, now)
                    return False
            if not self._hash_slots.acquire(timeout=max(0.0, attempt.time_left() - 0.05)):
                self.log.warning("credential cache: no hashing slot before the deadline; %s not stored",
                                 attempt.request_id)
                return False
            try:
                password_hash = self.hasher.hash(keys.peppered(user_key, credential.password))
            finally:
                self._hash_slots.release()
            sealed = keys.seal(row_key, identity, step, now, answered_by, password_hash=password_hash)
            if alias_row is not None and not self._point(keys, alias_row, identity.username, step, now,
                                                         credential.username):
                # The pointer first: a refusal under the name given that reads it meanwhile
                # forgets the account's row too. One that came before it (found no pointer, so
                # marked the name's row alone) refuses the pointer: then no entry is written.
                self._pointer_refused(row_key, now)
                return False
            self._retry_forget(row_key, self._kept(row_key))  # a refusal the store did not take yet goes first
            self.store.put(Entry(row_key, keys.kid, password_hash, sealed, now))
            self._memorise(row_key, mark, now)
            self._ok()
            if now - self._last_purge > _PURGE_EVERY and isinstance(self.store, SQLiteStore):
                self.purge_expired(now)  # Redis expires entries itself (PEXPIREAT)
            return True
        except (StoreError, KeyFileError) as exc:
            self._failed("storing a live login", exc)
            return False

    def _point(self, keys: CacheKeys, alias_row: str, account: str, step: str, now: float, name: str) -> bool:
        """Write the row of *name*, another name of *account*: it names the account's row and
        holds no password hash (:data:`ALIAS_HASH` is no argon2 hash: nothing verifies against
        it). False when the store refuses it: a refusal under that name marked the row after
        *now* (or a later login wrote its own pointer)."""
        self._retry_forget(alias_row, self._kept(alias_row))
        sealed = keys.seal_alias(alias_row, account, step, now, password_hash=ALIAS_HASH, name=name)
        if not self.store.put(Entry(alias_row, keys.kid, ALIAS_HASH, sealed, now)):
            return False
        self._memorise(alias_row, _pointer_mark(account), now)
        return True

    def _pointer_refused(self, row_key: str, now: float) -> None:
        """The pointer to *row_key* (the account's row) was refused: a refusal under the other
        name came while this login hashed, before the pointer told it whose the name is, and
        marked the name's row alone (review of this stop's diff: the account's entry was then
        written and answered offline after the account was locked). That refusal may be the
        account's: what the account's row holds from before *now* is forgotten too (a later
        login's entry, stamped after *now*, stays)."""
        with self._lock:
            self._memo.pop(row_key, None)
        self.store.forget(row_key, now, older_only=True)

    def _memorise(self, row_key: str, mark: bytes, now: float) -> None:
        """Note that this process wrote *row_key* (an entry with *mark*, or a pointer) at *now*."""
        with self._lock:
            self._memo[row_key] = (mark, now)
            self._memo.move_to_end(row_key)
            while len(self._memo) > _MEMO_LIMIT:
                self._memo.popitem(last=False)

    def _resolve(self, keys: CacheKeys, row_key: str, user_key: str, entry: Entry | None,
                 ) -> tuple[str, str, Entry | None, dict | None]:
        """The account behind *entry* (the row of *user_key*): ``(user_key, row_key, entry,
        document)`` of the row that holds the password hash. A pointer row (:meth:`_point`) is
        followed once (its own sealed time and hash checked as an entry's are; never a pointer
        to a pointer). ``document`` is None when nothing usable is there: an entry of another
        account under this name (written by a version that stored each name's own entry, or
        put there by a writer of the store) included. Raises StoreError."""
        document = self._opened(keys, row_key, entry)
        if document is None:
            return user_key, row_key, entry, None
        if "alias_of" not in document:
            if not self._own(document, user_key):
                return user_key, row_key, entry, None  # another account's entry: never answered under this name
            return user_key, row_key, entry, document
        stored_at = sealed_time(document)
        if (stored_at is None or stored_at != entry.stored_at or time.time() - stored_at > self.settings.max_age
                or entry.password_hash != ALIAS_HASH or not hash_bound(document, entry.password_hash)):
            return user_key, row_key, entry, None
        name = document.get("name")
        if isinstance(name, str) and name and self.user_key(name) != user_key:
            # Written for another name under an older key (the full case fold: ``jeßica@…``'s
            # pointer in ``jessica@…``'s row): that name's, not this one's.
            return user_key, row_key, entry, None
        account_key = self.user_key(str(document["alias_of"]))
        if account_key == user_key:
            return user_key, row_key, entry, None
        account_row = keys.row_key(account_key)
        account_entry = self.store.get(account_row)
        account_document = self._opened(keys, account_row, account_entry)
        if account_document is None or "alias_of" in account_document or not self._own(account_document, account_key):
            return account_key, account_row, account_entry, None
        return account_key, account_row, account_entry, account_document

    def _own(self, document: dict, user_key: str) -> bool:
        """Whether an entry's sealed identity is the account of the row of *user_key* (an identity
        without a username is stored under the name given)."""
        username = str(document.get("username", ""))
        return not username or self.user_key(username) == user_key

    def _account_row(self, keys: CacheKeys, row_key: str) -> str | None:
        """The account row a pointer row *row_key* names (None: not a readable pointer). Raises
        StoreError."""
        document = self._opened(keys, row_key, self.store.get(row_key))
        if document is None or "alias_of" not in document:
            return None
        name = document.get("name")
        if isinstance(name, str) and name and keys.row_key(self.user_key(name)) != row_key:
            # Written for another name under an older key (as in _resolve): a refusal of the
            # name whose row it is now is not that account's (review of this session's changes).
            return None
        account_row = keys.row_key(self.user_key(str(document["alias_of"])))
        return account_row if account_row != row_key else None

    def pointed_account(self, username: str, step: str) -> str | None:
        """The account *username* is another name of, by the pointer row *step* proved
        (:meth:`remember`), or None: no such row, one another step wrote, or one written for
        another name under an older key. Raises StoreError, KeyFileError."""
        keys = self.keys()
        user_key = self.user_key(username)
        row_key = keys.row_key(user_key)
        document = self._opened(keys, row_key, self.store.get(row_key))
        if document is None or "alias_of" not in document or document.get("step") != step:
            return None
        name = document.get("name")
        if isinstance(name, str) and name and self.user_key(name) != user_key:
            return None  # as in _account_row
        return str(document["alias_of"]) or None

    def forget(self, username: str) -> bool:
        """Delete a username's entry after the directory refused it, and the entry of the
        account it names when it is another name of an account (a pointer row: the refusal is
        the account's). When the store does not take it, the refusal is kept (in this process
        and in the state directory: a tombstone), so that this instance does not answer the user
        offline, and the deletion is retried in the background until it lands
        (:meth:`retry_forgets`): other workers and instances sharing the store could answer the
        refused password offline until then."""
        try:
            keys = self.keys()
            row_key = keys.row_key(self.user_key(username))
        except KeyFileError as exc:
            self._failed("deleting an entry", exc)
            return False
        at = time.time()
        with self._lock:
            self._memo.pop(row_key, None)
        account_row = None
        try:
            account_row = self._account_row(keys, row_key)
            deleted = self._forget_rows(row_key, account_row, at)
            self._ok()
            return deleted
        except StoreError as exc:
            self._failed("deleting an entry the directory refused (retried until the store takes it)", exc)
            # The retry of the name's row finds the pointer again (it is deleted last); the
            # account's row, when known, is kept too, so that no worker here answers it meanwhile.
            for key in (row_key, account_row):
                if key is not None:
                    self._keep_pending(key, at)
            return False

    def _forget_rows(self, row_key: str, account_row: str | None, at: float, older_only: bool = False) -> bool:
        """``store.forget`` *row_key* and, when it is another name's row, *account_row*, the
        account's row it points at (:meth:`_account_row`): the account's first, so that a failure
        in between leaves the pointer for the retry to follow. Raises StoreError."""
        deleted = False
        if account_row is not None:
            with self._lock:
                self._memo.pop(account_row, None)
            deleted = self.store.forget(account_row, at, older_only)
        return self.store.forget(row_key, at, older_only) or deleted

    def forget_unknown(self, username: str) -> bool:
        """The directory that was asked knows no user named *username*: forget its entry as
        :meth:`forget` does, unless the row under its key was written for a name the directory
        does not take for *username* (:func:`same_name`). Until the fifth round the row key
        folded case fully (``ß`` as ``ss``, ``ς`` as ``σ``), which directories do not: slapd
        has ``strasse`` and ``straße`` as two users, so a login as ``jeßica`` (no such user)
        deleted ``jessica``'s entry, or followed the pointer of ``jessica.smith@…`` to it
        (review of the cache, fourth round); rows keyed so live until ``max_age``. A row that
        does not say its name (none readable, written by an older version) is forgotten."""
        try:
            keys = self.keys()
            row_key = keys.row_key(self.user_key(username))
            document = self._opened(keys, row_key, self.store.get(row_key))
        except (StoreError, KeyFileError):
            return self.forget(username)  # cannot tell whose row it is: fail closed
        if document is not None:
            recorded = str(document.get("name", "") if "alias_of" in document else document.get("username", ""))
            if recorded and not same_name(username, recorded):
                self.log.info("credential cache: a name no directory knows folds like a cached user's "
                              "other name; that user's entry is kept")
                return False
        return self.forget(username)

    def forget_account(self, step: str, username: str, timeout: float, account: str | None = None) -> None:
        """The chain step *step* refused *username* for account state (disabled, locked,
        expired): forget the entry of the account that name is, which :meth:`forget` does not
        reach when the name has no row of its own yet (a mail never used to log in, under a
        ``user_filter`` that takes the uid or the mail): the account's row stayed answerable
        offline until ``max_age`` (review of the cache's refusal paths). The account is asked of
        *step* (:attr:`account_of`) on a thread of its own, waited for until *timeout*: a
        directory that answered the refusal and then hangs does not hold the answer past its
        deadline. Offline answers wait for the lookup meanwhile (:meth:`accounts_found`).

        When *step* named the account its directory refused (*account*,
        ``REFUSED_ACCOUNT_KEY``), that account's entry is forgotten here and now,
        with no lookup: none costs the directory a second search, and a step without a lookup
        (LDAP direct bind without a service account) can name it too."""
        if account:
            try:
                self._forget_account(step, username, account)
            except Exception:  # noqa: BLE001 - never turn the directory's refusal into an error
                self.log.exception("credential cache: forgetting the account of a name refused for account state "
                                   "failed")
            return
        done = threading.Event()

        def find() -> None:
            try:
                self._forget_account(step, username)
            except Exception:  # noqa: BLE001 - never end the thread unaccounted
                self.log.exception("credential cache: forgetting the account of a name refused for account state failed")
            finally:
                self._found()
                done.set()

        with self._recheck_done:
            self._finding += 1
        if not self._finders.acquire(blocking=False):
            find()  # many at once: on the refusal's own thread (fail closed, bounded)
            return

        def run() -> None:
            try:
                find()
            finally:
                self._finders.release()

        threading.Thread(target=run, name="authgw-cache-account", daemon=True).start()
        done.wait(max(0.0, timeout))

    def _forget_account(self, step: str, username: str, account: str | None = None) -> None:
        found = self._account_entry(step, username, account)
        if found is not None:
            self.forget(found[0])

    def _account_entry(self, step: str, username: str, account: str | None = None,
                       ) -> tuple[str, str, Entry, dict] | None:
        """``(account, row_key, entry, document)`` of the entry of the account *username* names
        for the chain step *step* (*account*, the one *step* named as refused, else
        :attr:`account_of`), when that is another name's row: None
        when the step names none, names *username* itself, or the row is not the account's own
        entry proved by *step*: a pointer row of that name (another account's, which forget()
        would follow), or another directory's user of that name, is never touched."""
        account = account or self.account_of(step, username)
        if not account:
            return None
        account_key = self.user_key(account)
        if account_key == self.user_key(username):
            return None  # the name's own row: forget() and the comparison reached it
        try:
            keys = self.keys()
            row_key = keys.row_key(account_key)
            entry = self.store.get(row_key)
        except (StoreError, KeyFileError) as exc:
            # Not kept for a retry as forget() keeps a row: whose row it is cannot be told.
            self._failed("reading the entry of an account refused under another name", exc)
            return None
        document = self._opened(keys, row_key, entry)
        if (document is None or "alias_of" in document or not self._own(document, account_key)
                or document.get("step") != step):
            return None
        return account, row_key, entry, document

    def _forget_account_if_cached(self, step: str, username: str, user_key: str, password,
                                  account: str | None = None) -> None:
        """A password refused under a name with no row: when the name is another of an account's
        (its mail), the account's entry is forgotten if it holds that password. Before, the
        account's old password, refused live under its mail after a change (or its right one
        after ppolicy locked it), kept working offline under its uid (review of the cache's
        refusal paths). Offline answers wait meanwhile (:meth:`accounts_found`)."""
        with self._recheck_done:
            self._finding += 1
        try:
            found = self._account_entry(step, username, account)
            if found is None:
                return
            account, _row_key, entry, document = found
            if not hash_bound(document, entry.password_hash) or not self.usable_hash(entry.password_hash):
                return  # not answered offline anyway; one guess under another name deletes nothing
            with self._hash_slots.held():
                same = self._verify(entry.password_hash, self.keys().peppered(self.user_key(account), password))
            if same:
                self.log.info("credential cache: the directory refused an account's cached password under "
                              "another of its names; entry forgotten")
                self.forget(account)
        finally:
            self._found()

    def _found(self) -> None:
        with self._recheck_done:
            self._finding -= 1
            self._recheck_done.notify_all()

    def accounts_found(self, timeout: float) -> bool:
        """Wait until no refused name's account is being looked up (:meth:`forget_account`);
        False when *timeout* passed first."""
        with self._recheck_done:
            return self._recheck_done.wait_for(lambda: not self._finding, max(0.0, timeout))

    def forget_now(self, username: str, at: float) -> bool:
        """The operator's purge of one user (``authgw cache purge USER``): as :meth:`forget`, the
        account's entry too when *username* is another name of it, but a store error is raised
        (the command says so) rather than kept for a retry. Raises StoreError, KeyFileError."""
        keys = self.keys(create=False)
        row_key = keys.row_key(self.user_key(username))
        return self._forget_rows(row_key, self._account_row(keys, row_key), at)

    # -- deletions the store did not take ------------------------------------------------------------

    def _keep_pending(self, row_key: str, at: float) -> None:
        with self._lock:
            self._tombstones[row_key] = max(at, self._tombstones.get(row_key, at))
            self._tombstones.move_to_end(row_key)
            while len(self._tombstones) > PENDING_LIMIT:
                self._tombstones.popitem(last=False)
        try:
            dropped = self._pending.add(row_key, at)
        except StoreError as exc:
            self.log.error("credential cache: a refusal the store did not take could not be kept in the state "
                           "directory (retried by this worker only, lost at a restart): %s", exc)
            dropped = 0
        if dropped:
            self.log.error("credential cache: more than %d refusals wait for the store; the %d oldest were dropped "
                           "(their entries may still answer offline elsewhere until max_age)", PENDING_LIMIT, dropped)
        self._start_retrying(RETRY_EVERY)

    def pending_forgets(self) -> int:
        """How many refusals this worker keeps for the store (memory only, for readiness)."""
        return len(self._tombstones)

    def resume_forgets(self) -> int:
        """At start-up and at each health round: retry the refusals kept in the state directory
        (by a previous run, or a worker gone since) on this worker's retry thread. Returns how
        many are kept."""
        try:
            kept = self._pending.count()
        except StoreError as exc:
            self.log.error("credential cache: reading the refusals the store did not take failed: %s", exc)
            return 0
        if kept:
            self._start_retrying(0.0)
        return kept

    def _start_retrying(self, first_in: float) -> None:
        with self._retrier_lock:
            if self._retrier is not None:
                return
            stop = self._retrier = threading.Event()
        threading.Thread(target=self._retry_loop, args=(stop, first_in), name="authgw-cache-forget",
                         daemon=True).start()

    def _retry_loop(self, stop: threading.Event, first_in: float) -> None:
        """Retry every :data:`RETRY_EVERY` seconds until nothing is kept (then the thread ends;
        the next failed deletion starts another) or :meth:`close`."""
        wait = first_in
        while not stop.wait(wait):
            wait = RETRY_EVERY
            try:
                self.retry_forgets()
            except Exception:  # noqa: BLE001 - the thread must go on while something is kept
                self.log.exception("credential cache: retrying deletions the store did not take failed")
            try:
                left = self._pending.count()
            except StoreError:  # logged by retry_forgets; this worker's own are in memory
                left = 0
            with self._retrier_lock:
                if self._retrier is not stop:
                    return
                if not left and not self._tombstones:
                    self._retrier = None
                    return

    def retry_forgets(self) -> int:
        """One round: retry the kept refusals, oldest first, until none is left, the store fails
        (the rest waits for the next round) or the round has run :data:`_RETRY_ROUND` seconds.
        A refusal older than ``max_age`` (plus the clock tolerance) is dropped: its entry is
        not answered any more. Returns how many landed."""
        if not self._retry_round.acquire(blocking=False):
            return 0
        landed = 0
        try:
            started = time.monotonic()
            horizon = time.time() - self.settings.max_age - FUTURE_TOLERANCE
            done: set[str] = set()
            while time.monotonic() - started < _RETRY_ROUND:
                with self._lock:
                    todo = {key: at for key, at in self._tombstones.items() if key not in done}
                try:
                    self._pending.expire(horizon)
                    for key, at in self._pending.due(_RETRY_BATCH + len(done)):
                        if key not in done:
                            todo[key] = max(at, todo.get(key, at))
                except StoreError as exc:
                    self.log.error("credential cache: reading the refusals the store did not take failed: %s", exc)
                if not todo:
                    break
                for key, at in sorted(todo.items(), key=lambda item: item[1])[:_RETRY_BATCH]:
                    done.add(key)
                    if at >= horizon:
                        try:
                            self._forget_rows(key, self._account_row(self.keys(), key), at, older_only=True)
                        except (StoreError, KeyFileError) as exc:
                            self.store_error = str(exc)
                            self.log.debug("credential cache: a deletion the store did not take failed again: %s",
                                           exc)
                            return landed
                        landed += 1
                    self._landed(key, at)
            if landed:
                self._ok()
                self.log.warning("credential cache: %d deletions of refused entries, which the store had not taken, "
                                 "landed", landed)
            return landed
        finally:
            self._retry_round.release()

    def _nothing_kept(self, row_key: str) -> bool:
        """True when no refusal of *row_key* waits for the store; else it is retried now and the
        answer is False (whether the retry lands or not). Raises StoreError."""
        kept = self._kept(row_key)
        if kept is None:
            return True
        self._retry_forget(row_key, kept)
        return False

    def _kept(self, row_key: str) -> float | None:
        """When *row_key*'s refusal the store did not take was made, if one is kept (by this
        worker, or by any in the state directory). Raises StoreError when the file cannot tell."""
        with self._lock:
            at = self._tombstones.get(row_key)
        return at if at is not None else self._pending.held(row_key)

    def _retry_forget(self, row_key: str, at: float | None) -> bool:
        """Retry the kept refusal of *row_key* made at *at* (:meth:`_kept`; None: nothing kept)
        now; False when it is still kept (the store failed again)."""
        if at is None:
            return True
        try:
            self._forget_rows(row_key, self._account_row(self.keys(), row_key), at, older_only=True)
        except (StoreError, KeyFileError) as exc:
            self._failed("deleting an entry the directory refused (retried)", exc)
            return False
        self._landed(row_key, at)
        return True

    def _landed(self, row_key: str, at: float) -> None:
        with self._lock:
            if self._tombstones.get(row_key, at + 1) <= at:
                del self._tombstones[row_key]
        try:
            self._pending.landed(row_key, at)
        except StoreError as exc:
            self.log.error("credential cache: a deletion that landed could not be removed from the state "
                           "directory (retried again): %s", exc)

    # -- a refused password --------------------------------------------------------------------------

    def refused(self, credential: PasswordCredential, step: str = "", account: str | None = None) -> None:
        """The directory refused this password: forget the user's entry if it is the cached
        password (changed since, or the account locked: ppolicy answers a locked account's right
        password as wrong), keep it if not. Forgetting on any wrong password let anyone wipe a
        user's offline login with one guess, for the next outage. Compared on a thread of its
        own, after the answer: an argon2 verify in the answer's time would tell a wrong password
        for a cached user from one for another. A name with no row of its own may be another of
        an account's: *account*, the account *step* (the step that refused it) named as refused
        (``REFUSED_ACCOUNT_KEY``), else the one *step*'s lookup finds; the password
        may be that of the account's entry (:meth:`_forget_account_if_cached`)."""
        user_key = self.user_key(credential.username)
        # The account's own key too: an offline answer under the account's name waits for this
        # comparison, which may forget its entry. It waited for its own name's only, and behind
        # a queue of other refused passwords the old password refused under the mail logged in
        # offline under the uid (items left by the review of the cache's refusal paths).
        keys = tuple(dict.fromkeys((user_key, self.user_key(account) if account else user_key)))
        with self._recheck_done:
            pending = self._queued
            if pending < _RECHECKS_QUEUED:
                self._queued += 1
                for key in keys:
                    self._rechecking[key] = self._rechecking.get(key, 0) + 1
        if pending >= _RECHECKS_QUEUED:
            self.forget(credential.username)
            if account:
                self._forget_account(step, credential.username, account)
            return
        self._rechecks.put((credential.username, keys, credential.password, step, account))
        if pending == 0:  # no thread is comparing: start one
            threading.Thread(target=self._recheck_queued, name="authgw-cache-recheck", daemon=True).start()

    def _recheck_queued(self) -> None:
        """Compare queued refused passwords until none is left (then the thread ends; the next
        refusal starts another)."""
        while True:
            username, keys, password, step, account = self._rechecks.get()
            user_key = keys[0]
            try:
                try:
                    self._forget_if_cached(username, user_key, password, step, account)
                except Exception:  # forget, as before the comparison
                    self.log.exception("credential cache: comparing a refused password failed; the entry is "
                                       "forgotten")
                    self.forget(username)
            except BaseException:  # noqa: BLE001 - never end the thread with items queued and counted
                self.log.exception("credential cache: forgetting an entry after a refused password failed")
            finally:
                with self._recheck_done:
                    for key in keys:
                        if self._rechecking[key] == 1:
                            del self._rechecking[key]
                        else:
                            self._rechecking[key] -= 1
                    self._queued -= 1
                    last = not self._queued
                    self._recheck_done.notify_all()
            if last:
                return

    def _forget_if_cached(self, username: str, user_key: str, password, step: str = "",
                          account: str | None = None) -> None:
        try:
            keys = self.keys()
            row_key = keys.row_key(user_key)
            entry = self.store.get(row_key)
            self._ok()
        except (StoreError, KeyFileError) as exc:
            self._failed("reading an entry the directory refused a password of", exc)
            self.forget(username)  # cannot compare: as before, fail closed
            return
        if entry is None:
            # An empty password or one with a NUL never logged in (ldap refuses it before any
            # bind): no entry holds it, and it costs the directory no lookup.
            if step and password and "\0" not in password:
                self._forget_account_if_cached(step, username, user_key, password, account)
            return
        try:
            user_key, row_key, entry, document = self._resolve(keys, row_key, user_key, entry)
        except StoreError as exc:
            self._failed("reading the entry of the account the directory refused a password of", exc)
            self.forget(username)
            return
        if (document is None or not hash_bound(document, entry.password_hash)
                or not self.usable_hash(entry.password_hash)):
            self.forget(username)  # not usable offline anyway
            return
        with self._hash_slots.held():
            same = self._verify(entry.password_hash, keys.peppered(user_key, password))
        if same:
            self.log.info("credential cache: the directory refused the cached password of a user; "
                          "entry forgotten")
            self.forget(username)

    def rechecked(self, timeout: float, user_key: str | None = None) -> bool:
        """Wait until every refused password queued so far (of *user_key*, or of anyone) is
        compared; False when *timeout* passed first."""
        with self._recheck_done:
            if user_key is None:
                return self._recheck_done.wait_for(lambda: not self._rechecking, timeout)
            return self._recheck_done.wait_for(lambda: user_key not in self._rechecking, max(0.0, timeout))

    def proved_by(self, username: str) -> str | None:
        """The step that proved the user whose entry this is (None: no readable entry)."""
        try:
            keys = self.keys()
            row_key = keys.row_key(self.user_key(username))
            entry = self.store.get(row_key)
            self._ok()
        except (StoreError, KeyFileError) as exc:
            self._failed("reading an entry", exc)
            return None
        document = self._opened(keys, row_key, entry)
        return str(document.get("step")) if document is not None else None

    @staticmethod
    def _opened(keys, row_key: str, entry) -> dict | None:
        """*entry*'s sealed document, or None: no entry, one sealed under another key, or one
        that does not open."""
        if entry is None or entry.kid != keys.kid:
            return None
        return keys.open(row_key, entry.sealed)

    # -- offline answers ------------------------------------------------------------------------------

    def answer(self, attempt: Attempt, credential: PasswordCredential, unavailable: Decision) -> Decision:
        """The decision for a password attempt the live chain could not decide (UNAVAILABLE)."""
        try:
            keys = self.keys()
            user_key = self.user_key(credential.username)
            row_key = keys.row_key(user_key)
            # A password of this user refused live a moment ago, still being compared with the
            # cached one: the answer waits for the comparison, which may forget the entry.
            if not self.rechecked(attempt.time_left() - 0.05, user_key):
                return unavailable
            # An account refused under another name, not known yet: it may be this one.
            if not self.accounts_found(attempt.time_left() - 0.05):
                return unavailable
            # A refusal of this user the store did not take (kept by any worker of this instance):
            # no answer from the entry it was meant to delete, whether the retry lands now or not.
            if not self._nothing_kept(row_key):
                return unavailable
            entry = self.store.get(row_key)
            # Another name of an account: the account's own row answers, and whatever holds
            # that row back (a refusal being compared or kept) holds this name back too.
            name_key = user_key
            user_key, row_key, entry, document = self._resolve(keys, row_key, name_key, entry)
            if user_key != name_key and (not self.rechecked(attempt.time_left() - 0.05, user_key)
                                         or not self._nothing_kept(row_key)):
                return unavailable
            self._ok()
        except (StoreError, KeyFileError) as exc:
            self._failed("an offline lookup", exc)
            return unavailable
        if document is None:
            return unavailable
        stored_at = sealed_time(document)
        if stored_at is None:
            return unavailable  # sealed by a version that did not seal the time: replaced at the next live login
        if stored_at != entry.stored_at:
            # Only a writer of the store changes one without the other (put writes both at
            # once): a captured row put back after a refusal deleted it, with a fresh time.
            self.log.warning("credential cache: an entry's stored time is not the one sealed with it "
                             "(changed in the store); deleted (attempt %s)", attempt.request_id)
            self._delete_quietly(row_key)
            return unavailable
        bound = hash_bound(document, entry.password_hash)
        if bound is None:
            return unavailable  # sealed by a version that did not bind the hash: replaced at the next live login
        if not bound:
            # As for the time: only a writer of the store changes the hash without the sealed
            # part, for instance an older hash of this user copied into the current row, which
            # would make the old (changed) password work offline.
            self.log.warning("credential cache: an entry's password hash is not the one sealed with it "
                             "(changed in the store); deleted (attempt %s)", attempt.request_id)
            self._delete_quietly(row_key)
            return unavailable
        now = time.time()
        if now - stored_at > self.settings.max_age or stored_at > now + FUTURE_TOLERANCE:
            self._delete_quietly(row_key)
            return unavailable
        if document.get("step") not in self.settings.methods:
            return unavailable
        step = document["step"]
        answered_by = document.get("answered_by", "")
        if answered_by:
            verdict = self.revoked(str(answered_by))
            if verdict is None:
                return unavailable  # cannot tell whether it was revoked: no answer on its word
            if verdict:
                # A backend revoked (a relay's connector that vouched falsely): what it vouched
                # for is not answered again, by this process or any other sharing the store.
                self.log.warning("credential cache: an entry rests on the word of %s (%s), revoked since; deleted "
                                 "(attempt %s)", printable(str(answered_by)), step, attempt.request_id)
                self._delete_quietly(row_key)
                return unavailable
        noted = {note.outcome: set() for note in attempt.notes}
        for note in attempt.notes:
            if note.offline or note.outcome is not Outcome.UNAVAILABLE:  # (else its own side answered offline)
                noted[note.outcome].add(note.step)
        if step in noted.get(Outcome.USER_NOT_FOUND, ()):
            # The directory that proved this user is up and says the user is gone, while another
            # step is unavailable (that made the fold UNAVAILABLE): a refusal, not an outage.
            self.forget_unknown(credential.username)
            return unavailable
        if step not in noted.get(Outcome.UNAVAILABLE, ()):
            return unavailable  # only an outage of the directory that proved the user counts
        if not self.usable_hash(entry.password_hash):
            self._foreign_hash(entry.password_hash)
            return unavailable
        if entry.failures >= self.settings.max_offline_failures:
            return self._too_many()
        try:
            taken = self.store.take_failure(row_key, self.settings.max_offline_failures)
        except StoreError as exc:
            self._failed("counting an offline attempt", exc)
            return unavailable
        if taken == AT_LIMIT:
            return self._too_many()
        if taken == GONE:  # deleted meanwhile (a refusal elsewhere)
            return unavailable
        if not self._hash_slots.acquire(timeout=max(0.0, attempt.time_left() - 0.05)):
            self._give_back(row_key)
            return unavailable
        try:
            right = self._verify(entry.password_hash, keys.peppered(user_key, credential.password))
        finally:
            self._hash_slots.release()
        if not right:
            self.log.info("credential cache: wrong password for a cached user offline (attempt %s)",
                          attempt.request_id)
            return Decision(Outcome.INVALID_CREDENTIALS, self.name, "cache.invalid_password", from_cache=True)
        if not self._give_back(row_key):
            # Deleted while the password was hashed: a refusal seen by another worker (the
            # directory answered that the account is gone or refused) wins over this copy.
            self.log.info("credential cache: the entry was deleted while its password was checked offline "
                          "(attempt %s)", attempt.request_id)
            return unavailable
        # answered_by: the backend whose live answer this one repeats (the audit line names it)
        return Decision.allow(identity_from(document, time.time()), step=self.name, reason="cache.offline",
                              from_cache=True, answered_by=str(answered_by))

    def usable_hash(self, encoded: str) -> bool:
        """Whether *encoded* is an argon2id hash made with the configured parameters (the only
        ones verified: see :func:`_hash_format`)."""
        return self._hash_format.fullmatch(encoded) is not None

    def _foreign_hash(self, encoded: str) -> None:
        if self._foreign_hash_logged:
            return
        self._foreign_hash_logged = True
        found = _PARAMETERS.match(encoded)
        a = self.settings.argon2
        self.log.warning("credential cache: an entry's password hash has other argon2 parameters (%s) than "
                         "the configured argon2id v=%d m=%d,t=%d,p=%d: such entries are not used offline "
                         "(hashed before argon2: changed, or changed in the store); further ones are not logged",
                         printable(" ".join(found.groups())) if found else "unreadable", ARGON2_VERSION,
                         a.memory_cost, a.time_cost, a.parallelism)

    def _verify(self, encoded: str, peppered: bytes) -> bool:
        try:
            return self.hasher.verify(encoded, peppered)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def _too_many(self) -> Decision:
        return Decision(Outcome.ACCOUNT_STATE, self.name, "cache.too_many_failures", from_cache=True)

    def _give_back(self, row_key: str) -> bool:
        """Undo a counted offline attempt; False when the entry is gone or the store failed."""
        try:
            return self.store.give_back_failure(row_key)
        except StoreError as exc:
            self._failed("returning an offline attempt", exc)
            return False

    def _delete_quietly(self, row_key: str) -> None:
        try:
            self.store.delete(row_key)
        except StoreError as exc:
            self._failed("deleting an expired entry", exc)

    # -- the wrapper's decision table -----------------------------------------------------------------

    def cacheable(self, attempt: Attempt, decision: Decision) -> bool:
        """A live success the cache may learn a password from: a password attempt decided by a
        listed method (never Kerberos or a certificate, which prove no password)."""
        return (decision.success and not decision.from_cache and attempt.password is not None
                and decision.step in self.settings.methods and decision.identity is not None)

    def after_chain(self, attempt: Attempt, decision: Decision) -> Decision:
        credential = attempt.password
        if credential is None or decision.from_cache:
            return decision
        if decision.success:
            if self.cacheable(attempt, decision):
                self.remember(attempt, credential, decision.identity, decision.step, decision.answered_by)
            return decision
        # The account the refusing step's directory refused, when the step named it (the LDAP
        # plugin does): no lookup of the name is needed to reach the account's rows.
        account = refused_account(attempt, decision.step)
        if decision.outcome is Outcome.INVALID_CREDENTIALS:
            self.refused(credential, decision.step, account)
            return decision
        if decision.outcome is Outcome.USER_NOT_FOUND:
            self.forget_unknown(credential.username)
            return decision
        if decision.outcome in _REFUSALS:
            self.forget(credential.username)
            if decision.outcome is Outcome.ACCOUNT_STATE:
                self.forget_account(decision.step, credential.username, attempt.time_left() - 0.05, account)
            return decision
        if decision.outcome is Outcome.UNAVAILABLE:
            answered = self.answer(attempt, credential, decision)
            if answered.from_cache:  # the store decided (a login, a wrong password or too many)
                self.last_offline_answer = time.time()  # wall clock, for the readiness line only
            return answered
        return decision


def same_name(typed: str, recorded: str) -> bool:
    """Whether a directory may take the name *typed* for *recorded*: equal but for case
    (:func:`lowered`)."""
    return lowered(typed) == lowered(recorded)


def _pointer_mark(account: str) -> bytes:
    """The memo's mark of a pointer row to *account* (an entry's mark is an HMAC: never this)."""
    return b"alias\0" + account.encode("utf-8", "surrogatepass")
