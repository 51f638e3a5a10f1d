"""The merged ``conf.d`` configuration, validated against typed settings models.

Layout and merge rules (also in docs/configuration.md):

* every ``*.yaml`` file of the directory is read in lexical order; dot-files are ignored, a
  ``*.yml`` file is an error and any other file a warning (it is not read);
* top-level keys are the core's settings (:class:`~gateway.settings.GatewaySettings`) and one
  key per plugin name, holding that plugin's settings (by convention in ``<plugin>.yaml``);
* mappings merge key by key across files; a list or a value set in two files is an error naming
  both places (no silent override);
* settings for a plugin that is installed but not enabled are ignored with a warning; a
  top-level key that is neither a core setting nor an installed plugin is an error;
* ``AUTHGW_<KEY>`` environment variables override scalar keys (``AUTHGW_DEADLINE=3``,
  ``AUTHGW_LDAP__RECEIVE_TIMEOUT=2``: ``__`` between levels), when the first level names a core
  setting or an installed plugin; their values are typed like YAML scalars.

Problems are collected, not raised one by one: with ``defer=True`` the core's problems wait in
:attr:`Config.problems` so that the plugins' are reported in the same run.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from gateway.errors import ConfigError
from gateway.settings import URL_QUERY_SECRET_WORDS, GatewaySettings, InvalidKey, InvalidKeys, ValidationContext
from gateway.yamlfiles import (
    KeyPath,
    Mark,
    display_name,
    format_path,
    load_directory,
    load_file,
    parse_scalar,
    referenced_paths,
    unread_files,
)

__all__ = ["Config", "load_config", "load_yaml_file", "validate"]

log = logging.getLogger("authgw.config")

M = TypeVar("M", bound=BaseModel)

_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "bool_type": "expected true or false (yes, no, on, off, 1 and 0 are not booleans here)",
    # Numbers are strict (gateway/settings.py): `retry_after: true` was taken as 1, `threads: '3'` as 3.
    "int_type": "expected a whole number, written as one (`3`; true, false, '3' and 3.0 are not whole numbers here)",
    "float_type": "expected a number, written as one (`2.5` or `3`; true, false and '2.5' are not numbers here)",
    # An `IPv4Network | IPv6Network` item was two errors, one per member (review of the configuration).
    "ip_v4_network": "not an IP network: write it in CIDR form with the host bits zero (`10.0.0.0/8`, "
                     "`192.0.2.7/32`, `fd00::/8`)",
    "ip_v6_network": "not an IP network: write it in CIDR form with the host bits zero (`10.0.0.0/8`, "
                     "`192.0.2.7/32`, `fd00::/8`)",
}


@dataclass
class Config:
    """A loaded configuration directory. Plugin sections are validated when plugins are built."""

    directory: Path
    data: dict[str, Any]
    marks: dict[KeyPath, Mark]
    files: list[Path]
    #: Installed plugin names; when given, unknown top-level keys are checked too.
    installed: set[str] | None = None
    #: The real conf.d when *directory* is a copy of it being checked (:attr:`ValidationContext.outside`).
    paths_from: Path | None = None
    #: Key paths set by ``AUTHGW_...`` variables, and the variable's name.
    environment: dict[KeyPath, str] = field(default_factory=dict)
    #: Keep the core's problems in :attr:`problems` instead of raising them (see module docstring).
    defer: bool = False
    #: Problems found so far (only with ``defer``); the caller adds the plugins' and raises.
    #: Given: problems found before (a strict conf.d's permissions), raised with these.
    problems: list[str] = field(default_factory=list)
    core: GatewaySettings | None = field(init=False)
    context: ValidationContext = field(init=False)

    def __post_init__(self) -> None:
        strict = self.data.get("strict") is True  # a non-boolean `strict` is an error below
        self.context = ValidationContext(config_dir=self.directory, strict=strict, outside=self.paths_from)
        core_keys = set(GatewaySettings.model_fields)
        core_data = {k: v for k, v in self.data.items() if k in core_keys}
        found, warnings = unread_files(self.directory, referenced_paths(self.data, self.directory))
        problems = [*self.problems, *found]  # given: strict conf.d permission problems (load_config)
        for warning in warnings:
            log.warning("%s", warning)
        if self.installed is not None:
            problems += self._unknown_top_level()
        self.core = None
        if "chain" not in core_data:
            problems.append(f"{display_name(self.directory)}: no file sets `chain:` (the list of "
                            "authentication steps, in order); see docs/configuration.md")
        else:
            try:
                self.core = self.validate(GatewaySettings, core_data, ())
                self.context.deadline = self.core.deadline
            except ConfigError as exc:
                problems += exc.problems
        if problems and not self.defer:
            raise ConfigError(problems)
        self.problems = problems

    @property
    def enabled(self) -> list[str]:
        """Every plugin the operator enabled: chain steps first, in order, then ``plugins:``."""
        if self.core is not None:
            return [*self.core.chain, *self.core.plugins]
        # The core is invalid (deferred problems): the names that are names, to check plugins too.
        return list(dict.fromkeys(name for key in ("chain", "plugins") if isinstance(self.data.get(key), list)
                                  for name in self.data[key] if isinstance(name, str)))

    def section(self, name: str) -> dict[str, Any]:
        value = self.data.get(name, {})
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(self.locate((name,), f"{name}: settings must be a mapping"))
        return value

    def locate(self, path: KeyPath, message: str) -> str:
        """Prefix *message* with the ``file:line`` of the closest key path that has a mark."""
        return locate(self.marks, path, message, display_name(self.directory))

    def validate(self, model: type[M], data: Any, prefix: KeyPath) -> M:
        """Validate the section at *prefix* into *model* (see :func:`validate`)."""
        return validate(model, data, prefix, self.marks, self.context, display_name(self.directory))

    def _unknown_top_level(self) -> list[str]:
        """Unknown top-level keys are errors; settings of installed, disabled plugins are not."""
        core_keys = set(GatewaySettings.model_fields)
        # Raw YAML, not validated yet: take only the names that are names.
        enabled = {name for key in ("chain", "plugins") if isinstance(self.data.get(key), list)
                   for name in self.data[key] if isinstance(name, str)}
        problems = []
        for key in self.data:
            if key in core_keys or key in enabled:
                continue
            if key in self.installed:
                log.warning("%s", self.locate((key,), f"{key}: settings for plugin {key!r}, which is "
                                                    "not enabled in `chain:` or `plugins:`; ignored"))
                continue
            problems.append(self.locate((key,), f"{key}: unknown key (neither a gateway setting nor an "
                                                f"installed plugin; see `authgw plugins`)"
                                                + did_you_mean(key, core_keys | self.installed)))
        return problems

    def redacted(self) -> dict[str, Any]:
        """The merged configuration as shown by ``authgw config show``, every section (enabled
        or not: a disabled plugin's section is never validated, so it may hold inline secrets).

        Secrets are references by construction; any other value that looks like an inline secret
        (a key named like a password, key or token, a URL with a password, a PEM private key) is
        masked anyway.
        """
        return _redact(self.data)


_SECRET_WORDS = {"password", "passwd", "passphrase", "pass", "pw", "pwd", "secret", "token", "credential", "credentials",
                 "pepper", "salt", "psk", "cookie", "authorization", "hmac", "seed", "jwk", "otp"}
#: ``*_key`` and ``*_keys`` name keys (``encryption_key``, ``session_keys``, ``keys``); ``key_prefix``
#: or ``key_file`` do not. A ticket is a bearer secret (the relay's enrolment); ``ticket_lifetime`` is not.
_SECRET_LAST = {"key", "keys", "pin", "pins", "ticket", "tickets"}
#: ``public_key``, ``public_keys``: public, and an operator needs to see which (the login plugin's
#: ``public_key`` of an OIDC client is the path of a PEM public key); a PEM private key written
#: there, or a JWK's private members, are masked all the same.
_PUBLIC = {"public", "pub"}
#: Found anywhere in a key with its separators and case dropped: plurals (``passwords``), one
#: word (``bindpw``, ``apikey``, ``authtok``) and compounds (``clientSecret``).
_SECRET_PARTS = ("password", "passwd", "passphrase", "secret", "token", "credential", "apikey", "authtok", "bindpw",
                 "cookie", "authorization", "pepper", "privatekey", "privkey", "accesskey", "signingkey",
                 "masterkey", "sharedkey", "authkey", "hmac", "jwk", "seed", "totp")
#: A JSON Web Key's private members (RFC 7518 section 6): masked in any mapping with a ``kty``.
_JWK_PRIVATE = {"d", "p", "q", "dp", "dq", "qi", "k", "oth"}
#: A JWK's public members (RFC 7517 section 4, RFC 7518 section 6): under a name like a secret
#: (``signing_jwks``), only these are shown.
_JWK_PUBLIC = {"kty", "kid", "use", "key_ops", "alg", "n", "e", "crv", "x", "y", "x5u", "x5c", "x5t", "x5t#S256"}
#: The password of a URL runs to the last ``@`` before the host (``ldap://admin:P@ss@dc1``); the
#: user name may hold an ``@`` too (``ldap://svc@corp:pw@dc1``), the password white space (so a
#: value with two URLs is masked from the first password to the last host: more, never less).
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/\s:]*:)(?P<pw>[^\n]*)(?=@[^@\s/?#]*(?:[/?#\s]|$))",
                           re.IGNORECASE)
#: ``user:password@host`` without a scheme (a proxy as curl takes it).
_BARE_PASSWORD = re.compile(r"^(?P<head>[^\s:/@]+:)(?!//)(?P<pw>[^\n]*)(?=@[^@\s/?#]+(?:[/?#]\S*)?$)")
#: A credential in a URL's query (``redis://host/0?password=...``).
_QUERY_PASSWORD = re.compile(rf"(?P<head>[?&][\w.-]*(?:{'|'.join(URL_QUERY_SECRET_WORDS)})[\w.-]*=)[^&#\s]*",
                             re.IGNORECASE)


def _secret_key(key: str) -> bool:
    words = [w for w in re.split(r"[_\-.\s]", re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).lower()) if w]
    squashed = "".join(words)
    # Plurals too: `psks`, `salts`, `otps` are lists of what `psk`, `salt`, `otp` name.
    singular = {w[:-1] for w in words if w.endswith("s")}
    return (bool(_SECRET_WORDS & (set(words) | singular))
            or bool(words and words[-1] in _SECRET_LAST and not _PUBLIC & set(words[:-1]))
            or any(part in squashed for part in _SECRET_PARTS))


def _is_reference(value: Any) -> bool:
    return isinstance(value, dict) and set(value) in ({"env"}, {"file"})


def _is_jwk(value: Any) -> bool:
    return isinstance(value, dict) and "kty" in value


def _is_jwks(value: Any) -> bool:
    """A JWK set's ``keys``: a list of JWKs."""
    return isinstance(value, list) and bool(value) and all(_is_jwk(item) for item in value)


def _redact(value: Any, key: str = "", inherited: bool = False) -> Any:
    """*value* with what looks like a secret masked; under a key named like a secret
    (*inherited*), every value is, but references (``{env:}``, ``{file:}``), and so is every key
    of a mapping there: ``api_keys: {sk-...: alice}`` has its secrets in the keys."""
    secret = inherited or _secret_key(key)
    if isinstance(value, dict):
        if _is_reference(value):
            return dict(value)  # a reference is not the secret
        if _is_jwk(value):  # its public members are shown, under any name (a JWKS's `keys`)
            return {k: _redact(v, str(k), k in _JWK_PRIVATE or (secret and k not in _JWK_PUBLIC))
                    for k, v in value.items()}
        if secret:
            return {(k if _is_reference(v) or _is_jwk(v) or _is_jwks(v) else f"<redacted {n}>"):
                    _redact(v, str(k), True) for n, (k, v) in enumerate(value.items(), 1)}
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, key, secret) for v in value]
    if value is not None and not isinstance(value, bool) and secret:
        return "<redacted>"
    if isinstance(value, str):
        if "PRIVATE KEY" in value:
            return "<redacted>"
        try:  # a JWKS written as a JSON string: its private members
            embedded = _embedded_json(value)
            if embedded is not None and (shown := _redact(embedded, key)) != embedded:
                return json.dumps(shown)
        except RecursionError:  # `[[[[...`, nested deeper than conf.d's YAML may be: not shown
            return "<redacted>"
        value = _URL_PASSWORD.sub(lambda m: m.group("head") + "<redacted>", value)
        value = _BARE_PASSWORD.sub(lambda m: m.group("head") + "<redacted>", value)
        return _QUERY_PASSWORD.sub(lambda m: m.group("head") + "<redacted>", value)
    return value


