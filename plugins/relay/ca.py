"""The relay's certificate authority: generated once in the state directory, it signs connector
certificates from their CSRs (enrolment and renewal) and, unless the operator gives one, the
relay listener's own server certificate.

Files under ``STATE_DIR/relay/ca/``: ``ca.key`` (0600, P-256) and ``ca.crt``. The directory is
created whole by a rename, so two processes starting at once end up with the same CA. With
``redis:``, ``shared`` holds the SHA-256 of the CA the instances share (:meth:`RelayCA.save`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import stat
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.files import write_atomic

__all__ = ["CSRRefused", "RelayCA"]

UTC = dt.timezone.utc
#: Connector certificates are backdated this much, for connectors whose clock runs a little behind.
_BACKDATE = dt.timedelta(minutes=1)
#: Beside ``ca.crt``: the SHA-256 of the CA this instance shares with the others in Redis.
_SHARED = "shared"
#: What loading a CSR raises for one that is not a CSR: InvalidVersion (a version other than 1,
#: the field 0) is no ValueError, and was a 500 at enrolment (review of the relay side).
_UNREADABLE = (ValueError, UnicodeEncodeError, x509.InvalidVersion)


class CSRRefused(Exception):
    """A CSR the relay will not sign; ``code`` is the stable error code answered."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class RelayCA:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    @classmethod
    def from_pem(cls, key_pem: bytes, cert_pem: bytes) -> RelayCA:
        return cls(serialization.load_pem_private_key(key_pem, None), x509.load_pem_x509_certificate(cert_pem))

    def save(self, state: Path) -> None:
        """Write this CA, the one the relay instances share in Redis, over the state directory's
        (an instance adopting the shared CA), so that ``STATE_DIR/relay/ca/ca.crt`` is always
        the CA connectors are given; and mark it shared (:meth:`shared_in`)."""
        directory = state / "relay" / "ca"
        if (directory / "ca.crt").read_text() != self.pem:
            write_atomic(directory / "ca.key", self.key_pem)
            write_atomic(directory / "ca.crt", self.pem.encode("ascii"), mode=0o644)
        if not self.shared_in(state):
            write_atomic(directory / _SHARED, self.fingerprint.encode("ascii") + b"\n", mode=0o644)

    def shared_in(self, state: Path) -> bool:
        """Whether this CA is the one *state* holds as the CA the instances shared (``shared``
        beside it: its certificate's SHA-256): connectors may have been enrolled with it at any
        instance. A CA without the mark was made by this instance and never used (its first
        start, or Redis unreachable then), and gives way to the shared one."""
        try:
            return (state / "relay" / "ca" / _SHARED).read_text().strip() == self.fingerprint
        except OSError:
            return False

    @property
    def fingerprint(self) -> str:
        """The certificate's SHA-256, in hex: what the logs name a CA by."""
        return self.cert.fingerprint(hashes.SHA256()).hex()

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode("ascii")

    @classmethod
    def load_or_create(cls, state: Path, name: str) -> RelayCA:
        directory = state / "relay" / "ca"
        if not directory.exists():
            directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".ca-", dir=directory.parent))
            key = ec.generate_private_key(ec.SECP256R1())
            now = dt.datetime.now(UTC)
            subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "authgw relay"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, f"authgw relay CA {name}")])
            cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                    .public_key(key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(now - _BACKDATE).not_valid_after(now + dt.timedelta(days=3650))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                 key_encipherment=False, data_encipherment=False,
                                                 key_agreement=False, key_cert_sign=True, crl_sign=True,
                                                 encipher_only=False, decipher_only=False), critical=True)
                    .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                    .sign(key, hashes.SHA256()))
            write_atomic(staging / "ca.key", _key_pem(key))
            (staging / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            try:
                staging.rename(directory)
            except OSError:  # another process won the race: use its CA
                for leftover in staging.iterdir():
                    leftover.unlink()
                staging.rmdir()
        try:
            key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
            cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        except ValueError as exc:  # damaged: say which files, not only OpenSSL's words (review of the state directory)
            raise ValueError(f"the relay CA in {directory} cannot be read ({exc}); restore ca.key and ca.crt from a "
                             "backup (a new CA would need every connector enrolled again)") from None
        return cls(key, cert)

    @staticmethod
    def key_exposure(state: Path) -> str:
        """What is wrong with the CA key's file mode, ``""`` when nothing: whoever reads it can
        issue certificates connectors trust for the relay (and be sent their requests). One
        restored or copied 0644 was used without a word, where the connector's own key is said
        (plugins/link/state.py)."""
        path = state / "relay" / "ca" / "ca.key"
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            return ""
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            return f"the relay CA's private key {path} is open to group or others (mode {mode:o}); chmod 600 {path}"
        return ""

    def server_certificate(self, directory: Path, names: list[str]) -> tuple[Path, Path]:
        """Issue the listener's certificate for *names* (DNS names or IP addresses) into
        *directory*; returns ``(cert, key)`` paths. Re-issued at every start (it is cheap).

        Valid as long as the relay's CA: a relay is not restarted for its listener, and one that
        ran a year on a 365-day certificate lost every connector at once (review of time). A
        shorter life would protect nothing: the key lies beside the CA's own key."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        now = dt.datetime.now(UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _BACKDATE).not_valid_after(self.cert.not_valid_after_utc)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # One pair per process (each worker issues its own): a worker loading its pair never
        # sees another's half-written one. Pairs of processes that are gone are removed.
        for old in directory.glob("server-*.crt"):
            pid = old.stem.split("-", 1)[1]
            if pid.isdigit() and Path("/proc/self").exists() and not Path(f"/proc/{pid}").exists():
                old.unlink(missing_ok=True)
                old.with_suffix(".key").unlink(missing_ok=True)
        stem = f"server-{os.getpid()}"
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        write_atomic(key_path, _key_pem(key))
        write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        return cert_path, key_path

    @staticmethod
    def requested_name(csr_pem: str) -> str:
        """The CN a CSR asks for ("" when it has none or does not parse; :meth:`sign` says why)."""
        try:
            names = x509.load_pem_x509_csr(csr_pem.encode("ascii")).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        except (*_UNREADABLE, TypeError):  # TypeError: a subject that does not read (sign)
            return ""
        return str(names[0].value) if len(names) == 1 else ""

    def sign(self, csr_pem: str, *, connector_id: str, connection: str, lifetime: float) -> x509.Certificate:
        """Sign a connector's CSR. The subject must be exactly ``CN=<connector_id>`` (the id the
        ticket named) and the key P-256: the relay seals passwords to it with HPKE."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
        except _UNREADABLE:
            raise CSRRefused("csr_malformed", "the CSR is not a PEM certificate request") from None
        try:
            # A key or signature algorithm (or an elliptic curve) the library does not know
            # raises rather than answers: refused like any key that is not P-256, never a 500.
            public_key = csr.public_key()
            signed = csr.is_signature_valid
        except (UnsupportedAlgorithm, ValueError):
            raise CSRRefused("csr_wrong_key", "the CSR's key or signature algorithm is not supported; "
                                              "the connector key must be P-256") from None
        if not signed:
            raise CSRRefused("csr_malformed", "the CSR's signature does not verify")
        try:
            # The subject's values are decoded only now: a CN that is an INTEGER, a BIT STRING or
            # a UTF8String that is not UTF-8 loads and verifies, then raised here, a 500 at
            # enrolment and a link handler's crash at renewal (review of the relay side).
            subject = csr.subject
        except (ValueError, TypeError):
            raise CSRRefused("csr_malformed", "the CSR's subject cannot be read") from None
        names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(names) != 1 or names[0].value != connector_id or len(subject) != 1:
            raise CSRRefused("csr_wrong_name", f"the CSR must name exactly CN={connector_id}")
        if not (isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1)):
            raise CSRRefused("csr_wrong_key", "the connector key must be P-256 (passwords are sealed to it)")
        if not 0 < lifetime < float("inf"):  # NaN fails this too
            raise ValueError(f"a certificate lifetime is finite seconds > 0, not {lifetime!r}")
        now = dt.datetime.now(UTC)
        # Never past the CA's own end (a certificate outliving its CA validates nowhere), and so
        # never a date beyond year 9999 either: 3e11 seconds raised OverflowError (review of time).
        lifetime = min(lifetime, (self.cert.not_valid_after_utc - now).total_seconds())
        if lifetime <= 0:
            raise ValueError(f"the relay CA expired at {self.cert.not_valid_after_utc.isoformat()}")
        backdate = min(_BACKDATE, dt.timedelta(seconds=lifetime / 10))  # tests use lifetimes of seconds
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, connection),
                             x509.NameAttribute(NameOID.COMMON_NAME, connector_id)])
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
                .public_key(public_key).serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
                .not_valid_before(now - backdate).not_valid_after(now + dt.timedelta(seconds=lifetime))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=True,
                                             key_cert_sign=False, crl_sign=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
