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
reached, every failure of the YAML layer (a control character, a number too long to convert)
is a :class:`ConfigError` naming the file and line, never a traceback, and a file larger than
:data:`MAX_CONFD_BYTES` (conf.d) or :data:`MAX_FILE_BYTES` (a users file) is refused before it
is read (a 28 MB conf.d file took 95 s and 1.4 GB to check).

What conf.d is made of is checked too (review of the core): every ``*.yaml`` entry must be a
regular file (a dangling symlink dropped a lockout policy without a word), and conf.d and its
``*.yaml`` files must be writable by their owner alone and owned by root or the user authgw
runs as (sshd's ``StrictModes``): whoever can write them decides who logs in. That is a warning,
and an error with ``strict: true``. The write bits do not count on a read-only mount (a
Kubernetes ConfigMap volume), where nobody can write.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from gateway.errors import ConfigError

__all__ = ["KeyPath", "Mark", "display_name", "foreign_owner", "format_path", "load_directory", "load_file",
           "read_regular", "reading_hook",
           "owner_of", "parse_scalar", "referenced_paths", "unread_files"]

KeyPath = tuple[str | int, ...]

log = logging.getLogger("authgw.config")


@dataclass(frozen=True, slots=True)
class Mark:
    file: str
    line: int

    def __str__(self) -> str:
        # Line 0: not from a file (an AUTHGW_... environment variable).
        return f"{self.file}:{self.line}" if self.line else self.file


#: Told the name of each file as it is looked at or read, and None once that is done (nothing
#: when None). The process reading conf.d for a reload tells its master (gateway/supervisor.py),
#: so that a read that never ends (a file on a network mount whose server died: its ``stat``
#: may answer, its read does not) is named in the log, not waited on without a word.
reading_hook: Callable[[str | None], None] | None = None


def _reading(name: str | None) -> None:
    if reading_hook is not None:
        reading_hook(name)


#: Deepest nesting of mappings and lists a file may have, the top level's included (conf.d needs
#: about 6).
MAX_DEPTH = 32

#: Largest ``conf.d/*.yaml`` file read: the biggest real one (a long ``api_tokens`` list) is some
#: kilobytes; parsing costs about 50 times a file's size in memory and 3 s per MB.
MAX_CONFD_BYTES = 16 << 20
#: Largest file :func:`load_file` reads otherwise (the static users file: 100,000 users with
#: argon2id hashes and a few groups are about 15 MB).
MAX_FILE_BYTES = 64 << 20


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
    except ValueError:  # an int of more digits than Python converts: the text, which validation refuses
        return text
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


def read_regular(path: Path, name: str, max_bytes: int, checked: os.stat_result | None = None) -> bytes:
    """*path*'s bytes, if it is a regular file of at most *max_bytes* (:func:`_read_text`);
    else :class:`ConfigError` naming *name* (its text holds none of the file's bytes)."""
    _reading(name)
    try:
        return _read_regular(path, name, max_bytes, checked)
    finally:
        _reading(None)


def _read_regular(path: Path, name: str, max_bytes: int, checked: os.stat_result | None) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc}") from None
    try:  # the type is checked before a file object is made (a directory: no fd left open)
        info = os.fstat(fd)
        if checked is not None and (info.st_dev, info.st_ino) != (checked.st_dev, checked.st_ino):
            raise ConfigError(f"{name}: not read: replaced by another file while it was checked; if that was "
                              "an update, run again")
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{name}: not read: {_kind(info.st_mode)}, not a regular file")
        if info.st_size > max_bytes:
            raise ConfigError(f"{name}: not read: {info.st_size:,} bytes, more than the {_size(max_bytes)} a file "
                              "may have here")
        chunks, size = [], 0
        while size <= max_bytes:
            try:
                chunk = os.read(fd, max_bytes + 1 - size)
            except OSError as exc:
                raise ConfigError(f"{name}: cannot read: {exc}") from None
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > max_bytes:  # grew since fstat
        raise ConfigError(f"{name}: not read: more than the {_size(max_bytes)} a file may have here")
    return b"".join(chunks)