def _embedded_json(value: str) -> Any:
    """A JSON object or array written as a string value (``'{"keys": [...]}'``), else None."""
    if not value.lstrip().startswith(("{", "[")):
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    return parsed if isinstance(parsed, (dict, list)) else None


def did_you_mean(key: str, candidates: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=0.7)
    return f"; did you mean `{close[0]}`?" if close else ""


def _field_names(model: type[BaseModel], seen: set[type] | None = None) -> set[str]:
    """Every key a model and its nested models accept (candidates for "did you mean")."""
    seen = seen if seen is not None else set()
    if model in seen:
        return set()
    seen.add(model)
    names = set(model.model_fields)
    for info in model.model_fields.values():
        stack = [info.annotation]
        while stack:
            annotation = stack.pop()
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                names |= _field_names(annotation, seen)
            stack.extend(getattr(annotation, "__args__", ()))
    return names


def apply_environment(data: dict[str, Any], marks: dict[KeyPath, Mark], known: set[str],
                      environ: dict[str, str] | None = None) -> dict[KeyPath, str]:
    """Set scalar keys from ``AUTHGW_...`` variables (containers configure by environment).

    ``AUTHGW_DEADLINE=3`` sets ``deadline``; ``AUTHGW_LDAP__RECEIVE_TIMEOUT=2`` sets
    ``ldap.receive_timeout``. Only variables whose first level is in *known* (core settings and
    installed plugins) are taken: others, like ``AUTHGW_CONFIG`` or a secret referenced with
    ``{env: AUTHGW_LDAP_PASSWORD}``, are not configuration keys. Returns what was set, by key path.
    """
    environ = os.environ if environ is None else environ
    problems, applied = [], {}
    for name in sorted(environ):
        if not name.startswith("AUTHGW_"):
            continue
        path = tuple(part.lower() for part in name[len("AUTHGW_"):].split("__"))
        if path[0] not in known or not all(path):
            continue
        where = f"${name}"
        target = data
        for part in path[:-1]:
            if not isinstance(target.get(part, {}), dict):
                problems.append(f"{where}: {format_path(path)}: {format_path(path[:-1])} is not a mapping")
                break
            target = target.setdefault(part, {})
        else:
            if isinstance(target.get(path[-1]), dict):
                problems.append(f"{where}: {format_path(path)}: is a mapping; the environment sets scalar "
                                "keys only (use AUTHGW_A__B for a.b)")
                continue
            target[path[-1]] = parse_scalar(environ[name])
            marks[path] = Mark(where, 0)
            applied[path] = name
    if problems:
        raise ConfigError(problems)
    return applied


