"""``/login`` and ``/logout``: how a browser gets a session, and how a protocol's pending request
(a SAML AuthnRequest, ...) is completed once it has one.

Order of methods at ``GET /login`` without a session: a client certificate on a TLS listener,
then an ``Authorization: Negotiate`` header, then, when a chain step offers ``Negotiate`` to this
client (Kerberos inside its ``allowed_networks``), a 401 Negotiate challenge whose body is the
password form (a browser without a ticket shows it), else the form. Every attempt goes through
``door.attempt`` + ``door.decide`` (front door ``login``): throttling, deadline and audit are
those of ``/auth``.

Never a URL from the request is redirected to: after login the browser goes on to a *pending*
request (an id into the store, made by a protocol module from a validated, registered return
address) or sees a "signed in" page.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

from aiohttp import web

from gateway import Decision, Outcome
from gateway.http import forms
from gateway.http.credentials import MalformedCredentials, parse_authorization, single_authorization
from gateway.logs import printable

from .pages import AUTOSUBMIT_HASH, STYLE_HASH, Pages
from .sessions import STORE_ERRORS, Session, SessionManager

__all__ = ["LoginDoor", "Refused"]

log = logging.getLogger("authgw.plugin.login")

CSRF_COOKIE = "authgw_csrf"
FRONT_DOOR = "login"
#: Completes a pending request for a session: returns the answer page (e.g. a SAML POST form).
Completer = Callable[[web.Request, dict, Session], Awaitable[web.StreamResponse]]


class Refused(Exception):
    """A protocol request that fails a named check; ``reason`` is its stable code
    (docs/reasons.md). The browser sees a generic page with the request's reference."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class UnreadableBody(Refused):
    """A request body that is not a form this front door can read (an unknown charset, a
    multipart body without its boundary): a 400, never a 500 with a traceback."""


async def read_form(request: web.Request):
    """:func:`gateway.http.forms.read_form`, a body it cannot read raising :class:`UnreadableBody`
    (``login.malformed``, answered by :meth:`LoginDoor.guarded`)."""
    try:
        return await forms.read_form(request)
    except forms.UnreadableForm as exc:
        raise UnreadableBody("login.malformed", str(exc)) from None


def _message_key(decision: Decision) -> str:
    if decision.outcome is Outcome.ACCOUNT_STATE:
        if "locked" in decision.reason:
            return "locked"
        if "expired" in decision.reason and "account" not in decision.reason or "change" in decision.reason:
            return "expired"
        return "disabled"
    if decision.outcome is Outcome.THROTTLED:
        return "throttled"
    if decision.outcome is Outcome.UNAVAILABLE:
        return "unavailable"
    return "invalid"  # unknown user, wrong password, error: one message


_STATUS = {"throttled": 429, "unavailable": 503}


