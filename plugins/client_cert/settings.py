"""Typed settings of the ``client_cert`` plugin (``client_cert:`` in conf.d).

Every setting, its type and default is documented in docs/plugins/client_cert.md; keep the two in
step. Paths are relative to the configuration directory.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from gateway import ConfigPath, PluginSettings, Secret
from gateway.settings import InvalidKey, InvalidKeys, parse_listen, shown_url, unmapped_networks

__all__ = [
    "ClientCertSettings",
    "HeaderSource",
    "IssuerSerial",
    "ListenerSettings",
    "MappingRule",
    "MappingSettings",
    "RevocationSettings",
]

#: Friendly names accepted in ``extended_key_usages`` (RFC 5280 section 4.2.1.12, Microsoft).
EKU_NAMES = {
    "clientAuth": "1.3.6.1.5.5.7.3.2",
    "serverAuth": "1.3.6.1.5.5.7.3.1",
    "emailProtection": "1.3.6.1.5.5.7.3.4",
    "smartcardLogon": "1.3.6.1.4.1.311.20.2.2",
    "anyExtendedKeyUsage": "2.5.29.37.0",
}

#: The longest of the revocation ages and graces (``crl_grace``, ``crl_max_age``, ``ocsp_max_age``):
#: a year. Unbounded, ``1e12`` or ``.inf`` seconds overflowed the date arithmetic of every
#: certificate login into ``internal_error``, a refusal even under soft-fail (review of time).
MAX_REVOCATION_AGE = 365 * 86400.0

_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def _oid(value: str) -> str:
    value = EKU_NAMES.get(value, value)
    if not _OID.fullmatch(value):  # not match: `$` lets a final newline through
        raise ValueError(f"{value!r} is not a dotted OID")
    return value


class ListenerSettings(PluginSettings):
    """The plugin's own HTTPS listener, which asks for client certificates."""

    address: str = Field(description="`HOST:PORT` to listen on (IPv6 as `[::1]:PORT`)")
    certificate: ConfigPath = Field(description="the server certificate, PEM (its intermediates may follow it)")
    key: ConfigPath = Field(description="the server's private key, PEM")
    key_password: Secret | None = Field(None, description="password of an encrypted key (`{env: NAME}`/`{file: PATH}`)")
    minimum_tls_version: Literal["TLSv1.2", "TLSv1.3"] = Field("TLSv1.2", description="oldest TLS version accepted")
    check_validity_in_handshake: bool = Field(
        True, description="OpenSSL refuses expired and not-yet-valid certificates in the handshake (no audit "
                          "line); `false` lets the plugin deny them with `cert.expired`/`cert.not_yet_valid`")
    session_tickets: int = Field(
        0, ge=0, le=8, description="TLS session tickets sent after each full handshake, for a client to resume "
                                   "with; `0`: none, so a TLS 1.3 client makes a full handshake on each "
                                   "connection (each ticket costs ~0.6 ms of CPU: docs/plugins/client_cert.md)")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_listen(value)
        return value


class HeaderSource(PluginSettings):
    """The one request header in which a trusted TLS-terminating proxy forwards the certificate.

    Each proxy sets exactly one header; any other certificate header from that proxy was passed
    through from the client and is ignored (issue 9: a fall-through to a second header let a
    client without a certificate name any user)."""

    name: str = Field(description="header name, e.g. `X-SSL-Client-Cert` or `X-Forwarded-Client-Cert`")
    format: Literal["pem", "xfcc"] = Field(
        description="`pem`: URL-encoded PEM (nginx `$ssl_client_escaped_cert`; bare base64 DER also read); "
                    "`xfcc`: Envoy `X-Forwarded-Client-Cert`")
    proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        [], description="the trusted proxies (CIDRs) that set this header; empty: every trusted proxy "
                        "that no other entry names. `::ffff:a.b.c.d` is read as `a.b.c.d`, as the peer is")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _HEADER.fullmatch(value):
            raise ValueError(f"{value!r} is not an HTTP header name")
        if value.lower() in ("authorization", "proxy-authorization", "cookie"):
            raise ValueError(f"{value} never reaches plugins; use another header")
        return value.lower()

    @field_validator("proxies")
    @classmethod
    def _unmapped(cls, value: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
                  ) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        # A mapped network would match no peer, and that proxy would fall to the catch-all entry:
        # the header it passes through from the client would be believed.
        return unmapped_networks(value)


