"""Typed settings: the base every plugin's settings model derives from, secret references,
paths relative to the configuration directory, and the core's own settings.

Plugins declare settings as pydantic models deriving from :class:`PluginSettings`; unknown keys,
wrong types and missing keys are rejected before the plugin is built, with file, line and key
path (see :mod:`gateway.config`).

Booleans and numbers are strict in every model deriving from :class:`PluginSettings` (the core's
and every plugin's, built-in or not): only ``true``/``false`` are booleans, never ``yes``, ``on``,
``1`` or the string ``"true"``; a whole number is written as one (``3``: not ``true``, ``'3'`` or
``3.0``); a number where a fraction may be meant (``float``) is ``2.5`` or ``3``, never ``true`` or
``'2.5'``. A validator that checks several keys raises :class:`InvalidKey` to name
the key at fault, so the error points at that key's own line.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PlainSerializer,
    PlainValidator,
    Strict,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, core_schema

from gateway.errors import ConfigError
from gateway.yamlfiles import foreign_owner, read_regular

#: The most a ``{file: PATH}`` secret file may hold (a password, a key: far less).
_MAX_SECRET_BYTES = 64 * 1024

__all__ = [
    "ConfigPath",
    "GatewaySettings",
    "InvalidKey",
    "InvalidKeys",
    "PluginSettings",
    "Secret",
    "StrictBool",
    "shown_url",
    "ValidationContext",
]

#: The one boolean type of the configuration: ``true`` or ``false``, nothing that looks like one.
#: :class:`PluginSettings` applies it to every field annotated ``bool``, so no model can forget it.
StrictBool = Annotated[bool, Strict()]


class InvalidKey(ValueError):
    """Raised by a settings validator to blame one key (dotted, relative to the model), so the
    error names ``file:line`` of that key instead of the section's first line."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class InvalidKeys(ValueError):
    """Raised by a settings validator that found several problems, so all of them are reported
    in one run: each :class:`InvalidKey` at its key's ``file:line``, any other ``ValueError`` at
    the model's. Raise it only when *problems* is not empty."""

    def __init__(self, problems: list[ValueError]) -> None:
        super().__init__("; ".join(str(problem) for problem in problems))
        self.problems = list(problems)


