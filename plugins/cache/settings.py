"""The ``cache:`` section of conf.d, as a typed model (see docs/plugins/cache.md)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from gateway import ConfigPath, PluginSettings, Secret
from gateway.settings import InvalidKey, redis_url

__all__ = ["Argon2Settings", "CacheSettings", "HotSettings", "RedisSettings", "SQLiteSettings", "parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")

#: Methods that never prove a password; their successes must not make a password cache entry.
NOT_PASSWORD_METHODS = frozenset({"kerberos", "client_cert"})
#: Secrets given in settings must carry at least 256 bits if random; shorter strings are refused.
MIN_SECRET_CHARS = 32


def parse_duration(value: Any) -> Any:
    """Seconds as a number, or a string with a unit: ``45s``, ``30m``, ``12h``, ``7d``, ``2w``."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError("expected seconds or a duration such as 30s, 15m, 12h, 7d, 2w")
        return float(match.group(1)) * _UNITS[match.group(2) or "s"]
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]


class SQLiteSettings(PluginSettings):
    """The embedded store (default): one file in the state directory, shared by worker processes."""

    path: ConfigPath | None = Field(None, description="database file; default `STATE_DIR/cache.sqlite3`")
    busy_timeout: float = Field(5.0, gt=0, le=60,
                                description="seconds a writer waits for another process's transaction")


class RedisSettings(PluginSettings):
    """A store shared by several gateway instances (``store: redis``)."""

    url: str = Field(pattern=r"^rediss?://",
                     description="`redis://HOST:PORT/DB` or `rediss://` (TLS, verified); no password in it")
    username: str | None = Field(None, description="Redis ACL user (Redis 6+)")
    password: Secret | None = Field(None, description="`{env: NAME}` or `{file: PATH}`")
    key_prefix: str = Field("authgw:cache:", min_length=1, max_length=100,
                            description="prepended to every key; keys are hashes, never usernames")
    timeout: float = Field(1.0, gt=0, le=30, description="seconds for connecting and for each command")
    ca_file: ConfigPath | None = Field(None, description="CA bundle of the Redis server certificate (`rediss://`)")

    @field_validator("url")
    @classmethod
    def _no_inline_password(cls, value: str) -> str:
        return redis_url(value)


class HotSettings(PluginSettings):
    """The in-memory positive cache for forward-auth repeats (off by default)."""

    enabled: bool = Field(False, description="answer repeats of a recent live success without the directory")
    ttl: Duration = Field(30.0, gt=0, le=3600, description="seconds a success is reused (or `45s`, `2m`)")
    max_entries: int = Field(10000, ge=1, le=10_000_000,
                             description="entries per worker process; the least recently used goes first")


class Argon2Settings(PluginSettings):
    """argon2id cost (RFC 9106). The floor is the OWASP minimum: 19 MiB, 2 passes, 1 lane."""

    memory_cost: int = Field(19 * 1024, ge=19 * 1024, le=4 * 1024 * 1024, description="KiB of memory per hash")
    time_cost: int = Field(2, ge=2, le=20, description="passes over the memory")
    parallelism: int = Field(1, ge=1, le=16, description="lanes")


class CacheSettings(PluginSettings):
    """Credential cache: offline logins when the directory is down, and an optional hot cache.
    Enabled with ``plugins: [cache]``; see docs/plugins/cache.md."""

    enabled: bool = Field(True, description="`false` switches both caches off (nothing stored or answered)")
    store: Literal["sqlite", "redis"] = Field("sqlite", description="where offline entries live")
    sqlite: SQLiteSettings = Field(SQLiteSettings(), description="the SQLite store")
    redis: RedisSettings | None = Field(None, description="the Redis store; required with `store: redis`")
    max_age: Duration = Field(7 * 86400.0, gt=0, le=366 * 86400,
                              description="seconds (or `7d`, `12h`) after the last live login that an entry "
                                          "is used; older ones are deleted")
    max_offline_failures: int = Field(5, ge=1, le=100,
                                      description="wrong passwords per user answered offline before the cache "
                                                  "refuses that user until a live login")
    methods: list[str] = Field(default_factory=lambda: ["ldap"], min_length=1,
                               description="chain steps whose password successes are cached")
    usernames: Literal["exact", "casefold"] = Field("casefold",
                                                    description="`casefold` (letters lowered one by one, "
                                                                "as Unicode 3.2 lowers them, as slapd does; İ "
                                                                "read as I; NFKC: LDAP and AD names ignore "
                                                                "case; never ß as ss) or `exact` "
                                                                "(case-sensitive sources only)")
    pepper: Secret | None = Field(None, description="secret mixed into every password hash; default a key "
                                                    "file `cache-pepper.key` in the state directory")
    encryption_key: Secret | None = Field(None, description="secret that encrypts profiles and groups; default "
                                                            "a key file `cache-encryption.key` in the state directory")
    refresh_after: Duration = Field(300.0, ge=0, description="seconds during which a repeat live login with the "
                                                             "same password is not hashed again (0: always)")
    hash_concurrency: int | None = Field(None, ge=1, le=64,
                                         description="password hashes computed at once per process, the others "
                                         "waiting in arrival order; default: the CPUs it may use")
    argon2: Argon2Settings = Field(Argon2Settings(), description="argon2id cost; never below the OWASP minimum")
    hot: HotSettings = Field(HotSettings(), description="the in-memory hot cache")

    @field_validator("methods")
    @classmethod
    def _password_methods_only(cls, value: list[str]) -> list[str]:
        wrong = sorted(set(value) & NOT_PASSWORD_METHODS)
        if wrong:
            verb = "checks" if len(wrong) == 1 else "check"
            raise ValueError(f"{' and '.join(wrong)} never {verb} a password; such logins cannot be cached")
        return value

    @field_validator("pepper", "encryption_key")
    @classmethod
    def _long_enough(cls, value: Secret | None) -> Secret | None:
        if value is not None and len(value.reveal()) < MIN_SECRET_CHARS:
            raise ValueError(f"must be at least {MIN_SECRET_CHARS} characters (e.g. `openssl rand -base64 32`)")
        return value

    @model_validator(mode="after")
    def _store_configured(self) -> CacheSettings:
        if self.store == "redis" and self.redis is None:
            raise InvalidKey("store", "store: redis needs a `redis:` section with at least `url`")
        if self.refresh_after >= self.max_age:
            # a repeat live login within refresh_after does not renew the entry: past max_age an
            # active user's entry would age out between two of its logins (review of time)
            raise InvalidKey("refresh_after", f"must be below max_age ({self.max_age:g} s): a user who logs in "
                                              "often would otherwise lose the entry")
        return self
