"""WS-Federation passive requestor profile (``/wsfed``): ``wa=wsignin1.0`` with ``wtrealm``,
``wreply`` and ``wctx``, answered by a form posting ``wresult``, a WS-Trust
RequestSecurityTokenResponse carrying a signed SAML 2.0 assertion (what ADFS sends, and what
Auth0's ADFS connections and Entra domain federation accept). Reads ``login.wsfed``. Its metadata (``/FederationMetadata/2007-06/FederationMetadata.xml``, where an
"ADFS URL" leads) lists the current and next signing certificates.

Named checks: ``wsfed.unsupported_action`` (any ``wa`` but ``wsignin1.0``),
``wsfed.unknown_realm``, ``wsfed.reply_not_registered`` (``wreply`` must be one of the realm's
``reply_urls`` exactly), ``login.parameter_too_large`` (``wctx`` over 4 KiB).
"""

from __future__ import annotations

import asyncio
import datetime as dt

from aiohttp import web
from lxml import etree

from gateway import Route

from .saml import DS, MD, XSI, SamlIdp, instant
from .settings import LoginSettings
from .web import Refused

__all__ = ["WsFed"]

TRUST = "http://schemas.xmlsoap.org/ws/2005/02/trust"
WSU = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
WSP = "http://schemas.xmlsoap.org/ws/2004/09/policy"
WSA = "http://www.w3.org/2005/08/addressing"
SAML2_TOKEN = "urn:oasis:names:tc:SAML:2.0:assertion"
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
        return {"protocol": "wsfed", "realm": party.realm, "reply": reply, "wctx": context, "force_authn": False}

    async def signin(self, request: web.Request) -> web.StreamResponse:
        try:
            pending = self.check(request.query)
        except Refused as exc:
            return self.web.refused(request, exc)
        return await self.web.begin(request, pending, self.settings.saml.request_lifetime)

    def token_response(self, realm: str, identity, session_index: str, now: dt.datetime) -> bytes:
        party = self.parties[realm]
        E = etree.SubElement
        rstr = etree.Element(f"{{{TRUST}}}RequestSecurityTokenResponse", nsmap={"t": TRUST})
        lifetime = E(rstr, f"{{{TRUST}}}Lifetime")
        E(lifetime, f"{{{WSU}}}Created", nsmap={"wsu": WSU}).text = instant(now)
        E(lifetime, f"{{{WSU}}}Expires", nsmap={"wsu": WSU}).text = instant(now + self.builder.lifetime)
        applies = E(rstr, f"{{{WSP}}}AppliesTo", nsmap={"wsp": WSP})
        E(E(applies, f"{{{WSA}}}EndpointReference", nsmap={"wsa": WSA}), f"{{{WSA}}}Address").text = realm
        token = E(rstr, f"{{{TRUST}}}RequestedSecurityToken")
        token.append(self.builder.assertion(
            audience=realm, identity=identity, name_id_format=party.name_id_format,
            name_id=self.builder.name_id(identity, party.name_id_format, party.name_id_source),
            attributes=party.attributes, session_index=session_index, now=now))
        E(rstr, f"{{{TRUST}}}TokenType").text = SAML2_TOKEN
        E(rstr, f"{{{TRUST}}}RequestType").text = f"{TRUST}/Issue"
        E(rstr, f"{{{TRUST}}}KeyType").text = "http://schemas.xmlsoap.org/ws/2005/05/identity/NoProofKey"
        return etree.tostring(rstr, encoding="UTF-8")

    async def complete(self, request: web.Request, pending: dict, session) -> web.Response:
        party = self.parties.get(pending["realm"])
        if party is None or pending["reply"] not in party.reply_urls:
            return self.web.refused(request, Refused("wsfed.reply_not_registered", pending["reply"][:200]))
        wresult = await asyncio.to_thread(self.token_response, party.realm, session.identity, session.index,
                                          dt.datetime.now(dt.timezone.utc))
        fields = [("wa", "wsignin1.0"), ("wresult", wresult.decode())]
        if pending["wctx"]:
            fields.append(("wctx", pending["wctx"]))
        return self.web.auto_post(pending["reply"], fields)
