"""Who may use the console, and the headers every answer carries.

* ``Host`` must name 127.0.0.1, ::1, localhost or a name in ``console.hosts``: a web page the
  operator visits cannot reach the console by re-pointing its own DNS name at 127.0.0.1
  (DNS rebinding) — the browser would send that name.
* A session comes only from a one-time login link (``authgw console``); its cookie is
  ``HttpOnly``, ``SameSite=Strict`` and, on the TLS listener, ``Secure``.
* Every POST carries the session's CSRF token (compared in constant time), and a present
  ``Origin`` must be this console's. The form is read once, here (handlers take it from
  ``request[FORM_KEY]``); a body that cannot be read as a form is a 400, never a 500.
* Pages are ``no-store`` and sent with a Content-Security-Policy that allows only the console's
  own script and style files: no inline script, no framing, forms post only to the console.
"""

from __future__ import annotations

import hmac
import logging
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web
from multidict import MultiDictProxy

from gateway.http.forms import UnreadableForm, read_form
from gateway.plugins.console.store import ConsoleStore, Session

__all__ = ["COOKIE", "FORM_KEY", "SECURITY_HEADERS", "Guard"]

log = logging.getLogger("authgw.plugin.console")

COOKIE = "authgw_console"
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make Chromium send `Origin: null` on POSTs
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}
SESSION_KEY = web.RequestKey("console_session", Session)
#: A POST's form, read once by the guard (the CSRF check needs it before the handler runs).
FORM_KEY = web.RequestKey("console_form", MultiDictProxy)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Guard:
    def __init__(self, store: ConsoleStore, session_ttl: float, hosts: list[str], tls: bool,
                 refuse: Callable[[web.Request, int, str], web.StreamResponse]) -> None:
        self.store = store
        self.session_ttl = session_ttl
        self.hosts = {"127.0.0.1", "::1", "localhost", *(h.lower() for h in hosts)}
        self.tls = tls
        self.refuse = refuse

    def host_ok(self, request: web.Request) -> bool:
        host = request.headers.get("Host", "")
        try:
            name = urlsplit(f"//{host}").hostname or ""
        except ValueError:
            return False
        return name.lower() in self.hosts

    def origin_ok(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        return parts.netloc.lower() == request.headers.get("Host", "").lower() and \
            parts.scheme == ("https" if self.tls else "http")

    def session(self, request: web.Request) -> Session | None:
        value = request.cookies.get(COOKIE)
        if not value or len(value) > 128:
            return None
        return self.store.session(value, self.session_ttl)

    def set_cookie(self, response: web.StreamResponse, session_id: str) -> None:
        response.set_cookie(COOKIE, session_id, httponly=True, samesite="Strict", secure=self.tls, path="/")

    async def refusal(self, request: web.Request, needs_session: bool) -> web.StreamResponse | None:
        """The answer to a request that may not reach its handler, else ``None`` (with the
        session and a POST's form stored on the request)."""
        if not self.host_ok(request):
            return self.refuse(request, 421, "This console answers only to 127.0.0.1, ::1 and "
                                             "localhost (or the names in console.hosts).")
        session = self.session(request) if needs_session else None
        if needs_session and session is None:
            return self.refuse(request, 401, "No console session: open the one-time link that "
                                             "`authgw console` prints.")
        if request.method == "POST":
            if not self.origin_ok(request):
                return self.refuse(request, 403, "This form was posted from another site.")
            try:
                form = await read_form(request)
            except UnreadableForm as exc:  # its text is the kind of error only, no client value
                log.warning("console: unreadable form refused: %s %s (%s)", request.method, request.path, exc)
                return self.refuse(request, 400, "This form could not be read: reload the page and "
                                                 "submit it again.")
            if needs_session and not _csrf_ok(form, session):
                return self.refuse(request, 403, "The form's CSRF token is missing or stale: reload the "
                                                 "page and submit again.")
            request[FORM_KEY] = form
        if needs_session:
            request[SESSION_KEY] = session
        return None

    def wrap(self, handler: Handler, *, needs_session: bool = True) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            response = await self.refusal(request, needs_session)
            if response is None:
                try:
                    response = await handler(request)
                except web.HTTPException as exc:  # redirects and 404s carry the headers too
                    for name, value in SECURITY_HEADERS.items():
                        exc.headers.setdefault(name, value)
                    raise
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return guarded


def _csrf_ok(form: MultiDictProxy, session: Session) -> bool:
    token = form.get("csrf")
    return isinstance(token, str) and hmac.compare_digest(token.encode(), session.csrf.encode())
