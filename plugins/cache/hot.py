"""The hot cache: recent successes in this process's memory, for forward-auth repeats.

A reverse proxy asks ``/auth`` for every request of every page with the same Basic
credentials; this remembers a success for ``ttl`` seconds so the repeats skip the directory.

Entries are keyed by keyed BLAKE2b (RFC 7693's MAC mode, 256 bits) under a random key made in
(and never leaving) this process, over the client address, the front door, the username and the
password. The password is never stored: the table alone (a swapped-out page, a core file of
another process) holds nothing that tests a guess without the key, and the key dies with the
process (a forked child makes its own). The client address is part of the key because a chain
step may decide differently for another client (network-restricted methods), and a hit must
never give a success the chain would not give.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from gateway import Identity
from gateway.perprocess import renew_in_children

__all__ = ["HotCache"]


@dataclass(frozen=True, slots=True)
class _Hit:
    expires: float
    identity: Identity
    #: The user keys a refusal forgets this hit under: the name given, and the directory's own
    #: username when the user logged in under another name of the account (a mail address).
    user_keys: tuple[str, ...]
    #: The chain step that decided when the success was remembered: the hit stands in for it.
    step: str = ""
    #: What the cache answers for this hit, made once when it is remembered (decisions are
    #: immutable); None when the caller gave none.
    answer: Any = None
    #: The backend of ``step`` that vouched (``Decision.answered_by``; empty: the step named
    #: none): a hit is asked about it before it answers (revoked since?).
    answered_by: str = ""


def _field(value: str) -> bytes:
    data = value.encode("utf-8", "surrogatepass")
    return len(data).to_bytes(4, "big") + data  # length-prefixed: no two inputs collide


class HotCache:
    """A bounded LRU of recent successes. Thread-safe; one per worker process."""

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self.renew()
        renew_in_children(self)  # a forked child starts with a new key and no entries

    def renew(self) -> None:
        self._lock = threading.Lock()  # a child may be forked while another thread holds it
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, _Hit] = OrderedDict()
        self._by_user: dict[str, set[bytes]] = {}

    def token(self, context: str, username: str, password: str) -> bytes:
        # Keyed BLAKE2b is a MAC by design (no HMAC construction needed) and CPython's own code:
        # in the worker, between requests, hmac.digest (OpenSSL's EVP fetch each call) measured
        # 10-12 µs a call, a quarter of a hot hit; this takes about 1 (docs/performance.md).
        data = _field(context) + _field(username) + _field(password)
        return hashlib.blake2b(data, digest_size=32, key=self._key).digest()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: bytes) -> Identity | None:
        hit = self.lookup(token)
        return hit.identity if hit is not None else None

    def lookup(self, token: bytes) -> _Hit | None:
        """The remembered success (identity, deciding step), or None."""
        now = self._clock()
        with self._lock:
            hit = self._entries.get(token)
            if hit is None:
                return None
            if hit.expires <= now:
                self._drop(token, hit)
                return None
            self._entries.move_to_end(token)
            return hit

    def put(self, token: bytes, user_key: str, identity: Identity, step: str = "", answer: Any = None,
            answered_by: str = "", also: tuple[str, ...] = ()) -> None:
        """Remember a success for *token*, forgotten by :meth:`forget_user` under *user_key* and
        under each key in *also*."""
        user_keys = tuple(dict.fromkeys((user_key, *also)))
        with self._lock:
            old = self._entries.pop(token, None)
            if old is not None:
                self._unindex(token, old.user_keys)
            self._entries[token] = _Hit(self._clock() + self.ttl, identity, user_keys, step, answer, answered_by)
            for key in user_keys:
                self._by_user.setdefault(key, set()).add(token)
            while len(self._entries) > self.max_entries:
                oldest, hit = self._entries.popitem(last=False)
                self._unindex(oldest, hit.user_keys)

    def discard(self, token: bytes) -> None:
        """Drop one entry (its backend was revoked); nothing when it is gone already."""
        with self._lock:
            hit = self._entries.get(token)
            if hit is not None:
                self._drop(token, hit)

    def forget_user(self, user_key: str) -> int:
        """Drop every entry of one user (any password, any client); returns how many."""
        with self._lock:
            tokens = self._by_user.pop(user_key, set())
            for token in tokens:
                hit = self._entries.pop(token, None)
                if hit is not None:
                    self._unindex(token, hit.user_keys)
            return len(tokens)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._by_user.clear()

    def _drop(self, token: bytes, hit: _Hit) -> None:
        self._entries.pop(token, None)
        self._unindex(token, hit.user_keys)

    def _unindex(self, token: bytes, user_keys: tuple[str, ...]) -> None:
        for user_key in user_keys:
            tokens = self._by_user.get(user_key)
            if tokens is not None:
                tokens.discard(token)
                if not tokens:
                    del self._by_user[user_key]