class RevocationSettings(PluginSettings):
    """Revocation checking: CRLs (RFC 5280) and OCSP (RFC 6960). ``revocation: soft-fail`` is short
    for ``revocation: {policy: soft-fail}``."""

    policy: Literal["off", "soft-fail", "hard-fail"] = Field(
        description="`off`: no check; `soft-fail`: revoked is denied, unknown/unreachable allowed and logged; "
                    "`hard-fail`: only a certificate known good is allowed")
    check: Literal["leaf", "chain"] = Field("leaf", description="`chain` also checks every intermediate CA")
    crl_files: list[ConfigPath] = Field([], description="CRL files (PEM or DER), re-read when they change")
    crl_urls: list[str] = Field([], description="CRLs to fetch (http/https) besides the distribution points")
    crl_distribution_points: bool = Field(True, description="fetch the CRLs named in the certificate (CDP)")
    crl_grace: float = Field(0.0, ge=0, le=MAX_REVOCATION_AGE,
                             description="seconds a CRL stays usable after its `nextUpdate` (at most a year)")
    crl_max_age: float | None = Field(None, gt=0, le=MAX_REVOCATION_AGE,
                                      description="seconds after `thisUpdate` when a CRL is too old anyway (also "
                                                  "bounds CRLs without `nextUpdate`; at most a year)")
    crl_refresh_interval: float = Field(300.0, ge=5, allow_inf_nan=False, description="seconds between background re-fetches of CRLs")
    crl_max_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="largest CRL fetched")
    ocsp: bool = Field(True, description="ask the OCSP responder named in the certificate (AIA)")
    ocsp_responder: str | None = Field(None, description="ask this OCSP responder instead (http/https URL)")
    ocsp_responder_certificate: ConfigPath | None = Field(
        None, description="a responder certificate trusted to sign answers itself (RFC 6960 4.2.2.2)")
    ocsp_nonce: bool = Field(True, description="send a nonce (RFC 8954); an answer with another nonce is refused")
    ocsp_require_nonce: bool = Field(False, description="refuse answers that carry no nonce")
    ocsp_max_age: float = Field(3600.0, gt=0, le=MAX_REVOCATION_AGE,
                                description="age limit, in seconds, of answers without `nextUpdate` (at most a year)")
    ocsp_cache_seconds: float = Field(300.0, ge=0, allow_inf_nan=False, description="seconds an answer is reused (never past "
                                                              "`nextUpdate`); 0: no cache")
    timeout: float = Field(3.0, gt=0, le=60, description="seconds per CRL or OCSP fetch (also capped by the deadline)")
    retry_after_failure: float = Field(10.0, ge=0, le=3600, allow_inf_nan=False,
                                       description="seconds a URL that failed is not asked again (at most an hour)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"policy": value} if isinstance(value, str) else value

    @field_validator("crl_urls", "ocsp_responder")
    @classmethod
    def _urls(cls, value: Any) -> Any:
        for url in [value] if isinstance(value, str) else (value or []):
            if not url.lower().startswith(("http://", "https://")):
                raise ValueError(f"{shown_url(url)}: only http:// and https:// URLs are fetched")
        return value


class IssuerSerial(PluginSettings):
    """One explicit ``issuer + serial`` entry (AD's strong ``X509:<I>..<SR>..`` mapping)."""

    issuer: str = Field(description="RFC 4514 text, as `openssl x509 -noout -issuer -nameopt RFC2253` prints it")
    serial: str = Field(description="hex, as `openssl x509 -noout -serial` prints it (colons allowed)")
    user: str = Field(min_length=1, description="the user name this certificate maps to")

    @field_validator("serial")
    @classmethod
    def _serial(cls, value: str) -> str:
        cleaned = value.replace(":", "").strip().lower()
        if not re.fullmatch(r"[0-9a-f]+", cleaned):
            raise ValueError(f"{value!r} is not a hex serial number")
        return cleaned.lstrip("0") or "0"


class MappingRule(PluginSettings):
    """One way to find a user name in a certificate; rules are tried in order. A bare string
    (``- upn``) is short for ``{type: upn}``."""

    type: Literal["upn", "email", "cn", "subject_email", "subject", "issuer_serial", "thumbprint"] = Field(
        description="where the name comes from (see docs/plugins/client_cert.md)")
    pattern: str | None = Field(None, description="regular expression the value must match; the name is group "
                                                  "`user`, else group 1, else the match (required for `subject`)")
    domains: list[str] = Field([], description="`upn`/`email`/`subject_email`: accept only these domains")
    strip_domain: bool | None = Field(None, description="drop `@domain`; default true for `upn`, else false")
    lowercase: bool = Field(False, description="lower-case the name")
    certificates: list[IssuerSerial] = Field([], description="`issuer_serial`: the explicit entries")
    thumbprints: dict[str, str] = Field({}, description="`thumbprint`: SHA-256 (hex) of the certificate -> user name")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @field_validator("thumbprints")
    @classmethod
    def _thumbprints(cls, value: dict[str, str]) -> dict[str, str]:
        cleaned = {}
        for key, user in value.items():
            digest = key.replace(":", "").strip().lower()
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"{key!r} is not a SHA-256 thumbprint (64 hex digits)")
            cleaned[digest] = user
        return cleaned

    @model_validator(mode="after")
    def _complete(self) -> MappingRule:
        if self.type == "subject" and not self.pattern:
            raise InvalidKey("type", "a `subject` rule needs a `pattern`")
        if self.type == "issuer_serial" and not self.certificates:
            raise InvalidKey("type", "an `issuer_serial` rule needs `certificates`")
        if self.type == "thumbprint" and not self.thumbprints:
            raise InvalidKey("type", "a `thumbprint` rule needs `thumbprints`")
        return self


