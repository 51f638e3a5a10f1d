"""Reading ``conf.d/*.yaml`` strictly, keeping where every key was written.

PyYAML's default loaders follow YAML 1.1: ``yes`` becomes ``True``, ``0636`` becomes 414,
``12:30`` becomes 750 and a key written twice silently keeps the last value. For a security
product's configuration each of those is a trap, so this loader resolves only ``true``/``false``,
``null``/``~``, plain decimal integers and floats; everything else stays a string, a duplicate
key is an error, and the line of every key and list item is kept for error messages.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.errors import ConfigError

__all__ = ["KeyPath", "Mark", "display_name", "format_path", "load_directory", "load_file"]

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Mark:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2-core-like implicit typing and nothing more."""

    yaml_implicit_resolvers: dict[str, list[tuple[str, re.Pattern[str]]]] = {}


def _resolver(tag: str, pattern: str, first: str) -> None:
    _StrictLoader.add_implicit_resolver(tag, re.compile(pattern, re.X), list(first))


_resolver("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF")
_resolver("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""])
# No leading zeros (so 0636 stays the string "0636"), no underscores, no base prefixes.
_resolver("tag:yaml.org,2002:int", r"^[-+]?(?:0|[1-9][0-9]*)$", "-+0123456789")
_resolver(
    "tag:yaml.org,2002:float",
    r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$",
    "-+0123456789.",
)


def display_name(path: Path) -> str:
    """A file name as the operator typed it: relative to the working directory when inside it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def format_path(path: KeyPath) -> str:
    """``("ldap", "servers", 0, "url")`` -> ``ldap.servers[0].url``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def load_file(path: Path, marks: dict[KeyPath, Mark]) -> dict[str, Any]:
    name = display_name(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: cannot read: {exc}") from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"{name}:{node.start_mark.line + 1}: the top level must be a mapping of keys")
        return _construct(loader, node, (), name, marks)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{name}{line}: invalid YAML: {exc.problem or exc.context}") from None
    finally:
        loader.dispose()


def _construct(loader: _StrictLoader, node: yaml.Node, path: KeyPath, name: str, marks: dict[KeyPath, Mark]) -> Any:
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise ConfigError(f"{name}:{line}: {format_path(path)}: keys must be strings, not {key!r}")
            key_path = (*path, key)
            if key in result:
                first = marks[key_path]
                raise ConfigError(
                    f"{name}:{line}: {format_path(key_path)}: duplicate key (first set at line {first.line})"
                )
            marks[key_path] = Mark(name, line)
            result[key] = _construct(loader, value_node, key_path, name, marks)
        return result
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            marks[(*path, index)] = Mark(name, item.start_mark.line + 1)
            items.append(_construct(loader, item, (*path, index), name, marks))
        return items
    return loader.construct_object(node, deep=True)


def _merge(into: dict[str, Any], new: dict[str, Any], path: KeyPath, marks: dict[KeyPath, Mark],
           new_marks: dict[KeyPath, Mark]) -> None:
    """Merge rule: mappings merge key by key, recursively; any other value may be set once."""
    for key, value in new.items():
        key_path = (*path, key)
        if key not in into:
            into[key] = value
            continue
        if isinstance(into[key], dict) and isinstance(value, dict):
            _merge(into[key], value, key_path, marks, new_marks)
            continue
        raise ConfigError(
            f"{new_marks[key_path]}: {format_path(key_path)}: already set at {marks[key_path]}; "
            "a key may be set in one file only (mappings merge, lists and values do not)"
        )
    for key_path, mark in new_marks.items():
        marks.setdefault(key_path, mark)


def load_directory(directory: Path) -> tuple[dict[str, Any], dict[KeyPath, Mark], list[Path]]:
    """Read and merge every ``*.yaml`` file of *directory* in lexical order.

    Dot-files and other suffixes are skipped. Returns the merged data, the mark of every key path,
    and the files read.
    """
    if not directory.is_dir():
        raise ConfigError(f"{display_name(directory)}: configuration directory not found")
    files = sorted(p for p in directory.iterdir() if p.suffix == ".yaml" and not p.name.startswith(".") and p.is_file())
    merged: dict[str, Any] = {}
    marks: dict[KeyPath, Mark] = {}
    for path in files:
        file_marks: dict[KeyPath, Mark] = {}
        data = load_file(path, file_marks)
        _merge(merged, data, (), marks, file_marks)
    return merged, marks, files
