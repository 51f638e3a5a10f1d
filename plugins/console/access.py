"""Who may use the console, and the headers every answer carries.

* ``Host`` must name 127.0.0.1, ::1, localhost, the address of ``console.listen`` (which the
  printed link names) or a name in ``console.hosts``: a web page the operator visits cannot
  reach the console by re-pointing its own DNS name at 127.0.0.1 (DNS rebinding) — the browser
  would send that name.
* A session comes only from a one-time login link (``authgw console``). It lives under a path
  prefix of its own, ``/s/<random token>/``, and its cookie is scoped to that path
  (``HttpOnly``, ``SameSite=Strict`` and, on the TLS listener, ``Secure``). Browsers send a
  cookie to every port of a host (RFC 6265 8.5), so a host-wide cookie reached any other web
  server on 127.0.0.1 the operator's browser visited; a server that does not know the prefix
  never gets this one. A request must carry both the cookie and the prefix of the same session
  (compared in constant time); without them it gets the sign-in page, never a page's content.
* Every POST carries the session's CSRF token (compared in constant time), and a present
  ``Origin`` must be this console's. The form is read once, here (handlers take it from
  ``request[FORM_KEY]``); a body that cannot be read as a form, a charset other than UTF-8, or
  a value that is not UTF-8 text (a lone surrogate, which a UTF-7 or ``unicode_escape`` body
  decodes to) is a 400, never a 500 or a saved value that breaks a page. A body over the
  gateway's limit for every listener (``MAX_BODY``, 64 KiB) is the console's own 413 page.
* Pages are ``no-store`` and sent with a Content-Security-Policy that allows only the console's
  own script and style files: no inline script, no framing, forms post only to the console.
  So is the 500 page of a handler that fails.
"""

from __future__ import annotations

import hmac
import logging
import sqlite3
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web
from multidict import MultiDictProxy

from gateway.http.credentials import cookie_values
from gateway.http.forms import UnreadableForm, read_form
from gateway.http.protocol import MAX_BODY, no_linger
from gateway.logs import printable
from gateway.sqlitedb import result_code
from gateway.plugins.console.store import ConsoleStore, Session

__all__ = ["COOKIE", "FORM_KEY", "SECURITY_HEADERS", "SESSION_KEY", "SIGN_IN", "Guard"]

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
#: The sign-in page's text (401): no session, an ended one, or a URL without its session's prefix.
SIGN_IN = ("No console session here, or it has ended: open the one-time link that `authgw console` "
           "prints.")
SESSION_KEY = web.RequestKey("console_session", Session)
#: A POST's form, read once by the guard (the CSRF check needs it before the handler runs).
FORM_KEY = web.RequestKey("console_form", MultiDictProxy)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Charsets a form may name: browsers send UTF-8 forms and name no charset. Others make aiohttp
#: decode the body as the client says (``utf-7``, ``unicode_escape``), into lone surrogates.
_FORM_CHARSETS = {"utf-8", "utf8"}
#: Cookie values tried per request: a browser may also hold a stale one under another path.
_MAX_COOKIES = 4


#: SQLite's result codes for a store that cannot be used now (busy, locked, read-only, I/O error,
#: full, cannot open): its 503 page. Others (no such table...) are bugs: the 500 page.
_STORE_TROUBLE = frozenset({5, 6, 8, 10, 13, 14})