class MappingSettings(PluginSettings):
    """From certificate to user name, then (by default) to the directory's profile."""

    rules: list[MappingRule] = Field(["upn", "email", "cn"], min_length=1,
                                     description="mapping rules, tried in order (a bare type is `{type: ...}`)")
    lookup: bool = Field(True, description="the name must be known to `gateway_lookup_user` (the directory); "
                                           "`false` trusts the mapped name as it is")
    require_directory_match: bool = Field(
        False, description="the directory entry must also hold this certificate (`userCertificate` or a strong "
                           "`altSecurityIdentities` mapping); needs `lookup`")
    serial_order: Literal["reversed", "forward", "either"] = Field(
        "reversed", description="byte order of the serial in `X509:<I>..<SR>..` mappings: `reversed` as Active "
                                "Directory writes it (KB5014754), `forward` as `openssl x509 -serial` prints it, "
                                "`either` only while migrating (a certificate whose serial is the byte-reverse of "
                                "a mapped one's then meets that mapping)")

    password_state_refuses: bool = Field(
        False, description="an expired or must-change password (as the directory reports it) also refuses "
                           "certificate logins; by default only disabled, locked and expired accounts do")

    @model_validator(mode="after")
    def _needs_lookup(self) -> MappingSettings:
        if self.require_directory_match and not self.lookup:
            raise InvalidKey("require_directory_match", "require_directory_match needs lookup: true")
        return self


class ClientCertSettings(PluginSettings):
    """TLS client-certificate logins (docs/plugins/client_cert.md)."""

    ca_bundle: ConfigPath = Field(description="trusted root CAs, PEM")
    intermediates: ConfigPath | None = Field(None, description="intermediate CAs, PEM (build paths; not anchors)")
    listener: ListenerSettings | None = Field(None, description="the HTTPS listener for certificate logins")
    headers: list[HeaderSource] = Field([], description="headers a trusted proxy forwards the certificate in")
    clock_tolerance: float = Field(60.0, ge=0, le=3600, description="seconds of clock skew allowed at both ends "
                                                                    "of the validity window")
    extended_key_usages: list[str] = Field(["clientAuth"], description="EKUs (names or OIDs) of which the "
                                                                      "certificate needs one; `[]`: no check")
    require_digital_signature: bool = Field(True, description="a keyUsage extension must include digitalSignature")
    required_policies: list[str] = Field([], description="certificate policy OIDs the certificate must all assert")
    max_chain_depth: int = Field(6, ge=1, le=16, description="longest path accepted, in CA certificates")
    revocation: RevocationSettings = Field(description="revocation policy; there is no default: choose one")
    mapping: MappingSettings = Field(MappingSettings(), description="certificate to user")
    verify_cache_seconds: float = Field(60.0, ge=0, allow_inf_nan=False, description="seconds a verified path is remembered "
                                                               "(validity is checked on every attempt)")

    @field_validator("extended_key_usages", "required_policies")
    @classmethod
    def _oids(cls, value: list[str]) -> list[str]:
        return [_oid(v) for v in value]

    @model_validator(mode="after")
    def _one_header_per_proxy(self) -> ClientCertSettings:
        # A proxy sets one header; two entries for one proxy would bring back the fall-through.
        # Every entry at fault is reported in one run, once (its first conflict).
        problems: dict[str, InvalidKey] = {}
        catch_all = [h.name for h in self.headers if not h.proxies]
        if len(catch_all) > 1:
            second = [n for n, h in enumerate(self.headers) if not h.proxies][1]
            problems[f"headers.{second}"] = InvalidKey(
                f"headers.{second}", f"{' and '.join(catch_all)} both apply to every trusted proxy; a "
                "proxy sets one certificate header: give each entry the `proxies` that set it")
        named = [(n, net, h.name) for n, h in enumerate(self.headers) for net in h.proxies]
        for i, (entry, net, name) in enumerate(named):
            for other_entry, other, other_name in named[i + 1:]:
                if other_entry != entry and net.version == other.version and net.overlaps(other):
                    problems.setdefault(f"headers.{other_entry}", InvalidKey(
                        f"headers.{other_entry}", f"proxy {net} sets {name} and {other} sets "
                        f"{other_name}; a proxy sets one certificate header"))
        if problems:
            raise InvalidKeys(list(problems.values()))
        return self
