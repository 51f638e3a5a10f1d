"""The set-up steps: enrol a ticket URL, and write the directory settings into conf.d.

The directory step turns the form into an ``ldap:`` section, writes it as
``conf.d/50-console.yaml`` (the password into a 0600 file beside it, referenced with
``{file:}``) in a **temporary copy** of conf.d, and validates that copy exactly as
``authgw config check`` does (:func:`gateway.runtime.build_runtime`). Only a valid copy is moved
into place; otherwise the form shows the same ``file:line`` messages, with the real directory's
name, and nothing on disk has changed. The copy follows symlinks (``conf.d/console`` may be one):
a file written into it never lands in the real directory. When ``ldap`` is not in ``chain:`` yet
and ``chain:`` is a one-line list, ``ldap`` is put first in it (the only edit outside the
console's own file); any other shape is left to the operator with a message naming the line.

One save at a time, across workers (an exclusive ``flock`` on ``<state_dir>/console-save.lock``
from the check to the last file written). A save changes all its files or none
(:func:`_put_in_place`): every new file is first written and synced to a temporary file of its
own beside its target, and only then are they renamed into place — the secrets and
``50-console.yaml`` before the chain edit, so that each step leaves a configuration that loads
(an ``ldap:`` section outside the chain is ignored; a chain naming ``ldap`` without one is not).
A write that fails puts back what was already renamed, from a link to each replaced file kept
until the end, and the form names the path and the error. A symlinked file (``gateway.yaml`` ->
elsewhere) is written through: the link stays and its target changes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from gateway.config import load_config
from gateway.errors import AuthgwError, ConfigError
from gateway.files import write_beside
from gateway.http.protocol import MAX_BODY
from gateway.settings import shown_url
from gateway.yamlfiles import display_name, parse_scalar

__all__ = ["CONSOLE_FILE", "DirectoryForm", "can_reload", "current_directory", "enrol", "reload_gateway",
           "save_directory"]

CONSOLE_FILE = "50-console.yaml"
SECRETS_DIR = "console"  # below conf.d: the bind password and an uploaded CA
PASSWORD_FILE = f"{SECRETS_DIR}/ldap-bind-password"
CA_FILE = f"{SECRETS_DIR}/ldap-ca.pem"
SAVE_LOCK = "console-save.lock"  # in the state directory
PRESETS = {"active_directory": "Active Directory", "openldap": "OpenLDAP", "freeipa": "FreeIPA"}
_CHAIN_LINE = re.compile(r"^(chain:\s*\[)([^\]#]*)(\]\s*(#.*)?)$")
ENROL_TIMEOUT = 60.0
#: The whole form's limit (every listener's, ``MAX_BODY``): a larger body is refused before it is
#: read (access.py), so an upload is never cut short here.
UPLOAD_LIMIT = MAX_BODY
_PEM_BLOCK = re.compile(rb"-----BEGIN ([^-\r\n]{0,64})-----")


@dataclass
class DirectoryForm:
    preset: str = "openldap"
    servers: str = ""
    start_tls: bool = False
    insecure: bool = False
    base_dn: str = ""
    bind_dn: str = ""
    password: str = ""  # never filled from storage; empty means "keep the stored one"
    ca_path: str = ""
    ca_upload: bytes = b""
    password_set: bool = False
    errors: list[str] = field(default_factory=list)

    @classmethod
    def from_post(cls, data) -> DirectoryForm:
        def text(name: str, limit: int = 4096) -> str:
            value = data.get(name, "")
            return value.strip()[:limit] if isinstance(value, str) else ""

        upload = data.get("ca_upload")
        raw = upload.file.read(UPLOAD_LIMIT) if hasattr(upload, "file") else b""
        return cls(preset=text("preset"), servers=text("servers"), start_tls=data.get("start_tls") == "on",
                   insecure=data.get("insecure") == "on", base_dn=text("base_dn"), bind_dn=text("bind_dn"),
                   password=data.get("password", "") if isinstance(data.get("password", ""), str) else "",
                   ca_path=text("ca_path"), ca_upload=raw)


def current_directory(config_dir: Path) -> DirectoryForm:
    """The form as the merged conf.d fills it: the password only as "set" or not."""
    form = DirectoryForm()
    try:
        section = load_config(config_dir).data.get("ldap") or {}
    except ConfigError:
        return form
    if not isinstance(section, dict):
        return form
    form.preset = _shown(section.get("preset", "openldap"))
    servers = section.get("servers") or []
    # A user name or password in a URL is never shown (the ldap plugin refuses one anyway); a save
    # that sends the shown URL back keeps the stored one (_stored_servers).
    form.servers = " ".join(_shown(shown_url(str(s))) for s in servers) if isinstance(servers, list) else ""
    form.start_tls = section.get("start_tls") is True
    form.insecure = section.get("insecure") is True
    form.base_dn = _shown(section.get("base_dn") or "")
    form.bind_dn = _shown(section.get("bind_dn") or "")
    form.ca_path = _shown(section.get("ca_file") or "")
    form.password_set = section.get("bind_password") is not None
    return form


def _shown(value: object) -> str:
    """*value* as text a page can carry: YAML's ``"\\uD83F"`` escape gives a lone surrogate,
    which no UTF-8 page can hold (it is shown as ``?``; the console never writes one)."""
    return str(value).encode("utf-8", "replace").decode("utf-8")


def _stored_servers(servers: list[str], stored: object) -> list[str]:
    """*servers* from the form, each URL the set-up page showed in place of a stored one (its
    user name, password or query hidden: :func:`current_directory`) replaced by the stored one,
    so that a save of an unchanged field never writes the hidden form over the real URL."""
    if not isinstance(stored, list):
        return servers
    real = {_shown(shown_url(str(url))): str(url) for url in stored if _shown(shown_url(str(url))) != str(url)}
    return [real.get(url, url) for url in servers]


def _section(form: DirectoryForm, existing_password: object, stored_servers: object = None) -> tuple[dict, list[str]]:
    problems = []
    if form.preset not in PRESETS:
        problems.append("preset: choose Active Directory, OpenLDAP or FreeIPA")
    servers = _stored_servers([s for s in re.split(r"[\s,]+", form.servers) if s], stored_servers)
    if not servers:
        problems.append("connection string: give at least one ldaps:// or ldap:// URL")
    if not form.password and existing_password is None and form.bind_dn:
        # An empty password is an unauthenticated bind (RFC 4513 5.1.2): never send one.
        problems.append("password: the service account needs its password")
    if any(c in form.password for c in "\r\n\0"):
        # A {file:} secret is read without its final line break: saved as typed, another
        # password would be sent (a browser's password field sends none; a hand-made POST can).
        problems.append("password: has a line break or NUL character: nothing saved")
    section: dict = {"preset": form.preset, "servers": servers, "base_dn": form.base_dn}
    if form.start_tls:
        section["start_tls"] = True
    if form.insecure:
        section["insecure"] = True
    if form.bind_dn:
        section["bind_dn"] = form.bind_dn
        section["bind_password"] = {"file": PASSWORD_FILE} if form.password else existing_password
    if form.ca_upload:
        section["ca_file"] = CA_FILE
    elif form.ca_path:
        section["ca_file"] = form.ca_path
    return section, problems


class _Dumper(yaml.SafeDumper):
    """``safe_dump`` that quotes every string conf.d's loader would read as something else.
    PyYAML quotes what *it* would read as a number (YAML 1.1: ``1.5e+5``), not what authgw's
    loader reads (``gateway.yamlfiles``: ``1.5e5`` is a float there), so a base DN or CA path
    typed as ``1.5e5`` was written plain and refused as "not a string" (review of the console)."""


def _quoted_when_not_text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = None if isinstance(parse_scalar(value), str) else "'"
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _quoted_when_not_text)


def _ca_certificates(data: bytes) -> tuple[bytes, str | None]:
    """The uploaded CA file as the certificates it holds, re-encoded (nothing else of the upload
    is stored), or a problem. A block that is not a certificate — a private key sent by mistake —
    is refused, and never shown: the CA file is readable by others (0644)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    labels = {label.strip().decode("ascii", "replace") for label in _PEM_BLOCK.findall(data)}
    others = sorted(label for label in labels if label != "CERTIFICATE")
    if others:
        shown = ", ".join(label if re.fullmatch(r"[A-Z0-9 ]{1,40}", label) else "?" for label in others)
        return b"", (f"CA upload: holds a PEM block that is not a certificate ({shown}); upload only the CA's "
                     "certificates (-----BEGIN CERTIFICATE-----), never a private key: nothing saved")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        return b"", "CA upload: not a PEM certificate (-----BEGIN CERTIFICATE-----)"
    return b"".join(cert.public_bytes(Encoding.PEM) for cert in certificates), None


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Replace *path* in the validation copy with *data* (the copy holds no symlinks)."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        os.fchmod(out.fileno(), mode)


