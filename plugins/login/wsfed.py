"""WS-Federation passive requestor profile (``/wsfed``): ``wa=wsignin1.0`` with ``wtrealm``,
``wreply`` and ``wctx``, answered by a form posting ``wresult``, a WS-Trust
RequestSecurityTokenResponse carrying a signed SAML 2.0 assertion (what ADFS sends, and what
Auth0's ADFS connections and Entra domain federation accept). Reads ``login.wsfed``. Its metadata (``/FederationMetadata/2007-06/FederationMetadata.xml``, where an
"ADFS URL" leads) lists the current and next signing certificates.

``wa=wsignout1.0`` (and ``wsignoutcleanup1.0``) ends the browser's session, with the SAML
Single Logout round of :mod:`.slo` for the SAML SPs of that session, then redirects to ``wreply``
when it is one of the realm's ``reply_urls`` or ``signout_urls`` (of any realm when no
``wtrealm`` is given), exactly; else it shows "signed out". A GET the browser says comes from
another site (``Sec-Fetch-Site: cross-site`` / ``same-site``) for a browser with a session is
confirmed first (the "signed in as" page and its Sign out button): a GET any page can send
ended the session (logout CSRF).

``wfresh`` (minutes; ``0``: sign in again) and ``prompt=login`` (Entra ID's ``NativeSupport``)
ask for a sign-in newer than the session's, as OIDC's ``max_age`` and ``prompt=login`` do.

Named checks: ``wsfed.unsupported_action`` (any other ``wa``),
``wsfed.unknown_realm``, ``wsfed.reply_not_registered`` (``wreply`` must be one of the realm's
``reply_urls`` exactly), ``login.parameter_too_large`` (``wctx`` over 4 KiB); when the token would
be made, ``wsfed.name_id_unavailable`` (the realm's ``name_id_source`` is empty for the user: no
token, never another field in its place).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets

from aiohttp import web
from lxml import etree

from gateway import Route

from .saml import DS, MD, XSI, SamlIdp, instant
from .settings import NAMEID_FORMATS, LoginSettings, WsFedRelyingParty
from .web import Refused

__all__ = ["WsFed"]

TRUST = "http://schemas.xmlsoap.org/ws/2005/02/trust"
WSU = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
WSP = "http://schemas.xmlsoap.org/ws/2004/09/policy"
WSA = "http://www.w3.org/2005/08/addressing"
SAML2_TOKEN = "urn:oasis:names:tc:SAML:2.0:assertion"
SAML1 = "urn:oasis:names:tc:SAML:1.0:assertion"
SAML11_TOKEN = "http://docs.oasis-open.org/wss/oasis-wss-saml-token-profile-1.1#SAMLV1.1"
SAML1_METHOD = {"kerberos": "urn:ietf:rfc:1510", "client_cert": "urn:ietf:rfc:2246"}
FED = "http://docs.oasis-open.org/wsfed/federation/200706"
MAX_WCTX = 4096


class WsFed:
    def __init__(self, settings: LoginSettings, idp: SamlIdp) -> None:
        self.settings = settings
        self.idp = idp  # the same issuer, keys and assertions as the SAML IdP
        self.builder = idp.builder
        self.parties = {rp.realm: rp for rp in settings.wsfed.relying_parties}

    def routes(self, web_door) -> list[Route]:
        self.web = web_door
        web_door.completers["wsfed"] = self.complete
        web_door.answerable["wsfed"] = self.answer_target
        web_door.logout_targets["wsfed"] = self.signout_target
        return [Route("GET", "/wsfed", self.signin),
                Route("GET", "/FederationMetadata/2007-06/FederationMetadata.xml", self.metadata_handler)]

    def metadata(self, entity_id: str, certificates: list[str]) -> bytes:
        """WS-Federation metadata (the document an "ADFS URL" points relying parties to): a
        security token service role with the signing certificates (current and next) and the
        passive requestor endpoint."""
        E = etree.SubElement
        root = etree.Element(f"{{{MD}}}EntityDescriptor", nsmap={"md": MD, "ds": DS, "fed": FED, "xsi": XSI,
                                                                 "wsa": WSA}, entityID=entity_id)
        role = E(root, f"{{{MD}}}RoleDescriptor", {f"{{{XSI}}}type": "fed:SecurityTokenServiceType"},
                 protocolSupportEnumeration="http://docs.oasis-open.org/wsfed/federation/200706")
        for certificate in certificates:
            key_info = E(E(role, f"{{{MD}}}KeyDescriptor", use="signing"), f"{{{DS}}}KeyInfo")
            E(E(key_info, f"{{{DS}}}X509Data"), f"{{{DS}}}X509Certificate").text = certificate
        endpoint = E(role, f"{{{FED}}}PassiveRequestorEndpoint")
        E(E(endpoint, f"{{{WSA}}}EndpointReference"), f"{{{WSA}}}Address").text = f"{self.settings.base_url}/wsfed"
        return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)

    async def metadata_handler(self, request: web.Request) -> web.Response:
        idp = self.idp
        body = self.metadata(idp.entity_id, [idp.current.cert_b64, idp.upcoming.cert_b64])
        return web.Response(body=body, content_type="application/xml", headers={"Cache-Control": "max-age=300"})

    def check(self, query) -> dict:
        """The pending sign-in for a request, or :class:`Refused` (no I/O)."""
        if query.get("wa") != "wsignin1.0":
            raise Refused("wsfed.unsupported_action", str(query.get("wa", ""))[:40])
        party = self.parties.get(query.get("wtrealm", ""))
        if party is None:
            raise Refused("wsfed.unknown_realm", query.get("wtrealm", "")[:200])
        reply = query.get("wreply") or party.reply_urls[0]
        if reply not in party.reply_urls:
            raise Refused("wsfed.reply_not_registered", reply[:200])
        context = query.get("wctx", "")
        if len(context.encode("utf-8", "surrogatepass")) > MAX_WCTX:
            raise Refused("login.parameter_too_large", "wctx")
        return {"protocol": "wsfed", "realm": party.realm, "reply": reply, "wctx": context,
                "force_authn": "login" in query.get("prompt", "").split(), "max_age": self.freshness(query)}

    @staticmethod
    def freshness(query) -> int | None:
        """``wfresh`` as a maximum age of the sign-in in seconds (``None``: any): minutes in the
        request, ``0`` a new sign-in whatever the session (WS-Federation 1.2 section 13.2.1;
        what Entra ID sends for an application's ``prompt=login``)."""
        value = query.get("wfresh")
        if value is None or value == "":
            return None
        if not (value.isascii() and value.isdigit() and len(value) <= 9):
            raise Refused("login.malformed", "wfresh is not a number of minutes")
        return int(value) * 60

    def signout_reply(self, query) -> str | None:
        """Where to go after ``wsignout1.0``: ``None`` or a registered ``wreply`` (no I/O). Not
        answered when no relying party is configured: the route is there all the same, and any
        page could end a session of a door that speaks no WS-Federation (review of the login door)."""
        if not self.parties:
            raise Refused("wsfed.unknown_realm", "no WS-Federation relying party is configured")
        realm = query.get("wtrealm")
        if realm is not None and realm not in self.parties:
            raise Refused("wsfed.unknown_realm", realm[:200])
        reply = query.get("wreply")
        if not reply:
            return None
        parties = [self.parties[realm]] if realm is not None else list(self.parties.values())
        if not any(reply in party.reply_urls or reply in party.signout_urls for party in parties):
            raise Refused("wsfed.reply_not_registered", reply[:200])
        return reply

    def signout_target(self, target: dict) -> str | None:
        """Where a sign-out the user confirmed goes (:meth:`.web.LoginDoor.confirm_logout`): the
        ``wreply`` kept when it was asked, if it is still registered (a reload may have removed
        it; then the signed-out page)."""
        query = {"wreply": target.get("reply", "")}
        if target.get("realm") is not None:
            query["wtrealm"] = target["realm"]
        try:
            return self.signout_reply(query)
        except Refused:
            return None

    async def signout(self, request: web.Request) -> web.StreamResponse:
        # A plain GET, as the profile has it, and any page can send it (logout CSRF). A browser
        # that says it comes from another site (Sec-Fetch-Site: cross-site or same-site) and has
        # a session here is asked first: the "signed in as" page, whose Sign out button (a
        # same-origin POST with the CSRF token) ends the session and then goes to the registered
        # wreply, kept server-side (single use). It ended the session at once from any page
        # (review of the login door). A relying party's top-level GET gets the page too (the
        # profile lets the IdP show one); a browser with no session here has nothing to end.
        # The redirect is checked like a sign-in's, before anything else.
        try:
            reply = self.signout_reply(request.query)
        except Refused as exc:
            return self.web.refused(request, exc)
        session = await self.web.asession(request, touch=False)
        if session is not None and request.headers.get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site"):
            target = {"protocol": "wsfed", "realm": request.query.get("wtrealm"), "reply": reply} if reply else None
            return await self.web.confirm_logout(request, session, target, reply)
        response = await self.web.logout_round(request, {session.key: session.index} if session else {}, reply)
        self.web.drop_cookie(response)
        return response

    async def signin(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("wa") in ("wsignout1.0", "wsignoutcleanup1.0"):
            return await self.signout(request)
        try:
            pending = self.check(request.query)
        except Refused as exc:
            return self.web.refused(request, exc)
        return await self.web.begin(request, pending, self.settings.saml.request_lifetime)

    def token_response(self, realm: str, identity, session_index: str, now: dt.datetime,
                       name_id: str | None = None) -> bytes:
        """The ``wresult`` for *identity*; *name_id* as :meth:`complete` made it (else made here:
        ``ValueError`` when the relying party's ``name_id_source`` is empty for this user)."""
        party = self.parties[realm]
        E = etree.SubElement
        rstr = etree.Element(f"{{{TRUST}}}RequestSecurityTokenResponse", nsmap={"t": TRUST})
        lifetime = E(rstr, f"{{{TRUST}}}Lifetime")
        E(lifetime, f"{{{WSU}}}Created", nsmap={"wsu": WSU}).text = instant(now)
        E(lifetime, f"{{{WSU}}}Expires", nsmap={"wsu": WSU}).text = instant(now + self.builder.lifetime)
        applies = E(rstr, f"{{{WSP}}}AppliesTo", nsmap={"wsp": WSP})
        E(E(applies, f"{{{WSA}}}EndpointReference", nsmap={"wsa": WSA}), f"{{{WSA}}}Address").text = realm
        token = E(rstr, f"{{{TRUST}}}RequestedSecurityToken")
        name_id = name_id or self.builder.name_id(identity, party.name_id_format, party.name_id_source)
        if not name_id:
            raise ValueError(f"no {party.name_id_source} for the NameID of {identity.username!r}")
        if party.token == "saml11":
            token.append(self.saml11_assertion(party, identity, name_id, now))
        else:
            token.append(self.builder.assertion(
                audience=realm, identity=identity, name_id_format=party.name_id_format, name_id=name_id,
                attributes=party.attributes, session_index=session_index, now=now))
        E(rstr, f"{{{TRUST}}}TokenType").text = SAML11_TOKEN if party.token == "saml11" else SAML2_TOKEN
        E(rstr, f"{{{TRUST}}}RequestType").text = f"{TRUST}/Issue"
        E(rstr, f"{{{TRUST}}}KeyType").text = "http://schemas.xmlsoap.org/ws/2005/05/identity/NoProofKey"
        return etree.tostring(rstr, encoding="UTF-8")

    def saml11_assertion(self, party, identity, name_id: str, now: dt.datetime) -> etree._Element:
        """A signed SAML 1.1 assertion (OASIS SAML 1.1 core): the subject in an attribute
        statement and an authentication statement, the signature last, by ``AssertionID``."""
        E = etree.SubElement
        fmt = NAMEID_FORMATS[party.name_id_format]  # Entra sends and expects the 2.0 persistent URI here too
        assertion = etree.Element(f"{{{SAML1}}}Assertion", nsmap={"saml": SAML1}, MajorVersion="1", MinorVersion="1",
                                  AssertionID="_" + secrets.token_hex(20), Issuer=self.idp.entity_id,
                                  IssueInstant=instant(now))
        conditions = E(assertion, f"{{{SAML1}}}Conditions", NotBefore=instant(now - self.builder.skew),
                       NotOnOrAfter=instant(now + self.builder.lifetime))
        E(E(conditions, f"{{{SAML1}}}AudienceRestrictionCondition"), f"{{{SAML1}}}Audience").text = party.realm

        def subject(parent):
            node = E(parent, f"{{{SAML1}}}Subject")
            E(node, f"{{{SAML1}}}NameIdentifier", Format=fmt).text = name_id
            E(E(node, f"{{{SAML1}}}SubjectConfirmation"), f"{{{SAML1}}}ConfirmationMethod").text = \
                "urn:oasis:names:tc:SAML:1.0:cm:bearer"

        statement = E(assertion, f"{{{SAML1}}}AttributeStatement")
        subject(statement)
        for claim, field in party.attributes.items():
            namespace, _, name = claim.rpartition("/")
            attribute = E(statement, f"{{{SAML1}}}Attribute", AttributeName=name or claim,
                          AttributeNamespace=namespace or "http://schemas.xmlsoap.org/claims")
            for value in self.builder._value(identity, field):
                E(attribute, f"{{{SAML1}}}AttributeValue").text = value
        authn = E(assertion, f"{{{SAML1}}}AuthenticationStatement",
                  AuthenticationMethod=SAML1_METHOD.get(identity.method, "urn:oasis:names:tc:SAML:1.0:am:password"),
                  AuthenticationInstant=instant(dt.datetime.fromtimestamp(identity.authenticated_at, dt.timezone.utc)))
        subject(authn)
        E(assertion, f"{{{DS}}}Signature", Id="placeholder", nsmap={"ds": DS})
        return self.builder.sign(assertion, id_attribute="AssertionID")

    def answer_target(self, pending: dict) -> WsFedRelyingParty:
        """The relying party to answer *pending* for, as configured now: a reload while the user
        signed in may have removed it (``wsfed.unknown_realm``) or its reply URL
        (``wsfed.reply_not_registered``)."""
        party = self.parties.get(pending["realm"])
        if party is None:
            raise Refused("wsfed.unknown_realm", pending["realm"][:200])
        if pending["reply"] not in party.reply_urls:
            raise Refused("wsfed.reply_not_registered", pending["reply"][:200])
        return party

    async def complete(self, request: web.Request, pending: dict, session) -> web.Response:
        party = self.answer_target(pending)
        identity = session.identity
        name_id = self.builder.name_id(identity, party.name_id_format, party.name_id_source)
        if name_id is None:
            # Fail closed, as SAML does: the NameID's source field is empty for this user, and
            # another value in its place (the user name) could be another account's at the relying
            # party. The error page (the session stays); the log names the user and the field.
            return self.web.refused(request, Refused(
                "wsfed.name_id_unavailable", f"user {identity.username[:100]} has no {party.name_id_source} "
                                             f"(name_id_source) for the NameID of {party.realm[:100]}"))
        wresult = await asyncio.to_thread(self.token_response, party.realm, identity,
                                          self.web.sessions.party_index(session.index, party.realm),
                                          dt.datetime.now(dt.timezone.utc), name_id)
        fields = [("wa", "wsignin1.0"), ("wresult", wresult.decode())]
        if pending["wctx"]:
            fields.append(("wctx", pending["wctx"]))
        return self.web.auto_post(pending["reply"], fields)