@dataclass
class ValidationContext:
    """Passed to pydantic validation: where relative paths start, and where warnings go."""

    config_dir: Path
    strict: bool = False
    #: Where a relative path that leads out of :attr:`config_dir` (``../tls/ca.pem``) starts, when
    #: that is a copy of conf.d being checked (the console's save): the real conf.d, so that the
    #: path names the file the running gateway will read, not one beside the copy.
    outside: Path | None = None
    #: The core's ``deadline`` once the core settings are valid (None before, or when they are
    #: not): plugins check their own timeouts against it while validating, so that a timeout
    #: above it is reported with every other problem of the run (issue 11 item 1).
    deadline: float | None = None
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (message, location hint)

    def resolve(self, value: str | os.PathLike[str]) -> Path:
        path = Path(os.path.expanduser(value))
        if path.is_absolute():
            return path
        if self.outside is not None and Path(os.path.normpath(path)).parts[:1] == ("..",):
            return self.outside / path
        return self.config_dir / path

    def check_private(self, path: Path, what: str) -> None:
        """Warn (or, in strict mode, fail) when a file holding secrets is readable by others, or
        belongs to someone but root and the user authgw runs as.

        A world-readable file of ours is made 0600 instead, once, with a warning saying so: git
        and archives do not keep modes, so every fresh clone has the shipped users file 0644, and
        a warning on every command teaches operators to ignore warnings. Taking read access away
        from others never widens anything. A group-readable file (a deliberate 0640 for a service
        group) and another user's file are left alone and warned about; strict mode changes
        nothing and fails. Another user's file is one its owner can rewrite at will (a users
        file: who logs in, as what; review of the core), so it is named whatever its mode. The
        file is the one a symlink points to.
        """
        try:
            info = path.stat()
        except OSError:
            return
        mode = info.st_mode
        euid = os.geteuid()
        if mode & stat.S_IRWXO and not self.strict and info.st_uid == euid:
            try:
                os.chmod(path, stat.S_IMODE(mode) & 0o700)
            except OSError:
                pass
            else:
                self.warnings.append((f"{what} {path} was readable by others (mode {stat.S_IMODE(mode):o}; git and "
                                      f"archives do not keep modes); changed it to {stat.S_IMODE(mode) & 0o700:o}",
                                      str(path)))
                return
        problems = []
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            problems.append(f"{what} {path} is readable by group or others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
        foreign = foreign_owner(info.st_uid, str(path))
        if foreign:
            owner, fix = foreign
            problems.append(f"{what} {path} {owner}, so its owner can change it at will; {fix}")
        if problems and self.strict:
            raise ValueError("; ".join(problems))
        self.warnings.extend((message, str(path)) for message in problems)


def _context(info: ValidationInfo) -> ValidationContext:
    ctx = info.context
    if not isinstance(ctx, ValidationContext):
        # Built in code or tests without a configuration directory: paths are relative to cwd.
        return ValidationContext(config_dir=Path.cwd())
    return ctx


class Secret:
    """A secret given by reference: ``{env: NAME}`` or ``{file: PATH}``, never inline.

    Resolved once, at validation. ``repr``/``str`` and ``authgw config show`` display only the
    reference; call :meth:`reveal` where the value is needed.
    """

    __slots__ = ("_value", "reference")

    def __init__(self, value: str, reference: dict[str, str]) -> None:
        self._value = value
        self.reference = reference

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        (kind, where), = self.reference.items()
        return f"Secret({kind}:{where})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other.reference == self.reference

    def __hash__(self) -> int:
        return hash(tuple(self.reference.items()))

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.with_info_plain_validator_function(
            cls._validate,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda s: dict(s.reference)),
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema, handler: Any) -> dict[str, Any]:
        ref = {"type": "string", "minLength": 1}
        return {"description": "a reference, never the secret: {env: NAME} or {file: PATH}",
                "oneOf": [{"type": "object", "properties": {"env": ref}, "required": ["env"],
                           "additionalProperties": False},
                          {"type": "object", "properties": {"file": ref}, "required": ["file"],
                           "additionalProperties": False}]}

    @classmethod
    def _validate(cls, value: Any, info: ValidationInfo) -> Secret:
        if isinstance(value, Secret):
            return value
        if not (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("env", "file")
                and isinstance(next(iter(value.values())), str)):
            raise PydanticCustomError(
                "secret_reference",
                "a secret must be a reference, {env: NAME} or {file: PATH}; it may not be written inline",
            )
        ctx = _context(info)
        (kind, where), = value.items()
        if kind == "env":
            if where not in os.environ:
                raise PydanticCustomError("secret_missing", "environment variable {name} is not set", {"name": where})
            secret = os.environ[where]
        else:
            path = ctx.resolve(where)
            try:
                # A regular file of at most 64 KiB, opened non-blocking: a FIFO hung `config check`
                # and a reload, /dev/zero read until memory ran out (review of the supervisor).
                secret = read_regular(path, "secret file", _MAX_SECRET_BYTES).decode("utf-8").rstrip("\r\n")
            except ConfigError as exc:
                raise PydanticCustomError("secret_file", "cannot read secret file {path}: {err}",
                                          {"path": str(path),
                                           "err": str(exc).removeprefix("secret file: ")}) from None
            except UnicodeDecodeError:  # (its message would show a byte of the secret)
                raise PydanticCustomError("secret_file", "cannot read secret file {path}: {err}",
                                          {"path": str(path), "err": "not UTF-8"}) from None
            ctx.check_private(path, "secret file")
        if not secret:
            raise PydanticCustomError("secret_empty", "the secret referenced by {ref} is empty", {"ref": f"{kind}:{where}"})
        return cls(secret, {kind: where})


def _resolve_path(value: Any, info: ValidationInfo) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise PydanticCustomError("path_type", "expected a file or directory path")
    return _context(info).resolve(value)


#: A path; relative values are taken from the configuration directory, not the working directory.
ConfigPath = Annotated[Path, PlainValidator(_resolve_path, json_schema_input_type=str), PlainSerializer(str)]


#: Core schema types validated strictly wherever they sit (a field, a list item, a mapping's value,
#: a member of a union, a nested model).
_STRICT_TYPES = ("bool", "int", "float")


def _strict_scalars(schema: Any) -> Any:
    """*schema* (a pydantic core schema) with every ``bool``, ``int`` and ``float`` in it strict."""
    seen: set[int] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.get("type") in _STRICT_TYPES:
                node["strict"] = True
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return schema


