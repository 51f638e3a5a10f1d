"""The connector's enrolment, kept in ``STATE_DIR/link/``: its private key (``key.pem``, 0600,
P-256, generated here and never sent), its certificate (``cert.pem``), the relay CA
(``relay-ca.pem``), the CA that verified enrolment when one was given (``server-ca.pem``) and
``link.json`` (link URL, connection, connector id, and whether the relay CA is pinned).

What the link trusts for the relay's certificate (:meth:`Enrolment.ssl_context`):

* the relay CA **alone**, when the relay's certificate at enrolment was issued by it (the
  relay's default, ``pinned``): no other CA can stand in for the relay, not even one the
  connector's host trusts (a TLS-inspecting proxy's);
* otherwise (the relay serves a certificate of the operator's, from a public CA) what verified
  enrolment: the ``--ca`` file, or the system's CAs; the relay CA as well. Such a link is only
  as safe from a rogue CA as the host's store: re-enrol with ``--ca`` to narrow it.

Each file is replaced by rename, so a reader sees the old file or the new one, never half of it.
An enrolment's files change together (:func:`write_enrolment`): all written beside first, then
renamed, ``link.json`` last. A process killed between two renames leaves files of two
enrolments: :func:`load` finds that (the certificate not for the key, or not for the connector
``link.json`` names) and says the enrolment is damaged, rather than dialling with them.
"""

from __future__ import annotations

import json
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.files import write_atomic, write_beside

__all__ = ["Enrolment", "EnrolmentDamaged", "directory", "key_exposure", "load", "write_enrolment", "write_file"]


def directory(state_dir: Path) -> Path:
    path = state_dir / "link"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def write_file(path: Path, data: bytes, private: bool = False) -> None:
    write_atomic(path, data, mode=0o600 if private else 0o644)


def write_enrolment(path: Path, files: list[tuple[str, bytes | None, bool]]) -> None:
    """Replace the enrolment in *path* with *files*, ``(name, data or None to remove, private)``
    in the order given (``link.json`` last): every file is written and synced beside its name
    before any is renamed, so a failure while writing (a full disk) leaves the old enrolment
    whole; the directory is synced after the renames, so a power cut does not undo some."""
    staged: list[tuple[str, Path | None]] = []
    try:
        for name, data, private in files:
            staged.append((name, None if data is None else
                           write_beside(path / name, data, mode=0o600 if private else 0o644)))
    except BaseException:
        for _, temporary in staged:
            if temporary is not None:
                temporary.unlink(missing_ok=True)
        raise
    for name, temporary in staged:
        if temporary is None:
            (path / name).unlink(missing_ok=True)
        else:
            os.replace(temporary, path / name)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Enrolment:
    directory: Path
    link_url: str
    connection: str
    connector: str
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    has_server_ca: bool
    #: The relay's certificate at enrolment was the relay CA's: the link trusts that CA alone.
    pinned: bool = False
    #: What is wrong with ``key.pem``'s permissions ("" when nothing): said by ``link status``,
    #: ``authgw check`` and the log (:func:`key_exposure`).
    key_warning: str = ""

    @property
    def not_before(self) -> float:
        return self.certificate.not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.certificate.not_valid_after_utc.timestamp()

    @property
    def renew_at(self) -> float:
        """Two thirds into the certificate's life (CONNECTOR.md section 2)."""
        return self.not_before + (self.not_after - self.not_before) * 2 / 3

    @property
    def trust(self) -> str:
        """What verifies the relay's certificate on the link, for messages."""
        if self.pinned:
            return "the pinned relay CA"
        return "the CA given at enrolment (--ca)" if self.has_server_ca else "the system's CAs (not pinned)"

    def ssl_context(self) -> ssl.SSLContext:
        """Client side of the link: our certificate, and the relay verified against the relay CA
        alone when pinned, else also against what verified enrolment (module docstring)."""
        relay_ca = str(self.directory / "relay-ca.pem")
        if self.pinned:  # cafile: create_default_context loads no system CAs then
            context = ssl.create_default_context(cafile=relay_ca)
        else:
            context = ssl.create_default_context(cafile=str(self.directory / "server-ca.pem")) \
                if self.has_server_ca else ssl.create_default_context()
            context.load_verify_locations(cafile=relay_ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.directory / "cert.pem"), str(self.directory / "key.pem"))
        return context


