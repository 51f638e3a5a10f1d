"""Failure throttling: password guesses per user, per (user, client) and per client address.

Decides whether a password attempt may reach the chain, and what its result costs. Reads the
``throttle:`` settings (``enabled``, ``user_failures``, ``user_client_failures``,
``client_failures``, ``window``, ``store``, ``redis``) and the state directory.

* **Counted before the chain.** :meth:`Throttle.admit` reserves a failure on every key of the
  attempt in one atomic step, refusing when a key is at its limit, so in-flight attempts count:
  100 simultaneous wrong passwords with a limit of 5 reach the directory at most 5 times.
  :meth:`Throttle.settle` then keeps the reservation (a guess), or gives it back.
* **Guesses only.** Only password attempts are throttled, and only ``INVALID_CREDENTIALS`` and
  ``USER_NOT_FOUND`` are guesses (``ACCOUNT_STATE`` counts for the user, not for the address).
  A Kerberos ticket or a certificate cannot be guessed: a replayed ticket, a malformed token or a
  malformed header costs nobody anything, so a browser retrying cannot lock out the users who
  share its address.
* **Three keys.** ``user_client_failures`` per (user, client) stops one address guessing one
  account; ``user_failures`` per user (any address) stays below the directory's lockout, so
  the gateway never locks an account out; ``client_failures`` per client stops password spraying.
  The victim of a single guessing address keeps logging in from other addresses until
  ``user_failures`` is reached; a live success clears the user's and that pair's count (as AD
  resets badPwdCount; a cache answer resets nothing). Trade-off in docs/design.md item 7.
* **Shared.** ``store: sqlite`` (one file in the state directory) shares the counts between the
  workers of a machine, ``store: redis`` between instances; ``auto`` is ``memory`` for one
  worker and ``sqlite`` for several, counting the workers of ``authgw serve --workers`` too. A
  store that cannot answer fails closed (``UNAVAILABLE``), and that attempt counts as no guess:
  a reservation whose call failed may still be made (a frozen Redis runs it when it wakes), so
  the Redis store takes it back once Redis answers again (``RedisStore._unsure``).
* **Kept over a reload.** A reload builds a new :class:`Throttle`; :meth:`Throttle.carry_over`
  hands it the running ``memory`` store, counts and all (``sqlite`` and ``redis`` keep theirs
  outside the process), so ``systemctl reload`` never hands guessers a fresh budget. A reload
  that changes the kind of store says in the log that counts start afresh.

Keys are SHA-256 hashes of ``kind, username, client``: the store never holds a username.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.model import Outcome, folded_username
from gateway.perprocess import UniqueIds
from gateway.settings import ThrottleSettings
from gateway.throttle_stores import MemoryStore, StoreLocked, StoreUnavailable, ThrottleStore, open_store, store_kind

__all__ = ["StoreLocked", "StoreUnavailable", "Throttle", "Ticket"]

log = logging.getLogger("authgw.throttle")

#: Refusals that are guesses at a password.
#: What counts as a guess. ERROR too: a step that crashed is answered as a refusal (401), and a
#: crash after a right password (a bug in a later lookup) must not be a free oracle.
GUESSES = frozenset({Outcome.INVALID_CREDENTIALS, Outcome.USER_NOT_FOUND, Outcome.ERROR})


#: Reservation ids, unique across every process sharing a store.
_TICKET_IDS = UniqueIds()


def _key(kind: str, *parts: str) -> str:
    data = "\0".join((kind, *parts)).encode("utf-8", "surrogatepass")
    return kind + hashlib.sha256(data).hexdigest()[:40]


@dataclass(frozen=True, slots=True)
class Ticket:
    """One admitted attempt's reservation: the keys it was counted on."""

    id: str
    user: str
    pair: str | None
    client: str | None