@dataclass
class _Write:
    """One file of a save: *name* below conf.d, *target* the file it replaces (a symlink's
    target), its temporary file and the link to the replaced file while the save runs."""

    name: str
    data: bytes = field(repr=False)  # the password, for one
    mode: int
    target: Path | None = None
    tmp: Path | None = None
    backup: Path | None = None  # the replaced file, until every file is in place
    made_dir: Path | None = None
    renamed: bool = False


class _WriteFailed(Exception):
    """A file of a save could not be written; the message is for the form."""


def _put_in_place(config_dir: Path, writes: list[_Write]) -> None:
    """All of *writes* in place, in their order, or none: raises :class:`_WriteFailed` after
    putting back what was renamed. Each rename replaces one whole file, and *writes* comes in
    an order where every prefix loads (``_save_directory``)."""
    current = writes[0]
    try:
        for current in writes:
            _prepare(config_dir, current)
        for current in writes:
            os.replace(current.tmp, current.target)
            current.renamed = True
    except OSError as exc:
        problem = _os_problem(exc, config_dir / current.name, current.tmp)
        kept = _roll_back(writes)
        _discard(writes)
        raise _WriteFailed(f"{problem}: nothing saved" if not kept else
                           f"{problem}; could not put back {'; '.join(kept)}") from None
    for directory in dict.fromkeys(write.target.parent for write in writes):
        _fsync_dir(directory)  # the renames themselves survive a crash
    _discard(writes)