class EnrolmentDamaged(Exception):
    """An enrolment whose files are there but cannot be read (truncated, missing one, not PEM):
    the message names the directory and what is wrong with it."""


_PARTS = ("link.json", "cert.pem", "key.pem")


def load(state_dir: Path) -> Enrolment | None:
    """The current enrolment, or ``None`` when there is none (yet).

    :raises EnrolmentDamaged: some of its files are there, but not all, or one cannot be read.
        Taken for "not enrolled" or left to end the link's task, it stopped the link without a
        word until a restart (review of the state directory)."""
    path = state_dir / "link"
    if not any((path / name).exists() for name in _PARTS):
        return None
    try:
        info = json.loads((path / "link.json").read_text())
        # Text, or every user of the enrolment fails its own way: `link status` printed a number
        # as the link and exited 0, `authgw check` reported an AttributeError of its self-tests.
        if not isinstance(info, dict) or not all(isinstance(info.get(name), str) and info[name]
                                                 for name in ("link_url", "connection", "connector")):
            raise ValueError("link.json does not name the link URL, connection and connector as text")
        cert = x509.load_pem_x509_certificate((path / "cert.pem").read_bytes())
        key = serialization.load_pem_private_key((path / "key.pem").read_bytes(), None)
        _check_together(cert, key, info)
        # An enrolment written before pinning (no "pinned") keeps the trust it had.
        return Enrolment(path, info["link_url"], info["connection"], info["connector"], cert, key,
                         (path / "server-ca.pem").exists(), info.get("pinned") is True,
                         key_exposure(path / "key.pem"))
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:  # JSONDecodeError and PEM errors are ValueErrors
        raise EnrolmentDamaged(f"the enrolment in {path} is damaged ({exc.__class__.__name__}: {exc}); restore "
                               "its files, or enrol again: authgw link enroll TICKET_URL") from None


def key_exposure(path: Path) -> str:
    """What opens the private key at *path* to others than authgw's user, or ``""``.

    Whoever reads ``key.pem`` can link as this connector: its hello replaces this connector's
    link at the relay, which then sends it logins, their passwords sealed to that very key. Such
    a key (restored from a backup, copied with ``cp``, 0644) was used without a word, where
    conf.d's secret files are warned about (review of the connector's side of the link)."""
    try:
        info = path.stat()
    except OSError:
        return ""
    problems = []
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        problems.append(f"is open to group or others (mode {stat.S_IMODE(info.st_mode):o}); chmod 600 {path}")
    if info.st_uid not in (0, os.geteuid()):
        problems.append(f"belongs to uid {info.st_uid}, not to the user authgw runs as; chown it")
    if not problems:
        return ""
    return (f"the link's private key {path} " + "; it ".join(problems) + ". Whoever reads it can link as this "
            "connector: enrol again (a new key) if someone may have")


def _check_together(cert: x509.Certificate, key, info: dict) -> None:
    """Raise :class:`ValueError` unless *cert* is for *key* and for the connector *info*
    (``link.json``) names: files of two enrolments (a re-enrolment killed between its renames)
    otherwise made `link status` exit 0 and the link fail every dial on a TLS error
    (``KEY_VALUES_MISMATCH``), forever (review of the link)."""
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ValueError("cert.pem is not the certificate of key.pem")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [name.value for name in names] != [info["connector"]]:
        raise ValueError(f"cert.pem is not for the connector link.json names ({info['connector']!r})")