class Throttle:
    def __init__(self, settings: ThrottleSettings, *, state_dir: Path | None = None, workers: int = 1,
                 clock=None) -> None:
        self.settings = settings
        self._domains = frozenset(map(folded_username, settings.user_domains))  # folded as user keys are
        #: ``memory``, ``sqlite`` or ``redis`` (``auto`` resolved for *workers*, the effective
        #: worker count), or ``off`` when throttling is disabled.
        self.kind = store_kind(settings, state_dir, workers) if settings.enabled else "off"
        # The memory store's counts live in this process: dated by the monotonic clock, which an
        # NTP step does not move (a step forward of a window freed every guess at once; review
        # of time). SQLite's are shared by the workers and outlive a boot: the store dates them
        # by the boot clock, the wall clock only setting where a boot's seconds start
        # (SQLiteStore._now). Redis dates them itself (its TIME, with a step of it forward taken
        # out: RedisStore.reserve).
        self._clock = clock or (time.monotonic if self.kind in ("memory", "off") else time.time)
        self.store: ThrottleStore = open_store(settings, state_dir, workers) if settings.enabled else MemoryStore()
        #: The store does network I/O: call it off the event loop.
        self.blocking = self.store.blocking
        self._handed_on = False  # the store went on to the next generation (carry_over): not closed here

    def _where(self) -> tuple:
        """What identifies the counts of this store: the same for two stores that share them."""
        store = self.store
        if self.kind == "redis":
            return (self.kind, getattr(store, "location", None), getattr(store, "_prefix", None))
        if self.kind == "sqlite":
            return (self.kind, str(getattr(store, "path", "")))
        return (self.kind, id(store))

    def carry_over(self, previous: Throttle) -> None:
        """Take over the counts of *previous*, the throttle of the configuration a reload
        replaces, before this one serves. A ``memory`` store is handed on whole (the retiring
        generation settles its attempts in flight into it too); ``sqlite`` and ``redis`` keep
        their counts outside the process. A change of store (memory to sqlite or redis, another
        Redis server) cannot carry them: it is said in the log."""
        if previous.kind == self.kind == "memory":
            self.store = previous.store
            previous._handed_on = True
            return
        if self.kind == "redis" and previous._where() == self._where():
            # what a step of Redis's clock is measured against: a reload must not let one pass unseen
            self.store.seen = getattr(previous.store, "seen", None)
        if previous.kind != "off" and self.kind != "off" and previous._where() != self._where():
            log.warning("reload: the throttle store is now %s (was %s); password-guess counts start afresh "
                        "(guesses counted in the old store are forgotten)", self.kind, previous.kind)

    def budget_name(self, user_key: str) -> str:
        """The name whose budget *user_key* (folded) spends: ``name@DOMAIN`` and ``DOMAIN\\name``
        for a domain of ``user_domains`` are ``name``. Active Directory's preset finds one account
        by its sAMAccountName and by its UPN, and a direct bind takes ``CORP\\name`` too: each
        spelling had a budget of its own, so an attacker had two or three times the guesses, and
        the gateway's guesses could reach the directory's lockout threshold (review of the LDAP
        plugin)."""
        domains = self._domains
        if domains:
            if "\\" in user_key:
                domain, _, name = user_key.partition("\\")
                if name and domain in domains:
                    return name
            elif "@" in user_key:
                name, _, domain = user_key.rpartition("@")
                if name and domain in domains:
                    return name
        return user_key

    def ticket(self, user_key: str, client: str | None) -> Ticket:
        user_key = self.budget_name(user_key)
        return Ticket(_TICKET_IDS.next(), _key("u", user_key),
                      None if client is None else _key("p", user_key, client),
                      None if client is None else _key("c", client))

    def admit(self, user_key: str | None, client: str | None) -> Ticket | None:
        """Reserve a failure for this attempt, or None when a key is at its limit (429).

        Raises :class:`StoreUnavailable` when the shared store cannot answer (fail closed).
        """
        if not self.settings.enabled or user_key is None:
            return Ticket("", "", None, None)  # nothing is counted
        s = self.settings
        ticket = self.ticket(user_key, client)
        keys = [(ticket.user, s.user_failures)]
        if ticket.pair is not None:
            keys += [(ticket.pair, s.user_client_failures), (ticket.client, s.client_failures)]
        return ticket if self.store.reserve(keys, ticket.id, self._clock(), s.window) else None

    def settle(self, ticket: Ticket, outcome: Outcome, *, live: bool = True) -> None:
        """Keep the reservation of a guess; give back the rest; a live success clears the user.

        A success answered from a cache (*live* false) reached no directory, so the directory's
        own bad-password count was not reset either: it only gives its reservation back, or
        every hot-cache hit of an active user would hand guessers a fresh budget.
        """
        if not ticket.id:
            return
        if outcome in GUESSES:
            if outcome is Outcome.USER_NOT_FOUND:
                # A name no directory knows: the memory store may drop its one failure when full
                # (a spray's), never an existing user's count.
                self.store.unknown_user(ticket.user)
            return
        client = [ticket.client] if ticket.client else []
        if outcome is Outcome.ACCOUNT_STATE:
            self.store.drop(client, ticket.id)
        elif outcome is Outcome.SUCCESS and live:
            self.store.clear([ticket.user] + ([ticket.pair] if ticket.pair else []))
            self.store.drop(client, ticket.id)
        else:  # unavailable, error, not applicable, a deadline: not a guess
            self.store.drop([ticket.user, *([ticket.pair] if ticket.pair else []), *client], ticket.id)

    def close(self) -> None:
        if not self._handed_on:
            self.store.close()