def locate(marks: dict[KeyPath, Mark], path: KeyPath, message: str, fallback: str) -> str:
    """Prefix *message* with the ``file:line`` of the closest key path that has a mark."""
    for end in range(len(path), 0, -1):
        mark = marks.get(path[:end])
        if mark:
            return f"{mark}: {message}"
    return f"{fallback}: {message}"


def validate(model: type[M], data: Any, prefix: KeyPath, marks: dict[KeyPath, Mark],
             context: ValidationContext, fallback: str) -> M:
    """Validate *data* into *model*, or raise :class:`ConfigError` listing every problem as
    ``file:line: key.path: message``. Warnings found while validating are logged."""
    try:
        result = model.model_validate(data, context=context)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False, include_input=False):
            path = (*prefix, *_key_path(data, error["loc"]))
            blamed = (error.get("ctx") or {}).get("error")
            if isinstance(blamed, InvalidKeys):  # several cross-field problems: one error each
                for problem in blamed.problems:
                    key = problem.key.split(".") if isinstance(problem, InvalidKey) else []
                    where = (*path, *(int(k) if k.isdigit() else k for k in key))
                    problems.append(locate(marks, where, f"{format_path(where)}: {problem}", fallback))
                continue
            if isinstance(blamed, InvalidKey):  # a cross-field check naming the key at fault
                path = (*path, *(int(k) if k.isdigit() else k for k in blamed.key.split(".")))
            message = _MESSAGES.get(error["type"], error["msg"])
            message = message.removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message += did_you_mean(str(path[-1]), _field_names(model))
            problem = locate(marks, path, f"{format_path(path)}: {message}", fallback)
            if problem not in problems:  # each member of a union said it at the same key
                problems.append(problem)
        raise ConfigError(problems) from None
    finally:
        for message, _where in context.warnings:
            log.warning("%s", message)
        context.warnings.clear()
    return result