class PluginSettings(BaseModel):
    """Base class of every plugin's settings: unknown keys are errors, booleans and numbers are
    strict (see the module docstring), and settings are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        # pydantic's lax mode took `insecure: on` as True, `retry_after: true` as 1 and
        # `threads: '3'` as 3: in a security product's configuration each is an error at its
        # line. Done on the schema, once, so that every model (third-party plugins too) is strict
        # without a special type, and so are `list[int]`, `dict[str, float]` and `int | None`.
        # A strict `float` still takes an int (`deadline: 5`).
        return _strict_scalars(handler(source))


# ---------------------------------------------------------------------------------------------
# The core's settings (top-level keys of conf.d)
# ---------------------------------------------------------------------------------------------


class AuditSettings(PluginSettings):
    file: str = Field("auto", description="where audit lines go: a file path, `-` for standard error, or "
                      "`auto`: `$LOGS_DIRECTORY/audit.log` under systemd (`LogsDirectory=authgw`), else `-`")

    @field_validator("file")
    @classmethod
    def _auto(cls, value: str) -> str:
        # A service's standard error is its journal, mixed with the service log: the audit trail
        # gets a file of its own there. Interactively, the terminal is the useful place.
        if value == "auto":
            logs = os.environ.get("LOGS_DIRECTORY", "").split(":")[0]
            return os.path.join(logs, "audit.log") if logs else "-"
        return value


#: A URL query parameter whose name holds one of these carries a credential (redis-py takes any:
#: ``ssl_password``, the TLS client key's, as well as ``password``, and it would win over
#: ``password: {env: ...}``). ``config show`` masks such values (config.py).
URL_QUERY_SECRET_WORDS = ("pass", "pwd", "secret", "token", "credential")


def _secret_query_name(name: str) -> bool:
    name = name.lower()
    return name in ("username", "user") or any(word in name for word in URL_QUERY_SECRET_WORDS)


def shown_url(url: str) -> str:
    """*url* as an error message or a log line may show it: nothing up to its last ``@`` (a user
    name or password, which may hold ``/``, ``?`` or ``@``) and no query or fragment (a
    credential may be there)."""
    scheme, sep, rest = url.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        return "(not a URL)" if set("@?#:") & set(url) else url
    hidden = "***@" if "@" in rest else ""
    rest = rest.rpartition("@")[2].partition("#")[0]
    rest, query, _ = rest.partition("?")
    return f"{scheme}://{hidden}{rest}" + ("?…" if query else "")


def redis_url(value: str) -> str:
    """A Redis URL without a credential in it (it would be shown by `config show` and logged):
    no password before the host, none in the query; the password is a ``Secret`` of its own."""
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("`redis://HOST:PORT/DB` or `rediss://` (TLS)")
    if parts.password is not None:
        raise ValueError("no password in the URL (it would be shown and logged); use `password: {env: NAME}`")
    if any(_secret_query_name(name) for name, _ in parse_qsl(parts.query, keep_blank_values=True)):
        raise ValueError("no credential in the URL's query (it would be shown and logged, and win over "
                         "`password:`); use `password: {env: NAME}`")
    if not parts.hostname:
        raise ValueError("the URL names no host")
    try:
        parts.port  # noqa: B018 - read to check it: every use of the URL (readiness, errors) reads it
    except ValueError:
        raise ValueError("the URL's port is not a number from 0 to 65535") from None
    return value


class ThrottleRedisSettings(PluginSettings):
    url: str = Field(pattern=r"^rediss?://", description="`redis://HOST:PORT/DB` or `rediss://` (TLS); no password in it")
    password: Secret | None = Field(None, description="Redis password (`{env:}`/`{file:}`)")
    key_prefix: str = Field("authgw:throttle:", description="prepended to every key (keys are hashes, never usernames)")
    timeout: float = Field(0.5, gt=0, le=10, description="seconds an attempt's Redis calls may take in all "
                           "(connecting, sending, reading the whole answer; the taking back of failed calls' "
                           "reservations and its own reservation together); not answered by then, the attempt is "
                           "refused (503), and its reservation is taken back once Redis answers again")

    @field_validator("url")
    @classmethod
    def _no_inline_password(cls, value: str) -> str:
        return redis_url(value)


class ThrottleSettings(PluginSettings):
    """Password-guess throttling (gateway/throttle.py). Derive the limits from the directory's
    lockout policy: ``user_failures`` below its threshold, ``window`` at least its observation
    window (docs/configuration.md)."""

    enabled: bool = Field(True, description="refuse (429) users and clients with too many recent password guesses")
    user_failures: int = Field(4, ge=1, description="guesses per username (from any client) within `window` "
                               "before 429; keep it below the directory's lockout threshold")
    user_client_failures: int = Field(3, ge=1, description="guesses per username from one client within `window` "
                                      "before that client gets 429 for that user (others may still log in)")
    client_failures: int = Field(30, ge=1, description="guesses per client address (any usernames) within `window` before 429")
    window: float = Field(1800.0, gt=0, le=30 * 86400, description="seconds a guess is remembered; at least the directory's "
                          "lockout observation window")
    user_domains: list[str] = Field(
        default_factory=list, description="domains whose spellings of a name spend that name's budget: `name@DOMAIN` "
        "and `DOMAIN\\name` count as `name` (case-insensitive). With Active Directory list its UPN suffixes and "
        "NetBIOS name (`[corp.example.com, CORP]`): it takes `alice`, `alice@corp.example.com` and `CORP\\alice` for "
        "one account, which would otherwise have a budget per spelling")
    ipv6_prefix: int = Field(64, ge=32, le=128, description="an IPv6 client is counted by its network of this "
                             "length (a /64 is one host's: every address in it is one client), 128: by address")
    store: Literal["auto", "memory", "sqlite", "redis"] = Field(
        "auto", description="where counts live: `memory` (one worker), `sqlite` (the workers of this machine, "
        "in the state directory), `redis` (several instances); `auto`: memory for one worker, else sqlite")
    redis: ThrottleRedisSettings | None = Field(None, description="the Redis server, with `store: redis`")

    @field_validator("user_domains")
    @classmethod
    def _plain_domains(cls, value: list[str]) -> list[str]:
        for domain in value:
            if not 0 < len(domain) <= 253 or any(c in domain for c in "@\\/ ") or not domain.isprintable():
                raise ValueError(f"{domain!r}: a domain name (`corp.example.com`) or NetBIOS name (`CORP`), "
                                 "without `@`, `\\`, `/` or spaces")
        return value

    @field_validator("redis")
    @classmethod
    def _redis_for_store(cls, value, info: ValidationInfo):
        if info.data.get("store") == "redis" and value is None:
            raise ValueError("`store: redis` needs `redis: {url: ...}`")
        return value


class FailureTimingSettings(PluginSettings):
    """Refused passwords take as long wherever the chain stopped (gateway/failtiming.py)."""

    enabled: bool = Field(True, description="hold back refused password attempts to a common floor")
    floor: float = Field(0.0, ge=0, le=10, description="minimum seconds a refusal takes (the adaptive floor "
                         "may be higher)")
    percentile: float = Field(0.9, gt=0, le=1, description="the adaptive floor: this percentile of the "
                              "slowest kind of refusal")
    max_floor: float = Field(1.0, gt=0, le=10, description="never hold a refusal back longer than this")


class ApiToken(PluginSettings):
    """A client allowed to call ``POST /v1/authenticate``. Only the SHA-256 of the token is stored
    (tokens are 256-bit random, so a fast hash is enough); ``authgw api-token`` makes one."""

    name: str = Field(min_length=1, description="who holds the token (for the operator)")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the token")


class LimitsSettings(PluginSettings):
    """What one worker accepts before it refuses, so overload and slow clients cannot take it
    down (docs/design.md, "Overload and slow clients")."""

    queue: int | None = Field(None, ge=1, le=100_000, description="attempts waiting for a chain "
                              "thread before more are refused at once with 503 (fewer when the "
                              "measured pace says a new one would miss its deadline); default 4 x `threads`")
    step_concurrency: int | None = Field(None, ge=1, le=512, description="threads a chain step may "
                                         "hold while none of its calls finishes for half the deadline; "
                                         "then it is skipped (a hanging backend cannot take them all); "
                                         "default half of `threads`")
    hash_concurrency: int | None = Field(None, ge=1, le=512, description="password hashes "
                                         "(argon2id: the static users file) verified at once per "
                                         "worker; the others wait their turn in arrival order, and "
                                         "are skipped when their client has gone; default: the CPUs "
                                         "the worker may use")
    queue_wait: float = Field(0.5, gt=0, le=300, description="seconds an attempt may be expected "
                              "to wait for a chain thread (estimated from the measured pace); more "
                              "is refused at once with 503, so a burst leaves no backlog behind it")
    retry_after: int = Field(1, ge=1, le=3600, description="`Retry-After` seconds of an overload 503")
    overload_refusals: float = Field(100, gt=0, le=1_000_000, description="overload 503s per "
                                     "second a worker answers before the connections it refused "
                                     "wait longer than `retry_after` for their next request to be read")
    max_hold: float = Field(8, ge=1, le=300, description="seconds at most a refused connection's "
                            "next request waits unread (its `Retry-After`)")
    header_timeout: float = Field(10.0, gt=0, le=300, description="seconds a client has to send a "
                                  "request's headers (slow-header floods), and to finish its TLS handshake "
                                  "on a TLS listener")
    max_header_bytes: int = Field(65536, ge=8192, le=1_048_576, description="bytes of a request line and its "
                                  "headers together (each header line: at most 8,190); more is answered 431 and "
                                  "the connection closed (memory held per connection)")
    write_timeout: float = Field(10.0, gt=0, le=300, description="seconds an answer may wait on a client that "
                                 "reads nothing (its buffers full) before the connection is closed")
    body_timeout: float = Field(10.0, gt=0, le=300, description="seconds a client has to send a "
                                "request body to `/v1/authenticate`")
    keepalive_timeout: float = Field(75.0, gt=0, le=3600, description="seconds an idle keep-alive "
                                     "connection stays open")
    max_connections: int = Field(4096, ge=1, le=1_000_000, description="open connections per worker, "
                                 "all its listeners together, TLS ones from their TCP accept; more are "
                                 "closed at once (logged). With several listeners each keeps a share "
                                 "of max_connections / (4 x listeners) the others cannot take")
    max_connections_per_client: int = Field(256, ge=1, le=1_000_000, description="open connections "
                                            "per client address and worker (`trusted_proxies` exempt, and "
                                            "admitted up to this many beyond `max_connections`)")


class HealthSettings(PluginSettings):
    """Backend probes and what ``/readyz`` and ``/metrics`` show."""

    probe_interval: float = Field(30.0, ge=1, le=3600, description="seconds between backend probes "
                                  "(state changes are logged at WARNING)")
    details_from: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        ["127.0.0.0/8", "::1/128"], description="addresses that see `/readyz` details (URLs, "
        "paths) and `/metrics`; others get only ready/not ready and the reason code, and 404 for "
        "`/metrics`")


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"{value!r} is not HOST:PORT (IPv6 as [::1]:PORT)")
    return host.strip("[]"), int(port)


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def unmapped_networks(networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
                      ) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """IPv4-mapped networks (``::ffff:10.0.0.5/128``, as dual-stack logs write addresses) as the
    IPv4 networks they name: the core unwraps a mapped peer to IPv4 before matching it."""
    out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for net in networks:
        if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
            net = ipaddress.IPv4Network((net.network_address.ipv4_mapped, max(net.prefixlen - 96, 0)))
        out.append(net)
    return out


class GatewaySettings(PluginSettings):
    """The top-level keys of ``conf.d`` (conventionally in ``gateway.yaml``)."""

    chain: list[str] = Field(min_length=1, description="authentication steps, in the order they are asked")
    plugins: list[str] = Field([], description="enabled plugins that are not chain steps (cache, sinks)")
    listen: list[str] = Field(["127.0.0.1:9000"], description="`HOST:PORT` addresses to listen on")
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        [], description="proxies whose `X-Forwarded-For` and forwarded certificates are believed")
    deadline: float = Field(5.0, gt=0, le=120, description="seconds an attempt may take in all")
    threads: int = Field(16, ge=1, le=512, description="threads per worker running (blocking) plugins; also the most "
                         "attempts a worker runs on its event loop at once for a chain of `loop_capable` steps")
    workers: int = Field(1, ge=1, le=64, description="worker processes sharing the sockets")
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto", description="`auto`: uvloop when installed (`authgw[speed]`), else asyncio")
    pin_workers: bool = Field(True, description="with several workers, keep each on its own CPU "
                              "(its event loop and plugin threads share one GIL)")
    reuse_port: bool = Field(True, description="with several workers, give each its own listening socket "
                             "(`SO_REUSEPORT`): the kernel spreads new connections evenly over them; `false`: "
                             "one shared socket, whose bursts one worker often takes whole (docs/operations.md)")
    worker_timeout: float = Field(30.0, ge=0, le=3600, description="with several workers, seconds a worker's "
                                  "event loop may go without turning before the master kills and replaces it "
                                  "(0: no watchdog; else at least 1; a new worker has at least 30 s to its "
                                  "first turn, and as long, max(worker_timeout, 30 s), to serve, as a "
                                  "reload's plugin start-up to finish; past it the first start fails, with "
                                  "one worker too)")
    realm: str = Field("authgw", description="realm of the `WWW-Authenticate: Basic` challenge")
    identity_headers: Literal["utf-8", "percent"] = Field(
        "utf-8", description="how `/auth` writes the `Remote-*` values: `utf-8` as they are; `percent`: each byte "
        "outside printable ASCII, and `%` (and `,` in a group name), percent-encoded (RFC 3986), for a backend "
        "that reads headers as latin-1 (WSGI), where the UTF-8 of `х` or `Å` holds a byte it reads as white "
        "space (docs/configuration.md)")
    state_dir: Path | None = Field(None, description="state directory (cache, keys); default "
                                   "`$XDG_DATA_HOME/authgw`; `--state-dir` overrides")
    strict: bool = Field(False, description="make permission warnings errors")
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$", description="DEBUG, INFO, WARNING or ERROR")
    log_format: Literal["text", "json"] = Field(
        "text", description="service log lines: `text`, or `json` (one object per line, with `request_id` "
                            "where there is one)")
    audit: AuditSettings = Field(AuditSettings(), description="the audit log (one JSON line per attempt)")
    throttle: ThrottleSettings = Field(ThrottleSettings(), description="failure throttling")
    failure_timing: FailureTimingSettings = Field(FailureTimingSettings(), description="uniform failure time")
    api_tokens: list[ApiToken] = Field([], description="clients allowed to call `POST /v1/authenticate`")
    limits: LimitsSettings = Field(LimitsSettings(), description="overload and slow-client limits")
    health: HealthSettings = Field(HealthSettings(), description="backend probes; who sees health details")

    @field_validator("realm")
    @classmethod
    def _quotable_realm(cls, value: str) -> str:
        # Written between quotes in every challenge: a `"` or `\\` made the header malformed, and a
        # control character had every challenge dropped with an ERROR (review of the endpoints).
        if not 1 <= len(value) <= 100 or not value.isprintable() or '"' in value or "\\" in value:
            raise ValueError('1 to 100 printable characters, without `"` or `\\`')
        return value

    @field_validator("worker_timeout")
    @classmethod
    def _watchdog(cls, value: float) -> float:
        if 0 < value < 1:
            raise ValueError("0 (no watchdog) or at least 1 second: a loop held up for a moment (a burst of TLS "
                             "handshakes, the garbage collector) would get its worker killed")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _unmapped(cls, value: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
                  ) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return unmapped_networks(value)  # else a proxy written `::ffff:a.b.c.d` is never trusted

    @field_validator("listen", mode="before")
    @classmethod
    def _one_address(cls, value: Any) -> Any:
        # `listen: 127.0.0.1:9000` is how operators write a single address.
        return [value] if isinstance(value, str) else value

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_listen(item)
        return value

    @field_validator("chain", "plugins")
    @classmethod
    def _unique(cls, value: list[str], info: ValidationInfo) -> list[str]:
        # At the item's own line. A plugin in `chain:` and in `plugins:` was built twice, and its
        # second registration ended `config check` and `serve` in a traceback, and a reload in
        # "ValueError: Plugin name already registered" (review of the configuration).
        steps = info.data.get("chain", []) if info.field_name == "plugins" else []
        seen: dict[str, int] = {}
        for index, name in enumerate(value):
            if name in seen:
                raise InvalidKey(str(index), f"{name!r} is listed twice (also at [{seen[name]}])")
            if name in steps:
                raise InvalidKey(str(index), f"{name!r} is a chain step already (chain[{steps.index(name)}]); "
                                 "list a plugin in `chain:` or in `plugins:`, not both (a chain step's lookups "
                                 "and groups serve too)")
            seen[name] = index
        return value

    @model_validator(mode="after")
    def _store_answers_within_the_deadline(self) -> GatewaySettings:
        # Every password login waits for the throttle store: a Redis timeout at or above the
        # deadline let one call hold an attempt past it (the attempt's wait is bounded by the
        # deadline anyway, gateway/chain.py, but such a timeout can only end in a 503).
        redis = self.throttle.redis
        if self.throttle.enabled and self.throttle.store == "redis" and redis is not None \
                and redis.timeout >= self.deadline:
            raise InvalidKey("throttle.redis.timeout", f"{redis.timeout}s is not below the gateway's deadline "
                             f"({self.deadline}s); every password login waits for the throttle store")
        return self
