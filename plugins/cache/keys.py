"""The cache's secrets: the pepper and the encryption key, and everything derived from them.

Two secrets, each from settings (a ``Secret``) or a key file in the state directory made on
first use (32 random bytes, base64, mode 0600, created atomically so that several worker
processes starting together agree on one):

* the **pepper** keys an HMAC applied to the password before argon2id (the OWASP "pre-hashing
  pepper"), and the HMAC that turns a username into the store's row key. A stolen database
  without the pepper can neither be brute-forced offline nor be read for usernames.
* the **encryption key** seals the identity (profile, groups), the step that proved it, the
  time of that live login and a SHA-256 digest of the row's password hash with AES-256-GCM; the
  row key is the associated data, so a ciphertext copied onto another user's row does not open.
  The store's own copies of the time and the hash are not authenticated: offline answers
  compare them with the sealed ones (a row put back by someone who can write to the store,
  with a fresh time, must not live past ``max_age``; an old hash of the same user written into
  the current row must not make the old password work offline).

Each secret is stretched with HKDF-SHA256 (RFC 5869) into separate keys per purpose.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway import Identity, Secret

__all__ = ["CacheKeys", "KeyFileError", "KeySource", "hash_bound", "key_file_problem", "load_keys", "sealed_time"]

PEPPER_FILE = "cache-pepper.key"
ENCRYPTION_FILE = "cache-encryption.key"
_VERSION = b"authgw-cache-v1"


class KeyFileError(Exception):
    """A key file is missing (and may not be created), unreadable, malformed or too open."""


@dataclass(frozen=True, slots=True)
class KeySource:
    """Where one secret comes from, for self-tests and ``authgw cache`` output."""

    name: str
    secret: Secret | None
    path: Path

    def describe(self) -> str:
        return f"{self.name} from {self.secret!r}" if self.secret is not None else f"{self.name} from {self.path}"


def _hkdf(material: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_VERSION + b" " + purpose).derive(material)


def key_file_problem(path: Path) -> str | None:
    """Why *path* is not a safe key file (None when it is): it must be a regular file only the
    owner can read."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return "missing"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_mode & 0o077:
        return f"readable by group or others (mode {stat.S_IMODE(info.st_mode):o}); chmod 600 it"
    return None


def _read_key_file(path: Path) -> bytes:
    problem = key_file_problem(path)
    if problem:
        raise KeyFileError(f"key file {path}: {problem}")
    try:
        raw = base64.b64decode(path.read_bytes().strip(), validate=True)
    except (ValueError, OSError) as exc:
        raise KeyFileError(f"key file {path}: not base64 ({exc.__class__.__name__})") from None
    if len(raw) < 32:
        raise KeyFileError(f"key file {path}: holds {len(raw)} bytes, needs at least 32")
    return raw


