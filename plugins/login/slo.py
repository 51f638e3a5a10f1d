"""SAML 2.0 Single Logout, SP-initiated (SAML profiles section 4.4): ``/saml/slo`` takes a
``LogoutRequest`` by HTTP-Redirect or HTTP-POST from a registered SP that has an ``slo_url``,
ends the authgw session its ``SessionIndex`` names (and the browser's own, when its cookie
comes along), and posts a signed ``LogoutResponse`` to that ``slo_url``. Reads
``login.saml.service_providers[].slo_url``.

Named checks: the decoding checks of :mod:`.xmlsafe`, ``saml.not_logout_request``,
``saml.unknown_sp``, ``saml.slo_not_registered`` (the SP has no ``slo_url``),
``saml.destination_mismatch``, ``saml.request_expired``, and for SPs with a
``request_certificate`` the signature and replay checks of SSO. Logout is not propagated to the
other SPs the user visited (front-channel logout of every session participant is not done).
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets

from aiohttp import web
from lxml import etree

from gateway import Route

from .saml import DS, SAML, SAMLP, SamlIdp, _parse_instant, instant
from .xmlsafe import parse_xml
from .web import Refused

__all__ = ["SingleLogout"]


def read_logout_request(root: etree._Element) -> tuple[str, str, str | None, str, list[str]]:
    """``(ID, Issuer, Destination, IssueInstant, SessionIndexes)`` of a LogoutRequest."""
    if root.tag != f"{{{SAMLP}}}LogoutRequest" or root.get("Version") != "2.0":
        raise Refused("saml.not_logout_request", str(root.tag)[:100])
    issuer, request_id = root.findtext(f"{{{SAML}}}Issuer"), root.get("ID")
    if not issuer or not request_id or len(request_id) > 256:
        raise Refused("saml.not_logout_request", "no Issuer or ID")
    indexes = [(e.text or "").strip() for e in root.findall(f"{{{SAMLP}}}SessionIndex")]
    return request_id, issuer.strip(), root.get("Destination"), root.get("IssueInstant", ""), indexes


class SingleLogout:
    def __init__(self, idp: SamlIdp) -> None:
        self.idp = idp
        self.url = f"{idp.settings.base_url}/saml/slo"

    def routes(self, web_door) -> list[Route]:
        self.web = web_door
        return [Route("GET", "/saml/slo", self.logout), Route("POST", "/saml/slo", self.logout)]

    def response(self, destination: str, in_response_to: str, now: dt.datetime) -> bytes:
        E = etree.SubElement
        root = etree.Element(f"{{{SAMLP}}}LogoutResponse", nsmap={"samlp": SAMLP, "saml": SAML},
                             ID="_" + secrets.token_hex(20), Version="2.0", IssueInstant=instant(now),
                             Destination=destination, InResponseTo=in_response_to)
        E(root, f"{{{SAML}}}Issuer").text = self.idp.entity_id
        E(root, f"{{{DS}}}Signature", Id="placeholder", nsmap={"ds": DS})
        E(E(root, f"{{{SAMLP}}}Status"), f"{{{SAMLP}}}StatusCode", Value="urn:oasis:names:tc:SAML:2.0:status:Success")
        return etree.tostring(self.idp.builder.sign(root), xml_declaration=True, encoding="UTF-8")

    async def logout(self, request: web.Request) -> web.StreamResponse:
        now = dt.datetime.now(dt.timezone.utc)
        try:
            data, relay_state = await self.idp.read_message(request)
            root = parse_xml(data)
            request_id, issuer, destination, issued, _ = read_logout_request(root)
            sp = self.idp.checker.provider(issuer)
            if sp.slo_url is None:
                raise Refused("saml.slo_not_registered", sp.entity_id[:200])
            if destination is not None and destination != self.url:
                raise Refused("saml.destination_mismatch", destination[:200])
            when, skew = _parse_instant(issued), self.idp.checker.skew
            if when > now + skew or when < now - self.idp.checker.lifetime - skew:
                raise Refused("saml.request_expired", issued[:40])
            request_id, _, _, _, indexes = read_logout_request(self.idp.verify_signed(request, sp, data, root))
        except Refused as exc:
            return self.web.refused(request, exc)
        for index in indexes:
            self.web.sessions.end_index(index)
        self.web.sessions.end(request.cookies.get(self.web.cookie))
        xml = self.response(sp.slo_url, request_id, now)
        fields = [("SAMLResponse", base64.b64encode(xml).decode())] + ([("RelayState", relay_state)] if relay_state else [])
        response = self.web.auto_post(sp.slo_url, fields)
        response.del_cookie(self.web.cookie, path="/")
        return response
