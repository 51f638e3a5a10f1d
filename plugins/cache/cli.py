"""``authgw cache list | show USER | purge [USER] [--expired]``: the operator's view of the cache.

Output shows profile fields only (username, name, email, groups, when, how many offline
failures); never a password hash, a key or ciphertext. Control characters in directory data are
escaped so that a crafted display name cannot drive the terminal.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from gateway import Command
from gateway.logs import printable
from gateway.plugins.cache.keys import CacheKeys, KeyFileError, hash_bound, sealed_time
from gateway.plugins.cache.store import Entry, StoreError

if TYPE_CHECKING:
    from gateway.plugins.cache.offline import OfflineCache

__all__ = ["cache_command"]

EXIT_OK, EXIT_FAILED = 0, 1


def _when(timestamp: float) -> str:
    """A stored time as UTC text; ``?`` for one no date holds: a row with ``stored_at`` ``1e20``
    (tampered, or written under a bad clock) raised OverflowError and ended the listing (review
    of time)."""
    try:
        return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, OSError, ValueError, TypeError):
        return "?"


def _age(seconds: float) -> str:
    if not -1e15 < seconds < 1e15:  # NaN, infinity and times no clock gives: unknown (see _when)
        return "?"
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds}s"


class _Report:
    """What can be said about one entry with the keys at hand."""

    def __init__(self, cache: OfflineCache, keys: CacheKeys | None, entry: Entry, now: float) -> None:
        settings = cache.settings
        self.entry = entry
        self.document = keys.open(entry.key, entry.sealed) if keys is not None and entry.kid == keys.kid else None
        self.age = now - entry.stored_at
        sealed_at = sealed_time(self.document) if self.document is not None else None
        bound = hash_bound(self.document, entry.password_hash) if self.document is not None else None
        if self.document is None:
            self.state = "unreadable (written with other keys)"
        elif "alias_of" in self.document:
            # Another login name of an account: its entry, under the directory's username, answers.
            self.state = f"another name of {printable(str(self.document['alias_of']))} (whose entry answers)"
        elif sealed_at is None or bound is None:
            self.state = "not used offline (written by an older version; the next live login replaces it)"
        elif sealed_at != entry.stored_at:
            self.state = "not used offline (its time was changed in the store)"
        elif not bound:
            self.state = "not used offline (its password hash was changed in the store)"
        elif not cache.usable_hash(entry.password_hash):
            self.state = "not used offline (hashed with other argon2 parameters; the next live login replaces it)"
        elif self.age > settings.max_age:
            self.state = "expired"
        elif entry.failures >= settings.max_offline_failures:
            self.state = "refused offline until a live login"
        else:
            self.state = "usable offline"

    @property
    def username(self) -> str:
        if not self.document:
            return f"? ({self.entry.key[:12]}...)"
        return printable(str(self.document.get("username", "(another name)")))


def _keys(cache: OfflineCache) -> CacheKeys | None:
    try:
        return cache.keys(create=False)
    except KeyFileError:
        return None


def _list(cache: OfflineCache) -> int:
    keys = _keys(cache)
    now = time.time()
    reports = sorted((_Report(cache, keys, e, now) for e in cache.store.scan()), key=lambda r: r.username)
    print(f"{'USERNAME':<24} {'STEP':<8} {'STORED (UTC)':<21} {'AGE':>7} {'FAILS':>5}  STATE")
    for report in reports:
        step = printable(report.document.get("step", "")) if report.document else "?"
        print(f"{report.username:<24} {step:<8} {_when(report.entry.stored_at):<21} {_age(report.age):>7} "
              f"{report.entry.failures:>5}  {report.state}")
    print(f"{len(reports)} entries in {cache.store.location}"
          + ("" if keys is not None else "; the cache keys were not found, so no entry can be read"))
    return EXIT_OK


def _show(cache: OfflineCache, username: str) -> int:
    keys = _keys(cache)
    if keys is None:
        print(f"no entry for {printable(username)} (the cache keys do not exist yet)")
        return EXIT_FAILED
    entry = cache.store.get(keys.row_key(cache.user_key(username)))
    if entry is None:
        print(f"no entry for {printable(username)}")
        return EXIT_FAILED
    report = _Report(cache, keys, entry, time.time())
    doc = report.document or {}
    rows = [
        ("username", report.username),
        ("subject", printable(doc.get("subject", "?"))),
        ("display name", printable(doc.get("display_name", ""))),
        ("email", printable(doc.get("email", ""))),
        ("groups", ", ".join(printable(g) for g in doc.get("groups", ()))),
        ("proved by", printable(doc.get("step", "?"))
                      + (f", vouched for by {printable(str(doc['answered_by']))}" if doc.get("answered_by") else "")),
        ("stored", f"{_when(entry.stored_at)} ({_age(report.age)} ago, at the last live login)"),
        ("expires", _when(entry.stored_at + cache.settings.max_age)),
        ("offline failures", f"{entry.failures} of {cache.settings.max_offline_failures}"),
        ("state", report.state),
    ]
    for label, value in rows:
        print(f"{label + ':':<18}{value}")
    return EXIT_OK


def _purge(cache: OfflineCache, username: str | None, expired: bool) -> int:
    # A purge forgets (leaves a "forgotten at" marker) rather than only deleting: a live login
    # that the directory accepted before the operator disabled the account may still be
    # hashing, and would otherwise write the entry back after the purge (review of purge).
    if username is not None:
        # Another login name of an account forgets the account's entry too (OfflineCache.forget_now).
        deleted = _keys(cache) is not None and cache.forget_now(username, time.time())
        print(f"deleted the entry for {printable(username)}" if deleted else f"no entry for {printable(username)}")
        return EXIT_OK if deleted else EXIT_FAILED
    removed = cache.purge_expired() if expired else cache.store.forget_all(time.time())
    print(f"deleted {removed} {'expired ' if expired else ''}entries from {cache.store.location}")
    print("(hot caches live in the gateway's memory and expire by themselves within hot.ttl)")
    return EXIT_OK


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="cache_action", required=True, metavar="ACTION")
    # --config/--state-dir are accepted after the action too; SUPPRESS keeps the values given
    # before it (the plugin was built from them already).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="DIR", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--state-dir", metavar="DIR", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    actions.add_parser("list", parents=[common], help="list cached users (no secrets)")
    show = actions.add_parser("show", parents=[common], help="show one user's cached profile (no secrets)")
    show.add_argument("username")
    purge = actions.add_parser("purge", parents=[common], help="delete one user's entry, or all entries")
    purge.add_argument("username", nargs="?", help="only this user (default: every entry)")
    purge.add_argument("--expired", action="store_true", help="only entries older than max_age")


def cache_command(cache: OfflineCache) -> Command:
    def run(args: argparse.Namespace) -> int:
        try:
            if args.cache_action == "list":
                return _list(cache)
            if args.cache_action == "show":
                return _show(cache, args.username)
            if args.username is not None and args.expired:
                print("give a username or --expired, not both")
                return EXIT_FAILED
            return _purge(cache, args.username, args.expired)
        except StoreError as exc:
            print(f"error: the cache store cannot be used: {exc}")
            return EXIT_FAILED
        finally:
            cache.close()

    return Command(name="cache", help="list, show or purge the credential cache",
                   add_arguments=_add_arguments, run=run)
