"""Signing keys of the login front door, kept in the state directory (never in conf.d).

``STATE/login/`` holds, each 0600:

* ``signing-current.key``/``.crt``: RSA-2048 key and self-signed certificate (SHA-256) that
  sign SAML answers now;
* ``signing-next.key``/``.crt``: the next pair, published in the metadata beside the current one
  so that service providers trust it before it signs (rollover without a flag day);
* ``cookie.key``: 32 random bytes for the HMAC of session cookies and CSRF tokens (a shorter
  file, say a copy cut short, is refused at start: never an HMAC key anyone could guess).

Each pair is checked at load: a key that is not its certificate's (a rotation cut short between
the two files) stops the start or the reload, naming both files.

They are made on first start under an exclusive ``flock`` (the master and every worker build
the plugin). ``authgw saml rotate`` makes *next* current and a fresh *next*; the old current is
kept as ``signing-previous.*``: :meth:`KeyStore.ensure` hands it on as the current pair's
:attr:`KeyPair.replaced`, so the OIDC provider can keep publishing it (an id_token signed
before the rotation still verifies) until the next rotation replaces it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from gateway.files import write_atomic

__all__ = ["KeyPair", "KeyStore"]

#: Certificates in SAML metadata are trust anchors, not CA-validated: their validity period is
#: not checked by most SPs, and rollover is by `rotate`, so they are made long-lived.
CERT_DAYS = 3650
#: The cookie key's size (``cookie.key``: 256 bits); a shorter file is refused, never used.
COOKIE_KEY_BYTES = 32


@dataclass(frozen=True)
class KeyPair:
    key: rsa.RSAPrivateKey
    cert: x509.Certificate
    #: The pair this one replaced as current (``signing-previous.*``), when it is the current pair
    #: and a rotation left one; ``None`` otherwise. It signs nothing any more.
    replaced: KeyPair | None = field(default=None, compare=False, repr=False)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_b64(self) -> str:
        """The DER certificate in base64, as ``ds:X509Certificate`` wants it."""
        return "".join(self.cert_pem.decode().splitlines()[1:-1])

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def _new_pair(common_name: str) -> KeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CERT_DAYS)).sign(key, hashes.SHA256()))
    return KeyPair(key, cert)


class KeyStore:
    """The key files of one state directory."""

    def __init__(self, state_dir: Path, common_name: str) -> None:
        self.directory = state_dir / "login"
        self.common_name = common_name

    @contextmanager
    def _locked(self):
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _path(self, slot: str, ext: str) -> Path:
        return self.directory / f"signing-{slot}.{ext}"

    def _load(self, slot: str) -> KeyPair:
        """The pair of *slot*; :class:`ValueError` naming both files when the key is not the
        certificate's. A rotation cut short between its two files (a full disk, a crash: each is
        replaced atomically, not both together) left a key that signed every SAML answer while
        the metadata (and each answer's KeyInfo) carried the other key's certificate, and
        nothing said so: every service provider refused the signatures (review of the web
        layer). Fail closed, at start, at each reload (every worker loads the pairs again) and
        before a rotation (which would carry the mismatch on into ``signing-previous``)."""
        key_file, cert_file = self._path(slot, "key"), self._path(slot, "crt")
        try:
            key = serialization.load_pem_private_key(key_file.read_bytes(), None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{key_file} is not an unencrypted PEM private key ({exc})") from None
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        except ValueError as exc:
            raise ValueError(f"{cert_file} is not a PEM certificate ({exc})") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{key_file} is not an RSA key")
        if cert.public_key() != key.public_key():
            raise ValueError(f"{key_file} is not the key of {cert_file}: {self._mismatch_hint(slot, key)}")
        return KeyPair(key, cert)

    def _mismatch_hint(self, slot: str, key) -> str:
        """What to do with *slot*'s key that is not its certificate's, as far as the directory tells."""
        for other in ("current", "next", "previous"):
            path = self._path(other, "crt")
            try:
                found = other != slot and x509.load_pem_x509_certificate(path.read_bytes()).public_key() == \
                    key.public_key()
            except (OSError, ValueError):
                continue
            if found:
                return (f"it is the key of {path.name} (a rotation cut short?); copy {path.name} over "
                        f"{self._path(slot, 'crt').name}, or put back both files from a copy")
        return "put back both files from a copy, or delete both to make a new pair (services must then be given it)"

    def _save(self, slot: str, pair: KeyPair) -> None:
        write_atomic(self._path(slot, "key"), pair.key_pem)
        write_atomic(self._path(slot, "crt"), pair.cert_pem)

    def ensure(self) -> tuple[KeyPair, KeyPair, bytes]:
        """Current and next signing pairs and the cookie key, made if missing. The current pair
        carries the one it replaced (``signing-previous.*``, if a rotation left it) as
        :attr:`KeyPair.replaced`."""
        with self._locked():
            for slot in ("current", "next"):
                if not self._path(slot, "key").exists():
                    self._save(slot, _new_pair(self.common_name))
            cookie = self.directory / "cookie.key"
            if not cookie.exists():
                write_atomic(cookie, secrets.token_bytes(COOKIE_KEY_BYTES))
            cookie_key = cookie.read_bytes()
            if len(cookie_key) < COOKIE_KEY_BYTES:
                # Fail closed: an empty or short key (a copy cut short, a file made by hand) is an
                # HMAC key anyone can guess, and with it the per-SP SessionIndex tags, the OIDC
                # sids and the CSRF tokens (review of the login door).
                raise ValueError(f"{cookie} holds {len(cookie_key)} bytes, fewer than {COOKIE_KEY_BYTES}: copy it "
                                 "whole from another instance sharing the sessions, or delete it to make a new one "
                                 "(every browser then signs in again)")
            current = self._load("current")
            if self._path("previous", "key").exists() and self._path("previous", "crt").exists():
                current = KeyPair(current.key, current.cert, replaced=self._load("previous"))
            return current, self._load("next"), cookie_key

    def rotate(self) -> tuple[KeyPair, KeyPair]:
        """Make *next* current and a new *next*. Running gateways pick it up when reloaded
        (SIGHUP: every worker builds the plugin again, which loads the pairs) or restarted."""
        self.ensure()
        with self._locked():
            current, upcoming = self._load("current"), self._load("next")
            self._save("previous", current)
            self._save("current", upcoming)
            fresh = _new_pair(self.common_name)
            self._save("next", fresh)
            return upcoming, fresh
