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

A session answers a new request only when the request allows it (no ``ForceAuthn`` /
``prompt=login``, within ``max_age``) and its account still passes ``gateway_lookup_user``
(checked at most every :data:`~.sessions.RECHECK_INTERVAL` seconds): an account that is gone or
may not sign in ends the session (with the Single Logout round) and the browser is sent to the
form; a directory that cannot answer is a 503, never an answer from the old profile.

``POST /login`` and ``POST /logout`` are refused (``login.cross_site``) when the browser says the
form comes from another site (``Sec-Fetch-Site: cross-site``, or an ``Origin`` other than the
door's); on https the cookies carry the ``__Host-`` prefix, so that no other host (a sibling
subdomain, a plain-http answer) can plant them.

A protocol request parked for ``/login`` (by :meth:`LoginDoor.begin`, or by any handler through
``sessions.park``) spends one token of its client's budget (:class:`SharedBudget`: a bucket of
``sessions.requests_per_client`` per client address in the session store, shared by the workers,
refilled at as many a minute); a
client without one gets 429 (``login.too_many_requests``) and nothing is parked. The address is
the one the door computes for an attempt (a trusted proxy's ``X-Forwarded-For``; an IPv6 client
by its ``throttle.ipv6_prefix`` network). The handler's request is found through a context
variable that :meth:`LoginDoor.guarded` sets for every route of this door.

A request answered from an existing session without a new sign-in (a SAML Response, a
WS-Federation token, an OIDC code: :meth:`LoginDoor.begin`, and ``/login?req=`` with a session)
spends a token of its *user's* budget (:meth:`LoginDoor.admit_answer`: the same
``sessions.requests_per_client``, kept per subject in the store apart from the addresses', so users
behind one NAT do not share it), before the account check, the chain and any signature; past it
429 (``login.too_many_requests``) and nothing is stored or signed. A person's few sign-ins a
minute across services are far below it; one session cookie in a loop is not. A validated request
whose protocol can be told at its return address (:attr:`LoginDoor.unavailable`: OIDC's
``error=temporarily_unavailable`` at the ``redirect_uri``) is answered there instead of with the
429, or 503 when the store or the directory cannot be used (:meth:`LoginDoor.served`).

``GET /logout`` ends nothing (any site can make a browser send it): it shows a signed-in user the
Sign out button, anyone else the "signed out" page.