def _create_key_file(path: Path) -> None:
    """Write 32 random bytes to *path* unless it exists. Race-free across processes: the key is
    written to a private temporary file that is then hard-linked into place (link fails if
    another process got there first; both then read the winner's key)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(base64.b64encode(secrets.token_bytes(32)) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def _material(source: KeySource, create: bool) -> bytes:
    if source.secret is not None:
        return source.secret.reveal().encode("utf-8")
    if create and not source.path.exists():
        _create_key_file(source.path)
    return _read_key_file(source.path)


@dataclass(frozen=True)
class CacheKeys:
    """Keys derived from the two secrets. Never logged: ``repr`` shows only the key id."""

    pepper: bytes = field(repr=False)
    index: bytes = field(repr=False)
    aead: AESGCM = field(repr=False)
    #: Identifies the pair of secrets an entry was written with (not secret: a truncated HMAC).
    kid: str

    @classmethod
    def derive(cls, pepper_material: bytes, encryption_material: bytes) -> CacheKeys:
        pepper = _hkdf(pepper_material, b"pepper")
        index = _hkdf(pepper_material, b"index")
        aead_key = _hkdf(encryption_material, b"aead")
        kid = (hmac.new(pepper, b"kid", hashlib.sha256).hexdigest()[:8]
               + hmac.new(aead_key, b"kid", hashlib.sha256).hexdigest()[:8])
        return cls(pepper, index, AESGCM(aead_key), kid)

    def row_key(self, user_key: str) -> str:
        """The store's key for a (normalised) username: a keyed hash, so the store holds no names."""
        return hmac.new(self.index, b"user\0" + user_key.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    def peppered(self, user_key: str, password: str) -> bytes:
        """What argon2id hashes: HMAC(pepper, username, password). Binding the username means one
        user's hash cannot be copied onto another's row and verify there."""
        user = user_key.encode("utf-8", "surrogatepass")
        message = len(user).to_bytes(4, "big") + user + password.encode("utf-8", "surrogatepass")
        return hmac.new(self.pepper, message, hashlib.sha256).digest()

    def _aad(self, row_key: str) -> bytes:
        return _VERSION + b"\0" + row_key.encode("ascii")

    def seal(self, row_key: str, identity: Identity, step: str, stored_at: float, answered_by: str = "", *,
             password_hash: str) -> bytes:
        """AES-256-GCM over the identity, the name of the step that proved it, *stored_at*, the
        time of that live login (the entry's ``stored_at``; the sealed copy is the one
        ``max_age`` is judged by), *answered_by*, the backend of that step that vouched
        (``Decision.answered_by``; left out when the step named none), and the digest of
        *password_hash*, the entry's hash (see :func:`hash_bound`)."""
        document = identity.to_json()
        document.pop("authenticated_at", None)
        document["step"] = step
        if answered_by:
            document["answered_by"] = answered_by
        return self._seal(row_key, document, stored_at, password_hash)

    def seal_alias(self, row_key: str, account: str, step: str, stored_at: float, *, password_hash: str,
                   name: str = "") -> bytes:
        """The sealed document of a row that only names the account's own row: *account* is the
        username the directory gave (``Identity.username``) when the user logged in live under
        another name (a mail address, a userPrincipalName), *name* that name as it was given.
        Sealed like an entry (the row key is the associated data), so a writer of the store
        cannot point one name at another account."""
        document = {"alias_of": account, "step": step}
        if name:
            document["name"] = name
        return self._seal(row_key, document, stored_at, password_hash)

    def _seal(self, row_key: str, document: dict, stored_at: float, password_hash: str) -> bytes:
        document["stored_at"] = stored_at
        document["hash_sha256"] = _hash_digest(password_hash)
        plaintext = json.dumps(document, separators=(",", ":"), default=str).encode("utf-8")
        nonce = secrets.token_bytes(12)  # random 96-bit nonces: NIST SP 800-38D section 8.2.2
        return nonce + self.aead.encrypt(nonce, plaintext, self._aad(row_key))

    def open(self, row_key: str, sealed: bytes) -> dict[str, Any] | None:
        """The identity document, or None when it was sealed with other keys or tampered with."""
        if len(sealed) < 12 + 16:
            return None
        try:
            plaintext = self.aead.decrypt(sealed[:12], sealed[12:], self._aad(row_key))
        except InvalidTag:
            return None
        return json.loads(plaintext)


def sealed_time(document: dict) -> float | None:
    """The time of the live login sealed in an entry (what ``max_age`` counts from), or None
    for an entry sealed without it. The store's own ``stored_at`` is not authenticated: anyone
    who can write to the store can change it (and the failure count), not the sealed copy."""
    value = document.get("stored_at")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _hash_digest(password_hash: str) -> str:
    return hashlib.sha256(password_hash.encode("utf-8", "surrogatepass")).hexdigest()


def hash_bound(document: dict, password_hash: str) -> bool | None:
    """Whether *password_hash*, the store's copy, is the hash sealed with the entry; None for an
    entry sealed without the digest (an older version). Like the time, the hash column is not
    authenticated: a writer of the store could put an older hash of the same user (a backup, a
    replica) into the current row, and the old password would verify offline."""
    sealed = document.get("hash_sha256")
    if not isinstance(sealed, str):
        return None
    return hmac.compare_digest(sealed.encode("ascii", "replace"), _hash_digest(password_hash).encode("ascii"))


def sources(state_dir: Path, pepper: Secret | None, encryption_key: Secret | None) -> tuple[KeySource, KeySource]:
    return (KeySource("pepper", pepper, state_dir / PEPPER_FILE),
            KeySource("encryption key", encryption_key, state_dir / ENCRYPTION_FILE))


def load_keys(state_dir: Path, pepper: Secret | None, encryption_key: Secret | None, *,
              create: bool) -> CacheKeys:
    """Read (and with *create*, make) both secrets and derive the keys. Raises KeyFileError."""
    pepper_source, encryption_source = sources(state_dir, pepper, encryption_key)
    return CacheKeys.derive(_material(pepper_source, create), _material(encryption_source, create))
