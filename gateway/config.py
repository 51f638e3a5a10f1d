"""The merged ``conf.d`` configuration, validated against typed settings models.

Layout and merge rules (also in docs/configuration.md):

* every ``*.yaml`` file of the directory is read in lexical order; dot-files and other suffixes
  are ignored;
* top-level keys are the core's settings (:class:`~gateway.settings.GatewaySettings`) and one
  key per plugin name, holding that plugin's settings (by convention in ``<plugin>.yaml``);
* mappings merge key by key across files; a list or a value set in two files is an error naming
  both places (no silent override);
* settings for a plugin that is installed but not enabled are ignored with a warning; a
  top-level key that is neither a core setting nor an installed plugin is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from gateway.errors import ConfigError
from gateway.settings import GatewaySettings, ValidationContext
from gateway.yamlfiles import KeyPath, Mark, display_name, format_path, load_directory, load_file

__all__ = ["Config", "load_config", "load_yaml_file", "validate"]

log = logging.getLogger("authgw.config")

M = TypeVar("M", bound=BaseModel)

_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
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
    core: GatewaySettings = field(init=False)
    context: ValidationContext = field(init=False)

    def __post_init__(self) -> None:
        strict = self.data.get("strict") is True
        self.context = ValidationContext(config_dir=self.directory, strict=strict)
        core_keys = set(GatewaySettings.model_fields)
        core_data = {k: v for k, v in self.data.items() if k in core_keys}
        if "chain" not in core_data:
            raise ConfigError(f"{display_name(self.directory)}: no file sets `chain:` (the list of "
                              "authentication steps, in order); see docs/configuration.md")
        problems = self._unknown_top_level() if self.installed is not None else []
        try:
            self.core = self.validate(GatewaySettings, core_data, ())
        except ConfigError as exc:
            raise ConfigError(problems + exc.problems) from None
        if problems:
            raise ConfigError(problems)

    @property
    def enabled(self) -> list[str]:
        """Every plugin the operator enabled: chain steps first, in order, then ``plugins:``."""
        return [*self.core.chain, *self.core.plugins]

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
                                                f"installed plugin; see `authgw plugins`)"))
        return problems

    def redacted(self) -> dict[str, Any]:
        """The merged configuration as shown by ``authgw config show``.

        Secrets are references by construction; any other value that looks like an inline secret
        (a key named like a password or token) is masked anyway.
        """
        return _redact(self.data)


_SECRET_WORDS = {"password", "passwd", "secret", "token", "credential"}


def _redact(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        if set(value) in ({"env"}, {"file"}):
            return dict(value)  # a reference is not the secret
        return {k: _redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, key) for v in value]
    if isinstance(value, str) and _SECRET_WORDS & set(key.lower().split("_")):
        return "<redacted>"
    return value


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
            path = (*prefix, *error["loc"])
            message = _MESSAGES.get(error["type"], error["msg"])
            message = message.removeprefix("Value error, ")
            problems.append(locate(marks, path, f"{format_path(path)}: {message}", fallback))
        raise ConfigError(problems) from None
    finally:
        for message, _where in context.warnings:
            log.warning("%s", message)
        context.warnings.clear()
    return result


def load_yaml_file(path: Path, model: type[M], context: ValidationContext) -> M:
    """Read one YAML file strictly and validate it into *model* (for files a plugin owns)."""
    marks: dict[KeyPath, Mark] = {}
    data = load_file(path, marks)
    return validate(model, data, (), marks, context, display_name(path))


def load_config(directory: Path, installed: set[str] | None = None) -> Config:
    data, marks, files = load_directory(directory)
    return Config(directory=directory, data=data, marks=marks, files=files, installed=installed)