def _read_text(path: Path, name: str, max_bytes: int, checked: os.stat_result | None = None) -> str:
    """*path*'s text, if it is a regular file of at most *max_bytes*: both checked on the opened
    file (``fstat``) before anything is read. Opened non-blocking, so a FIFO is refused, not
    waited on. Newlines as ``Path.read_text`` gives them (universal newlines). With *checked*
    (the ``stat`` its permissions were judged by), the file opened must be that very file: one
    put in its place between the check and the reading (a rename over it, a symlink swapped) is
    refused, not read unchecked."""
    data = read_regular(path, name, max_bytes, checked)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # where, not the bytes (the file may hold a secret)
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise ConfigError(f"{name}:{line}: not UTF-8 (column {column}); save the file as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _size(count: int) -> str:
    return f"{count >> 20} MiB" if count and not count % (1 << 20) else f"{count:,} bytes"


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a file"


def load_file(path: Path, marks: dict[KeyPath, Mark], max_bytes: int = MAX_FILE_BYTES,
              checked: os.stat_result | None = None) -> dict[str, Any]:
    """Read one YAML file strictly (see the module docstring): a mapping, with the mark of every
    key path added to *marks*. A file larger than *max_bytes* is refused unread; with *checked*,
    so is any file but the one that ``stat`` describes (:func:`_read_text`)."""
    name = display_name(path)
    text = _read_text(path, name, max_bytes, checked)
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
    except (ValueError, OverflowError):
        # PyYAML's scanner converts as it reads: `"\U0011FFFF"` (chr() of no character) and a
        # `%YAML` version of 5,000 digits (int()) raised out of the loader, a traceback for
        # `config check` and a reload refused without file or line (review of the configuration).
        line = loader.line + 1 if loader is not None else 1
        key = _key_at(text, line)
        raise ConfigError(f"{name}:{line}: {key + ': ' if key else ''}not a usable value: a `\\U` escape "
                          "above \\U0010FFFF (no character), or a number too long to convert") from None
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
        if path.name.startswith(".") or path.suffix == ".yaml":
            continue  # *.yaml: load_directory's, whatever it is
        if path.suffix != ".yml" and not path.is_file():
            continue  # a sub-directory; a `*.yml` is an error even as a dangling link
        if _resolved(path) in referenced:
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


def _resolved(path: Path) -> Path | None:
    """*path* resolved, or None for a symbolic link loop (``x.yml -> x.yml``: a traceback from
    every command before)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return None


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


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


def owner_of(uid: int) -> str:
    """``nobody (uid 65534)``, or ``uid 65534`` when the user has no name."""
    name = _user_name(uid)
    return f"{name} (uid {uid})" if name else f"uid {uid}"


def foreign_owner(uid: int, shown: str) -> tuple[str, str] | None:
    """For a file (*shown*: its name) owned by *uid*: ``None`` when that is root or the user
    authgw runs as, else who owns it, who should, and the ``chown`` that makes it so."""
    euid = os.geteuid()
    if uid in (0, euid):
        return None
    if euid == 0:
        return f"belongs to {owner_of(uid)}, not to root, the user authgw runs as", f"chown root {shown}"
    return (f"belongs to {owner_of(uid)}, neither to root nor to {owner_of(euid)}, the user authgw runs as",
            f"chown root {shown} (or chown {_user_name(euid) or euid} {shown})")


def _read_only(path: Path) -> bool:
    """Whether *path* (a symlink's target) is on a file system mounted read-only."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _insecure(path: Path, info: os.stat_result, what: str) -> list[str]:
    """What is wrong with *path* (*info*: its ``stat``, symlinks followed) holding configuration:
    writable by group or others, or owned by someone but root and the user authgw runs as
    (sshd's ``StrictModes``). Each problem says how to fix it.

    The write bits are not judged on a read-only file system: nobody can write the path there,
    and ``chmod`` is impossible. A Kubernetes ConfigMap or Secret volume is mounted read-only
    with its directory 0777 (review of the core: ``config check`` with strict failed on every
    such mount, and every start warned)."""
    problems = []
    name = display_name(path)
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022 and not _read_only(path):
        problems.append(f"{name}: {what} is writable by group or others (mode {mode:o}): whoever can write it "
                        f"decides who logs in; chmod go-w {name}")
    foreign = foreign_owner(info.st_uid, name)
    if foreign:
        owner, fix = foreign
        problems.append(f"{name}: {what} {owner}: its owner decides who logs in; {fix}")
    return problems


#: The permission warnings last logged for each path (by this process): a reload or a console page
#: that loads the same conf.d again does not repeat them; a changed or new problem is logged.
_warned: dict[str, str] = {}


def _warn(path: Path, problems: list[str]) -> None:
    key = str(path)
    text = "\n".join(problems)
    if not problems:
        _warned.pop(key, None)
        return
    if _warned.get(key) == text:
        return
    if len(_warned) >= 1024:  # validation copies in temporary directories (the console's)
        _warned.clear()
    _warned[key] = text
    for problem in problems:
        log.warning("%s (an error with `strict: true`)", problem)


def _strict(data: dict[str, Any]) -> bool:
    """Whether ``strict`` is on, as :class:`gateway.config.Config` will see it: ``AUTHGW_STRICT``
    (applied over conf.d) or else the merged files' ``strict:``; only ``true`` is on."""
    if "AUTHGW_STRICT" in os.environ:
        return parse_scalar(os.environ["AUTHGW_STRICT"]) is True
    return data.get("strict") is True


def load_directory(directory: Path, *, insecure: list[str] | None = None,
                   ) -> tuple[dict[str, Any], dict[KeyPath, Mark], list[Path]]:
    """Read and merge every ``*.yaml`` file of *directory* in lexical order.

    Dot-files and sub-directories (not named ``*.yaml``) are skipped; other files are reported by
    :func:`unread_files`. A ``*.yaml`` entry that is not a readable regular file (a dangling symlink, a directory, a
    FIFO) is an error: running without what it was meant to set is worse than not starting.
    The directory and every ``*.yaml`` file (a symlink's target) are checked with
    :func:`_insecure`: warned about, and errors when ``strict`` is on.

    Returns the merged data, the mark of every key path, and the files read. The problems found
    here (every file's, and with ``strict`` the permission problems, those first) are collected
    and raised together, so one run shows them all. With *insecure* (a list), the permission
    problems of a conf.d whose files all read are put there instead of raised: the caller
    (:func:`gateway.config.load_config`) raises them with the settings' own problems, which a
    strict ``config check`` otherwise showed only in the next run, once the modes were fixed.
    """
    try:
        dir_info = directory.stat()
    except OSError:
        dir_info = None
    if dir_info is None or not stat.S_ISDIR(dir_info.st_mode):
        raise ConfigError(f"{display_name(directory)}: configuration directory not found")
    merged: dict[str, Any] = {}
    marks: dict[KeyPath, Mark] = {}
    problems: list[str] = []
    files: list[Path] = []
    unsafe: dict[Path, list[str]] = {directory: _insecure(directory, dir_info, "the configuration directory")}
    for path in sorted(p for p in directory.iterdir() if p.suffix == ".yaml" and not p.name.startswith(".")):
        name = display_name(path)
        _reading(name)  # a stat on a dead network mount waits too
        try:
            info = path.stat()  # the target of a symlink; never opened here (a FIFO would block)
        except OSError as exc:
            _reading(None)
            if path.is_symlink():
                problems.append(f"{name}: not read: a symlink to {os.readlink(path)}, which cannot be reached "
                                f"({exc.strerror}); a `*.yaml` file that is not there is an error, not skipped")
            else:
                problems.append(f"{name}: cannot read: {exc.strerror}")
            continue
        _reading(None)
        if not stat.S_ISREG(info.st_mode):
            problems.append(f"{name}: not read: {_kind(info.st_mode)}, not a regular file; every `*.yaml` entry "
                            "of conf.d must be a configuration file (rename it, or move it out)")
            continue
        # A symlink (config management, a secrets mount): its target is checked, not the link
        # (whose own mode Linux ignores) nor the directories on the way.
        what = f"the file it links to, {os.path.realpath(path)}," if path.is_symlink() else "a configuration file"
        unsafe[path] = _insecure(path, info, what)
        files.append(path)
        file_marks: dict[KeyPath, Mark] = {}
        try:
            data = load_file(path, file_marks, MAX_CONFD_BYTES, checked=info)  # the file judged, or none
            _merge(merged, data, (), marks, file_marks)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if _strict(merged):
        found_unsafe = [problem for found in unsafe.values() for problem in found]
        if insecure is not None and not problems:
            insecure.extend(found_unsafe)
        else:
            problems[:0] = found_unsafe
    else:
        for path, found in unsafe.items():
            _warn(path, found)
    if problems:
        raise ConfigError(problems)
    return merged, marks, files
