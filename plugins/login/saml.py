"""SAML 2.0 identity provider: the Web Browser SSO profile (SAML profiles section 4.1).

AuthnRequests arrive by HTTP-Redirect or HTTP-POST at ``/saml/sso`` (a POST without the session
cookie, which a cross-site POST never carries, waits at ``/login``, where a session answers it);
the Response goes back by HTTP-POST to a registered Assertion Consumer Service URL only. Reads
``login.saml``, ``login.entity_id``, ``login.base_url``, ``login.clock_skew`` and the size limits.

A request passes named checks, each with its own reason code (docs/reasons.md), in this order:
size and decoding (``login.*``), ``saml.not_authn_request``, ``saml.unknown_sp``,
``saml.acs_not_registered``, ``saml.binding_unsupported``, ``saml.destination_mismatch``,
``saml.request_expired``, then, for SPs with a ``request_certificate``,
``saml.signature_missing`` / ``saml.signature_invalid``, ``saml.destination_mismatch`` (a signed
message must name its Destination) and ``saml.request_replayed``; a ``<saml:Subject>`` that is not
one ``<saml:NameID>`` of at most :data:`MAX_NAME_ID_CHARS` characters is
``saml.subject_unsupported``, a ``<samlp:RequestedAuthnContext>`` that is not one, with a schema
``Comparison`` and 1 to 16 class (or declaration) references, ``login.malformed``. These get the generic 400 page.

A request that passed them is answered at its (validated) ACS URL, signed as the SP's Success
Responses are; with an error status instead of an assertion (core section 3.2.2.2) when it asks
for what cannot be given: a ``NameIDPolicy`` Format other than the SP's ``name_id_format``
(``Requester``/``InvalidNameIDPolicy``, ``saml.nameid_policy_unsupported``, checked before any
session is looked at), ``IsPassive`` where no session may answer (``Responder``/``NoPassive``,
``saml.no_passive``; also with ``ForceAuthn``), a ``<saml:Subject>`` other than the NameID this
SP would be given for the user signed in (``Responder``/``UnknownPrincipal``,
``saml.subject_mismatch``, checked when the answer is made: after a fresh sign-in as for a
reused session, so that no assertion ever names someone the request did not, core 3.4.1.4), a
``RequestedAuthnContext`` the sign-in does not meet (``Responder``/``NoAuthnContext``,
``saml.authn_context_unmet``, core 3.3.2.2.1: at once when no class authgw states could meet
it, else when the answer is made, by the class of the session's sign-in, :func:`context_satisfies`),
and a user whose ``name_id_source`` field is empty (``Responder``/``InvalidNameIDPolicy``,
``saml.name_id_unavailable``: never another field in its place).
:class:`RequestChecker` and :class:`ResponseBuilder` are sans-I/O (time is passed in); the
handlers at the bottom do the HTTP.

Signatures are made and verified by signxml (exclusive C14N, RSA-SHA256); the HTTP-Redirect
request signature (bindings section 3.4.4.1) is checked over the raw query octets with
``cryptography``. The query is parsed once (:func:`read_redirect_query`): the message, RelayState
and SigAlg read are those whose raw values were verified; a binding parameter with a
percent-encoded name or given twice, both ``SAMLRequest`` and ``SAMLResponse``, or the message
field another endpoint takes, is ``login.malformed``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import re
import secrets
from dataclasses import dataclass
from urllib.parse import unquote_plus

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.serialization import Encoding
from lxml import etree
from signxml import CanonicalizationMethod, XMLSigner, XMLVerifier
from signxml.exceptions import InvalidInput, InvalidSignature as XMLInvalidSignature

from gateway import Identity, Route
from gateway.logs import printable

from .keys import KeyPair
from .sessions import STORE_ERRORS
from .settings import NAMEID_FORMATS, LoginSettings, SamlServiceProvider
from .xmlsafe import decode_post, inflate_redirect, parse_xml
from .web import Refused, SharedBudget, read_form, request_cookie

__all__ = ["AuthnRequest", "BindingMessage", "RedirectQuery", "RequestChecker", "ResponseBuilder", "SamlIdp",
           "read_redirect_query"]

SAMLP = "urn:oasis:names:tc:SAML:2.0:protocol"
SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
MD = "urn:oasis:names:tc:SAML:2.0:metadata"
DS = "http://www.w3.org/2000/09/xmldsig#"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
XS = "http://www.w3.org/2001/XMLSchema"
BINDING_POST = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST"
BINDING_REDIRECT = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect"
RSA_SHA256 = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"
AUTHN_CONTEXT = {
    "kerberos": "urn:oasis:names:tc:SAML:2.0:ac:classes:Kerberos",
    "client_cert": "urn:oasis:names:tc:SAML:2.0:ac:classes:X509",
}
PASSWORD_CONTEXT = "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"
#: The authentication context classes authgw states (core 2.7.2.2, authn-context 3.4): one per
#: sign-in method, as :func:`authn_context_class` gives them.
ISSUED_CONTEXTS = (PASSWORD_CONTEXT, AUTHN_CONTEXT["kerberos"], AUTHN_CONTEXT["client_cert"])
#: authgw's order of the classes (a partial order; core 3.3.2.2.1 leaves it to the responder):
#: each class, and the classes it is at least as strong as. A password over TLS is at least
#: ``Password`` (and ``unspecified``); a Kerberos ticket or a client certificate is at least a
#: password over TLS; Kerberos and X509 are not compared with each other.
_WEAKER = ("urn:oasis:names:tc:SAML:2.0:ac:classes:unspecified", "urn:oasis:names:tc:SAML:2.0:ac:classes:Password")
AT_LEAST = {
    PASSWORD_CONTEXT: frozenset({PASSWORD_CONTEXT, *_WEAKER}),
    AUTHN_CONTEXT["kerberos"]: frozenset({AUTHN_CONTEXT["kerberos"], PASSWORD_CONTEXT, *_WEAKER}),
    AUTHN_CONTEXT["client_cert"]: frozenset({AUTHN_CONTEXT["client_cert"], PASSWORD_CONTEXT, *_WEAKER}),
}
#: RequestedAuthnContext (core 3.3.2.2.1): its Comparison values (``exact`` when absent), and
#: the most class references read from one (more is refused as malformed).
COMPARISONS = ("exact", "minimum", "maximum", "better")
MAX_CONTEXT_REFS = 16
MAX_CONTEXT_REF_CHARS = 1024
#: The longest ``<saml:Subject>`` NameID read from a request: a request waiting for ``/login`` is
#: parked in the session store with it (a persistent identifier is at most 256, core 8.3.7).
MAX_NAME_ID_CHARS = 1024
#: Attribute NameFormats (core sections 8.2.2, 8.2.3): a name that is a URI (has a ``:``, as
#: ``urn:oid:...`` and ``http://schemas.xmlsoap.org/claims/UPN``) is not an ``xs:Name``.
ATTRNAME_BASIC = "urn:oasis:names:tc:SAML:2.0:attrname-format:basic"
ATTRNAME_URI = "urn:oasis:names:tc:SAML:2.0:attrname-format:uri"
#: Status codes (core section 3.2.2.2).
STATUS = "urn:oasis:names:tc:SAML:2.0:status:"
SUCCESS, REQUESTER, RESPONDER = STATUS + "Success", STATUS + "Requester", STATUS + "Responder"
NO_PASSIVE, UNKNOWN_PRINCIPAL = STATUS + "NoPassive", STATUS + "UnknownPrincipal"
REQUEST_DENIED = STATUS + "RequestDenied"
NO_AUTHN_CONTEXT = STATUS + "NoAuthnContext"
INVALID_NAMEID_POLICY = STATUS + "InvalidNameIDPolicy"
#: NameID Formats a request may name without asking for one (core 3.4.1.1, 8.3.1).
UNSPECIFIED = "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified"

log = logging.getLogger("authgw.plugin.login")


def instant(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_instant(text: str | None) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat((text or "").replace("Z", "+00:00"))
    except ValueError:
        raise Refused("saml.request_expired", "IssueInstant is not a time") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


@dataclass(frozen=True)
class AuthnRequest:
    id: str
    issuer: str
    acs_url: str | None
    acs_index: str | None
    binding: str | None
    destination: str | None
    issue_instant: str
    force_authn: bool
    is_passive: bool = False
    #: The ``<saml:Subject>``'s NameID: ``{"name_id", "format", "name_qualifier",
    #: "sp_name_qualifier"}`` (absent attributes ``None``), or ``None`` without a Subject.
    subject: dict | None = None
    #: ``NameIDPolicy``: ``{"format", "sp_name_qualifier"}``, or ``None`` without one.
    name_id_policy: dict | None = None
    #: ``RequestedAuthnContext``: ``{"comparison", "class_refs", "decl_refs"}`` (the lists of
    #: AuthnContextClassRef and AuthnContextDeclRef values, one of them empty), or ``None``.
    authn_context: dict | None = None


def _children(element: etree._Element, tag: str) -> list[etree._Element]:
    return [child for child in element if child.tag == tag]


def _read_subject(root: etree._Element) -> dict | None:
    """The request's ``<saml:Subject>`` (core 3.4.1): exactly one ``<saml:NameID>`` is read; a
    ``BaseID``, ``EncryptedID``, ``SubjectConfirmation`` or a second NameID cannot be honoured, and
    is refused rather than ignored (``saml.subject_unsupported``)."""
    subjects = _children(root, f"{{{SAML}}}Subject")
    if not subjects:
        return None
    if len(subjects) > 1:
        raise Refused("saml.subject_unsupported", "more than one Subject")
    parts = [child for child in subjects[0] if isinstance(child.tag, str)]  # not comments
    if len(parts) != 1 or parts[0].tag != f"{{{SAML}}}NameID":
        names = ", ".join(etree.QName(child).localname for child in parts) or "nothing"
        raise Refused("saml.subject_unsupported", f"a Subject with {names[:100]}, not one NameID")
    name_id = parts[0]
    value = (name_id.text or "").strip()
    if len(value) > MAX_NAME_ID_CHARS:
        # 250,000 characters deflate to 750 bytes of query, and each such request (anyone's, no
        # credential) parked a 250 KB record until the sign-in: sessions.max_pending of them, 5 GB
        # of store (review of the XML protocols). No NameID issued is that long: refused, unread.
        raise Refused("saml.subject_unsupported", f"a NameID of {len(value)} characters")
    return {"name_id": value, "format": name_id.get("Format"),
            "name_qualifier": name_id.get("NameQualifier"), "sp_name_qualifier": name_id.get("SPNameQualifier")}


def _read_name_id_policy(root: etree._Element) -> dict | None:
    policies = _children(root, f"{{{SAMLP}}}NameIDPolicy")
    if len(policies) > 1:
        raise Refused("login.malformed", "more than one NameIDPolicy")
    if not policies:
        return None
    return {"format": policies[0].get("Format"), "sp_name_qualifier": policies[0].get("SPNameQualifier")}


def _read_authn_context(root: etree._Element) -> dict | None:
    """The request's ``<samlp:RequestedAuthnContext>`` (core 3.3.2.2.1), read strictly: at most
    one, a ``Comparison`` of the schema's four values (``exact`` when absent), one to
    :data:`MAX_CONTEXT_REFS` references, all ``AuthnContextClassRef`` or all
    ``AuthnContextDeclRef`` (the schema's choice), each a non-empty URI of at most
    :data:`MAX_CONTEXT_REF_CHARS` characters; anything else is ``login.malformed``."""
    found = _children(root, f"{{{SAMLP}}}RequestedAuthnContext")
    if not found:
        return None
    if len(found) > 1:
        raise Refused("login.malformed", "more than one RequestedAuthnContext")
    comparison = found[0].get("Comparison", "exact")
    if comparison not in COMPARISONS:
        raise Refused("login.malformed", f"RequestedAuthnContext Comparison {comparison[:40]!r}")
    refs: dict[str, list[str]] = {f"{{{SAML}}}AuthnContextClassRef": [], f"{{{SAML}}}AuthnContextDeclRef": []}
    parts = [child for child in found[0] if isinstance(child.tag, str)]  # not comments
    for part in parts:
        if part.tag not in refs or len(part):
            raise Refused("login.malformed", f"RequestedAuthnContext holds {etree.QName(part).localname[:60]}")
        value = (part.text or "").strip()
        if not value or len(value) > MAX_CONTEXT_REF_CHARS:
            raise Refused("login.malformed", "an empty or overlong authentication context reference")
        refs[part.tag].append(value)
    classes, declarations = refs.values()
    if not parts or len(parts) > MAX_CONTEXT_REFS or (classes and declarations):
        raise Refused("login.malformed", f"RequestedAuthnContext with {len(classes)} class and "
                                         f"{len(declarations)} declaration references")
    return {"comparison": comparison, "class_refs": classes, "decl_refs": declarations}


def authn_context_class(identity: Identity) -> str:
    """The AuthnContextClassRef a sign-in by *identity*'s method is stated with (and, in OIDC,
    its ``acr``)."""
    return AUTHN_CONTEXT.get(identity.method, PASSWORD_CONTEXT)


def context_satisfies(requested: dict, issued: str) -> bool:
    """Whether a sign-in stated as the class *issued* meets *requested* (core 3.3.2.2.1, by
    authgw's order :data:`AT_LEAST`): ``exact``, one of the classes; ``minimum``, at least as
    strong as one of them; ``better``, stronger than every one; ``maximum``, not stronger than
    one of them. Declaration references are never met (authgw states no declarations)."""
    refs = requested["class_refs"]
    if not refs:
        return False
    weaker = AT_LEAST.get(issued, frozenset({issued}))
    comparison = requested["comparison"]
    if comparison == "exact":
        return issued in refs
    if comparison == "minimum":
        return any(ref in weaker for ref in refs)
    if comparison == "better":
        return all(ref in weaker and ref != issued for ref in refs)
    return any(issued in AT_LEAST.get(ref, frozenset({ref})) for ref in refs)  # maximum


def _boolean(root: etree._Element, name: str) -> bool:
    """An ``xs:boolean`` attribute (``false`` when absent). Its whitespace is collapsed (XML Schema
    part 2, 3.2.2): ``ForceAuthn=" true "`` was read as false, and the request answered from the
    session without the new sign-in it asks for. A value that is no boolean is refused, not read
    as false; ``True`` is read as true (the reading that asks more of the sign-in)."""
    value = root.get(name)
    if value is None:
        return False
    value = value.strip(" \t\r\n").lower()
    if value not in ("true", "1", "false", "0"):
        raise Refused("login.malformed", f"{name} is not a boolean: {value[:20]!r}")
    return value in ("true", "1")


def read_authn_request(root: etree._Element) -> AuthnRequest:
    if root.tag != f"{{{SAMLP}}}AuthnRequest" or root.get("Version") != "2.0":
        raise Refused("saml.not_authn_request", str(root.tag)[:100])
    issuer = root.findtext(f"{{{SAML}}}Issuer")
    request_id = root.get("ID")
    if not issuer or not request_id or len(request_id) > 256:
        raise Refused("saml.not_authn_request", "no Issuer or ID")
    return AuthnRequest(request_id, issuer.strip(), root.get("AssertionConsumerServiceURL"),
                        root.get("AssertionConsumerServiceIndex"), root.get("ProtocolBinding"),
                        root.get("Destination"), root.get("IssueInstant", ""), _boolean(root, "ForceAuthn"),
                        _boolean(root, "IsPassive"), _read_subject(root), _read_name_id_policy(root),
                        _read_authn_context(root))


@dataclass(frozen=True)
class Unanswerable:
    """Why a request gets an error Response instead of an assertion: the reason code (logged),
    the top-level and second-level status codes and the StatusMessage."""

    reason: str
    status: str
    second: str
    message: str
    detail: str = ""


def unanswerable(idp: str, sp: SamlServiceProvider, policy: dict | None, subject: dict | None,
                 name_id: str | None = None, authn_context: dict | None = None,
                 issued_context: str | None = None) -> Unanswerable | None:
    """What in a request's ``NameIDPolicy``, ``RequestedAuthnContext`` and ``<saml:Subject>``
    *sp* cannot be given (core 3.4.1.1, 3.3.2.2.1, 3.4.1.4): a policy Format other than
    ``unspecified`` and the one this SP is issued (``encrypted`` included: not supported), or
    another ``SPNameQualifier``; an authentication context that no class authgw states could
    meet, or, with *issued_context* (the class of the signed-in user's sign-in), that this one
    does not meet; a Subject in another Format, qualified by another IdP than *idp* (this entity
    id) or for another SP, naming a transient identifier (never issued twice), or, with *name_id*
    (the NameID the signed-in user would get), naming someone else. ``None``: fine."""
    issued_format = NAMEID_FORMATS[sp.name_id_format]
    if policy is not None:
        if policy["format"] not in (None, UNSPECIFIED, issued_format):
            return Unanswerable("saml.nameid_policy_unsupported", REQUESTER, INVALID_NAMEID_POLICY,
                                f"NameIDPolicy Format {issued_format} only", str(policy["format"])[:200])
        if policy["sp_name_qualifier"] not in (None, sp.entity_id):
            return Unanswerable("saml.nameid_policy_unsupported", REQUESTER, INVALID_NAMEID_POLICY,
                                "NameIDPolicy SPNameQualifier is not the requester",
                                str(policy["sp_name_qualifier"])[:200])
    if authn_context is not None:
        candidates = ISSUED_CONTEXTS if issued_context is None else (issued_context,)
        if not any(context_satisfies(authn_context, issued) for issued in candidates):
            asked = authn_context["class_refs"] or [f"declaration {d}" for d in authn_context["decl_refs"]]
            detail = f"{authn_context['comparison']} {' '.join(asked)}"[:300]
            if issued_context is not None:
                detail += f"; the sign-in is {issued_context}"
            return Unanswerable("saml.authn_context_unmet", RESPONDER, NO_AUTHN_CONTEXT,
                                "the requested authentication context cannot be met", detail)
    if subject is None:
        return None
    other = None
    if subject["format"] not in (None, UNSPECIFIED, issued_format):
        other = f"Format {subject['format'][:200]}"
    elif sp.name_id_format == "transient":
        other = "a transient NameID"
    elif subject["name_qualifier"] not in (None, idp):
        other = f"NameQualifier {subject['name_qualifier'][:200]}"
    elif subject["sp_name_qualifier"] not in (None, sp.entity_id):
        other = f"SPNameQualifier {subject['sp_name_qualifier'][:200]}"
    elif name_id is not None and subject["name_id"] != name_id:
        other = f"NameID {subject['name_id'][:200]!r}, not {name_id[:200]!r}"
    if other is not None:
        return Unanswerable("saml.subject_mismatch", RESPONDER, UNKNOWN_PRINCIPAL,
                            "the request's Subject is not the user signed in", other)
    return None


class RequestChecker:
    """The named checks of an AuthnRequest against the registered SPs (no I/O)."""

    def __init__(self, settings: LoginSettings, sso_url: str) -> None:
        self.providers = {sp.entity_id: sp for sp in settings.saml.service_providers}
        self.sso_url = sso_url
        self.skew = dt.timedelta(seconds=settings.clock_skew)
        self.lifetime = dt.timedelta(seconds=settings.saml.request_lifetime)
        self.certificates = {sp.entity_id: x509.load_pem_x509_certificate(sp.request_certificate.read_bytes())
                             for sp in settings.saml.service_providers if sp.request_certificate}

    def provider(self, entity_id: str) -> SamlServiceProvider:
        sp = self.providers.get(entity_id)
        if sp is None:
            raise Refused("saml.unknown_sp", entity_id[:200])
        return sp

    def check(self, request: AuthnRequest, now: dt.datetime) -> tuple[SamlServiceProvider, str]:
        """The SP and the ACS URL to answer, or :class:`Refused` naming the failed check."""
        sp = self.provider(request.issuer)
        if request.acs_url is not None:
            if request.acs_url not in sp.acs_urls:  # exact match: no prefix, no open redirect
                raise Refused("saml.acs_not_registered", request.acs_url[:200])
            acs = request.acs_url
        elif request.acs_index is not None:
            if not _INDEX.fullmatch(request.acs_index) or int(request.acs_index) >= len(sp.acs_urls):
                raise Refused("saml.acs_not_registered", f"index {request.acs_index[:10]}")
            acs = sp.acs_urls[int(request.acs_index)]
        else:
            acs = sp.acs_urls[0]
        if request.binding not in (None, BINDING_POST):
            raise Refused("saml.binding_unsupported", request.binding[:200])
        if request.destination is not None and request.destination != self.sso_url:
            raise Refused("saml.destination_mismatch", request.destination[:200])
        issued = _parse_instant(request.issue_instant)
        if issued > now + self.skew or issued < now - self.lifetime - self.skew:
            raise Refused("saml.request_expired", request.issue_instant[:40])
        return sp, acs

    def verify_redirect_signature(self, sp: SamlServiceProvider, query: RedirectQuery) -> None:
        """HTTP-Redirect: the signature over the raw octets of the parameters that were read
        (:func:`read_redirect_query`), SAML bindings section 3.4.4.1."""
        if query.signature is None or query.sig_alg is None:
            raise Refused("saml.signature_missing", sp.entity_id[:200])
        if query.sig_alg != RSA_SHA256:
            raise Refused("saml.signature_invalid", "only rsa-sha256 is accepted")
        try:
            self.certificates[sp.entity_id].public_key().verify(_signature_bytes(query.signature),
                                                                query.signed_octets.encode("ascii"),
                                                                padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, ValueError, TypeError):
            raise Refused("saml.signature_invalid", sp.entity_id[:200]) from None

    def verify_post_signature(self, sp: SamlServiceProvider, data: bytes,
                              root: etree._Element) -> tuple[etree._Element, bytes]:
        """HTTP-POST: an enveloped XML signature over the whole AuthnRequest; returns the signed
        element (only what was signed is used, against signature wrapping) and the value of the
        signature that was checked."""
        if root.find(f"{{{DS}}}Signature") is None:
            raise Refused("saml.signature_missing", sp.entity_id[:200])
        pem = self.certificates[sp.entity_id].public_bytes(Encoding.PEM)
        try:
            result = XMLVerifier().verify(root, x509_cert=pem.decode(), expect_references=1, id_attribute="ID")
        except (XMLInvalidSignature, InvalidInput) as exc:
            raise Refused("saml.signature_invalid", str(exc)[:200]) from None
        except Exception as exc:  # noqa: BLE001 - a signature the verifier cannot even read (no SignedInfo,
            # an empty SignatureValue: lxml's DocumentInvalid, a TypeError) is not a valid one: fail closed
            raise Refused("saml.signature_invalid", f"unreadable signature: {exc.__class__.__name__}") from None
        signed = result.signed_xml
        if signed is None or signed.tag != root.tag or signed.get("ID") != root.get("ID"):
            raise Refused("saml.signature_invalid", "the signature does not cover the request")
        try:
            value = _signature_bytes(result.signature_xml.findtext(f"{{{DS}}}SignatureValue") or "")
        except ValueError:
            raise Refused("saml.signature_invalid", "unreadable signature value") from None
        return signed, value


#: The parameters of the SAML bindings (bindings section 3.4.4 and 3.5.4): each at most once. With
#: two, the message read and the one whose signature was checked could differ.
BINDING_PARAMETERS = ("SAMLRequest", "SAMLResponse", "RelayState", "SigAlg", "Signature")
#: The message parameters: a query or form carries exactly one, the one its endpoint expects.
MESSAGE_FIELDS = ("SAMLRequest", "SAMLResponse")
#: An AssertionConsumerServiceIndex (xs:unsignedShort), in ASCII digits (str.isdigit() takes "²").
_INDEX = re.compile(r"[0-9]{1,5}")
#: What XML 1.0 cannot carry (section 2.2): C0 controls but tab, CR and LF; U+FFFE, U+FFFF. A
#: directory value holding one made lxml raise while the answer was built: a 500 at every
#: sign-in of that user, or of every member of a group so named (review of the login door).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def once(params) -> None:
    """Refuse a form that carries a SAML binding parameter more than once."""
    for name in BINDING_PARAMETERS:
        if len(params.getall(name, ())) > 1:
            raise Refused("login.malformed", f"{name} appears more than once")


def message_field(present, expected: str | None) -> str:
    """The one message parameter among *present* (names): refused when both are there, or when
    it is not the *expected* one (``None``: either)."""
    fields = [name for name in MESSAGE_FIELDS if name in present]
    if len(fields) > 1:
        raise Refused("login.malformed", "both SAMLRequest and SAMLResponse")
    field = fields[0] if fields else expected or MESSAGE_FIELDS[0]
    if expected is not None and field != expected:
        raise Refused("login.malformed", f"{field} where a {expected} belongs")
    return field


@dataclass(frozen=True)
class RedirectQuery:
    """The binding parameters of one HTTP-Redirect query, read once from the raw query string:
    the message, RelayState and SigAlg used are the ones whose raw values are the signed octets."""

    field: str
    message: str
    relay_state: str | None
    sig_alg: str | None
    signature: str | None
    signed_octets: str


def read_redirect_query(raw_query: str, expected: str | None = "SAMLRequest") -> RedirectQuery:
    """Parse *raw_query* (as sent) into the binding parameters, raw and decoded together. A
    binding parameter with a percent-encoded name, given twice or not UTF-8 is refused: a
    reader that decodes names (aiohttp's ``request.query``) would see another query than the
    signed octets are made of."""
    raw: dict[str, str] = {}
    decoded: dict[str, str] = {}
    for part in raw_query.split("&"):
        raw_name, _, raw_value = part.partition("=")
        name = unquote_plus(raw_name, errors="replace")
        if name not in BINDING_PARAMETERS:
            continue  # not read, not signed
        if raw_name != name:
            raise Refused("login.malformed", f"{name} with a percent-encoded name")
        if name in raw:
            raise Refused("login.malformed", f"{name} appears more than once")
        try:
            decoded[name] = unquote_plus(raw_value, errors="strict")
        except UnicodeDecodeError:
            raise Refused("login.malformed", f"{name} is not UTF-8") from None
        raw[name] = raw_value
    field = message_field(raw, expected)
    # Bindings 3.4.4.1: the signed octets are the parameters as sent, in this order.
    octets = "&".join(f"{name}={raw[name]}" for name in (field, "RelayState", "SigAlg") if name in raw)
    return RedirectQuery(field, decoded.get(field, ""), decoded.get("RelayState"), decoded.get("SigAlg"),
                         decoded.get("Signature"), octets)


def _signature_bytes(text: str) -> bytes:
    return base64.b64decode("".join(text.split()), validate=True)


@dataclass(frozen=True)
class BindingMessage:
    """A SAML message as received by either binding: the decoded XML, the RelayState and, for
    HTTP-Redirect, the query whose signature covers it."""

    field: str
    data: bytes
    relay_state: str
    query: RedirectQuery | None


class ResponseBuilder:
    """Signed Responses for one IdP key (no I/O; time is passed in)."""

    def __init__(self, entity_id: str, key: KeyPair, settings: LoginSettings) -> None:
        self.entity_id = entity_id
        self.key = key
        self.lifetime = dt.timedelta(seconds=settings.saml.assertion_lifetime)
        self.skew = dt.timedelta(seconds=settings.clock_skew)

    def sign(self, element: etree._Element, id_attribute: str = "ID") -> etree._Element:
        """An enveloped RSA-SHA256 signature over *element* (at its ``ds:Signature`` placeholder).
        A signer per call: ``XMLSigner.sign`` sets attributes on itself, and answers are signed
        on several threads. The certificate goes in as an object (a PEM string would be
        re-wrapped on every signature)."""
        signer = XMLSigner(signature_algorithm="rsa-sha256", digest_algorithm="sha256",
                           c14n_algorithm=CanonicalizationMethod.EXCLUSIVE_XML_CANONICALIZATION_1_0)
        return signer.sign(element, key=self.key.key, cert=[self.key.cert], id_attribute=id_attribute,
                           reference_uri="#" + element.get(id_attribute))

    @staticmethod
    def _raw(identity: Identity, field: str) -> list[str]:
        value = getattr(identity, field)
        return [str(v) for v in value] if isinstance(value, tuple) else ([value] if value else [])

    @classmethod
    def _value(cls, identity: Identity, field: str) -> list[str]:
        """*field*'s values as an attribute carries them: a character XML cannot carry is sent
        as U+FFFD (a group so renamed names no other group; the rest of the value is kept)."""
        return [_NOT_XML.sub("\ufffd", value) for value in cls._raw(identity, field)]

    def name_id(self, identity: Identity, fmt: str, source: str) -> str | None:
        """The NameID for *identity*: a new random one (``transient``), else the value of its
        *source* field; ``None`` when that is empty: nothing may be issued then (another
        field in its place could be another account's value at the SP, e.g. a user name that
        looks like someone's mail address). The default source, ``username``, is never empty."""
        if fmt == "transient":
            return "_" + secrets.token_hex(16)
        values = self._raw(identity, source)
        if values and _NOT_XML.search(values[0]):
            # Not sent altered: an identifier changed is another one, maybe another account's.
            log.warning("login: the %s of %s holds a character XML cannot carry; no NameID from it",
                        source, printable(identity.username))
            return None
        return values[0] if values and values[0] else None

    def assertion(self, *, audience: str, identity: Identity, name_id_format: str, name_id: str,
                  attributes: dict[str, str], session_index: str, now: dt.datetime, recipient: str | None = None,
                  in_response_to: str | None = None, sign: bool = True) -> etree._Element:
        """A (signed) SAML 2.0 Assertion about *identity* for *audience*; also used by WS-Fed."""
        E = etree.SubElement
        assertion = etree.Element(f"{{{SAML}}}Assertion", nsmap={"saml": SAML, "xs": XS, "xsi": XSI},
                                  ID="_" + secrets.token_hex(20), Version="2.0", IssueInstant=instant(now))
        E(assertion, f"{{{SAML}}}Issuer").text = self.entity_id
        if sign:
            E(assertion, f"{{{DS}}}Signature", Id="placeholder", nsmap={"ds": DS})
        subject = E(assertion, f"{{{SAML}}}Subject")
        E(subject, f"{{{SAML}}}NameID", Format=NAMEID_FORMATS[name_id_format], SPNameQualifier=audience).text = name_id
        confirmation = E(subject, f"{{{SAML}}}SubjectConfirmation", Method="urn:oasis:names:tc:SAML:2.0:cm:bearer")
        data = E(confirmation, f"{{{SAML}}}SubjectConfirmationData", NotOnOrAfter=instant(now + self.lifetime))
        if recipient:
            data.set("Recipient", recipient)
        if in_response_to:
            data.set("InResponseTo", in_response_to)
        conditions = E(assertion, f"{{{SAML}}}Conditions", NotBefore=instant(now - self.skew),
                       NotOnOrAfter=instant(now + self.lifetime))
        E(E(conditions, f"{{{SAML}}}AudienceRestriction"), f"{{{SAML}}}Audience").text = audience
        authn = E(assertion, f"{{{SAML}}}AuthnStatement", SessionIndex=session_index,
                  AuthnInstant=instant(dt.datetime.fromtimestamp(identity.authenticated_at, dt.timezone.utc)))
        E(E(authn, f"{{{SAML}}}AuthnContext"), f"{{{SAML}}}AuthnContextClassRef").text = authn_context_class(identity)
        if attributes:
            statement = E(assertion, f"{{{SAML}}}AttributeStatement")
            for name, field in attributes.items():
                attribute = E(statement, f"{{{SAML}}}Attribute", Name=name,
                              NameFormat=ATTRNAME_URI if ":" in name else ATTRNAME_BASIC)
                for value in self._value(identity, field):
                    E(attribute, f"{{{SAML}}}AttributeValue", {f"{{{XSI}}}type": "xs:string"}).text = value
        return self.sign(assertion) if sign else assertion

    def build(self, sp: SamlServiceProvider, acs: str, identity: Identity, in_response_to: str | None,
              session_index: str, now: dt.datetime, name_id: str | None = None) -> bytes:
        name_id = name_id or self.name_id(identity, sp.name_id_format, sp.name_id_source)
        if not name_id:  # SamlIdp.complete answers an error Response before this
            raise ValueError(f"no {sp.name_id_source} for the NameID of {identity.username!r}")
        response = self._response(sp, acs, in_response_to, now)
        E = etree.SubElement
        E(E(response, f"{{{SAMLP}}}Status"), f"{{{SAMLP}}}StatusCode", Value=SUCCESS)
        response.append(self.assertion(
            audience=sp.entity_id, identity=identity, name_id_format=sp.name_id_format,
            name_id=name_id, attributes=sp.attributes,
            session_index=session_index, now=now, recipient=acs, in_response_to=in_response_to,
            sign=sp.sign_assertion))
        return self._finished(sp, response)

    def error(self, sp: SamlServiceProvider, acs: str, in_response_to: str | None, why: Unanswerable,
              now: dt.datetime) -> bytes:
        """A Response with an error status and no assertion (core 3.2.2.2), to a validated *acs*;
        signed as this SP's Success Responses are (``sign_response``)."""
        response = self._response(sp, acs, in_response_to, now)
        E = etree.SubElement
        status = E(response, f"{{{SAMLP}}}Status")
        E(E(status, f"{{{SAMLP}}}StatusCode", Value=why.status), f"{{{SAMLP}}}StatusCode", Value=why.second)
        E(status, f"{{{SAMLP}}}StatusMessage").text = why.message
        return self._finished(sp, response)

    def _response(self, sp: SamlServiceProvider, acs: str, in_response_to: str | None,
                  now: dt.datetime) -> etree._Element:
        """A ``samlp:Response`` to *acs* up to its Status: Issuer, and the signature's place
        when the SP's Responses are signed."""
        response = etree.Element(f"{{{SAMLP}}}Response", nsmap={"samlp": SAMLP, "saml": SAML},
                                 ID="_" + secrets.token_hex(20), Version="2.0", IssueInstant=instant(now),
                                 Destination=acs)
        if in_response_to:
            response.set("InResponseTo", in_response_to)
        etree.SubElement(response, f"{{{SAML}}}Issuer").text = self.entity_id
        if sp.sign_response:
            etree.SubElement(response, f"{{{DS}}}Signature", Id="placeholder", nsmap={"ds": DS})
        return response

    def _finished(self, sp: SamlServiceProvider, response: etree._Element) -> bytes:
        signed = self.sign(response) if sp.sign_response else response
        return etree.tostring(signed, xml_declaration=True, encoding="UTF-8")


class SamlIdp:
    """The IdP of one worker: metadata, the SSO endpoint and the completer for ``/login``."""

    def __init__(self, settings: LoginSettings, entity_id: str, current: KeyPair, upcoming: KeyPair) -> None:
        self.settings = settings
        self.entity_id = entity_id
        self.current, self.upcoming = current, upcoming
        self.sso_url = f"{settings.base_url}/saml/sso"
        self.checker = RequestChecker(settings, self.sso_url)
        self.builder = ResponseBuilder(entity_id, current, settings)

    def metadata(self) -> bytes:
        E = etree.SubElement
        root = etree.Element(f"{{{MD}}}EntityDescriptor", nsmap={"md": MD, "ds": DS}, entityID=self.entity_id)
        idp = E(root, f"{{{MD}}}IDPSSODescriptor", protocolSupportEnumeration=SAMLP,
                WantAuthnRequestsSigned="false")
        for pair in (self.current, self.upcoming):  # the next key first appears here: rollover
            key_info = E(E(idp, f"{{{MD}}}KeyDescriptor", use="signing"), f"{{{DS}}}KeyInfo")
            E(E(key_info, f"{{{DS}}}X509Data"), f"{{{DS}}}X509Certificate").text = pair.cert_b64
        for binding in (BINDING_REDIRECT, BINDING_POST):  # schema order: SLO before NameIDFormat
            E(idp, f"{{{MD}}}SingleLogoutService", Binding=binding, Location=f"{self.settings.base_url}/saml/slo")
        for fmt in NAMEID_FORMATS.values():
            E(idp, f"{{{MD}}}NameIDFormat").text = fmt
        for binding in (BINDING_REDIRECT, BINDING_POST):
            E(idp, f"{{{MD}}}SingleSignOnService", Binding=binding, Location=self.sso_url)
        return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)

    def routes(self, web_door) -> list[Route]:
        self.web = web_door
        budget = web_door.sessions.settings.requests_per_client
        #: Error Responses for requests that cannot be served now (:meth:`unavailable`), by client
        #: address: each may be signed, and the requests refused are those past a budget already.
        self.refusals = SharedBudget(web_door.sessions, "saml-refusals", burst=budget, rate=budget / 60)
        web_door.completers["saml"] = self.complete
        web_door.declined["saml"] = self.no_passive
        web_door.answerable["saml"] = self.answer_target
        web_door.unavailable["saml"] = self.unavailable
        return [Route("GET", "/saml/metadata", self.metadata_handler), Route("GET", "/saml/sso", self.sso),
                Route("POST", "/saml/sso", self.sso), Route("GET", "/saml/idp", self.idp_initiated)]

    async def metadata_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metadata(), content_type="application/samlmetadata+xml",
                            headers={"Cache-Control": "max-age=300"})

    def relay_state(self, value) -> str:
        if value is not None and not isinstance(value, str):  # a multipart file part
            raise Refused("login.malformed", "RelayState is not text")
        try:
            size = len(value.encode("utf-8")) if value is not None else 0
        except UnicodeEncodeError:
            # A lone surrogate: a form body in charset=utf-7 (or a part so labelled) decodes to
            # one. It was parked, then the answer page carrying it could not be written: a 500
            # after the user signed in, and at /saml/slo after the sessions had ended.
            raise Refused("login.malformed", "RelayState is not Unicode text") from None
        if size > self.settings.max_relay_state_bytes:
            raise Refused("login.relay_state_too_large", f"{size} bytes")
        return value or ""

    async def read_message(self, request: web.Request, field: str | None = "SAMLRequest") -> BindingMessage:
        """The decoded message of either binding (``SAMLRequest``, or *field*; ``None``: the one
        that is there) and its ``RelayState``."""
        limits = self.settings
        if request.method == "GET":
            query = read_redirect_query(request.rel_url.raw_query_string, field)
            if not query.message:
                raise Refused("login.malformed", f"no {query.field}")
            data = inflate_redirect(query.message, limit=limits.max_inflated_bytes,
                                    max_parameter=limits.max_parameter_bytes)
            return BindingMessage(query.field, data, self.relay_state(query.relay_state), query)
        params = await read_form(request)
        once(params)
        field = message_field(params, field)
        text = params.get(field)
        if not isinstance(text, str) or not text:
            raise Refused("login.malformed", f"no {field}")
        data = decode_post(text, max_parameter=limits.max_parameter_bytes)
        return BindingMessage(field, data, self.relay_state(params.get("RelayState")), None)

    @staticmethod
    def carries_signature(message: BindingMessage, root: etree._Element) -> bool:
        """Whether *message* comes signed (HTTP-Redirect: a ``Signature`` parameter; HTTP-POST:
        an enveloped ``ds:Signature``); :meth:`verify_signed` checks it."""
        if message.query is not None:
            return message.query.signature is not None
        return root.find(f"{{{DS}}}Signature") is not None

    def verified(self, message: BindingMessage, sp: SamlServiceProvider, root: etree._Element) -> bool:
        """Whether :meth:`verify_signed` (which passed) checked a signature on *message*: the
        SP has a ``request_certificate`` and the message came signed."""
        return sp.entity_id in self.checker.certificates and self.carries_signature(message, root)

    async def verify_signed(self, message: BindingMessage, sp: SamlServiceProvider, root: etree._Element,
                      required: bool = True) -> etree._Element:
        """For SPs with a ``request_certificate``: the signature (either binding) and replay
        checks; returns the element to read (only what was signed). Not *required* (an SP's
        ``signed_logout: false``): an unsigned message is read as it is."""
        if sp.entity_id not in self.checker.certificates:
            return root
        query = message.query
        if not required and not self.carries_signature(message, root):
            return root
        if query is not None:
            self.checker.verify_redirect_signature(sp, query)
            signature = _signature_bytes(query.signature)
        else:
            root, signature = self.checker.verify_post_signature(sp, message.data, root)
        if root.get("Destination") is None:
            # SAML bindings 3.4.5.2 and 3.5.5.2: a signed message MUST name where it was sent, and
            # the recipient check it (what it names is checked with the request's other fields),
            # so that a signature made for another recipient does not open a request here.
            raise Refused("saml.destination_mismatch", "a signed message names no Destination")
        # A signed request is good once: a captured one cannot be played again, by its ID or by
        # its signature (should a signature ever be checked over another message than the one
        # read, it still opens one request at most).
        window = self.settings.saml.request_lifetime + 2 * self.settings.clock_skew
        sessions = self.web.sessions
        if not await sessions.afirst_use("saml", f"{sp.entity_id} {root.get('ID')}", window):
            raise Refused("saml.request_replayed", str(root.get("ID"))[:100])
        if not await sessions.afirst_use("saml-signature", f"{sp.entity_id} {signature.hex()}", window):
            raise Refused("saml.request_replayed", f"signature of {str(root.get('ID'))[:100]} seen before")
        return root

    async def sso(self, request: web.Request) -> web.StreamResponse:
        limits = self.settings
        try:
            message = await self.read_message(request)
            root = parse_xml(message.data)
            authn = read_authn_request(root)
            sp, acs = self.checker.check(authn, dt.datetime.now(dt.timezone.utc))
            authn = read_authn_request(await self.verify_signed(message, sp, root))
        except Refused as exc:
            return self.web.refused(request, exc)
        pending = {"protocol": "saml", "sp": sp.entity_id, "acs": acs, "request_id": authn.id,
                   "relay_state": message.relay_state, "force_authn": authn.force_authn,
                   # IsPassive: no page may be shown; without a session that may answer, web.py
                   # declines (no_passive), ForceAuthn or not (a new sign-in needs the form).
                   "prompt_none": authn.is_passive, "subject": authn.subject, "name_id_policy": authn.name_id_policy,
                   "authn_context": authn.authn_context}
        # What no user's session can satisfy is answered at once, before any session is used;
        # past the client's budget, as any request of this SP that cannot be served now
        # (RequestDenied at the ACS, web.served): it got the 429 page (review of the login door).
        why = unanswerable(self.entity_id, sp, authn.name_id_policy, authn.subject, authn_context=authn.authn_context)
        if why is not None:
            return await self.web.served(request, pending, lambda: self.error_answer(request, pending, sp, why))
        if request.method == "POST" and request_cookie(request, self.web.cookie) is None:
            # HTTP-POST binding: an SP's page posts cross-site, and the browser does not send its
            # SameSite=Lax session cookie with that POST. Taken as "no session", IsPassive was
            # answered NoPassive for a user who was signed in. The request waits at /login (a GET,
            # which gets the cookie), where a session answers it or IsPassive is declined there.
            return await self.web.wait_at_login(request, pending, limits.saml.request_lifetime)
        return await self.web.begin(request, pending, limits.saml.request_lifetime)

    async def idp_initiated(self, request: web.Request) -> web.StreamResponse:
        try:
            sp = self.checker.provider(request.query.get("sp", "")[:1024])
            if not sp.idp_initiated:
                raise Refused("saml.idp_initiated_refused", sp.entity_id[:200])
            relay_state = self.relay_state(request.query.get("RelayState"))
            if relay_state and relay_state not in sp.idp_initiated_relay_states:
                # Anyone can write this link, and SPs read RelayState as where to go after the
                # login: `?RelayState=https://evil.example/` signed a user in at the SP and sent
                # them on there (an open redirect by way of the SP), unsolicited.
                raise Refused("saml.relay_state_not_allowed", relay_state[:200])
        except Refused as exc:
            return self.web.refused(request, exc)
        pending = {"protocol": "saml", "sp": sp.entity_id, "acs": sp.acs_urls[0], "request_id": "",
                   "relay_state": relay_state, "force_authn": False}
        return await self.web.begin(request, pending, self.settings.saml.request_lifetime)

    def answer_target(self, pending: dict) -> SamlServiceProvider:
        """The SP to answer *pending* for, as configured now: a reload while the user signed in
        may have removed it (``saml.unknown_sp``) or its ACS URL (``saml.acs_not_registered``)."""
        sp = self.checker.provider(pending["sp"])
        if pending["acs"] not in sp.acs_urls:
            raise Refused("saml.acs_not_registered", pending["acs"][:200])
        return sp

    async def error_answer(self, request: web.Request, pending: dict, sp: SamlServiceProvider,
                           why: Unanswerable, *, spend: bool = True) -> web.Response:
        """An error Response (no assertion) posted to the request's validated ACS URL, with its
        RelayState; logged with the reason code, which is also sent as ``X-Refused-Reason``. With
        *spend*, it spends a token of the client's budget, as a parked request does (signing
        costs CPU, and the request that asks for it needs no credentials): past it
        :class:`.web.ParkRefused`, nothing signed. Not for an answer made when a sign-in or a
        session's answer was already counted (:meth:`complete`)."""
        if spend:
            await self.web.spend_park()
        log.warning("login request refused: reason=%s client=%s sp=%s status=%s %s", why.reason, request.remote,
                    printable(sp.entity_id[:200]), why.second.rsplit(":", 1)[-1], printable(why.detail[:200]))
        response = await self._error_post(pending, sp, why)
        response.headers["X-Refused-Reason"] = why.reason
        return response

    async def _error_post(self, pending: dict, sp: SamlServiceProvider, why: Unanswerable) -> web.Response:
        """The page posting the error Response for *why* to *pending*'s ACS, with its RelayState."""
        xml = await asyncio.to_thread(self.builder.error, sp, pending["acs"], pending["request_id"] or None, why,
                                      dt.datetime.now(dt.timezone.utc))
        fields = [("SAMLResponse", base64.b64encode(xml).decode())]
        if pending["relay_state"]:
            fields.append(("RelayState", pending["relay_state"]))
        return self.web.auto_post(pending["acs"], fields)

    async def unavailable(self, request: web.Request, pending: dict) -> web.Response | None:
        """A request from an SP that cannot be served now (:attr:`.web.LoginDoor.unavailable`: its
        client's or user's budget spent, the session store or the directory down) is answered at
        its validated ACS with ``Responder``/``RequestDenied`` (core 3.2.2.2: "able to process
        the request but has chosen not to respond"), as OIDC answers at the ``redirect_uri``; it
        got the 429/503 page, where an SP's ``IsPassive`` request may show none and the SP never
        learns why the user did not come back (review of the login door). ``None`` (the page):
        an IdP-initiated request (no SP asked; the user is at the door), and past a bound of its
        own per client address, since each answer may be signed and these requests are the ones
        a budget already refused. The refusal was logged where it was decided."""
        if not pending["request_id"]:
            return None
        sp = self.answer_target(pending)
        try:
            if await self.refusals.spend(self.web.client_key(request)):
                return None
        except STORE_ERRORS:  # the bound cannot be counted (the store is down): the page, nothing signed
            return None
        return await self._error_post(pending, sp, Unanswerable(
            "login.unavailable", RESPONDER, REQUEST_DENIED, "the request cannot be served now; try again later"))

    async def no_passive(self, request: web.Request, pending: dict, *, parked: bool = False) -> web.Response:
        """``IsPassive`` and no session may answer (none, ``ForceAuthn``, its account gone): the
        SP is told ``NoPassive`` (core 3.4.1), no page is shown. A request declined at its
        arrival spends a token of its client's budget for the signature; one *parked* for
        ``/login`` (an HTTP-POST request) spent it when parked, and is declined once (its record
        is single use)."""
        sp = self.answer_target(pending)
        return await self.error_answer(request, pending, sp, Unanswerable(
            "saml.no_passive", RESPONDER, NO_PASSIVE, "the user cannot be signed in without a page",
            "IsPassive and no session may answer" + (" (ForceAuthn)" if pending.get("force_authn") else "")),
            spend=not parked)

    async def complete(self, request: web.Request, pending: dict, session) -> web.Response:
        sp = self.answer_target(pending)
        identity = session.identity
        name_id = self.builder.name_id(identity, sp.name_id_format, sp.name_id_source)
        if name_id is None:
            # The NameID's source field is empty for this user: nothing is issued (fail closed;
            # another value in its place could be another account's at the SP).
            return await self.error_answer(request, pending, sp, Unanswerable(
                "saml.name_id_unavailable", RESPONDER, INVALID_NAMEID_POLICY,
                "the user has no value for this service's NameID",
                f"user {identity.username[:100]} has no {sp.name_id_source} (name_id_source) for the NameID"),
                spend=False)
        # The request's Subject and RequestedAuthnContext against the user signed in and how
        # (checked again in full: a reload may have changed the SP's NameID format while the
        # request waited). Nothing is issued, and the SP not recorded as a participant, for
        # another user or another kind of sign-in than asked. Its answer spends no address token,
        # as an assertion spends none: the sign-in (the chain's throttle) or the session's
        # answer (the user's budget, web.admit_answer) was counted. It spent one: a user who
        # signed in from an address whose budget was spent (a NAT) got the 429 page and no
        # session cookie, the request used up and the SP never told (review of the login door).
        why = unanswerable(self.entity_id, sp, pending.get("name_id_policy"), pending.get("subject"), name_id,
                           pending.get("authn_context"), authn_context_class(identity))
        if why is not None:
            return await self.error_answer(request, pending, sp, why, spend=False)
        # Two RSA signatures and C14N take milliseconds: off the event loop, so /auth is not held up.
        told = self.web.sessions.party_index(session.index, sp.entity_id)  # this SP's own SessionIndex
        xml = await asyncio.to_thread(self.builder.build, sp, pending["acs"], session.identity,
                                      pending["request_id"] or None, told, dt.datetime.now(dt.timezone.utc),
                                      name_id)
        # Single Logout tells this SP about the logout with the NameID and index as issued here;
        # recorded once the answer is built (one that could not be is no participation).
        await self.web.sessions.aadd_participant(session, sp.entity_id, {
            "name_id": name_id, "format": NAMEID_FORMATS[sp.name_id_format], "index": told})
        fields = [("SAMLResponse", base64.b64encode(xml).decode())]
        if pending["relay_state"]:
            fields.append(("RelayState", pending["relay_state"]))
        return self.web.auto_post(pending["acs"], fields)
