"""From a verified certificate to a user name, and the optional directory binding check.

Rules are tried in order (``mapping.rules``). A rule yields the distinct names it finds; one name
ends the search (after ``gateway_lookup_user`` found it, when ``lookup`` is on), none goes on to
the next rule, and two or more is ``cert.ambiguous``: a certificate that names two users names
nobody.

Rule types: ``upn`` (SAN otherName 1.3.6.1.4.1.311.20.2.3, the AD smart-card logon name),
``email`` (SAN rfc822Name), ``cn`` (subject commonName), ``subject_email`` (subject
emailAddress, PKCS #9), ``subject`` (a regular expression on the RFC 4514 subject),
``issuer_serial`` and ``thumbprint`` (explicit tables).

Directory binding (``require_directory_match``), like AD strong certificate mapping (KB5014754):
the directory's identity must carry the presented certificate in its claims, either

* ``userCertificate``: the DER certificates stored for the user (bytes, or base64/PEM text), or
* ``altSecurityIdentities``: strong mappings ``X509:<I>issuer<SR>serial`` (the serial in the
  byte order ``serial_order`` names, by default as AD writes it, byte-reversed hex:
  :func:`serial_spellings`; only when the issuer on the verified path is a configured CA, not
  one of that name from the client's chain), ``X509:<SKI>hex``
  (subjectKeyIdentifier, only when it is derived from the certificate's own key:
  :func:`key_identifiers`), ``X509:<SHA1-PUKEY>hex`` (SHA-1 of the certificate, as ``certutil``
  computes it).

The weak forms (``<I>..<S>``, ``<S>`` alone, ``<RFC822>``) are not accepted.

The ``subject`` rule searches the operator's pattern in the RFC 4514 text, where the structure
(``,`` between RDNs, ``+`` inside one, ``=`` after a type) and the values are spelt with the same
characters, and the values are what the certificate's holder asked the CA for. A CN
``eve,CN=admin``, printed ``CN=eve\\,CN=admin,OU=staff``, matched ``CN=(?P<user>[^,]+),OU=staff``
at ``CN=admin`` and logged in as admin (review of the client_cert plugin). The escape cannot
help a pattern that is not anchored at an RDN boundary, and patterns are the operator's to
write; so a subject with any value holding a character the text would escape (RFC 4514 section
2.4: ``,`` ``+`` ``"`` ``\\`` ``<`` ``>`` ``;`` NUL, a leading ``#`` or space, a trailing space)
or an ``=`` (with which a pattern finds ``TYPE=`` inside a value) maps to no one by this rule,
and the plugin logs why (:func:`subject_syntax_in_values`). The text a pattern sees then has
structure exactly where the certificate's Name has it. Rewriting the values instead (a hex
escape for every such character) would be as safe, but would change the names that existing
patterns yield; a subject with a comma in a value (``O=Example\\, Inc.``) is left to the rules
that read one attribute (``cn``) or to the explicit tables.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Any, Iterable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x448, x25519
from cryptography.x509.oid import NameOID

from gateway.model import plainly_spelt

from .settings import MappingRule

__all__ = ["SERIAL_ORDERS", "UPN_OID", "candidates", "directory_binding_matches", "issuer_serial_orders",
           "lowers_letter_for_letter", "misspelt", "serial_spellings", "subject_syntax_in_values", "thumbprint"]

UPN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")
_MAX_NAME = 256
#: Characters of RFC 4514 text's structure that a value may not hold for the ``subject`` rule
#: (section 2.4 escapes all but ``=``; the module docstring says why ``=`` is refused too).
_RDN_SYNTAX = frozenset(',+"\\<>;=\0')
#: The rules whose values are mailboxes (``local@domain``), which ``domains`` and ``strip_domain`` read.
_MAILBOX_RULES = frozenset({"upn", "email", "subject_email"})


def thumbprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _der_string(value: bytes) -> str | None:
    """Decode the DER of an otherName value: UTF8String (AD) or, leniently, IA5String; an
    explicit ``[0]`` wrapper (RFC 5280 AnotherName ``value [0] EXPLICIT``) is unwrapped if a
    library left it in place."""
    def tlv(data: bytes) -> tuple[int, bytes] | None:
        if len(data) < 2:
            return None
        tag, length, pos = data[0], data[1], 2
        if length & 0x80:
            count = length & 0x7F
            if count == 0 or count > 4 or len(data) < 2 + count:
                return None
            length, pos = int.from_bytes(data[2:2 + count], "big"), 2 + count
        if len(data) != pos + length:
            return None
        return tag, data[pos:]

    parsed = tlv(value)
    if parsed and parsed[0] == 0xA0:
        parsed = tlv(parsed[1])
    if not parsed or parsed[0] not in (0x0C, 0x16):
        return None
    try:
        return parsed[1].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _sans(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def _raw_values(rule: MappingRule, cert: x509.Certificate) -> list[str]:
    kind = rule.type
    if kind == "upn":
        sans = _sans(cert)
        found = [_der_string(n.value) for n in (sans.get_values_for_type(x509.OtherName) if sans else [])
                 if n.type_id == UPN_OID]
        return [v for v in found if v is not None]
    if kind == "email":
        sans = _sans(cert)
        return list(sans.get_values_for_type(x509.RFC822Name)) if sans else []
    if kind == "cn":
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if kind == "subject_email":
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)]
    if kind == "subject":
        return [] if subject_syntax_in_values(cert) else [cert.subject.rfc4514_string()]
    if kind == "issuer_serial":
        issuer = _norm_dn(cert.issuer.rfc4514_string())
        serial = f"{cert.serial_number:x}"
        return [e.user for e in rule.certificates if e.serial == serial and _norm_dn(e.issuer) == issuer]
    if kind == "thumbprint":
        user = rule.thumbprints.get(thumbprint(cert))
        return [user] if user else []
    raise ValueError(f"unknown rule type {kind}")


def subject_syntax_in_values(cert: x509.Certificate) -> list[str]:
    """The subject's attribute values that hold what RFC 4514 text spells its structure with
    (:data:`_RDN_SYNTAX`, a leading ``#`` or space, a trailing space), as ``TYPE=value`` texts
    escaped for a log line: with any, the ``subject`` rule maps to no one (module docstring).
    A value that is not a string (a BIT STRING) is printed as ``#`` and hex digits, which hold
    none of them."""
    found = []
    for attribute in cert.subject:
        value = attribute.value
        if not isinstance(value, str):
            continue
        if _RDN_SYNTAX.intersection(value) or value.startswith(("#", " ")) or value.endswith(" "):
            found.append(attribute.rfc4514_string())
    return found


def _norm_dn(text: str) -> str:
    """Compare DNs as text, forgiving case and blanks around separators."""
    return re.sub(r"\s*([,+=])\s*", r"\1", text.strip()).casefold()


def _shape(rule: MappingRule, value: str) -> str | None:
    if not _readable(rule, value):  # the whole value: a pattern's `$` matches before a final newline
        return None
    if rule.type in _MAILBOX_RULES:
        local, at, domain = value.rpartition("@")
        if rule.domains:
            if not at or _domain_key(domain) not in {_domain_key(d) for d in rule.domains}:
                return None
        strip = rule.strip_domain if rule.strip_domain is not None else rule.type == "upn"
        if strip and at:
            value = local
    if rule.pattern is not None:
        match = re.search(rule.pattern, value)
        if match is None:
            return None
        if "user" in match.re.groupindex:
            value = match.group("user")
        elif match.re.groups:
            value = match.group(1)
        else:
            value = match.group(0)
        if value is None:
            return None
    if not _canonical(value):
        return None
    if rule.lowercase:
        value = value.lower()
    if not value or len(value) > _MAX_NAME:
        return None
    return value


#: A-Z to a-z and nothing else: the case DNS names ignore (RFC 4343).
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _domain_key(domain: str) -> str:
    """*domain* as ``domains`` compares it: without regard to ASCII case, as DNS compares names,
    and no other folding. ``str.casefold`` read ``ß`` as ``ss``: a UPN ``admin@groß.test``, of
    another domain (IDNA 2008 ``xn--gro-7ka.test``), passed ``domains: [gross.test]`` and named
    admin (review of the client_cert plugin)."""
    return domain.translate(_ASCII_LOWER)


def _canonical(value: str) -> bool:
    """Whether *value* is a name as the certificate should spell it (:func:`plainly_spelt`). With
    a certificate the name is the whole credential, and directories match names loosely: a
    certificate naming ``ｆｒａｎｋ`` (fullwidth), ``fran\u212a`` (the Kelvin sign) or
    ``frank\u00a0`` logged in as frank (review of the client_cert plugin). Such a name maps to no
    one (``cert.unmapped``)."""
    return plainly_spelt(value)


def _readable(rule: MappingRule, value: str) -> bool:
    """Whether *value*, as the certificate holds it, can name anyone by *rule*: plainly spelt
    (:func:`_canonical`), and for the mailbox rules one mailbox, ``local@domain`` with one ``@``.
    ``domains`` and ``strip_domain`` read the domain after the last ``@``, so a UPN
    ``admin@partner.test@corp.test`` passed ``domains: [corp.test]`` and named
    ``admin@partner.test``, which the directory finds as another domain's user (the ``active_directory``
    preset looks names up by userPrincipalName too; review of the client_cert plugin). With
    ``lowercase``, a value that does not lower letter for letter (:func:`lowers_letter_for_letter`)."""
    return (_canonical(value) and (rule.type not in _MAILBOX_RULES or value.count("@") <= 1)
            and (not rule.lowercase or lowers_letter_for_letter(value)))


def lowers_letter_for_letter(value: str) -> bool:
    """Whether ``lowercase`` can lower *value* letter for letter into a name in its one spelling.
    ``İ`` (U+0130) cannot, the one letter in Unicode: ``str.lower`` makes it ``i`` and U+0307
    COMBINING DOT ABOVE, while a Turkish reader (and a CA uppercasing ``alice`` in a Turkish
    locale) takes it for ``i``, and slapd lowers it to ``i``. A certificate for ``ALİCE`` or
    ``alİce`` logged in as the account ``ali\\u0307ce`` beside alice, and without that account
    named ``ali\\u0307ce`` to the services behind a rule without ``lookup`` (stop 47). Such a
    value names no one by a ``lowercase`` rule; a rule without it reads the name as spelt."""
    lowered = value.lower()
    return len(lowered) == len(value) and _canonical(lowered)


def candidates(rule: MappingRule, cert: x509.Certificate) -> list[str]:
    """The distinct user names *rule* finds in *cert*, in order."""
    names: list[str] = []
    for raw in _raw_values(rule, cert):
        name = _shape(rule, raw)
        if name is not None and name not in names:
            names.append(name)
    return names


def misspelt(rule: MappingRule, cert: x509.Certificate) -> list[str]:
    """The values *rule* reads in *cert* that are not names as a certificate should spell them
    (:func:`_readable`): beside a good one, they make the certificate name two identities
    (``al\\nice@`` and ``bob@``, or ``bob@`` and ``admin@partner.test@``), and it names nobody
    (review of what the gateway writes)."""
    return [raw for raw in _raw_values(rule, cert) if not _readable(rule, raw)]


# -- directory binding ---------------------------------------------------------------------------


def _as_der(value: Any) -> bytes | None:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-----BEGIN"):
            try:
                return x509.load_pem_x509_certificate(text.encode()).public_bytes(serialization.Encoding.DER)
            except ValueError:
                return None
        try:
            return base64.b64decode(re.sub(r"\s+", "", text), validate=True)
        except (binascii.Error, ValueError):
            return None
    return None


def _listed(value: Any) -> Iterable[Any]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        return (value,)
    return value if isinstance(value, (list, tuple, set, frozenset)) else ()


#: The byte orders of ``serial_order``: AD's (KB5014754: ``X509:<I>IssuerName<SR>1200000000AC11000000002B``
#: names the certificate whose serial ``certutil`` and ``openssl`` print ``2B0000000011AC0000000012``)
#: and the order of the DER INTEGER, as ``openssl x509 -serial`` prints it.
SERIAL_ORDERS = {"reversed": ("reversed",), "forward": ("forward",), "either": ("reversed", "forward")}


def serial_spellings(cert: x509.Certificate, order: str) -> set[str]:
    """The hex spellings of *cert*'s serial number in byte *order* (``reversed``, ``forward``):
    the DER INTEGER's octets, with and without a leading zero octet (the sign octet of a serial
    whose top bit is set, which tools differ in showing). One order only: a serial read in both
    orders is also the byte-reverse of another serial, and a certificate the same CA issued with
    that serial (``0x3412`` beside ``0x1234``, which a CA numbering its certificates in sequence
    issues in time) met the first one's mapping (stop 47)."""
    number = cert.serial_number
    octets = number.to_bytes(max(1, (number.bit_length() + 8) // 8), "big", signed=True)
    forms = {octets, octets.lstrip(b"\0") or octets}  # never the empty string (serial 0)
    if order == "reversed":
        forms = {form[::-1] for form in forms}
    return {form.hex() for form in forms}


def _issuer_serial_mappings(cert: x509.Certificate, order: str) -> set[str]:
    """The normalised ``X509:<I>..<SR>..`` mappings naming *cert*, its serial in byte *order*
    and its issuer in either RDN order (RFC 4514 text, or X.500 order as AD writes it)."""
    issuer = cert.issuer
    issuers = {issuer.rfc4514_string(), x509.Name(list(reversed(list(issuer)))).rfc4514_string()}
    return {f"x509:<i>{_norm_dn(i)}<sr>{s}" for i in issuers for s in serial_spellings(cert, order)}


def strong_mappings(cert: x509.Certificate, serial_order: str = "reversed") -> set[str]:
    """The ``altSecurityIdentities`` values that strongly name *cert*, normalised; the serial of
    ``X509:<I>..<SR>..`` in the byte orders *serial_order* reads (:data:`SERIAL_ORDERS`)."""
    found = {m for order in SERIAL_ORDERS[serial_order] for m in _issuer_serial_mappings(cert, order)}
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        ski = None
    if ski is not None and ski in key_identifiers(cert):
        found.add(f"x509:<ski>{ski.hex()}")
    found.add(f"x509:<sha1-pukey>{hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest()}")
    return found


def key_identifiers(cert: x509.Certificate) -> set[bytes]:
    """The subjectKeyIdentifiers that *cert*'s own public key yields by the methods CAs use (RFC
    5280 4.2.1.2: SHA-1 of the subjectPublicKey, or ``0100`` and its last 60 bits; RFC 7093: the
    leftmost 160 bits of its SHA-256, -384 or -512, or of the SHA-256 of the whole
    SubjectPublicKeyInfo). The SKI is an extension the issuing CA writes: any CA the gateway trusts
    (the partner CA the docs warn of) could copy alice's SKI, which is public, into a certificate
    for its own key and meet alice's ``X509:<SKI>`` mapping (stop 46 review). Only an SKI derived
    from the certificate's own key (which the TLS handshake proved the client holds) binds it."""
    try:
        public_key = cert.public_key()
        spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        key = _subject_public_key(public_key)
    except Exception:  # noqa: BLE001 - a key type cryptography cannot read: no SKI binds it (fail closed)
        return set()
    sha1 = hashlib.sha1(key).digest()
    return {sha1, bytes([0x40 | (sha1[12] & 0x0F)]) + sha1[13:], hashlib.sha256(key).digest()[:20],
            hashlib.sha384(key).digest()[:20], hashlib.sha512(key).digest()[:20], hashlib.sha256(spki).digest()[:20]}


def _subject_public_key(public_key) -> bytes:
    """The contents of a SubjectPublicKeyInfo's subjectPublicKey BIT STRING, as cryptography
    encodes each key type (RSAPublicKey in DER, an EC point uncompressed, EdDSA and ECDH keys
    raw); another type raises (no SKI binds it)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return public_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    if isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey, x25519.X25519PublicKey,
                               x448.X448PublicKey)):
        return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    raise TypeError(f"no subjectPublicKey encoding for {type(public_key).__name__}")


def _norm_mapping(text: str) -> str:
    text = text.strip()
    head, sep, rest = text.partition("<SR>") if "<SR>" in text else text.partition("<sr>")
    if text.lower().startswith("x509:<i>") and sep:
        return f"x509:<i>{_norm_dn(head[8:])}<sr>{rest.strip().lower()}"
    return re.sub(r"\s+", "", text).lower()


def _claim(claims: Mapping[str, Any], name: str) -> Iterable[Any]:
    """The values of claim *name* (lower case), matched case-insensitively and without an LDAP
    option such as ``;binary``."""
    lowered = {str(k).lower().split(";")[0]: v for k, v in claims.items()}  # userCertificate;binary
    return _listed(lowered.get(name))


def _mappings(claims: Mapping[str, Any]) -> set[str]:
    """The directory's ``altSecurityIdentities`` values, normalised."""
    return {_norm_mapping(value) for value in _claim(claims, "altsecurityidentities") if isinstance(value, str)}


def directory_binding_matches(claims: Mapping[str, Any], cert: x509.Certificate, *,
                              issuer_serial: bool = True, serial_order: str = "reversed") -> bool:
    """True when the directory's claims hold *cert* (``userCertificate``) or a strong
    ``altSecurityIdentities`` mapping to it. Claim names are matched case-insensitively, and an
    LDAP option such as ``;binary`` is ignored. *issuer_serial* false: the ``X509:<I>..<SR>..``
    forms do not count (the issuer on the verified path is not a configured CA, only one of the
    same name: ``ClientCertPlugin.map_user``); *serial_order*: the byte order of their serial
    (:func:`serial_spellings`)."""
    der = cert.public_bytes(serialization.Encoding.DER)
    for value in _claim(claims, "usercertificate"):
        if _as_der(value) == der:
            return True
    strong = strong_mappings(cert, serial_order)
    if not issuer_serial:
        strong = {m for m in strong if not m.startswith("x509:<i>")}
    return not strong.isdisjoint(_mappings(claims))


def issuer_serial_orders(claims: Mapping[str, Any], cert: x509.Certificate) -> set[str]:
    """The byte orders (``reversed``, ``forward``) in which an ``X509:<I>..<SR>..`` mapping of
    *claims* names *cert*: both for a serial that reads the same either way, none without such a
    mapping. For the log line that tells an operator a mapping is in the other order than
    ``serial_order`` reads (``ClientCertPlugin.map_user``)."""
    mappings = _mappings(claims)
    return {order for order in ("reversed", "forward")
            if not mappings.isdisjoint(_issuer_serial_mappings(cert, order))}
