"""``static``: users from a YAML file with argon2id password hashes.

For demos, and for break-glass accounts that must work when the directory does not.

Decides
    password attempts for users in the file: ``SUCCESS`` (the identity carries the name as the
    users file spells it, also with ``case_insensitive``), ``INVALID_CREDENTIALS`` (wrong
    password), ``ACCOUNT_STATE`` with ``static.disabled`` (right password, ``disabled: true``).
    ``gateway_lookup_user`` answers for users in the file, a disabled one with
    ``account_state: static.disabled``.
Abstains
    when the attempt has no password; when the user is not in the file (noting
    ``USER_NOT_FOUND``, after verifying against a dummy hash so that an unknown user costs the
    same time as a wrong password).
Settings (``static:`` in conf.d)
    ``users_file`` (path, relative to conf.d), ``case_insensitive`` (default false),
    ``reload_interval`` (seconds between checks of the file's modification time; 0 disables).
Users file
    ``users: {NAME: {password_hash, display_name, email, groups, subject, disabled}}``; make a
    hash with ``authgw hash-password``.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

from pydantic import Field

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
from gateway.passwords import DUMMY_HASH, verify_password
from gateway.settings import ValidationContext

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


class StaticSettings(PluginSettings):
    users_file: ConfigPath = Field(description="YAML users file (relative to conf.d); keep it out of conf.d's top level")
    case_insensitive: bool = Field(False, description="match usernames case-insensitively (casefold)")
    reload_interval: float = Field(2.0, ge=0, description="seconds between checks for a changed users file; 0: never")


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
        self._users, self._mtime = self._read()
        self._checked = time.monotonic()

    @hookimpl
    def gateway_startup(self) -> None:
        # The shipped conf.d works out of the box with demo/demo: say so loudly at every start,
        # so a gateway exposed with it is not a surprise.
        _, demo = self._users.get(self._key("demo"), (None, None))
        if demo is not None and verify_password(demo.password_hash, "demo"):
            self.log.warning("demo/demo is enabled (the shipped DEMO account): remove it from %s "
                             "before anyone else can reach this gateway", self.settings.users_file)

    # -- the users file ----------------------------------------------------------------------

    def _key(self, username: str) -> str:
        return username.casefold() if self.settings.case_insensitive else username

    def _read(self) -> tuple[dict[str, tuple[str, StaticUser]], float]:
        """The users by lookup key, each with its name as the file spells it (the canonical name
        the identity carries, whatever case the client typed)."""
        path = self.settings.users_file
        mtime = path.stat().st_mtime if path.exists() else 0.0
        self._validation.check_private(path, "users file")
        users = load_yaml_file(path, UsersFile, self._validation).users
        table = {}
        for name, user in users.items():
            key = self._key(name)
            if key in table:
                raise ConfigError(f"{path}: users {name!r} and another differ only in case, "
                                  "but case_insensitive is on")
            table[key] = (name, user)
        return table, mtime

    def _current(self) -> dict[str, tuple[str, StaticUser]]:
        """The users table, re-read when the file changed (checked every reload_interval)."""
        interval = self.settings.reload_interval
        if not interval or time.monotonic() - self._checked < interval:
            return self._users
        with self._lock:
            self._checked = time.monotonic()
            try:
                mtime = self.settings.users_file.stat().st_mtime
            except OSError:
                return self._users
            if mtime != self._mtime:
                try:
                    self._users, self._mtime = self._read()
                    self.log.info("users file %s reloaded: %d users", self.settings.users_file, len(self._users))
                except (ConfigError, OSError) as exc:  # keep serving the last good file
                    self._mtime = mtime
                    self.log.error("users file %s not reloaded, keeping the previous one: %s",
                                   self.settings.users_file, exc)
        return self._users

    # -- hooks ---------------------------------------------------------------------------------

    @hookimpl
    def gateway_authenticate(self, attempt: Attempt) -> Decision | None:
        credential = attempt.password
        if credential is None:
            return None
        found = self._current().get(self._key(credential.username))
        if found is None:
            verify_password(DUMMY_HASH, credential.password)  # same cost as a wrong password
            attempt.note(Outcome.USER_NOT_FOUND, step=self.name, reason="static.user_not_found")
            return None
        name, user = found
        if not verify_password(user.password_hash, credential.password):
            return Decision.deny(Outcome.INVALID_CREDENTIALS, step=self.name, reason="static.invalid_password")
        if user.disabled:
            return Decision.deny(Outcome.ACCOUNT_STATE, step=self.name, reason="static.disabled")
        return Decision.allow(self._identity(name, user), step=self.name)

    @hookimpl
    def gateway_lookup_user(self, username: str) -> Identity | None:
        found = self._current().get(self._key(username))
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
        return [ComponentState(f"{self.name}.users_file", True, f"{len(self._users)} users")]

    @hookimpl
    def gateway_selftests(self) -> list[SelfTest]:
        return [SelfTest(f"{self.name}.users_file", self._test_users_file, prerequisite=True)]

    def _test_users_file(self) -> CheckResult:
        path = Path(self.settings.users_file)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            users, _ = self._read()
        except (OSError, ConfigError) as exc:
            return CheckResult.fail(f"{path}: {exc}", "check the path in static.users_file and the YAML in it")
        detail = f"{path}: {len(users)} users, mode {mode:o}"
        if mode & 0o077:
            return CheckResult.warn(detail, f"the file holds password hashes; chmod 600 {path}")
        return CheckResult.ok(detail)