def _store_trouble(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and result_code(exc) in _STORE_TROUBLE


class Guard:
    def __init__(self, store: ConsoleStore, session_ttl: float, session_lifetime: float, hosts: list[str],
                 tls: bool, refuse: Callable[[web.Request, int, str], web.StreamResponse]) -> None:
        self.store = store
        self.session_ttl = session_ttl
        self.session_lifetime = session_lifetime
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
        """The session named by the cookie and by the ``/s/{prefix}/`` of the URL, both."""
        path_token = request.match_info.get("prefix", "")
        if not path_token or len(path_token) > 128:
            return None
        # every value: a browser still holding one from before the path prefixes (under `/`)
        # sends two, this one first
        for value in cookie_values(request.headers, COOKIE)[:_MAX_COOKIES]:
            if value and len(value) <= 128:
                session = self.store.session(value, path_token, self.session_ttl, self.session_lifetime)
                if session is not None:
                    return session
        return None

    def set_cookie(self, response: web.StreamResponse, session_id: str, session: Session) -> None:
        # No Max-Age: the cookie ends with the browser; the store ends the session before that.
        response.set_cookie(COOKIE, session_id, httponly=True, samesite="Strict", secure=self.tls,
                            path=session.prefix)

    def clear_cookie(self, response: web.StreamResponse, session: Session) -> None:
        response.del_cookie(COOKIE, path=session.prefix, secure=self.tls, httponly=True, samesite="Strict")

    async def refusal(self, request: web.Request, needs_session: bool,
                      reads_form: bool = True) -> web.StreamResponse | None:
        """The answer to a request that may not reach its handler, else ``None`` (with the
        session and a POST's form stored on the request)."""
        if not self.host_ok(request):
            return self.refuse(request, 421, "This console answers only to 127.0.0.1, ::1 and "
                                             "localhost (or the names in console.hosts).")
        session = self.session(request) if needs_session else None
        if needs_session and session is None:
            return self.refuse(request, 401, SIGN_IN)
        if request.method == "POST" and reads_form:
            if not self.origin_ok(request):
                return self.refuse(request, 403, "This form was posted from another site.")
            try:
                form = await _read_utf8_form(request)
            except web.HTTPRequestEntityTooLarge:  # declared, or found while reading a chunked body
                no_linger(request)
                return self.refuse(request, 413, f"This form is larger than {MAX_BODY // 1024} KiB, the "
                                                 "console's limit: upload only the CA's certificate, or give "
                                                 "the path of a larger CA file instead.")
            except UnreadableForm as exc:  # its text is the kind of error only, no client value
                # The route's pattern, not the path: the path holds the session's secret prefix.
                log.warning("console: unreadable form refused: %s %s (%s)", request.method, _route(request), exc)
                return self.refuse(request, 400, "This form could not be read: reload the page and "
                                                 "submit it again.")
            if needs_session and not _csrf_ok(form, session):
                return self.refuse(request, 403, "The form's CSRF token is missing or stale: reload the "
                                                 "page and submit again.")
            request[FORM_KEY] = form
        if needs_session:
            request[SESSION_KEY] = session
        return None

    def wrap(self, handler: Handler, *, needs_session: bool = True, reads_form: bool = True) -> Handler:
        """*handler* behind the checks above; *reads_form* False for a handler that answers a
        POST without its form (the sign-in page)."""
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                response = await self.refusal(request, needs_session, reads_form)
                if response is None:
                    response = await handler(request)
            except web.HTTPException as exc:  # redirects and 404s carry the headers too
                for name, value in SECURITY_HEADERS.items():
                    exc.headers.setdefault(name, value)
                raise
            except Exception as exc:
                if _store_trouble(exc):  # a lock held past ConsoleStore.BUSY_TIMEOUT, a full disk
                    log.warning("console: %s %s: its store could not be used (%s)", request.method,
                                _route(request), printable(exc))
                    response = self.refuse(request, 503, "The console's store is busy or unavailable; try again "
                                                         "in a moment. The gateway's log says why.")
                else:
                    # The core would answer a bare 500, without the policy headers; this page has them.
                    log.error("console: %s %s raised %s", request.method, _route(request), exc.__class__.__name__,
                              exc_info=exc)
                    response = self._failure(request)
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return guarded

    def _failure(self, request: web.Request) -> web.StreamResponse:
        text = "Something went wrong on this page; the gateway's log says what. Reload the page to try again."
        try:
            return self.refuse(request, 500, text)
        except Exception:  # rendering failed too: a page without the template
            log.exception("console: the error page could not be rendered")
            return web.Response(status=500, text=text, content_type="text/plain", charset="utf-8")


async def _read_utf8_form(request: web.Request) -> MultiDictProxy:
    """The form, read as UTF-8 text only (RFC 7578 4.6 and the HTML standard's form encoding:
    browsers send UTF-8). A charset other than UTF-8 is refused before the body is decoded; a
    field name or value that does not encode as UTF-8 (a lone surrogate from a multipart part's
    own charset or ``_charset_``) is refused after it: either would reach YAML, files or a page."""
    charset = request.charset
    if charset is not None and charset.strip().lower() not in _FORM_CHARSETS:
        raise UnreadableForm("a charset other than UTF-8")
    form = await read_form(request)
    for name, value in form.items():
        texts = [name, value] if isinstance(value, str) else [name, getattr(value, "filename", "") or ""]
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise UnreadableForm("a value that is not UTF-8 text") from None
    return form


def _route(request: web.Request) -> str:
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    return resource.canonical if resource is not None else "?"


def _csrf_ok(form: MultiDictProxy, session: Session) -> bool:
    token = form.get("csrf")
    return isinstance(token, str) and hmac.compare_digest(token.encode(), session.csrf.encode())