def _prepare(config_dir: Path, write: _Write) -> None:
    """*write*'s data synced to a temporary file beside its target, and a link to the file it
    replaces: everything that can fail for want of space or rights happens before a rename."""
    path = config_dir / write.name
    if path.is_symlink():  # written through: the operator's link stays, its target changes
        path = Path(os.path.realpath(path))
        if not path.is_file():
            raise FileNotFoundError(errno.ENOENT, "a symlink to a missing file or not to a file",
                                    str(config_dir / write.name))
    parent = path.parent
    if parent.is_symlink() and not parent.exists():
        raise FileNotFoundError(errno.ENOENT, f"a symlink to {os.readlink(parent)}, which does not exist",
                                str(parent))
    if not parent.is_dir():
        parent.mkdir(mode=0o700)
        write.made_dir = parent
    write.target = path
    write.tmp = write_beside(path, write.data, mode=write.mode)
    if path.exists():
        write.backup = _backup(path)


def _backup(path: Path) -> Path:
    """A second name for *path*'s file (a hard link: owner and mode kept), or a 0600 copy where
    the file system has no hard links, until the save is over."""
    backup = path.with_name(f".{path.name}.{secrets.token_hex(6)}.bak")
    try:
        os.link(path, backup, follow_symlinks=False)
        return backup
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
    fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(path.read_bytes())
        os.fchmod(out.fileno(), path.stat().st_mode & 0o7777)
        os.fsync(out.fileno())
    return backup


def _roll_back(writes: list[_Write]) -> list[str]:
    """Put back every renamed file (newest first); what could not be, with where it is kept."""
    kept = []
    for write in reversed([w for w in writes if w.renamed]):
        try:
            if write.backup is not None:
                os.replace(write.backup, write.target)
                write.backup = None
            else:
                write.target.unlink()
            write.renamed = False
        except OSError as exc:
            where = f"the previous file is kept as {write.backup}" if write.backup else "it was new"
            kept.append(f"{display_name(write.target)} ({exc.strerror or exc.__class__.__name__}; {where})")
            write.backup = None  # never removed: it is the only copy
    return kept