def _key_path(data: Any, loc: tuple[str | int, ...]) -> KeyPath:
    """The keys and list indexes of *data* that pydantic's *loc* names, without the names it
    puts between them for the members of a union: ``trusted_proxies[0].lax-or-strict[lax=function-
    plain[ip_v4_network_validator()],...]`` was the key an error named (review of the
    configuration). A name under a value that is not a mapping, one no key can be (brackets), or
    one followed by a key of the mapping it is not in, is such a name."""
    path: list[str | int] = []
    node: Any = data
    for index, part in enumerate(loc):
        member = isinstance(part, str) and ("[" in part or "(" in part)
        if isinstance(node, dict) and isinstance(part, str):
            if part in node:
                node = node[part]
                path.append(part)
                continue
            following = loc[index + 1] if index + 1 < len(loc) else None
            if member or (isinstance(following, str) and following in node):
                continue
            path.append(part)  # a key not written: one that is missing, a default refused
            node = _ABSENT
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            path.append(part)
        elif node is _ABSENT and not member:
            path.append(part)
        # else: a union member's name, or a name under a value: no key of the file
    return tuple(path)


_ABSENT = object()


def load_yaml_file(path: Path, model: type[M], context: ValidationContext) -> M:
    """Read one YAML file strictly and validate it into *model* (for files a plugin owns)."""
    marks: dict[KeyPath, Mark] = {}
    data = load_file(path, marks)
    return validate(model, data, (), marks, context, display_name(path))


def load_config(directory: Path, installed: set[str] | None = None, *, defer: bool = False,
                paths_from: Path | None = None) -> Config:
    """Read *directory*, apply ``AUTHGW_...`` overrides and validate the core settings. *paths_from*:
    the real conf.d when *directory* is a copy of it (relative paths that lead out start there)."""
    insecure: list[str] = []  # strict: conf.d's permission problems, raised with the settings' (Config)
    data, marks, files = load_directory(directory, insecure=insecure)
    known = set(GatewaySettings.model_fields) | (installed or set()) | {k for k in data if isinstance(data[k], dict)}
    environment = apply_environment(data, marks, known)
    return Config(directory=directory, data=data, marks=marks, files=files, installed=installed,
                  environment=environment, defer=defer, problems=insecure, paths_from=paths_from)