An OIDC logout that does not prove it is the browser's own session's is confirmed by the user
(:meth:`LoginDoor.confirm_logout`: the "signed in as" page and its Sign out button); where the
confirmed logout goes is kept single use under an id in the button's address
(:meth:`.SessionManager.hold`) and checked again by the protocol then (:attr:`LoginDoor.logout_targets`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import time
from collections import OrderedDict
from contextvars import ContextVar
from typing import Awaitable, Callable
from urllib.parse import unquote, urlencode, urlsplit

from aiohttp import web
from yarl import URL

from gateway import BackendUnavailable, Decision, Identity, Outcome, SessionCredential
from gateway.chain import AFTER_THE_CHAIN, PRECHECK_STEP, PRECHECKED
from gateway.http import forms
from gateway.http.credentials import MalformedCredentials, cookie_values, parse_authorization, single_authorization
from gateway.logs import RateLimitedWarning, printable
from gateway.registry import answerer_revoked

from .pages import AUTOSUBMIT_HASH, STYLE_HASH, Pages
from .sessions import STORE_ERRORS, ParkRefused, Session, SessionManager, within

__all__ = ["PARK_CLIENTS", "AccountUncheckable", "LoginDoor", "Refused", "SharedBudget", "pending_key_of",
           "request_cookie"]

log = logging.getLogger("authgw.plugin.login")
#: A store outage refuses every request of its length: one line a minute (the store's own client
#: logs the outage's start and end once each, plugins/login/sessions.py).
_store_warning = RateLimitedWarning(log)

CSRF_COOKIE = "authgw_csrf"
FRONT_DOOR = "login"
#: Completes a pending request for a session: returns the answer page (e.g. a SAML POST form).
Completer = Callable[[web.Request, dict, Session], Awaitable[web.StreamResponse]]
#: Answers a pending request that may show no page (OIDC ``prompt=none``) when no session can.
#: ``parked``: the request was parked for ``/login`` (its client's token spent then), not declined
#: on its arrival.
Declined = Callable[..., Awaitable[web.StreamResponse]]
#: Answers a validated pending request at its return address when it cannot be served now (its
#: client's or user's budget spent, the session store or the directory unavailable), for a
#: protocol that has such an answer: OIDC's ``error=temporarily_unavailable`` at the registered
#: ``redirect_uri`` (RFC 6749 section 4.1.2.1, OIDC Core 3.1.2.6), SAML's ``Responder`` /
#: ``RequestDenied`` Response at the ACS; see :meth:`LoginDoor.begin`. ``None``: not for this
#: request, or not now (the 429/503 page of :meth:`LoginDoor.guarded`).
Unavailable = Callable[[web.Request, dict], Awaitable[web.StreamResponse | None]]
#: Raises :class:`Refused` when a pending request can no longer be answered: a reload removed
#: its client, service provider or return address while the user signed in.
Answerable = Callable[[dict], None]
#: The address a completion answers *with a redirect* (OIDC ``response_mode=query``), or ``None``
#: (an auto-posting page, or no answer); see :meth:`LoginDoor.form_action`.
Redirect = Callable[[dict], str | None]


#: Keys whose refusal a worker remembers having logged (:meth:`SharedBudget.first_refusal`; the
#: least recently refused is forgotten first, about 100 bytes each). The budgets themselves are
#: in the session store.
PARK_CLIENTS = 10_000

#: The request a login route is handling (set by :meth:`LoginDoor.guarded`): parking finds its
#: client address here, whichever handler parks.
_REQUEST: ContextVar[web.Request | None] = ContextVar("authgw_login_request", default=None)
#: The request's key marking a park token :meth:`LoginDoor.prepay_park` spent, not used yet.
_PARK_PREPAID = "authgw.login.park_prepaid"


def request_cookie(request: web.Request, name: str) -> str | None:
    """The cookie *name* as the browser sent it (:func:`gateway.http.credentials.cookie_values`:
    whole, not as aiohttp's parser splits it at white space; review of the sessions). A name
    sent twice is no cookie: the door sets each of its cookies once, at ``Path=/``."""
    values = cookie_values(request.headers, name)
    return values[0] if len(values) == 1 else None


#: What a parked request's id looks like (``secrets.token_urlsafe``, :meth:`.SessionManager.park`).
_PENDING_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def pending_key_of(value) -> str:
    """The parked request's id a ``req`` parameter names, or ``""`` for anything that is not one:
    it is looked up in the store and written back into the form. A field that decoded to a lone
    surrogate (a body in ``charset=utf-7`` or ``unicode_escape``) could be neither: a 500
    (review of the sessions)."""
    return value if isinstance(value, str) and _PENDING_KEY.fullmatch(value) else ""


class AccountUncheckable(Exception):
    """The directory could not say whether a session's account still exists: nothing is issued
    from that session (a 503, as when the session store is down)."""


def _origin(url: str) -> str:
    """The serialized origin of *url* (RFC 6454 section 6.1): scheme, host, non-default port; a
    host name as a browser serializes it (WHATWG URL: percent-decoded, then UTS #46 ToASCII):
    ``https://bücher.example`` is ``https://xn--bcher-kva.example``. CSP sources are ASCII (CSP 3
    ``host-char``) and matched against that form, so a registered IDN address was left out of
    ``form-action`` (or made it ``'none'``) and the browser blocked the answer (review of the web
    layer). A host that cannot be encoded is returned as it was (and fails :data:`_CSP_ORIGIN`)."""
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    host = parts.hostname or ""
    if (not host.isascii() or "%" in host) and ":" not in unquote(host):  # (no IP literal is encoded)
        try:
            host = URL.build(scheme="https", host=unquote(host)).raw_host or host  # yarl: idna, UTS #46
        except (ValueError, UnicodeError):
            pass
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port not in (None, default) else ""
    return f"{parts.scheme}://{host}{port}"


#: What an origin from a (validated, registered) URL must look like to be written into a CSP
#: header: a host name or IP literal and a port, nothing that could end the directive.
_CSP_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def form_targets(urls) -> str:
    """``form-action`` for a page whose form is answered with a redirect to one of *urls*:
    ``'self'`` and their origins. Chromium checks ``form-action`` again at every redirect that
    follows a form submission (tests/test_login_csp_browser.py), so a ``303`` from ``POST /login`` to a
    relying party's ``redirect_uri`` is blocked unless its origin is listed. Only origins: CSP
    ignores a source's path once a request was redirected."""
    origins = dict.fromkeys(o for o in map(_origin, urls) if _CSP_ORIGIN.fullmatch(o))
    return " ".join(["'self'", *origins])


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


class SharedBudget:
    """Token buckets by key in the session store (:meth:`.SessionManager.take_token`), shared by
    every worker of the gateway (and every instance, with Redis): *burst* at once, then *rate* a
    second. With a bucket per worker (in memory, before), ``--workers N`` gave a flood N times
    the budget (review of the login door). A store error propagates (the door's 503: fail
    closed, nothing answered as if a token were there). Only whether a refusal was logged is the
    worker's own (:meth:`first_refusal`: a line per worker and spent budget)."""

    def __init__(self, sessions: SessionManager, name: str, burst: float, rate: float,
                 size: int = PARK_CLIENTS) -> None:
        self.sessions, self.name = sessions, name
        self.burst, self.rate, self.size = float(burst), float(rate), size
        self._refused: OrderedDict[str, bool] = OrderedDict()  # keys refused since their last token

    async def spend(self, key: str) -> float:
        """Spend a token of *key*'s bucket: ``0.0`` when there was one, else the seconds until
        one is due (nothing spent). A lock held on the store is waited for off the event loop
        (:meth:`.SessionManager.take_token`): the worker answers its other requests meanwhile."""
        return self._spent(key, await self.sessions.take_token(self.name, key, self.burst, self.rate))

    def take(self, key: str) -> float:
        """:meth:`spend` for a caller that cannot await it: a lock held on the SQLite store is
        waited for on the event loop (up to half a second), stalling the worker's other requests."""
        return self._spent(key, self.sessions.take_token_now(self.name, key, self.burst, self.rate))

    def _spent(self, key: str, wait: float) -> float:
        if not wait:
            self._refused.pop(key, None)
        return wait

    async def give_back(self, key: str) -> None:
        """Give back a token :meth:`spend` spent of *key*'s bucket (atomically in the store: never
        past *burst*, another worker's spend meanwhile kept): a budget of failures is spent
        before the attempt and given back when it succeeds, so that no two workers can both pass
        a check on its last token. Off the event loop, as :meth:`spend`."""
        await self.sessions.give_back_token(self.name, key, self.burst, self.rate)

    async def wait(self, key: str) -> float:
        """The seconds until *key*'s bucket holds a token (``0.0``: it does), nothing spent."""
        return await self.sessions.take_token(self.name, key, self.burst, self.rate, spend=False)

    def first_refusal(self, key: str) -> bool:
        """Whether this is this worker's first refusal of *key* since its last token (logged once)."""
        if key in self._refused:
            self._refused.move_to_end(key)
            return False
        self._refused[key] = True
        if len(self._refused) > self.size:
            self._refused.popitem(last=False)
        return True


async def _spend(limiter: SharedBudget, key: str, who: Callable[[], tuple[str, str]], budget: str) -> None:
    """Spend a token of *key*'s budget in *limiter* (off the event loop when the store's lock is
    held), or raise :class:`ParkRefused` (429, ``login.too_many_requests``), logged once per key
    and spent budget (a flood is not logged whole). *who*, asked only then: who is refused, as
    logged and as the refusal's detail; *budget*: what is counted."""
    _refuse_past(limiter, key, await limiter.spend(key), who, budget)


def _spend_now(limiter: SharedBudget, key: str, who: Callable[[], tuple[str, str]], budget: str) -> None:
    """:func:`_spend` for a caller that cannot await it (:meth:`SharedBudget.take`)."""
    _refuse_past(limiter, key, limiter.take(key), who, budget)


def _refuse_past(limiter: SharedBudget, key: str, wait: float, who: Callable[[], tuple[str, str]],
                 budget: str) -> None:
    if wait:
        logged, detail = who()
        if limiter.first_refusal(key):
            log.warning("login requests refused: reason=login.too_many_requests %s (%d %s, burst %d)", logged,
                        round(limiter.rate * 60), budget, limiter.burst)
        raise ParkRefused(429, "login.too_many_requests", math.ceil(wait), detail)


class LoginDoor:
    def __init__(self, door, sessions: SessionManager, pages: Pages, settings, hook=None) -> None:
        self.door = door
        self.sessions = sessions
        self.pages = pages
        self.settings = settings
        self.hook = hook  # the plugin manager's hook relay: gateway_lookup_user
        # __Host-: Secure, Path=/, no Domain, so a sibling host or a plain-http answer cannot set
        # it (a planted CSRF or session cookie is login CSRF). Browsers take it only from https.
        self.secure = settings.base_url.startswith("https://") and settings.sessions.secure_cookie
        prefix = "__Host-" if self.secure else ""
        self.cookie = prefix + settings.sessions.cookie_name
        self.csrf_cookie = prefix + CSRF_COOKIE
        self.origin = _origin(settings.base_url)
        self.secure_origin = self.origin.startswith("https://")
        self.completers: dict[str, Completer] = {}
        self.declined: dict[str, Declined] = {}
        self.unavailable: dict[str, Unavailable] = {}
        self.answerable: dict[str, Answerable] = {}
        self.redirects: dict[str, Redirect] = {}
        #: The Single Logout addresses ``POST /logout`` for a session may redirect the browser to
        #: first (:mod:`.slo`: its participants' HTTP-Redirect ``slo_url``).
        self.logout_redirects: Callable[[Session], list[str]] | None = None
        #: Ends a session and tells the services it was used with (SAML Single Logout, :mod:`.slo`).
        #: Arguments: the request, the sessions to end (store key -> SessionIndex), where to go after.
        self.logout_round: Callable[..., Awaitable[web.StreamResponse]] | None = None
        budget = sessions.settings.requests_per_client
        self.park_limiter = SharedBudget(sessions, "park", burst=budget, rate=budget / 60)
        #: Answers made from an existing session (no new sign-in), by the session's user: the
        #: same budget, kept apart from the addresses' (users behind one NAT each have theirs).
        self.answer_limiter = SharedBudget(sessions, "answer", burst=budget, rate=budget / 60)
        #: Where a confirmed logout goes (:meth:`confirm_logout`), by the protocol that asked (the
        #: kept target's ``protocol``; OIDC's when it has none): it checks the address it kept
        #: again (a reload may have removed it); ``None``: the signed-out page.
        self.logout_targets: dict[str, Callable[[dict], str | None]] = {}
        self._full_logged = -math.inf  # monotonic time of the last "not parked" ERROR (the total bound)
        sessions.admit_park = self._admit_park

    # -- responses -------------------------------------------------------------------------------

    def html(self, body: str, status: int = 200, *, form_action: str = "'self'", script: bool = False) -> web.Response:
        csp = (f"default-src 'none'; style-src '{STYLE_HASH}'; form-action {form_action}; "
               f"frame-ancestors 'none'; base-uri 'none'" + (f"; script-src '{AUTOSUBMIT_HASH}'" if script else ""))
        return web.Response(text=body, status=status, content_type="text/html", headers={
            "Cache-Control": "no-store", "Content-Security-Policy": csp, "X-Frame-Options": "DENY",
            "Referrer-Policy": "same-origin", "X-Content-Type-Options": "nosniff"})

    def refused(self, request: web.Request, exc: Refused) -> web.Response:
        """The generic page for a request that failed a named check (logged with its reason)."""
        reference = self.door.request_ids.next()
        log.warning("login request refused: reason=%s reference=%s client=%s %s", exc.reason, reference,
                    request.remote, printable(exc.detail[:200]))
        response = self.html(self.pages.message("refused", alert=True, reference=reference), 400)
        response.headers["X-Refused-Reason"] = exc.reason
        return response

    def client_key(self, request: web.Request) -> str:
        """The client address a budget is kept for: the door's (trusted proxies' forwarded
        address; the socket peer on a TLS listener authgw terminates), an IPv6 client by its
        network as the throttle counts it."""
        client, _trusted = self.door.client_of(request)
        return self.door.gateway.client_key(client)

    def _admit_park(self) -> None:
        """:attr:`.SessionManager.admit_park`: spend a token of the handled request's client,
        unless :meth:`prepay_park` spent it already for this park (then that token is used up)."""
        request = _REQUEST.get()
        if request is None:  # not a request of this door (nothing to count it by)
            return
        if request.pop(_PARK_PREPAID, False):
            return
        key = self.client_key(request)
        _spend_now(self.park_limiter, key, lambda: (f"client={key}", f"client {key}"),
                   "parked requests a minute per address")

    async def prepay_park(self) -> None:
        """Spend the handled request's client token for the ``sessions.park`` or
        ``sessions.hold`` that follows, off the event loop when the store's lock is held: those
        are not coroutines (the SAML and WS-Federation code calls them too), and spent there a
        token waited for the lock on the loop, the worker answering nothing else meanwhile
        (items left by stop 46). Raises :class:`ParkRefused` as the park would; the token is
        for one park."""
        request = _REQUEST.get()
        if request is None:
            return
        await self.spend_park()
        request[_PARK_PREPAID] = True

    async def spend_park(self) -> None:
        """Spend the handled request's client token as a park would, for an answer that costs a
        park's work and parks nothing (a SAML error Response, the signed answer to an unsigned
        LogoutRequest that ends no session), off the event loop when the store's lock is held.
        Raises :class:`ParkRefused`."""
        request = _REQUEST.get()
        if request is None:  # not a request of this door (nothing to count it by)
            return
        key = self.client_key(request)
        await _spend(self.park_limiter, key, lambda: (f"client={key}", f"client {key}"),
                     "parked requests a minute per address")

    async def admit_answer(self, session: Session) -> None:
        """Spend a token of the budget of *session*'s user (its subject) before a service is
        answered from the session without a new sign-in (a SAML Response, a WS-Federation token,
        an OIDC code): ``sessions.requests_per_client`` at once, then as many a minute, in the
        store (every worker's). Past it :class:`ParkRefused` (429, ``login.too_many_requests``)
        and nothing is checked, signed or stored. A request parked for ``/login`` spent its client address's
        token already; one answered from a session spends its user's as well, wherever it comes
        from (review: one session cookie had 3,000 codes stored in 9 s, 1,000 SAML answers
        signed in 2.2 s)."""
        def who() -> tuple[str, str]:
            request, user = _REQUEST.get(), printable(session.identity.username[:100])
            client = self.client_key(request) if request is not None else "-"
            return f"user={user} client={client}", f"user {user}"

        await _spend(self.answer_limiter, session.identity.subject, who, "answers from a user's sessions a minute")

    def _log_unserved(self, request: web.Request, exc: Exception) -> None:
        """Log why *request* is not served now (:class:`ParkRefused`, a store error,
        :class:`AccountUncheckable`), as briefly as a flood of them needs: a spent budget was
        logged where it was spent (:func:`_spend`), the store's outage once a minute, the total
        bound at most every 10 s."""
        if isinstance(exc, ParkRefused):
            if exc.status != 429 and time.monotonic() >= self._full_logged + 10:
                self._full_logged = time.monotonic()
                log.error("login requests not parked: reason=%s (client %s, and every new one for now): %s; logged "
                          "at most every 10 s", exc.reason, request.remote, exc.detail)
        elif isinstance(exc, AccountUncheckable):
            log.error("login: nothing issued: %s", exc)
        else:
            _store_warning("store", "login session store unavailable: %s: %s", exc.__class__.__name__, exc)

    def not_parked(self, request: web.Request, exc: ParkRefused, json: bool) -> web.Response:
        """429 or 503 for a request that was not parked (:class:`ParkRefused`), with
        ``Retry-After`` and ``X-Refused-Reason``."""
        self._log_unserved(request, exc)
        headers = {"Retry-After": str(exc.retry_after), "X-Refused-Reason": exc.reason}
        if json:
            return web.json_response({"error": "temporarily_unavailable"}, status=exc.status,
                                     headers={**headers, "Cache-Control": "no-store"})
        response = self.html(self.pages.message("unavailable", alert=True), exc.status)
        response.headers.update(headers)
        return response

    def _set_cookie(self, response: web.StreamResponse, name: str, value: str) -> None:
        response.set_cookie(name, value, path="/", httponly=True, samesite="Lax",
                            secure=self.settings.sessions.secure_cookie)

    def drop_cookie(self, response: web.StreamResponse) -> None:
        """Remove the session cookie (a ``__Host-`` cookie is only replaced by a ``Secure`` one)."""
        response.del_cookie(self.cookie, path="/", secure=self.settings.sessions.secure_cookie,
                            httponly=True, samesite="Lax")

    def cross_site(self, request: web.Request) -> bool:
        """Whether the browser says this request comes from another site: ``Sec-Fetch-Site:
        cross-site``, or an ``Origin`` that is neither the door's (``base_url``) nor the one this
        request was sent to (another listener of the door, e.g. ``client_cert``'s). ``Origin:
        null`` is another site's: the door's pages send their origin (``Referrer-Policy:
        same-origin``). Requests without these headers (non-browser clients) pass: the CSRF
        token still applies. When ``base_url`` is https, the listener's own origin counts only
        in https: a door reached in plain http behind a proxy that ends TLS took ``Origin:
        http://<its host>`` (a plain-http page of the same host, which anyone on the path can
        write) as its own (review of the login door)."""
        if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
            return True
        origin = request.headers.get("Origin")
        if origin is None:
            return False
        scheme = "https" if request.secure else "http"
        own = [f"{scheme}://{request.host}".lower()] if scheme == "https" or not self.secure_origin else []
        return origin.lower() not in (self.origin.lower(), *own)

    def auto_post(self, url: str, fields: list[tuple[str, str]]) -> web.Response:
        """The answer page: a form that posts *fields* to *url* (a registered address) on load,
        or when the user presses Continue without JavaScript. ``form-action`` is the URL's
        origin as a browser reads it (:func:`_origin`): the text before the third ``/`` of a
        registered ``https://sp.example?x=1`` (no path) was ``https://sp.example?x=1``, a source
        Chromium ignores as invalid, leaving ``form-action 'none'``: every answer there was
        blocked (review of the login door)."""
        origin = _origin(url)
        return self.html(self.pages.post(url, fields), script=True,
                         form_action=origin if _CSP_ORIGIN.fullmatch(origin) else "'none'")

    def guarded(self, handler, *, json: bool = False):
        """*handler*, answering 503 (not 500) when the session store cannot be used: sign-ins
        wait for the store, they are never answered without it (fail closed); 429 or 503 for a
        request that could not be parked (:class:`ParkRefused`); and the 400 page of
        :meth:`refused` for any :class:`Refused` it raises: a body it cannot read
        (:func:`read_form`), a completer's pending request that a reload made unanswerable."""
        async def guarded_handler(request: web.Request) -> web.StreamResponse:
            token = _REQUEST.set(request)
            try:
                return await handler(request)
            except ParkRefused as exc:  # the client's budget or the store's bound: nothing parked
                return self.not_parked(request, exc, json)
            except Refused as exc:  # an unreadable body; a pending request a reload made unanswerable
                if json:
                    log.warning("login request refused: reason=%s client=%s %s", exc.reason, request.remote, exc.detail)
                    description = "unreadable body" if isinstance(exc, UnreadableBody) else exc.reason
                    return web.json_response({"error": "invalid_request", "error_description": description},
                                             status=400, headers={"Cache-Control": "no-store"})
                return self.refused(request, exc)
            except (*STORE_ERRORS, AccountUncheckable) as exc:
                self._log_unserved(request, exc)
                if json:
                    return web.json_response({"error": "temporarily_unavailable"}, status=503,
                                             headers={"Retry-After": "5", "Cache-Control": "no-store"})
                response = self.html(self.pages.message("unavailable", alert=True), 503)
                response.headers["Retry-After"] = "5"
                return response
            finally:
                _REQUEST.reset(token)

        return guarded_handler

    # -- sessions ---------------------------------------------------------------------------------

    async def asession(self, request: web.Request, *, touch: bool = True) -> Session | None:
        """The browser's live session (:meth:`.SessionManager.aget`: its use written without
        holding the event loop for a lock held on the store elsewhere)."""
        return await self.sessions.aget(request_cookie(request, self.cookie), touch=touch)

    def session(self, request: web.Request, *, touch: bool = True) -> Session | None:
        """:meth:`asession` for a caller that cannot await (a lock held on the SQLite store is
        waited for on the event loop, up to its ``BUSY_TIMEOUT``)."""
        return self.sessions.get(request_cookie(request, self.cookie), touch=touch)

    @staticmethod
    def reusable(session: Session, pending: dict) -> bool:
        """Whether *pending* may be answered from *session* without a new sign-in: not when it
        forces one (``ForceAuthn``, ``prompt=login``), nor when the sign-in is older than its
        ``max_age`` (OIDC Core section 3.1.2.1; ``max_age=0``: always a new one), nor when it
        names the user it is for (``principals``: the subjects an OIDC ``id_token_hint`` or
        ``claims`` ``sub`` allow) and the session is another's: that request waits for a
        sign-in (the completer checks who signed in), or, when it may show no page, is declined."""
        if pending.get("force_authn"):
            return False
        principals = pending.get("principals")
        if principals is not None and session.identity.subject not in principals:
            return False
        max_age = pending.get("max_age")
        return max_age is None or (max_age > 0 and within(time.time() - session.identity.authenticated_at, max_age))

    async def lookup(self, username: str) -> Identity | None:
        """``gateway_lookup_user`` (off the event loop: a directory's lookup may block);
        :class:`AccountUncheckable` when the directory cannot answer (or its plugin fails)."""
        try:
            return await asyncio.to_thread(self.hook.gateway_lookup_user, username=username)
        except BackendUnavailable as exc:
            raise AccountUncheckable(f"the directory cannot check {printable(username)!s}'s account "
                                     f"({exc.reason})") from None
        except Exception as exc:  # noqa: BLE001 - any plugin failure: fail closed, as the chain does
            log.exception("login: gateway_lookup_user failed for %s", printable(username))
            raise AccountUncheckable(f"the account lookup failed: {exc.__class__.__name__}") from None

    def can_check(self) -> bool:
        return self.hook is not None and bool(self.hook.gateway_lookup_user.get_hookimpls())

    async def recheck(self, session: Session, request: web.Request) -> Session | None:
        """*session*, about to answer a service again (*request*): its account checked again in
        the directory (at most every RECHECK_INTERVAL seconds: ``gateway_lookup_user``, its
        profile refreshed), then the chain's policy, at every reuse (:meth:`_vouched`). ``None``
        when the account is gone or may not sign in, or a chain step or wrapper refuses it (the
        caller ends the session); :class:`AccountUncheckable` when that cannot be told now.
        First of all, a session whose sign-in a backend vouched for (a relay's connector) ends
        when that backend was revoked since (``gateway_answerer_revoked``)."""
        if session.answered_by and self.hook is not None:
            revoked = answerer_revoked(self.hook, session.answered_by, log)
            if revoked is None:
                raise AccountUncheckable(f"whether {printable(session.answered_by)!s}, which vouched for this "
                                         "session, was revoked cannot be told now")
            if revoked:
                log.warning("login: the session of %s rests on the word of %s, revoked since; it ends",
                            printable(session.identity.username), printable(session.answered_by))
                return None
        checked: Session | None = session
        if self.can_check() and self.sessions.recheck_due(session):
            checked = await self.sessions.arechecked(session, await self.lookup(session.identity.username))
            if checked is None:
                log.warning("login: the account of %s is gone or may not sign in; its session ends",
                            printable(session.identity.username))
                return None
        return await self._vouched(checked, request)

    async def _vouched(self, session: Session, request: web.Request) -> Session | None:
        """Single sign-on under the chain's policy: an attempt whose only credential is the
        session (its user) runs through every chain step and wrapper, the session's identity
        answering unless one of them refuses (:data:`gateway.chain.AFTER_THE_CHAIN`): a deny
        list or a group rule ends a session as it refuses a sign-in, and each reuse is audited
        (``method: session``, reason ``login.session``). A reused session used to answer every
        service until its ``absolute`` lifetime whatever the policy said (review of account
        state)."""
        identity = session.identity
        # No credential but the session: no headers a trusted proxy forwards (a client
        # certificate a later step would take for a sign-in of its own, and end the session).
        attempt = dataclasses.replace(self.door.attempt(request, FRONT_DOOR, session=SessionCredential(identity.username)),
                                      headers={}, trusted_peer=False)
        attempt.stash[PRECHECKED] = Decision.allow(identity, step=FRONT_DOOR, reason="login.session", from_cache=True)
        attempt.stash[PRECHECK_STEP] = AFTER_THE_CHAIN
        decision = await self.door.decide(attempt)
        if decision.success and decision.identity is not None and decision.identity.subject == identity.subject:
            return session
        if decision.outcome in (Outcome.UNAVAILABLE, Outcome.ERROR):  # no verdict: nothing issued, the session stays
            raise AccountUncheckable(f"the chain could not vouch for {printable(identity.username)!s}'s session "
                                     f"({decision.outcome.value}: {decision.reason})")
        log.warning("login: the session of %s is refused (%s, %s: %s); it ends", printable(identity.username),
                    decision.outcome.value, decision.step, decision.reason)
        return None

    async def end_and_go(self, request: web.Request, session: Session, target: str) -> web.StreamResponse:
        """End *session* as logout does (the Single Logout round for its participants), then
        send the browser to *target* (a path of this door)."""
        if self.logout_round is not None:
            response = await self.logout_round(request, {session.key: session.index}, target)
        else:
            await self.sessions.aend_key(session.key, session.index)
            response = web.Response(status=303, headers={"Location": target, "Cache-Control": "no-store"})
        self.drop_cookie(response)
        return response

    async def begin(self, request: web.Request, pending: dict, lifetime: float) -> web.StreamResponse:
        """Continue a validated protocol request: at once with a live session that may answer it,
        else after ``/login`` (the request parked under a single-use id); a request that may show
        no page (``prompt=none``) is declined instead. One that cannot be served now is answered
        as :meth:`served` says."""
        async def serve() -> web.StreamResponse:
            session = await self.asession(request)
            if session is not None and self.reusable(session, pending):
                await self.admit_answer(session)  # before the account check, the chain and the answer
                checked = await self.recheck(session, request)
                if checked is not None:
                    return await self.completers[pending["protocol"]](request, pending, checked)
                await self.prepay_park()
                key = await self.sessions.apark(pending, lifetime)
                return await self.end_and_go(request, session, f"/login?req={key}")
            if pending.get("prompt_none"):
                return await self.declined[pending["protocol"]](request, pending)
            return await self._to_login(pending, lifetime)

        return await self.served(request, pending, serve)

    async def wait_at_login(self, request: web.Request, pending: dict, lifetime: float) -> web.StreamResponse:
        """Park a validated protocol request for ``/login`` and send the browser there, whatever
        session it has (a cross-site POST, which carries no ``SameSite=Lax`` cookie: ``/login``
        answers it from the session). One that cannot be parked now is answered as
        :meth:`served` says."""
        async def serve() -> web.StreamResponse:
            return await self._to_login(pending, lifetime)

        return await self.served(request, pending, serve)

    async def _to_login(self, pending: dict, lifetime: float) -> web.Response:
        await self.prepay_park()
        key = await self.sessions.apark(pending, lifetime)
        return web.Response(status=303, headers={"Location": f"/login?req={key}", "Cache-Control": "no-store"})

    async def served(self, request: web.Request, pending: dict,
                      serve: Callable[[], Awaitable[web.StreamResponse | None]], *,
                      parked: str = "") -> web.StreamResponse | None:
        """``serve()`` for validated *pending*; when it cannot be served now (the user's or the
        client address's budget spent, the session store or the directory unavailable: nothing
        was stored or signed) and its protocol answers that at the return address
        (:attr:`unavailable`; the address was validated before *pending* was made), answered
        there rather than with the 429/503 page of :meth:`guarded`: a relying party asking with
        ``prompt=none`` (an iframe, a silent renewal) can show no page, and OAuth answers a
        request whose ``redirect_uri`` is known at it (RFC 6749 section 4.1.2.1:
        ``temporarily_unavailable``, "needed because a 503 ... cannot be returned to the client
        via an HTTP redirect"; review of the web layer: it got the HTML page); SAML answers an
        SP's request at its ACS (review of the login door). *parked*: the id *pending* waits
        under for ``/login``, used up when it is answered so (not when the protocol has no
        answer for it there: the page, and the request waits)."""
        try:
            return await serve()
        except (ParkRefused, *STORE_ERRORS, AccountUncheckable) as exc:
            unavailable = self.unavailable.get(pending["protocol"])
            response = await unavailable(request, pending) if unavailable is not None else None
            if response is None:
                raise  # the page of guarded(): the protocol has no answer there for this request, or not now
            if parked:
                try:
                    await self.sessions.aunpark(parked)  # answered now: not again from a session later
                except STORE_ERRORS:
                    pass  # the store is what failed: the record ends at its lifetime
            self._log_unserved(request, exc)
            if isinstance(exc, ParkRefused):
                response.headers.update({"Retry-After": str(exc.retry_after), "X-Refused-Reason": exc.reason})
            return response

    # -- /login -------------------------------------------------------------------------------------

    def _form(self, request: web.Request, pending: str, *, status: int = 200, error: str = "",
              username: str = "", challenge: str | None = None) -> web.Response:
        cookie, token = self.sessions.csrf_pair(request_cookie(request, self.csrf_cookie))
        response = self.html(self.pages.form(action="/login", csrf=token, pending=pending, username=username,
                                             error=error), status, form_action=self.form_action(pending))
        if challenge:
            response.headers["WWW-Authenticate"] = challenge
        self._set_cookie(response, self.csrf_cookie, cookie)
        return response

    async def _directory_of(self, identity: Identity) -> tuple[str | None, bool]:
        """The subject the directory knows a new session's account by (``None``: unknown to it),
        and whether the directory answered (``False``: it cannot now): a later check that no
        longer finds the account tells a deleted one from one no directory ever held, and one
        not asked is not given that benefit (:meth:`.SessionManager.rechecked`). The first
        reuse of the session checks the account again whatever this found (``checked`` is 0)."""
        if not self.can_check():
            return None, True
        try:
            found = await self.lookup(identity.username)
        except AccountUncheckable as exc:
            log.info("login: %s at sign-in; the account is checked at the session's first use", exc)
            return None, False
        return (found.subject if found is not None else None), True

    def form_action(self, pending_key: str) -> str:
        """The form page's ``form-action``: ``'self'``, and the origin of the address the pending
        request is answered at when that answer is a redirect (:func:`form_targets`)."""
        pending = self.sessions.peek(pending_key) if pending_key else None
        redirect = self.redirects.get(pending["protocol"]) if pending is not None else None
        target = redirect(pending) if redirect is not None else None
        return form_targets([target] if target else [])

    def _signed_in_page(self, request: web.Request, session: Session, then: str = "",
                        after: str | None = None, *, status: int = 200) -> web.Response:
        """"Signed in as", with the Sign out button; its ``form-action`` admits the Single Logout
        addresses ``POST /logout`` may redirect to first (:func:`form_targets`), and *after*,
        where a confirmed logout then goes (*then*: the :meth:`.SessionManager.hold` id of it)."""
        cookie, token = self.sessions.csrf_pair(request_cookie(request, self.csrf_cookie))
        name = session.identity.display_name or session.identity.username
        targets = self.logout_redirects(session) if self.logout_redirects is not None else []
        action = f"/logout?{urlencode({'then': then})}" if then else "/logout"
        response = self.html(self.pages.message("signed_in", name=name, logout=action, csrf=token), status,
                             form_action=form_targets(targets + ([after] if after else [])))
        self._set_cookie(response, self.csrf_cookie, cookie)
        return response

    async def confirm_logout(self, request: web.Request, session: Session, target: dict | None = None,
                             after: str | None = None) -> web.Response:
        """Ask the user whether to sign out (OpenID Connect RP-Initiated Logout 1.0 section 2: a
        logout request that does not prove it is this browser's own session's): the "signed in
        as" page with its Sign out button, whose ``POST /logout`` (CSRF-checked, same site) ends
        the browser's session and then goes to *after*: *target* is what
        :attr:`logout_targets` checks again then, kept single use under an id in the button's
        address (:meth:`.SessionManager.hold`, spending the client's budget)."""
        then = ""
        if target is not None:
            await self.prepay_park()  # the hold's token, off the event loop
            then = await self.sessions.ahold(target, 600)
        return self._signed_in_page(request, session, then, after if then else None)

    async def _signed_in(self, request: web.Request, decision: Decision, pending_key: str) -> web.StreamResponse:
        # The pending request is checked before the session is made: one a reload made
        # unanswerable is refused (a 400 page), and no session is left behind without its cookie.
        pending = await self.sessions.aunpark(pending_key) if pending_key else None
        if pending is not None:
            self.answerable[pending["protocol"]](pending)
        directory, asked = await self._directory_of(decision.identity)
        value, session = await self.sessions.acreate(decision.identity, request_cookie(request, self.cookie),
                                                     directory=directory, asked=asked,
                                                     answered_by=decision.answered_by)
        try:
            if pending is not None:
                response = await self.completers[pending["protocol"]](request, pending, session)
            else:
                response = self._signed_in_page(request, session)
        except BaseException:
            # No cookie goes out with a failed completion (a store error noting the SP, storing
            # the code: the 503 page): the new session would be nobody's, yet counted in the
            # user's sessions and alive until its idle end (review of the login door).
            await self._abandon(session)
            raise
        self._set_cookie(response, self.cookie, value)
        return response

    async def _abandon(self, session: Session) -> None:
        """End *session*, made for a sign-in whose answer failed (its cookie never sent); when
        the store cannot (it is what failed), the record ends at its idle time, and is logged."""
        try:
            await self.sessions.aend_key(session.key, session.index)
        except STORE_ERRORS as exc:
            log.error("login: a session made for a sign-in whose answer failed could not be ended (%s: %s); its "
                      "cookie was not sent, it ends at its idle time", exc.__class__.__name__, exc)

    async def login_get(self, request: web.Request) -> web.StreamResponse:
        pending_key = pending_key_of(request.query.get("req", ""))
        session = await self.asession(request)
        peeked = self.sessions.peek(pending_key) if pending_key else None
        if session is not None:
            if peeked is not None and self.reusable(session, peeked):
                async def reuse() -> web.StreamResponse | None:
                    await self.admit_answer(session)  # the request waits, unused, when it is spent
                    checked = await self.recheck(session, request)
                    if checked is None:
                        return await self.end_and_go(request, session, f"/login?req={pending_key}")
                    pending = await self.sessions.aunpark(pending_key)
                    if pending is None:
                        return None
                    return await self.completers[pending["protocol"]](request, pending, checked)

                # A request that waited here (an OIDC POST: its cross-site POST carried no cookie)
                # and cannot be served now is answered at its return address as at its first
                # arrival: it got the 429 page, which prompt=none must never get (third review
                # of the OIDC provider).
                response = await self.served(request, peeked, reuse, parked=pending_key)
                if response is not None:
                    return response
            elif peeked is None:
                return self._signed_in_page(request, session)
            # ForceAuthn / prompt=login / max_age: the user proves it again; the request waits, unused.
        if peeked is not None and peeked.get("prompt_none"):  # no page may be shown: declined
            pending = await self.sessions.aunpark(pending_key)
            if pending is not None:
                # Parked, it spent its client's token then: SAML's NoPassive spent a second one,
                # and a POSTed IsPassive request got the 429 page, which it may not show, once its
                # address's budget was spent meanwhile (review of the login door).
                return await self.declined[pending["protocol"]](request, pending, parked=True)
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

    @staticmethod
    def _log_cross_site(request: web.Request) -> None:
        log.warning("login form refused: reason=login.cross_site client=%s origin=%s sec-fetch-site=%s",
                    request.remote, printable(request.headers.get("Origin", "-")[:200]),
                    printable(request.headers.get("Sec-Fetch-Site", "-")[:40]))

    def _refuse_cross_site(self, request: web.Request, pending_key: str) -> web.Response:
        self._log_cross_site(request)
        response = self._form(request, pending_key, status=403, error="csrf")
        response.headers["X-Refused-Reason"] = "login.cross_site"
        return response

    async def login_post(self, request: web.Request) -> web.StreamResponse:
        form = await read_form(request)
        pending_key = pending_key_of(form.get("req", ""))
        if self.cross_site(request):  # login CSRF: another site signing this browser in
            return self._refuse_cross_site(request, pending_key)
        if not self.sessions.csrf_ok(request_cookie(request, self.csrf_cookie), str(form.get("csrf", ""))):
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

    async def _sign_out(self, request: web.Request) -> web.StreamResponse:
        """End the browser's session (a ``POST /logout`` that passed the checks): the Single
        Logout round, then where a confirmed logout was to go (:meth:`confirm_logout`)."""
        then = request.query.get("then", "")
        target = await self.sessions.arelease(then) if then else None
        check = self.logout_targets.get(target.get("protocol", "oidc")) if isinstance(target, dict) else None
        after = check(target) if check is not None else None
        session = await self.asession(request, touch=False)  # ended next: no write before the delete
        if session is not None and self.logout_round is not None:
            return await self.logout_round(request, {session.key: session.index}, after)
        await self.sessions.aend(request_cookie(request, self.cookie))
        if after:
            return web.Response(status=303, headers={"Location": after, "Cache-Control": "no-store"})
        return self.html(self.pages.message("signed_out"))

    async def logout(self, request: web.Request) -> web.StreamResponse:
        refused = None  # why a POST is refused: login.cross_site, login.csrf
        if request.method == "POST":
            form = await read_form(request)
            if self.cross_site(request):
                self._log_cross_site(request)
                refused = "login.cross_site"
            elif self.sessions.csrf_ok(request_cookie(request, self.csrf_cookie), str(form.get("csrf", ""))):
                try:
                    response = await self._sign_out(request)
                except STORE_ERRORS as exc:
                    # The user asked to sign out: this browser forgets its session even when the
                    # store cannot end it now. It kept the cookie, and the session answered again
                    # once the store was back, for whoever used the browser next (review of the
                    # sessions). The record ends at its idle time; its services are not told.
                    self._log_unserved(request, exc)
                    response = self.html(self.pages.message("unavailable", alert=True), 503)
                    response.headers["Retry-After"] = "5"
                self.drop_cookie(response)
                return response
            else:
                log.warning("logout refused: reason=login.csrf client=%s", request.remote)
                refused = "login.csrf"
        # A GET (a typed or linked /logout) ends nothing: any site can make a browser send one.
        # With a session it shows the Sign out button, as does a refused post (a token that
        # expired, a form on another site): the sign-in form it showed told a user still signed
        # in that they were signed out (review of the web layer).
        session = await self.asession(request)
        if session is not None:
            response = self._signed_in_page(request, session, status=403 if refused else 200)
        elif refused:
            response = self._form(request, "", status=403, error="csrf")
        else:
            response = self.html(self.pages.message("signed_out"))
        if refused == "login.cross_site":
            response.headers["X-Refused-Reason"] = refused
        return response
