"""SAML 2.0 Single Logout (SAML profiles section 4.4), authgw as the session authority.

``/saml/slo`` takes, by HTTP-Redirect or HTTP-POST:

* a ``LogoutRequest`` from a registered SP that has an ``slo_url``: authgw ends the sessions its
  ``SessionIndex`` names (where that SP got an assertion, with this NameID), and the browser's own
  (when its cookie comes along) only when it is one of those or the request was signed, its
  signature verified and its NameID is the browser's user as that SP knows them (an unsigned
  one, from an SP without ``request_certificate`` or with ``signed_logout: false``, is a GET any
  page can make; a signed one names whoever signed out at the SP), then sends a signed LogoutRequest to
  every *other* SP that got an assertion in those sessions, one after another through the
  browser (to its registered ``slo_url``, by its ``slo_binding``: HTTP-POST or HTTP-Redirect;
  the NameID and SessionIndex as issued), checks each LogoutResponse, and finally sends a signed
  LogoutResponse to the initiating SP the same way: ``Success``, or ``Success`` with the
  second-level ``PartialLogout`` when another participant could not be logged out (no
  ``slo_url``, a refusal, a bad or missing signature; ``Success`` also when the request ended
  no session: :func:`.logout.logout_response`). At most :data:`.logout.MAX_SESSION_INDEXES`
  ``SessionIndex`` elements (more: ``login.malformed``), looked up in one store round trip; an
  unsigned request that ends no session then spends a token of the client's budget
  (``login.too_many_requests``, 429, past it, nothing signed), as a SAML error Response does; one
  that ends a session is never refused by the budget (users behind one NAT share it with their
  sign-ins);
* a ``LogoutResponse`` from such an SP, found by its ``InResponseTo`` (the random ID of the
  request authgw sent, kept server-side with the rest of the round, single use).

``POST /logout`` (the "Sign out" button, CSRF-checked in :mod:`.web`), WS-Federation
``wsignout1.0`` and OpenID Connect RP-initiated logout start the same round without an initiating
SP; it ends on the "signed out" page, or with a redirect to the (registered) address they were
given. Reads
``login.saml.service_providers[].slo_url`` / ``signed_logout`` / ``request_certificate`` and
``login.saml.request_lifetime`` (how long a round waits for an SP's answer).

Named checks: the decoding checks of :mod:`.xmlsafe`, ``saml.not_logout_request``,
``saml.not_logout_response``, ``saml.unknown_sp``, ``saml.slo_not_registered``,
``saml.destination_mismatch``, ``saml.request_expired``, ``saml.logout_unknown`` (a
LogoutResponse to nothing authgw sent, or sent too long ago), ``login.malformed`` (too many
SessionIndex elements), and the signature and replay checks of SSO; ``login.too_many_requests``
(429) for an unsigned LogoutRequest that ends no session, past its client's budget. Only
registered ``slo_url`` addresses are ever posted to.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from aiohttp import web
from lxml import etree

from gateway import Route
from gateway.logs import printable

from .logout import SUCCESS, encode, logout_request, logout_response, read_logout
from .saml import BindingMessage, SamlIdp, _parse_instant
from .sessions import same
from .xmlsafe import parse_xml
from .web import Refused

__all__ = ["SingleLogout"]

log = logging.getLogger("authgw.plugin.login")


class SingleLogout:
    def __init__(self, idp: SamlIdp) -> None:
        self.idp = idp
        self.url = f"{idp.settings.base_url}/saml/slo"
        self.lifetime = dt.timedelta(seconds=idp.settings.saml.request_lifetime)

    def routes(self, web_door) -> list[Route]:
        self.web = web_door
        web_door.logout_round = self.start_round
        web_door.logout_redirects = self.first_redirects
        return [Route("GET", "/saml/slo", self.endpoint), Route("POST", "/saml/slo", self.endpoint)]

    async def endpoint(self, request: web.Request) -> web.StreamResponse:
        try:  # one reading of the query or form decides the kind and gives the message
            message = await self.idp.read_message(request, None)
        except Refused as exc:
            return self.web.refused(request, exc)
        if message.field == "SAMLResponse":
            return await self.confirmation(request, message)
        return await self.logout(request, message)

    # -- a LogoutRequest from an SP ------------------------------------------------------------------

    def _check_times(self, issued: str, not_on_or_after: str | None, now: dt.datetime) -> None:
        when, skew = _parse_instant(issued), self.idp.checker.skew
        if when > now + skew or when < now - self.idp.checker.lifetime - skew:
            raise Refused("saml.request_expired", issued[:40])
        if not_on_or_after is not None and _parse_instant(not_on_or_after) <= now - skew:  # "not on": at it, past
            raise Refused("saml.request_expired", f"NotOnOrAfter {not_on_or_after[:40]}")

    async def logout(self, request: web.Request, received: BindingMessage) -> web.StreamResponse:
        now = dt.datetime.now(dt.timezone.utc)
        try:
            root = parse_xml(received.data)
            message = read_logout(root, "request")
            sp = self.idp.checker.provider(message.issuer)
            if sp.slo_url is None:
                raise Refused("saml.slo_not_registered", sp.entity_id[:200])
            if message.destination is not None and message.destination != self.url:
                raise Refused("saml.destination_mismatch", message.destination[:200])
            self._check_times(message.issue_instant, message.not_on_or_after, now)
            signed = await self.idp.verify_signed(received, sp, root, sp.signed_logout)
            verified = self.idp.verified(received, sp, root)  # a signature was there, and it verified
            message = read_logout(signed, "request")
        except Refused as exc:
            return self.web.refused(request, exc)
        sessions = self.web.sessions
        ending: dict[str, str | None] = {}  # store key -> SessionIndex
        # The indexes (at most MAX_SESSION_INDEXES, each once: read_logout) in one store round trip.
        told = {sessions.told_index(index): index for index in message.session_indexes}
        for index, key in sessions.keys_of_indexes(list(told)).items():
            issued = sessions.participants(key).get(sp.entity_id)
            if issued is None or issued["name_id"] != message.name_id or not same(str(issued.get("index", "")), told[index]):
                # Not a session this SP was told about, not for this subject, or by an index told
                # to another party (each its own: SessionManager.party_index): not its to end.
                log.warning("single logout: %s named a session it has no part in; it stays", sp.entity_id)
                continue
            ending[key] = index
        # The browser's own session ends when the request named it (above: its SessionIndex, with
        # the NameID this SP was issued in it), or when the SP signed the request, the signature
        # verified and its NameID is the browser's user as this SP knows them. An unsigned
        # request (an SP without request_certificate, or with signed_logout: false) is a
        # cross-site GET any page can make: it names no session of this browser by chance, so it
        # does not end that one because its cookie came along.
        own = await self.web.asession(request)
        if own is not None and own.key not in ending:
            if verified and self._names_user_of(own, sp, message.name_id):
                ending[own.key] = own.index
            else:
                log.warning("single logout: %s LogoutRequest from %s did not name the browser's own "
                            "session; it stays", "a signed" if verified else "an unsigned", sp.entity_id)
        if not ending:
            if not verified:
                # An unsigned LogoutRequest needs no credential, yet it is answered with a signed
                # LogoutResponse (CPU): one that ends no session spends a token of the client's
                # budget, as a SAML error Response does (past it, 429 and nothing signed). Only
                # after the lookup (one round trip, at most MAX_SESSION_INDEXES): a user's logout
                # that ends their session is never refused, although users behind one NAT share
                # the address's budget with their sign-ins (refused, it would leave the session
                # alive and the next sign-in at an SP silent: a shared machine).
                await self.web.spend_park()
            log.info("single logout: a LogoutRequest from %s ended no session", sp.entity_id)
        state = await self._round(ending, initiator=sp.entity_id)
        state.update(request_id=message.id, relay_state=received.relay_state)
        response = await self.next_step(state)
        if own is not None and own.key in ending:
            self.web.drop_cookie(response)
        return response

    def _names_user_of(self, own, sp, name_id: str | None) -> bool:
        """Whether *name_id* (a verified LogoutRequest's) is the user of the browser's session
        *own* as *sp* knows them: the NameID *sp* was issued in it, or, when *sp* got no assertion
        in it (the SP's session began in an earlier one), the NameID it would be issued. A signed
        LogoutRequest is the SP's word about its own user: anyone who signed out there holds one
        (a URL) for themselves, and sent a victim's browser with it, ending the victim's whole
        session and their other SPs' (review of the XML protocols)."""
        if not name_id:
            return False
        issued = self.web.sessions.participants(own.key).get(sp.entity_id)
        if issued is not None:
            return same(str(issued.get("name_id", "")), name_id)
        if sp.name_id_format == "transient":  # never issued twice: only the record above names it
            return False
        expected = self.idp.builder.name_id(own.identity, sp.name_id_format, sp.name_id_source)
        return expected is not None and same(expected, name_id)

    def first_redirects(self, session) -> list[str]:
        """The addresses ``POST /logout`` for *session* may redirect the browser to first: the
        ``slo_url`` of each of its participants that takes HTTP-Redirect (:mod:`.web` lists their
        origins in the Sign out page's ``form-action``)."""
        providers = (self.idp.checker.providers.get(party) for party in self.web.sessions.participants(session.key))
        return [sp.slo_url for sp in providers if sp is not None and sp.slo_url and sp.slo_binding == "redirect"]

    async def start_round(self, request: web.Request, ending: dict[str, str | None],
                          after: str | None = None) -> web.StreamResponse:
        """End the sessions in *ending* (store key -> SessionIndex), tell every SP that got an
        assertion in them, then show "signed out" or go to *after* (a registered address)."""
        state = await self._round(ending, initiator=None)
        state["after"] = after
        return await self.next_step(state)

    async def _round(self, ending: dict[str, str | None], initiator: str | None) -> dict:
        """End the sessions in *ending*; the state of the logout round for their participants."""
        sessions, queue, failed = self.web.sessions, [], []
        for key, index in ending.items():
            for party, issued in sessions.participants(key).items():
                if party == initiator:
                    continue
                target = {"sp": party, **issued}
                if target in queue:
                    continue
                sp = self.idp.checker.providers.get(party)
                if sp is None or sp.slo_url is None:
                    failed.append(party)  # it cannot be told: the logout is partial
                else:
                    queue.append(target)
            await sessions.aend_key(key, index)
        return {"initiator": initiator, "queue": queue, "failed": failed, "told": []}

    async def next_step(self, state: dict) -> web.Response:
        """Send the browser with a LogoutRequest to the next participant, or finish the round."""
        while state["queue"]:
            target = state["queue"].pop(0)
            sp = self.idp.checker.providers.get(target["sp"])
            if sp is None or sp.slo_url is None:  # the configuration changed during the round
                state["failed"].append(target["sp"])
                continue
            message = logout_request(
                self.idp.entity_id, destination=sp.slo_url, name_id=target["name_id"], name_id_format=target["format"],
                sp_name_qualifier=sp.entity_id, session_index=target["index"], now=dt.datetime.now(dt.timezone.utc),
                lifetime=self.lifetime)
            state["sent"] = sp.entity_id
            await self.web.sessions.apark_as(message.get("ID"), state, self.lifetime.total_seconds())
            return await self._send(sp, message)
        return await self.finish(state)

    async def _send(self, sp, message: etree._Element, relay_state: str = "") -> web.Response:
        """*message* to the SP's registered ``slo_url``, by its ``slo_binding``."""
        # An RSA signature (and C14N for POST) takes milliseconds: off the event loop.
        encoded = await asyncio.to_thread(encode, self.idp.builder, message, sp.slo_binding, sp.slo_url, relay_state)
        if isinstance(encoded, str):
            return web.Response(status=303, headers={"Location": encoded, "Cache-Control": "no-store"})
        return self.web.auto_post(sp.slo_url, encoded)

    async def finish(self, state: dict) -> web.Response:
        log.info("single logout done: initiator=%s told=%s failed=%s", state["initiator"] or "authgw",
                 ",".join(state["told"]) or "-", ",".join(state["failed"]) or "-")
        if state.get("after"):  # registered by the protocol that started the round (WS-Fed, OIDC)
            return web.Response(status=303, headers={"Location": state["after"], "Cache-Control": "no-store"})
        sp = self.idp.checker.providers.get(state["initiator"] or "")
        if sp is None or sp.slo_url is None:
            return self.web.html(self.web.pages.message("signed_out_partial" if state["failed"] else "signed_out"))
        message = logout_response(self.idp.entity_id, destination=sp.slo_url, in_response_to=state["request_id"],
                                  now=dt.datetime.now(dt.timezone.utc), partial=bool(state["failed"]))
        return await self._send(sp, message, state["relay_state"])

    # -- a LogoutResponse from an SP authgw sent a LogoutRequest to ------------------------------------

    async def confirmation(self, request: web.Request, received: BindingMessage) -> web.StreamResponse:
        try:
            root = parse_xml(received.data)
            message = read_logout(root, "response")
            state = await self.web.sessions.aunpark_as(message.in_response_to or "")
            if state is None:
                raise Refused("saml.logout_unknown", str(message.in_response_to)[:100])
        except Refused as exc:
            return self.web.refused(request, exc)
        expected = state.pop("sent")
        try:
            await self._check_confirmation(expected, message, received, root)
            state["told"].append(expected)
        except Refused as exc:
            # The detail quotes the answer (its Issuer, Destination, status): escaped, so a LogoutResponse
            # whose Issuer holds "&#10;" cannot start a forged log line (the user's own browser carries it).
            log.warning("single logout: %s did not confirm: reason=%s %s", expected, exc.reason,
                        printable(exc.detail[:200]))
            state["failed"].append(expected)
        return await self.next_step(state)

    async def _check_confirmation(self, expected: str, message, received: BindingMessage, root: etree._Element) -> None:
        if message.issuer != expected:
            raise Refused("saml.unknown_sp", f"a LogoutResponse for {expected[:100]} from {message.issuer[:100]}")
        sp = self.idp.checker.provider(expected)
        if message.destination is not None and message.destination != self.url:
            raise Refused("saml.destination_mismatch", message.destination[:200])
        signed = read_logout(await self.idp.verify_signed(received, sp, root, sp.signed_logout), "response")
        if signed.in_response_to != message.in_response_to or signed.issuer != expected:
            raise Refused("saml.signature_invalid", "the signature does not cover the response")
        if signed.status != SUCCESS:
            raise Refused("saml.logout_failed", str(signed.status)[:200])