class LoginDoor:
    def __init__(self, door, sessions: SessionManager, pages: Pages, settings) -> None:
        self.door = door
        self.sessions = sessions
        self.pages = pages
        self.settings = settings
        self.cookie = settings.sessions.cookie_name
        self.completers: dict[str, Completer] = {}
        #: Ends a session and tells the services it was used with (SAML Single Logout, :mod:`.slo`).
        #: Arguments: the request, the sessions to end (store key -> SessionIndex), where to go after.
        self.logout_round: Callable[..., Awaitable[web.StreamResponse]] | None = None

    # -- responses -------------------------------------------------------------------------------

    def html(self, body: str, status: int = 200, *, form_action: str = "'self'", script: bool = False) -> web.Response:
        csp = (f"default-src 'none'; style-src '{STYLE_HASH}'; form-action {form_action}; "
               f"frame-ancestors 'none'; base-uri 'none'" + (f"; script-src '{AUTOSUBMIT_HASH}'" if script else ""))
        return web.Response(text=body, status=status, content_type="text/html", headers={
            "Cache-Control": "no-store", "Content-Security-Policy": csp, "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"})

    def refused(self, request: web.Request, exc: Refused) -> web.Response:
        """The generic page for a request that failed a named check (logged with its reason)."""
        reference = self.door.request_ids.next()
        log.warning("login request refused: reason=%s reference=%s client=%s %s", exc.reason, reference,
                    request.remote, printable(exc.detail[:200]))
        response = self.html(self.pages.message("refused", alert=True, reference=reference), 400)
        response.headers["X-Refused-Reason"] = exc.reason
        return response

    def _set_cookie(self, response: web.StreamResponse, name: str, value: str) -> None:
        response.set_cookie(name, value, path="/", httponly=True, samesite="Lax",
                            secure=self.settings.sessions.secure_cookie)

    def auto_post(self, url: str, fields: list[tuple[str, str]]) -> web.Response:
        """The answer page: a form that posts *fields* to *url* (a registered address) on load,
        or when the user presses Continue without JavaScript."""
        origin = "/".join(url.split("/", 3)[:3])
        return self.html(self.pages.post(url, fields), form_action=origin, script=True)

    def guarded(self, handler, *, json: bool = False):
        """*handler*, answering 503 (not 500) when the session store cannot be used: sign-ins
        wait for the store, they are never answered without it (fail closed); and 400 for a
        body it cannot read (:func:`read_form`)."""
        async def guarded_handler(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except UnreadableBody as exc:
                if json:
                    log.warning("login request refused: reason=%s client=%s %s", exc.reason, request.remote, exc.detail)
                    return web.json_response({"error": "invalid_request", "error_description": "unreadable body"},
                                             status=400, headers={"Cache-Control": "no-store"})
                return self.refused(request, exc)
            except STORE_ERRORS as exc:
                log.error("login session store unavailable: %s: %s", exc.__class__.__name__, exc)
                if json:
                    return web.json_response({"error": "temporarily_unavailable"}, status=503,
                                             headers={"Retry-After": "5", "Cache-Control": "no-store"})
                response = self.html(self.pages.message("unavailable", alert=True), 503)
                response.headers["Retry-After"] = "5"
                return response

        return guarded_handler

    # -- sessions ---------------------------------------------------------------------------------

    def session(self, request: web.Request) -> Session | None:
        return self.sessions.get(request.cookies.get(self.cookie))

    async def begin(self, request: web.Request, pending: dict, lifetime: float) -> web.StreamResponse:
        """Continue a validated protocol request: at once with a live session, else after
        ``/login`` (the request parked under a single-use id)."""
        session = self.session(request)
        if session is not None and not pending.get("force_authn"):
            return await self.completers[pending["protocol"]](request, pending, session)
        key = self.sessions.park(pending, lifetime)
        raise web.HTTPSeeOther(f"/login?req={key}", headers={"Cache-Control": "no-store"})

    # -- /login -------------------------------------------------------------------------------------

    def _form(self, request: web.Request, pending: str, *, status: int = 200, error: str = "",
              username: str = "", challenge: str | None = None) -> web.Response:
        cookie, token = self.sessions.csrf_pair(request.cookies.get(CSRF_COOKIE))
        response = self.html(self.pages.form(action="/login", csrf=token, pending=pending, username=username,
                                             error=error), status)
        if challenge:
            response.headers["WWW-Authenticate"] = challenge
        self._set_cookie(response, CSRF_COOKIE, cookie)
        return response

    async def _signed_in(self, request: web.Request, decision: Decision, pending_key: str) -> web.StreamResponse:
        value, session = self.sessions.create(decision.identity, request.cookies.get(self.cookie))
        pending = self.sessions.unpark(pending_key) if pending_key else None
        if pending is not None:
            response = await self.completers[pending["protocol"]](request, pending, session)
        else:
            cookie, token = self.sessions.csrf_pair(request.cookies.get(CSRF_COOKIE))
            name = session.identity.display_name or session.identity.username
            response = self.html(self.pages.message("signed_in", name=name, logout="/logout", csrf=token))
            self._set_cookie(response, CSRF_COOKIE, cookie)
        self._set_cookie(response, self.cookie, value)
        return response

    async def login_get(self, request: web.Request) -> web.StreamResponse:
        pending_key = request.query.get("req", "")[:64]
        session = self.session(request)
        if session is not None:
            peeked = self.sessions.peek(pending_key) if pending_key else None
            if peeked is not None and not peeked.get("force_authn"):
                pending = self.sessions.unpark(pending_key)
                if pending is not None:
                    return await self.completers[pending["protocol"]](request, pending, session)
            elif peeked is None:
                cookie, token = self.sessions.csrf_pair(request.cookies.get(CSRF_COOKIE))
                name = session.identity.display_name or session.identity.username
                response = self.html(self.pages.message("signed_in", name=name, logout="/logout", csrf=token))
                self._set_cookie(response, CSRF_COOKIE, cookie)
                return response
            # ForceAuthn / prompt=login: the user proves it again; the request waits, unused.
        certificate = self.door.tls_certificate(request)
        if certificate is not None:
            decision = await self.door.decide(self.door.attempt(request, FRONT_DOOR, certificate=certificate))
            if decision.success:
                return await self._signed_in(request, decision, pending_key)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "negotiate" and token:
            try:
                credential = parse_authorization(single_authorization(request.headers))
                refused = None
            except MalformedCredentials as exc:
                credential, refused = None, exc.reason
            decision = await self.door.decide(self.door.attempt(request, FRONT_DOOR, negotiate=credential), refused)
            if decision.success:
                return await self._signed_in(request, decision, pending_key)
            return self._form(request, pending_key)
        offers = self.door.gateway.challenges(self.door.attempt(request, FRONT_DOOR))
        negotiate = next((o for o in offers if o.lower().startswith("negotiate")), None)
        return self._form(request, pending_key, status=401 if negotiate else 200, challenge=negotiate)

    async def login_post(self, request: web.Request) -> web.StreamResponse:
        form = await read_form(request)
        pending_key = str(form.get("req", ""))[:64]
        if not self.sessions.csrf_ok(request.cookies.get(CSRF_COOKIE), str(form.get("csrf", ""))):
            log.warning("login form refused: reason=login.csrf client=%s", request.remote)
            return self._form(request, pending_key, status=403, error="csrf")
        username, password = form.get("username", ""), form.get("password", "")
        if not isinstance(username, str) or not isinstance(password, str):
            return self._form(request, pending_key, status=400, error="invalid")
        credential, refused = self.door.password_credential(username, password)
        decision = await self.door.decide(self.door.attempt(request, FRONT_DOOR, password=credential), refused)
        if decision.success:
            return await self._signed_in(request, decision, pending_key)
        key = _message_key(decision)
        return self._form(request, pending_key, status=_STATUS.get(key, 401), error=key,
                          username=username[:256] if refused is None else "")

    async def logout(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            form = await read_form(request)
            if self.sessions.csrf_ok(request.cookies.get(CSRF_COOKIE), str(form.get("csrf", ""))):
                session = self.session(request)
                if session is not None and self.logout_round is not None:
                    response = await self.logout_round(request, {session.key: session.index})
                else:
                    self.sessions.end(request.cookies.get(self.cookie))
                    response = self.html(self.pages.message("signed_out"))
                response.del_cookie(self.cookie, path="/")
                return response
        return self._form(request, "", status=403 if request.method == "POST" else 200,
                          error="csrf" if request.method == "POST" else "")
