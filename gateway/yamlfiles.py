"""Reading ``conf.d/*.yaml`` strictly, keeping where every key was written.

PyYAML's default loaders follow YAML 1.1: ``yes`` becomes ``True``, ``0636`` becomes 414,
``12:30`` becomes 750 and a key written twice silently keeps the last value. For a security
product's configuration each of those is a trap, so this loader resolves only ``true``/``false``,
``null``/``~``, plain decimal integers and floats; everything else stays a string, a duplicate
key is an error, and the line of every key and list item is kept for error messages.

What a file may make the loader do is bounded, since a file can be edited by mistake or by
someone else (the users file is re-read while serving): aliases (``*name``) are refused, so a
"billion laughs" file cannot expand into gigabytes (no shipped or documented configuration uses
them), nesting deeper than :data:`MAX_DEPTH` is refused before Python's recursion limit is
reached, and every failure of the YAML layer (a control character, a number too long to convert)
is a :class:`ConfigError` naming the file and line, never a traceback.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.errors import ConfigError

__all__ = ["KeyPath", "Mark", "display_name", "format_path", "load_directory", "load_file", "parse_scalar",
           "referenced_paths", "unread_files"]

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Mark:
    file: str
    line: int

    def __str__(self) -> str:
        # Line 0: not from a file (an AUTHGW_... environment variable).
        return f"{self.file}:{self.line}" if self.line else self.file


#: Deepest nesting of mappings and lists a file may have, the top level's included (conf.d needs
#: about 6).
MAX_DEPTH = 32


class _Refused(yaml.MarkedYAMLError):
    """A construct this loader does not accept; ``problem`` says what to do, at ``problem_mark``."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2-core-like implicit typing and nothing more; no aliases, and
    nesting bounded by :data:`MAX_DEPTH`."""

    yaml_implicit_resolvers: dict[str, list[tuple[str, re.Pattern[str]]]] = {}
    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            # The alias's name is not shown: it may be a password that starts with `*`.
            raise _Refused(problem="a YAML alias (a value that starts with `*`), and aliases are not expanded in "
                                   "authgw's files; write the value out (or quote a value that starts with `*`)",
                           problem_mark=event.start_mark)
        event = self.peek_event()
        if getattr(event, "tag", None) is not None:
            # Nor the tag's text: it may be a password that starts with `!`.
            raise _Refused(problem="a YAML tag (a value that starts with `!`), and tags are not read in authgw's "
                                   "files; quote a value that starts with `!`", problem_mark=event.start_mark)
        if not self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise _Refused(problem=f"nested more than {MAX_DEPTH} levels deep", problem_mark=self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


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


def parse_scalar(text: str) -> Any:
    """*text* typed as this loader types a plain scalar (``true``, ``3``, ``1.5``, else a string)."""
    loader = _StrictLoader("")
    try:
        tag = loader.resolve(yaml.ScalarNode, text, (True, False))
        return loader.construct_object(yaml.ScalarNode(tag, text), deep=True)
    finally:
        loader.dispose()


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
    loader = None
    try:
        loader = _StrictLoader(text)  # checks every character: may raise ReaderError
        node = loader.get_single_node()
        if node is None:
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"{name}:{node.start_mark.line + 1}: the top level must be a mapping of keys")
        return _construct(loader, node, (), name, marks)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(_yaml_problem(name, text, exc)) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else 1
        key = _key_at(text, line)
        code = exc.character if isinstance(exc.character, int) else 0
        raise ConfigError(f"{name}:{line}: {key + ': ' if key else ''}a character YAML does not allow "
                          f"(U+{code:04X}, a control character?); remove it") from None
    except yaml.YAMLError as exc:  # any other failure of the YAML layer: still a config error
        raise ConfigError(f"{name}: invalid YAML: {_unquoted(str(exc))}") from None
    except RecursionError:  # not expected (MAX_DEPTH is far below the limit), never a traceback
        raise ConfigError(f"{name}: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


#: PyYAML's parser messages, said the way an operator fixes them: (context, problem start) -> text,
#: and whether the mistake is at the context's line (an unclosed bracket or quote) or the problem's.
_YAML_HINTS: list[tuple[str, str, str, bool]] = [
    ("flow sequence", "", "a `[` list is not closed with `]` on this line (or an item holds an unquoted `:`)", True),
    ("flow mapping", "", "a `{` mapping is not closed with `}` on this line (or a value holds an unquoted `:`)", True),
    ("quoted scalar", "", "a quoted value is not closed (a quote inside it? write '' in single quotes)", True),
    ("", "mapping values are not allowed", "a value holds an unquoted `: `, or a key is indented under a value; "
                                           "quote the value or fix the indentation", False),
    ("", "found character '\\t'", "a tab character: YAML indents with spaces only", False),
    ("", "found character", "a value starts with a character YAML reserves (@ ` % | >); quote the value", False),
    ("", "found undefined alias", "`*` starts a YAML alias; quote a value that starts with `*`", False),
    ("block mapping", "expected <block end>", "the indentation does not match the keys above, or a quoted "
                                             "value is followed by more text", False),
    ("block collection", "expected <block end>", "a list item's indentation does not match the items above", False),
]


def _key_at(text: str, line: int) -> str:
    """The dotted key path that holds *line* (1-based), from indentation alone: used when the YAML
    cannot be parsed, so no node is available to name the key."""
    lines = text.splitlines()[:line]
    path: list[tuple[int, str]] = []
    for raw in lines:
        match = re.match(r"^( *)(?:- +)?([A-Za-z_][\w.-]*)\s*:(\s|$)", raw)
        if not match:
            continue
        indent = len(match.group(1))
        while path and path[-1][0] >= indent:
            path.pop()
        path.append((indent, match.group(2)))
    return ".".join(key for _, key in path)


def _yaml_problem(name: str, text: str, exc: yaml.MarkedYAMLError) -> str:
    """Rewrite a PyYAML error as ``file:line: key: what to fix`` at the line of the mistake."""
    context, problem = exc.context or "", exc.problem or ""
    if isinstance(exc, _Refused):
        line = exc.problem_mark.line + 1 if exc.problem_mark else 1
        key = _key_at(text, line)
        return f"{name}:{line}: {key + ': ' if key else ''}{problem}"
    for in_context, starts, hint, at_context in _YAML_HINTS:
        if in_context in context and problem.startswith(starts):
            mark = exc.context_mark if at_context and exc.context_mark else exc.problem_mark or exc.context_mark
            break
    else:
        # PyYAML's own words, with what they quote of the file taken out: a tag, an escape or a
        # character it stopped at may be part of a password written there.
        hint = f"invalid YAML: {_unquoted(problem or context)}"
        mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark else 1
    key = _key_at(text, line)
    return f"{name}:{line}: {key + ': ' if key else ''}{hint}"


def _unquoted(message: str) -> str:
    """*message* without what it quotes (``'...'`` or ``"..."``: text of the file)."""
    return re.sub(r"'.*'|\".*\"", "(not shown)", message)


def _construct(loader: _StrictLoader, node: yaml.Node, path: KeyPath, name: str, marks: dict[KeyPath, Mark]) -> Any:
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            key = _scalar(loader, key_node, path, name) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                shown = repr(key) if isinstance(key_node, yaml.ScalarNode) else "a list or mapping"
                raise ConfigError(f"{name}:{line}: {format_path(path)}: keys must be strings, not {shown}")
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
    return _scalar(loader, node, path, name)


def _scalar(loader: _StrictLoader, node: yaml.Node, path: KeyPath, name: str) -> Any:
    try:
        value = loader.construct_object(node, deep=True)
    except ValueError as exc:  # int() of a number longer than Python converts
        raise ConfigError(f"{name}:{node.start_mark.line + 1}: {format_path(path)}: not a usable value: {exc}") from None
    if isinstance(value, str) and not value.isascii() and _SURROGATE.search(value):
        # "\ud83d\ude00" is how JSON-style writers escape one character (an emoji): PyYAML
        # leaves the two halves apart, joined here. A half alone is no character: nothing can
        # write it as UTF-8 (a header, a log line, an XML assertion), and a user's name holding
        # one reset every answer of their logins (review of the front door).
        value = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
        if not _SURROGATE.search(value):
            return value
        raise ConfigError(f"{name}:{node.start_mark.line + 1}: {format_path(path)}: not text: a lone surrogate "
                          "escape (\\uD800-\\uDFFF); write the character itself, or its \\U escape")
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


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


#: Left behind by editors and package managers; reported as "not read", never read.
_BACKUP = re.compile(r"(~|\.(bak|orig|old|save|swp|rej|dpkg-\w+|rpm\w+|ucf-\w+))$")


def unread_files(directory: Path, referenced: set[Path] = frozenset()) -> tuple[list[str], list[str]]:
    """Files of *directory* that are not read, as ``(errors, warnings)``.

    ``*.yml`` is an error, not silently skipped: it is surely meant as configuration, and running
    without it (an LDAP section missing) is worse than not starting. Anything else that is not a
    dot-file (``ldap.yaml.bak``, ``notes.txt``) is a warning, so a renamed-away file is visibly off.
    Files a setting names (*referenced*, resolved: a users file, a keytab) are a plugin's, not
    configuration, and are not reported.
    """
    errors, warnings = [], []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix == ".yaml":
            continue
        if path.resolve() in referenced:
            continue
        name = display_name(path)
        if path.suffix == ".yml":
            errors.append(f"{name}: not read: configuration files end in `.yaml`; rename it to "
                          f"{path.with_suffix('.yaml').name}")
        else:
            kind = "a backup" if _BACKUP.search(path.name) else "not `*.yaml`"
            warnings.append(f"{name}: not read ({kind}); only `*.yaml` files of "
                            f"{display_name(directory)} are configuration")
    return errors, warnings


def referenced_paths(data: Any, directory: Path) -> set[Path]:
    """Every string value of *data* taken as a path (relative ones from *directory*), resolved."""
    found: set[Path] = set()
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str) and value and "\0" not in value and len(value) < 4096:
            try:
                found.add((directory / os.path.expanduser(value)).resolve())
            except (OSError, RuntimeError, ValueError):
                pass
    return found


def load_directory(directory: Path) -> tuple[dict[str, Any], dict[KeyPath, Mark], list[Path]]:
    """Read and merge every ``*.yaml`` file of *directory* in lexical order.

    Dot-files and sub-directories are skipped; other files are reported by :func:`unread_files`.
    Returns the merged data, the mark of every key path, and the files read. Every file's
    problems are collected before raising, so one run shows them all.
    """
    if not directory.is_dir():
        raise ConfigError(f"{display_name(directory)}: configuration directory not found")
    files = sorted(p for p in directory.iterdir() if p.suffix == ".yaml" and not p.name.startswith(".") and p.is_file())
    merged: dict[str, Any] = {}
    marks: dict[KeyPath, Mark] = {}
    problems: list[str] = []
    for path in files:
        file_marks: dict[KeyPath, Mark] = {}
        try:
            data = load_file(path, file_marks)
            _merge(merged, data, (), marks, file_marks)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return merged, marks, files
