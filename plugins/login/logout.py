"""SAML 2.0 logout messages (SAML core section 3.7), sans-I/O: reading the ``LogoutRequest`` and
``LogoutResponse`` an SP sends, building the signed ones authgw sends. Time is passed in; the
HTTP flow is in :mod:`.slo`. Reads nothing from conf.d itself.

Only the elements the flow needs are read; the caller reads them from the *signed* element when
the SP signs (against signature wrapping), as for AuthnRequests.
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import zlib
from dataclasses import dataclass
from itertools import islice
from urllib.parse import urlencode

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from lxml import etree

from .saml import DS, RSA_SHA256, SAML, SAMLP, ResponseBuilder, instant
from .web import Refused

__all__ = ["LogoutMessage", "MAX_SESSION_INDEXES", "PARTIAL_LOGOUT", "SUCCESS", "encode", "logout_request",
           "logout_response", "read_logout"]

SUCCESS = "urn:oasis:names:tc:SAML:2.0:status:Success"
PARTIAL_LOGOUT = "urn:oasis:names:tc:SAML:2.0:status:PartialLogout"
#: The most ``SessionIndex`` elements a LogoutRequest may carry; more is ``login.malformed``. A
#: real SP sends one (the index it was given); each distinct one is looked up in the session store
#: (review: 8,500 of them, 1 KB deflated, held a worker's event loop for 1.2 s with Redis).
MAX_SESSION_INDEXES = 16
_KINDS = {f"{{{SAMLP}}}LogoutRequest": "request", f"{{{SAMLP}}}LogoutResponse": "response"}


@dataclass(frozen=True)
class LogoutMessage:
    kind: str                  # "request" or "response"
    id: str
    issuer: str
    destination: str | None
    issue_instant: str
    not_on_or_after: str | None   # requests only
    name_id: str | None           # requests only
    session_indexes: list[str]    # requests only
    in_response_to: str | None    # responses only
    status: str | None            # responses only: the top-level status code


def read_logout(root: etree._Element, expect: str | None = None) -> LogoutMessage:
    """The parts of a LogoutRequest or LogoutResponse; :class:`Refused` when it is neither (or
    not the *expect*-ed kind)."""
    kind = _KINDS.get(root.tag)
    if kind is None or root.get("Version") != "2.0" or (expect and kind != expect):
        raise Refused(f"saml.not_logout_{expect or 'request'}", str(root.tag)[:100])
    issuer, message_id = root.findtext(f"{{{SAML}}}Issuer"), root.get("ID")
    if not issuer or not message_id or len(message_id) > 256:
        raise Refused(f"saml.not_logout_{kind}", "no Issuer or ID")
    name_id = root.findtext(f"{{{SAML}}}NameID")
    # Counted without reading past the limit; the same index named twice is looked up once.
    elements = list(islice(root.iterchildren(f"{{{SAMLP}}}SessionIndex"), MAX_SESSION_INDEXES + 1))
    if len(elements) > MAX_SESSION_INDEXES:
        raise Refused("login.malformed", f"a {kind} with more than {MAX_SESSION_INDEXES} SessionIndex elements")
    indexes = list(dict.fromkeys((e.text or "").strip() for e in elements))
    code = root.find(f"{{{SAMLP}}}Status/{{{SAMLP}}}StatusCode")
    return LogoutMessage(kind, message_id, issuer.strip(), root.get("Destination"), root.get("IssueInstant", ""),
                         root.get("NotOnOrAfter"), name_id.strip() if name_id else None, indexes,
                         root.get("InResponseTo"), code.get("Value") if code is not None else None)


def logout_request(entity_id: str, *, destination: str, name_id: str, name_id_format: str,
                   sp_name_qualifier: str, session_index: str, now: dt.datetime,
                   lifetime: dt.timedelta) -> etree._Element:
    """A LogoutRequest (unsigned: :func:`encode` signs it for its binding) naming the subject
    exactly as it was issued to that SP."""
    E = etree.SubElement
    root = etree.Element(f"{{{SAMLP}}}LogoutRequest", nsmap={"samlp": SAMLP, "saml": SAML},
                         ID="_" + secrets.token_hex(20), Version="2.0", IssueInstant=instant(now),
                         Destination=destination, NotOnOrAfter=instant(now + lifetime))
    E(root, f"{{{SAML}}}Issuer").text = entity_id
    E(root, f"{{{SAML}}}NameID", Format=name_id_format, SPNameQualifier=sp_name_qualifier).text = name_id
    E(root, f"{{{SAMLP}}}SessionIndex").text = session_index
    return root


def logout_response(entity_id: str, *, destination: str, in_response_to: str, now: dt.datetime,
                    partial: bool = False) -> etree._Element:
    """A LogoutResponse (unsigned: see :func:`encode`): ``Success``, with the second-level
    ``PartialLogout`` when some other session participant could not be logged out (core section
    3.7.3.2: the requester's own session did end). A request that ended no session is answered
    ``Success`` too: the principal has no session here, which is the state logout asks for, and
    the usual case is a user whose authgw session expired before they signed out at the SP (an
    error status there makes SPs show an error for a logout that held)."""
    E = etree.SubElement
    root = etree.Element(f"{{{SAMLP}}}LogoutResponse", nsmap={"samlp": SAMLP, "saml": SAML},
                         ID="_" + secrets.token_hex(20), Version="2.0", IssueInstant=instant(now),
                         Destination=destination, InResponseTo=in_response_to)
    E(root, f"{{{SAML}}}Issuer").text = entity_id
    code = E(E(root, f"{{{SAMLP}}}Status"), f"{{{SAMLP}}}StatusCode", Value=SUCCESS)
    if partial:
        E(code, f"{{{SAMLP}}}StatusCode", Value=PARTIAL_LOGOUT)
    return root


def encode(builder: ResponseBuilder, message: etree._Element, binding: str, url: str,
           relay_state: str = "") -> list[tuple[str, str]] | str:
    """*message* signed for *binding*: for ``post`` the form fields (an enveloped signature right
    after the Issuer, schema order); for ``redirect`` the URL to send the browser to (DEFLATE,
    base64, and the RSA-SHA256 signature over ``SAMLRequest=..&RelayState=..&SigAlg=..`` as sent,
    SAML bindings section 3.4.4.1, made by ``cryptography``)."""
    field = "SAMLRequest" if message.tag == f"{{{SAMLP}}}LogoutRequest" else "SAMLResponse"
    if binding == "post":
        message.insert(1, etree.Element(f"{{{DS}}}Signature", Id="placeholder", nsmap={"ds": DS}))
        xml = etree.tostring(builder.sign(message), xml_declaration=True, encoding="UTF-8")
        return [(field, base64.b64encode(xml).decode())] + ([("RelayState", relay_state)] if relay_state else [])
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = packer.compress(etree.tostring(message, encoding="UTF-8")) + packer.flush()
    params = [(field, base64.b64encode(deflated).decode())] + ([("RelayState", relay_state)] if relay_state else [])
    octets = urlencode(params + [("SigAlg", RSA_SHA256)])
    signature = builder.key.key.sign(octets.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return f"{url}{'&' if '?' in url else '?'}{octets}&{urlencode({'Signature': base64.b64encode(signature)})}"