def _discard(writes: list[_Write]) -> None:
    """Remove the temporary files and links of *writes*, and a directory made for them."""
    for write in writes:
        for path in (write.tmp, write.backup):
            if path is not None:
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass
        write.tmp = write.backup = None
    # Then the directories made (a later write's temporary file may have been in one): each
    # goes only when empty, so never one a renamed file is in.
    for write in reversed(writes):
        if write.made_dir is not None and not write.renamed:
            try:
                write.made_dir.rmdir()
            except OSError:
                pass


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_problem(exc: OSError, path: Path, tmp: Path | None) -> str:
    """``PATH: could not be written (the OS error)`` for the form, with the path the error
    names when it is another one (the directory, a symlink's target), never a temporary file."""
    where = Path(exc.filename) if exc.filename else None
    other = f"{display_name(where)}: " if where is not None and where not in (path, tmp) else ""
    return f"{display_name(path)}: could not be written ({other}{exc.strerror or exc.__class__.__name__})"


@contextmanager
def _one_save_at_a_time(state_dir: Path):
    """An exclusive ``flock`` on ``<state_dir>/console-save.lock`` for one whole save (validate
    and write), so that saves from two workers (or two threads of one) never interleave their
    files. flock locks belong to the open file, so two threads of one process exclude each
    other too."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state_dir / SAVE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _chain_with_ldap(config_dir: Path) -> tuple[Path, str] | str | None:
    """``None`` when ldap is in the chain; else (file, new text) or a message for the operator."""
    config = load_config(config_dir)
    if "ldap" in config.core.chain:
        return None
    mark = config.marks.get(("chain",))
    where = f"{mark}" if mark else display_name(config_dir)
    if mark is None:
        return f"{where}: chain: add ldap to it to use the directory"
    path = config_dir / Path(mark.file).name
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    match = _CHAIN_LINE.match(lines[mark.line - 1].rstrip("\n"))
    if not match:
        return f"{where}: chain: add ldap to it to use the directory (it is not a one-line list)"
    steps = ", ".join(["ldap", *[s.strip() for s in match.group(2).split(",") if s.strip()]])
    lines[mark.line - 1] = f"{match.group(1)}{steps}{match.group(3)}\n"
    return path, "".join(lines)


def save_directory(form: DirectoryForm, config_dir: Path, state_dir: Path) -> list[str]:
    """Validate and save; returns the problems (empty when saved, else nothing was written)."""
    with _one_save_at_a_time(state_dir):
        return _save_directory(form, config_dir, state_dir)


def _save_directory(form: DirectoryForm, config_dir: Path, state_dir: Path) -> list[str]:
    from gateway.runtime import build_runtime

    try:
        stored = load_config(config_dir).data.get("ldap") or {}
        existing, stored_servers = stored.get("bind_password"), stored.get("servers")
    except (ConfigError, AttributeError):
        existing = stored_servers = None
    ca = b""
    if form.ca_upload:
        ca, problem = _ca_certificates(form.ca_upload)
        if problem:
            return [problem]
    section, problems = _section(form, existing, stored_servers)
    if problems:
        return problems
    with tempfile.TemporaryDirectory(prefix="authgw-console-") as tmp:
        copy = Path(tmp) / "conf.d"
        # Symlinks followed: a symlink kept in the copy (conf.d/console -> /etc/secrets) would let
        # the staged writes below replace the live files before validation.
        try:
            shutil.copytree(config_dir, copy, symlinks=False, ignore_dangling_symlinks=True)
        except OSError as exc:  # shutil.Error too; e.g. a symlink loop
            return [f"{display_name(config_dir)}: could not be copied to check it ({exc.__class__.__name__}): "
                    "nothing saved"]
        try:
            chain_edit = _chain_with_ldap(copy)
        except ConfigError as exc:
            return _real_names(exc.problems, copy, config_dir)
        if isinstance(chain_edit, str):
            return _real_names([chain_edit], copy, config_dir)
        # In the order they are put in place: each step leaves a configuration that loads.
        writes = []
        if form.password:
            writes.append(_Write(PASSWORD_FILE, form.password.encode("utf-8"), 0o600))
        if ca:
            writes.append(_Write(CA_FILE, ca, 0o644))
        text = ("# Written by the authgw console (docs/console.md). The password is in "
                f"{PASSWORD_FILE} (0600).\n" + yaml.dump({"ldap": section}, Dumper=_Dumper, sort_keys=False))
        writes.append(_Write(CONSOLE_FILE, text.encode("utf-8"), 0o644))
        if chain_edit is not None:  # keep the operator's file mode
            writes.append(_Write(chain_edit[0].name, chain_edit[1].encode(), chain_edit[0].stat().st_mode & 0o777))
        inside = copy.resolve()
        for write in writes:
            if not (copy / write.name).parent.resolve().is_relative_to(inside):  # the copy has no symlinks: never
                return [f"{display_name(config_dir)}/{write.name}: leads out of conf.d: nothing saved"]
            try:
                _write_file(copy / write.name, write.data, write.mode)
            except OSError as exc:  # conf.d/console a file, the password file a directory: a 500 lost the form
                return [f"{display_name(config_dir)}/{write.name}: could not be written "
                        f"({exc.strerror or exc.__class__.__name__}): nothing saved"]
        try:
            # Relative paths that lead out of conf.d (``../tls/ca.pem``) start from the real one:
            # from the copy they named files beside it, in the temporary directory, and a save
            # of a conf.d that `authgw config check` passes was refused (review of the console).
            build_runtime(copy, state_dir=state_dir, serving=False, paths_from=config_dir).discard()
        except ConfigError as exc:
            return _real_names(exc.problems, copy, config_dir)
        except (AuthgwError, OSError) as exc:
            return _real_names([str(exc)], copy, config_dir)
    try:
        _put_in_place(config_dir, writes)
    except _WriteFailed as exc:
        return [str(exc)]
    return []


def _real_names(problems: list[str], copy: Path, config_dir: Path) -> list[str]:
    """Messages about the temporary copy, naming the files the operator has."""
    real = display_name(config_dir)
    names = {str(copy), display_name(copy)}
    out = []
    for problem in problems:
        for name in names:
            problem = problem.replace(name, real)
        out.append(problem)
    return out


def can_reload(state_dir: Path) -> bool:
    return (state_dir / "authgw.pid").is_file()


def reload_gateway(state_dir: Path) -> str:
    """SIGHUP the master whose PID is in ``<state_dir>/authgw.pid`` (written by gateways that
    reload on SIGHUP). Without that file a SIGHUP would kill a gateway that cannot reload."""
    pid_file = state_dir / "authgw.pid"
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except FileNotFoundError:
        return "saved; this gateway cannot reload itself: restart authgw to use the new settings"
    except (ValueError, ProcessLookupError, PermissionError) as exc:
        return f"saved; could not signal the gateway ({pid_file}: {exc.__class__.__name__}): restart authgw"
    return "saved; the gateway is reloading its configuration"


def enrol(ticket_url: str, config_dir: Path, state_dir: Path, ca_path: str = "", *,
          link_enabled: bool) -> tuple[bool, str]:
    """Run ``authgw link enroll TICKET_URL`` as the CLI does; (ok, one line for the page).
    *link_enabled*: the running gateway has the link plugin (so that command exists); asked of
    the running configuration rather than of a second interpreter, which doubled the wait."""
    parts = urlsplit(ticket_url)
    if parts.scheme not in ("https", "http") or not parts.hostname or len(ticket_url) > 2048:
        return False, "the ticket URL must be an https:// URL, as the cloud service shows it"
    if not link_enabled:
        return False, ("enrolment is not available: enable the link plugin (`plugins: [link]` in conf.d) "
                       "so that `authgw link enroll` exists")
    # The ticket goes on standard input: a command line is readable by every user of the host
    # (/proc/PID/cmdline) while it runs, and whoever sends a CSR with the ticket first enrols.
    command = [sys.executable, "-m", "gateway", "link", "enroll", "-",
               "--config", str(config_dir), "--state-dir", str(state_dir)]
    if ca_path:
        command += ["--ca", ca_path]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=ENROL_TIMEOUT,
                                input=ticket_url + "\n")
    except subprocess.TimeoutExpired:
        return False, f"enrolment did not finish within {ENROL_TIMEOUT:.0f}s: is the ticket URL reachable?"
    lines = [line for line in (result.stderr + "\n" + result.stdout).splitlines() if line.strip()]
    if result.returncode != 0:
        return False, (lines[-1] if lines else f"enrolment failed (exit {result.returncode})").removeprefix("error: ")
    return True, lines[-1] if lines else "enrolled"
