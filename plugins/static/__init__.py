"""``static``: users from a YAML file with argon2id password hashes.

For demos, and for break-glass accounts that must work when the directory does not.

Decides
    password attempts for users in the file: ``SUCCESS`` (the identity carries the name as the
    users file spells it, also with ``case_insensitive``, in the core's one spelling of names:
    NFKC, white space trimmed; two names that are one so are refused), ``INVALID_CREDENTIALS``
    (wrong password), ``ACCOUNT_STATE`` with ``static.disabled`` (right password,
    ``disabled: true``).
    ``gateway_lookup_user`` answers for users in the file, a disabled one with
    ``account_state: static.disabled``.
Abstains
    when the attempt has no password; when the user is not in the file (noting
    ``USER_NOT_FOUND``, after verifying against a dummy hash so that an unknown user costs the
    same time as a wrong password).
Settings (``static:`` in conf.d)
    ``users_file`` (path, relative to conf.d), ``case_insensitive`` (default false),
    ``reload_interval`` (seconds between checks of the file for a change; 0 disables).
Users file
    ``users: {NAME: {password_hash, display_name, email, groups, subject, disabled}}``; make a
    hash with ``authgw hash-password``. Missing at start-up: a configuration error. Changed while
    serving: re-read; an edit that cannot be used (any failure to read, parse or validate it) is
    logged once and the previous users stay; a file that is gone means no users (fail closed).
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator

from gateway import (
    Attempt,
    CheckResult,
    ComponentState,
    ConfigPath,
    Decision,
    Identity,
    Outcome,
    PluginContext,
    PluginSettings,
    SelfTest,
    hookimpl,
)
from gateway.config import load_yaml_file
from gateway.errors import ConfigError
from gateway.logs import MULTILINE, printable, problem_lines
from gateway.model import canonical_username
from gateway.passwords import dummy_hash_like, hash_parameters, readable_hash, verify_password
from gateway.settings import ValidationContext
from gateway.yamlfiles import display_name

__all__ = ["StaticPlugin"]


class StaticUser(PluginSettings):
    password_hash: str = Field(pattern=r"^\$argon2id\$", description="argon2id hash from `authgw hash-password`")
    display_name: str = ""
    email: str = ""
    groups: list[str] = []
    subject: str | None = Field(None, description="stable id; default `static:<name>`")
    disabled: bool = Field(False, description="refuse the user (`static.disabled`) even with the right password")


class UsersFile(PluginSettings):
    users: dict[str, StaticUser] = {}

    @field_validator("users", mode="before")
    @classmethod
    def _no_users(cls, value: object) -> object:
        # `users:` left with no entry (the demo account deleted from the shipped file): no users.
        return {} if value is None else value


class StaticSettings(PluginSettings):
    users_file: ConfigPath = Field(description="YAML users file (relative to conf.d); keep it out of conf.d's top level")
    case_insensitive: bool = Field(False, description="match usernames case-insensitively (casefold)")
    reload_interval: float = Field(2.0, ge=0, description="seconds between checks for a changed users file; 0: never")


#: What identifies one version of the users file: a change of any of these re-reads it (a
#: ``chmod 600`` too, which changes only the mode and ctime); None when it is gone.
Signature = tuple


def _signature(path: Path) -> Signature | None:
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:  # cannot even stat it: a state of its own, logged once until it changes
        return ("unreadable", exc.errno)
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_mode, info.st_uid)


@dataclass(frozen=True)
class _Users:
    """One reading of the users file, swapped as a whole."""

    #: The users by lookup key, each with its name as the file spells it.
    table: dict[str, tuple[str, StaticUser]]
    #: Verified against for an unknown user: made with the parameters of the file's hashes, so
    #: that it costs what a wrong password costs (``gateway.passwords.dummy_hash_like``).
    dummy: str
    signature: Signature | None
    #: The users (as the table spells them) whose hash does not read: no password logs them in.
    unreadable: frozenset[str] = frozenset()


#: The cheapest argon2id parameters the OWASP Password Storage Cheat Sheet accepts (m=7 MiB, t=5;
#: its list trades memory for passes, m x t of 35,840 KiB at least, m=19 MiB t=2 the first).
_MIN_MEMORY_KIB, _MIN_WORK = 7 * 1024, 7 * 1024 * 5
#: The shortest argon2 tag and salt that are not weak, in bytes (argon2-cffi makes 32 and 16).
_MIN_BYTES = 16


def _weak_users(users: dict[str, StaticUser]) -> list[str]:
    """The users whose hash is cheaper than OWASP's minimum (or does not say its parameters), or
    whose tag or salt is shorter than 16 bytes (a 4-byte tag verified, and a copy of the file
    then gives a colliding password in about 2**32 tries: review of the endpoints)."""
    weak = []
    for name, user in users.items():
        found = hash_parameters(user.password_hash)
        if found is None:
            continue  # unreadable: _unreadable_users
        if (found.memory_cost < _MIN_MEMORY_KIB or found.memory_cost * found.time_cost < _MIN_WORK
                or found.hash_len < _MIN_BYTES or found.salt_len < _MIN_BYTES):
            weak.append(name)
    return sorted(weak)


def _unreadable_users(users: dict[str, StaticUser]) -> list[str]:
    return sorted(name for name, user in users.items() if not readable_hash(user.password_hash))


def _shown(names: list[str]) -> str:
    return ", ".join(repr(name) for name in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _unreadable_message(names: list[str]) -> str:
    return (f"{len(names)} password hash(es) that do not read as argon2id, or ask for more work than authgw "
            f"verifies (memory times passes over 4 GiB, or over 64 lanes): {_shown(names)}; no password logs "
            "them in (to lock an account, say `disabled: true`; to set a password, make a hash with "
            "`authgw hash-password`)")


def _weak_message(weak: list[str]) -> str:
    shown = _shown(weak)
    return (f"{len(weak)} password hash(es) below the OWASP minimum for argon2id (m=19 MiB and t=2, or as much "
            f"work; a tag and a salt of 16 bytes at least): {shown}; a copy of the file is that much cheaper to crack, and a wrong password for them "
            f"answers sooner than an unknown user's; make them again with `authgw hash-password`")


class StaticPlugin:
    """Registered as ``static``."""

    Settings = StaticSettings
    #: What this step checks (readiness: which steps can serve password logins).
    credentials = ("password",)

    def __init__(self, settings: StaticSettings, context: PluginContext) -> None:
        self.settings = settings
        self.name = context.name
        self.log = context.log
        self.challenge = f'Basic realm="{context.gateway.realm}", charset="UTF-8"'
        self._validation = ValidationContext(config_dir=context.config_dir, strict=context.gateway.strict)
        self._lock = threading.Lock()
        if _signature(settings.users_file) is None:
            raise ConfigError(f"{self.name}.users_file: {display_name(settings.users_file)} not found (a file with no "
                              "users says `users: {}`; to stop using it, take this step out of the chain)")
        self._state = self._read()
        #: The signature of the file as last checked (of the version that failed, when it did).
        self._seen = self._state.signature
        self._problem = ""  # why the file as it is now is not in use, for readiness
        self._checked = time.monotonic()

    @hookimpl
    def gateway_startup(self) -> None:
        # The shipped conf.d works out of the box with demo/demo: say so loudly at every start,
        # so a gateway exposed with it is not a surprise.
        _, demo = self._state.table.get(self._key("demo"), (None, None))
        if demo is not None and verify_password(demo.password_hash, "demo"):
            self.log.warning("demo/demo is enabled (the shipped DEMO account): remove it from %s "
                             "before anyone else can reach this gateway", self.settings.users_file)

    # -- the users file ----------------------------------------------------------------------

    def _key(self, username: str) -> str:
        return username.casefold() if self.settings.case_insensitive else username

    def _read(self, read: list[Signature | None] | None = None) -> _Users:
        """Read, validate and index the users file. Raises ConfigError (or anything else) when it
        cannot be used. *read* gets the signature of the version read, also when it fails; at a
        reload, the users read are in use before the dummy of a new parameter set is made."""
        path = self.settings.users_file
        try:
            self._validation.check_private(path, "users file")
        except ValueError as exc:  # strict: a users file others can read is refused
            raise ConfigError(f"{self.name}.users_file: {exc}") from None
        # After check_private (which may chmod it), before reading: a change made while reading
        # gives another signature at the next check, so it is read then.
        signature = _signature(path)
        if read is not None:
            read.append(signature)
        users = load_yaml_file(path, UsersFile, self._validation).users
        table, written = {}, {}
        for name, user in users.items():
            # Indexed as the core spells the names it is given (canonical_username: NFKC, white
            # space trimmed): a name saved otherwise (`José` decomposed, as some editors save it;
            # `bob `) was never found, however typed (review of the console and static users).
            spelt = canonical_username(name)
            key = self._key(spelt)
            if key in written:
                first = written[key]
                if canonical_username(first) == spelt and (first == spelt) != (name == spelt):
                    # One of them is written as typed names are read: it is the user, as it was
                    # before names were read so (the other one could never log in). Refusing
                    # the file would keep a working break-glass file from starting after an
                    # upgrade (review of this stop's diff).
                    plain, other = (first, name) if first == spelt else (name, first)
                    table[key], written[key] = (spelt, users[plain]), plain
                    self.log.warning("users file %s: user %r is %r as the gateway reads usernames (NFKC, white "
                                     "space trimmed), which the file names too: it is ignored; remove it",
                                     display_name(path), other, plain)
                    continue
                why = ("are one name as the gateway reads usernames (docs/configuration.md, Usernames)"
                       if canonical_username(first) == spelt else "differ only in case, but case_insensitive is on")
                raise ConfigError(f"{display_name(path)}: users {first!r} and {name!r} {why}: keep one")
            table[key], written[key] = (spelt, user), name
        hashes = [user.password_hash for user in users.values()]
        self._warn_mixed_parameters(hashes)
        unreadable = _unreadable_users(users)
        if unreadable:
            # Served (a file may mark locked accounts so), not refused: a wrong password for them
            # costs a hashing as any other does (gateway.passwords.verify_password). Before, they
            # were reported as weak hashes (review of the console and static users).
            self.log.warning("users file %s: %s", display_name(path), _unreadable_message(unreadable))
        weak = [name for name in _weak_users(users) if name not in unreadable]
        if weak:
            self.log.warning("users file %s: %s", display_name(path), _weak_message(weak))
        unreadable = frozenset(spelt for spelt, user in table.values() if not readable_hash(user.password_hash))
        if read is not None:
            # A reload: the edit applies now, with the dummy in use, while the new one is made
            # (one hashing with the new parameters: seconds). The logins that do not wait for
            # this reload were answered from the users as they were meanwhile, and a user the
            # edit removed or disabled logged in (review of this stop's diff).
            self._state = _Users(table, self._state.dummy, signature, unreadable)
        return _Users(table, dummy_hash_like(hashes), signature, unreadable)

    def _warn_mixed_parameters(self, hashes: list[str]) -> None:
        kinds = Counter((p.memory_cost, p.time_cost, p.parallelism)
                        for p in map(hash_parameters, hashes) if p is not None)
        if len(kinds) > 1:
            shown = ", ".join(f"m={m},t={t},p={p} ({n} users)" for (m, t, p), n in kinds.most_common())
            self.log.warning("users file %s: the password hashes use different argon2 parameters (%s): an unknown "
                             "user costs as much as the most expensive, so a wrong password for a user with cheaper "
                             "ones answers sooner; make them all with `authgw hash-password`",
                             display_name(self.settings.users_file), shown)

    def _current(self) -> _Users:
        """The users, re-read when the file changed (checked every reload_interval).

        Whatever goes wrong with a new version of the file, the previous users stay and it is
        logged once (not at every attempt, and never as an attempt's error); a file that is gone
        means no users at all (fail closed)."""
        interval = self.settings.reload_interval
        if not interval or time.monotonic() - self._checked < interval:
            return self._state
        # Another thread checking or re-reading the file: go on with the users as they are. Every
        # login waited for the reading, and a new hash's dummy (one hashing, of seconds for
        # expensive parameters) answered them all 503 past their deadline (review of the audit
        # and static users).
        if not self._lock.acquire(blocking=False):
            return self._state
        try:
            if time.monotonic() - self._checked < interval:  # another thread has just checked
                return self._state
            self._checked = time.monotonic()
            self._reload_if_changed()
        finally:
            self._lock.release()
        return self._state

    def _reload_if_changed(self) -> None:
        """Re-read the users file if its signature changed; the lock is held."""
        path = self.settings.users_file
        signature = _signature(path)
        if signature == self._seen:
            return
        self._seen = signature
        if signature is None:
            self._state = _Users({}, self._state.dummy, None)
            self._problem = "the users file is gone"
            self.log.error("users file %s is gone: no user of it can log in until it is back", display_name(path))
            return
        read: list[Signature | None] = []
        try:
            state = self._read(read)
        except Exception as exc:  # noqa: BLE001 -- keep serving the last good file, whatever happened
            # The version that was read, as check_private left it (it may chmod it), never the
            # file as it is now: an edit finished while a broken version was parsed (a write
            # in place read half-way, a fix saved a moment after a typo) was taken for the
            # broken one and never applied, its old passwords still accepted (review of the
            # console and static users). Gone meanwhile: the next check finds it gone.
            self._seen = read[0] if read and read[0] is not None else signature
            self._problem = "the last change of the users file was not applied"
            expected = isinstance(exc, (ConfigError, OSError))
            # one problem a line (a ConfigError's file:line: key), each escaped
            self.log.error("users file %s not reloaded, keeping the previous %d users: %s",
                           printable(display_name(path)), len(self._state.table),
                           problem_lines(exc) if expected else printable(f"{exc.__class__.__name__}: {exc}"),
                           exc_info=not expected, extra=MULTILINE)
        else:
            self._state, self._seen, self._problem = state, state.signature, ""
            self.log.info("users file %s reloaded: %d users", display_name(path), len(state.table))

    # -- hooks ---------------------------------------------------------------------------------

    @hookimpl
    def gateway_authenticate(self, attempt: Attempt) -> Decision | None:
        credential = attempt.password
        if credential is None:
            return None
        users = self._current()
        found = users.table.get(self._key(credential.username))
        if found is None:
            verify_password(users.dummy, credential.password)  # same cost as a wrong password
            attempt.note(Outcome.USER_NOT_FOUND, step=self.name, reason="static.user_not_found")
            return None
        name, user = found
        if name in users.unreadable:
            verify_password(users.dummy, credential.password)  # costs what a wrong password costs
            return Decision.deny(Outcome.INVALID_CREDENTIALS, step=self.name, reason="static.invalid_password")
        if not verify_password(user.password_hash, credential.password):
            return Decision.deny(Outcome.INVALID_CREDENTIALS, step=self.name, reason="static.invalid_password")
        if user.disabled:
            return Decision.deny(Outcome.ACCOUNT_STATE, step=self.name, reason="static.disabled")
        return Decision.allow(self._identity(name, user), step=self.name)

    @hookimpl
    def gateway_lookup_user(self, username: str) -> Identity | None:
        found = self._current().table.get(self._key(username))
        if found is None:
            return None
        # A disabled user is reported, not hidden: None would let the next directory answer for
        # the name, and the caller must refuse with ACCOUNT_STATE (gateway_lookup_user contract).
        return self._identity(*found)

    def _identity(self, name: str, user: StaticUser) -> Identity:
        return Identity(subject=user.subject or f"static:{name}", username=name, method=self.name,
                        display_name=user.display_name, email=user.email, groups=tuple(user.groups),
                        account_state="static.disabled" if user.disabled else "")

    @hookimpl
    def gateway_challenges(self, attempt: Attempt) -> str:
        return self.challenge

    @hookimpl
    def gateway_readiness(self) -> list[ComponentState]:
        detail = f"{len(self._state.table)} users"
        return [ComponentState(f"{self.name}.users_file", True,
                               f"{detail}; {self._problem} (see the log)" if self._problem else detail)]

    @hookimpl
    def gateway_selftests(self) -> list[SelfTest]:
        return [SelfTest(f"{self.name}.users_file", self._test_users_file, prerequisite=True)]

    def _test_users_file(self) -> CheckResult:
        path = Path(self.settings.users_file)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            users = self._read().table
        except FileNotFoundError:
            return CheckResult.fail(f"{path}: not found (no users)", "check the path in static.users_file")
        except Exception as exc:  # noqa: BLE001 -- the self-test reports, it does not crash
            return CheckResult.fail(f"{path}: {exc}", "check the path in static.users_file and the YAML in it")
        detail = f"{path}: {len(users)} users, mode {mode:o}"
        if mode & 0o077:
            return CheckResult.warn(detail, f"the file holds password hashes; chmod 600 {path}")
        listed = dict(users.values())
        unreadable = _unreadable_users(listed)
        weak = [name for name in _weak_users(listed) if name not in unreadable]
        problems = ([_unreadable_message(unreadable)] if unreadable else []) + ([_weak_message(weak)] if weak else [])
        if problems:
            return CheckResult.warn("; ".join([detail, *problems]),
                                    "make those users' hashes again with `authgw hash-password`")
        return CheckResult.ok(detail)
