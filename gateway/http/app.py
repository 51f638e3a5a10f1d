"""The HTTP front doors (DESIGN.md section 5).

``/auth``              forward-auth for nginx ``auth_request``, Traefik ForwardAuth, Caddy ``forward_auth``
``/v1/authenticate``   JSON API for other services; needs an API token (it is a password oracle)
``/healthz``           the process is alive
``/readyz``            the chain can serve (one step or a fallback can answer; core stores up)
``/metrics``           Prometheus text
"""

from __future__ import annotations

import hashlib
import asyncio
import hmac
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from urllib.parse import quote

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from gateway.chain import CLIENT_GONE, Gateway
from gateway.errors import PluginLoadError
from gateway.http.openapi import openapi_document
from gateway.logs import RateLimitedWarning, authgw_version
from gateway.perprocess import UniqueIds
from gateway.http.answer import Answer
from gateway.http.clientaddr import ClientAddressResolver, IPAddress, parse_address
from gateway.http.credentials import (MalformedCredentials, check_password_credential, parse_authorization,
                                      single_authorization)
from gateway.http.protocol import MAX_BODY, SERVER_HEADER, MalformedBody, content_encoded, continue_body, no_linger
from gateway.model import (
    API_CLIENT_KEY,
    Attempt,
    CertificateCredential,
    MUTUAL_AUTH_KEY,
    Decision,
    NegotiateCredential,
    Outcome,
    PasswordCredential,
)

__all__ = ["BodyCutShort", "EXACT_TARGETS", "FrontDoor", "build_apps", "exact_targets", "read_body"]

GATEWAY_KEY = web.AppKey("gateway", Gateway)
#: Handlers the connection calls for an exact request target, before aiohttp's router
#: (:func:`exact_targets`): ``/auth``, the request every attempt makes.
EXACT_TARGETS = web.AppKey("exact_targets", dict)

_DENY_BODY = "401 Unauthorized\n"
_RETRY_AFTER_UNAVAILABLE = "5"
_MAX_JSON_BYTES = 8 * 1024
#: Deepest JSON nesting /v1/authenticate reads (its body is one flat object): deeper input is a
#: 400 before json.loads could recurse (issue 10 item 5).
_MAX_JSON_DEPTH = 32
#: Headers not copied to ``Attempt.headers``: credentials reach plugins typed, or not at all.
_PRIVATE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
#: Characters that may not reach a response header (header injection / response splitting): C0,
#: DEL and C1 controls, and the Unicode line and paragraph separators. A backend that reads a
#: header as latin-1 (WSGI) and splits lines broke ``Eve\u0085Remote-User: admin`` into a line of
#: its own, and ``str.split()`` read ``users\u0085admins`` as a group ``admins`` (review of the
#: front doors).
_UNSAFE = {c: None for c in range(32)} | {c: None for c in range(0x7F, 0xA0)} | {0x2028: None, 0x2029: None}

_identity_warning = RateLimitedWarning(logging.getLogger("authgw.http"))


def _header_value(text: str, field: str = "") -> str:
    """*text* as a response header's value. A value holding a control character is not sent
    (an empty value, with a warning): taking the characters out made another value of it, so
    a directory's ``mail: "ceo@example.com\\x7f"`` reached the backend as the CEO's address
    (review of what the gateway writes). HTTP has no way to send them.

    isprintable() is False for every character _UNSAFE holds (and for some it does not, such as
    U+200E, sent as they are): a printable value, the usual case, needs no copy. A lone
    surrogate (an identity from a YAML or JSON escape) cannot be written as UTF-8: it became a
    reset connection after a logged success (review of the front door); it is written as "?"."""
    if text.isprintable():
        return text
    if len(text.translate(_UNSAFE)) != len(text):
        _identity_warning(f"control:{field}", "the identity's %s holds a control character: %s sent empty (its "
                          "characters cannot be sent, and leaving them out would make another value of it)",
                          field or "value", f"Remote-{field.capitalize()}" if field else "the header")
        return ""
    return text.encode("utf-8", "replace").decode("utf-8")


_groups_warning = RateLimitedWarning(logging.getLogger("authgw.http"))
_token_warning = RateLimitedWarning(logging.getLogger("authgw.http"))
_mutual_warning = RateLimitedWarning(logging.getLogger("authgw.http"))

#: What ``identity_headers: percent`` leaves as it is: printable ASCII but ``%`` and ``,``.
_PERCENT_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in "%,")


def _percent(text: str) -> str:
    """*text* with each byte of its UTF-8 outside printable ASCII, and ``%`` and ``,``,
    percent-encoded (RFC 3986 section 2.1): a backend reading the header as latin-1 (WSGI)
    read the second byte of ``х`` (D1 85) as NEL, and ``str.split()`` split ``хadmins`` into a
    group ``admins``; NBSP (A0, in ``Р`` and ``à``) likewise."""
    return text if text.isascii() and "%" not in text and "," not in text else quote(text, safe=_PERCENT_SAFE)


def _identity_headers(identity, percent: bool) -> dict[str, str]:
    """The ``Remote-*`` headers of a signed-in identity (``identity_headers``)."""
    if not percent:
        return {"Remote-User": _header_value(identity.username, "user"),
                "Remote-Groups": _groups_header(identity.groups),
                "Remote-Email": _header_value(identity.email, "email"),
                "Remote-Name": _header_value(identity.display_name, "name")}
    # A value a control character keeps from being sent is sent empty (a group left out), as in
    # utf-8, and so is a group with white space at an end (not encoded: %20 is a printable
    # space's spelling too); a comma in a group name is written %2C, so that group is kept.
    groups = [g for g in identity.groups if len(g.translate(_UNSAFE)) == len(g) and not _loose_ends(g)]
    if len(groups) != len(identity.groups):
        _groups_warning("control", "group name(s) %s hold a control character or white space at an end: left out "
                        "of Remote-Groups", ", ".join(repr(g) for g in identity.groups if g not in groups)[:500])
    return {"Remote-User": _percent(_header_value(identity.username, "user")),
            "Remote-Groups": ",".join(_percent(_header_value(g, "groups")) for g in groups),
            "Remote-Email": _percent(_header_value(identity.email, "email")),
            "Remote-Name": _percent(_header_value(identity.display_name, "name"))}


#: A name with white space at an end, in a list of names joined by commas (commas only between
#: them): ``\s`` is what ``str.strip()`` takes off.
_LOOSE_END = re.compile(r"(?:^|,)\s|\s(?:,|$)")


def _loose_ends(name: str) -> bool:
    return name != name.strip()


def _groups_header(groups: tuple[str, ...]) -> str:
    """``Remote-Groups``: the names, comma-separated. A name holding a comma is left out (with a
    warning): ``project-x, admins`` would read as two groups, ``admins`` among them, to a
    backend that splits on commas (review of the front door). So is a name holding a control
    character: without it ``adm\\x00ins`` read as ``admins`` (review of what the gateway writes).
    So is a name with white space at an end: `` admins`` reached the application behind nginx
    as ``admins`` (nginx drops it at the start of a value, RFC 9110 section 5.5; a backend
    splitting on commas and stripping, anywhere) (second review of the front door)."""
    joined = ",".join(groups)
    if not groups or (joined.count(",") == len(groups) - 1 and joined.isprintable()
                      and not _LOOSE_END.search(joined)):  # the usual case
        return joined
    left_out = [g for g in groups if "," in g or len(g.translate(_UNSAFE)) != len(g) or _loose_ends(g)]
    if left_out:
        _groups_warning("comma", "group name(s) %s hold a comma, a control character or white space at an end: "
                        "left out of Remote-Groups (a backend splitting it on commas would read several groups; "
                        "without the control character or the white space it would read as another group); "
                        "rename them, or read groups from /v1/authenticate", ", ".join(map(repr, left_out[:5])))
    return _header_value(",".join(g for g in groups if g not in left_out), "groups")


class PublicHeaders(Mapping[str, str]):
    """A read-only, case-insensitive view of a request's headers without the credentials ones.

    A view, not a copy: most attempts never look at their headers.
    """

    __slots__ = ("_headers",)

    def __init__(self, headers) -> None:
        self._headers = headers

    def __getitem__(self, name: str) -> str:
        if name.lower() in _PRIVATE_HEADERS:
            raise KeyError(name)
        return self._headers[name]

    def __iter__(self):
        return (k.lower() for k in self._headers if k.lower() not in _PRIVATE_HEADERS)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def getall(self, name: str) -> list[str]:
        return [] if name.lower() in _PRIVATE_HEADERS else self._headers.getall(name, [])


class FrontDoor:
    """The front doors of one worker, and what plugin routes use to authenticate
    (``gateway_http_routes``): :meth:`attempt`, :meth:`decide`, :meth:`tls_certificate`."""

    def __init__(self, gateway: Gateway, metrics=None) -> None:
        self.gateway = gateway
        self.metrics = metrics
        self.resolver = ClientAddressResolver(gateway.settings.trusted_proxies)
        self.request_ids = UniqueIds()
        self.api_tokens = {t.sha256: t.name for t in gateway.settings.api_tokens}
        self.realm_challenge = f'Basic realm="{gateway.settings.realm}", charset="UTF-8"'

    # -- building attempts -------------------------------------------------------------------

    def attempt(self, request: web.Request, front_door: str, *, forwarded: bool = True, **credentials) -> Attempt:
        """A new attempt for *request*: request id, client address (:meth:`client_of`), deadline,
        public headers, and the given credentials. With *forwarded* false the attempt carries
        no headers and no trusted peer: nothing a proxy forwards (a client certificate) can
        answer for it; its client address is still the one a trusted proxy forwards for."""
        client, trusted = self.client_of(request)
        transport = request.transport
        attempt = Attempt(
            request_id=self.request_ids.next(),
            client=client,
            front_door=front_door,
            deadline=time.monotonic() + self.gateway.settings.deadline,
            peer=parse_address(request.remote or ""),
            trusted_peer=trusted and forwarded,
            headers=PublicHeaders(request.headers) if forwarded else {},
            **credentials,
        )
        if transport is not None:  # a queued attempt whose client hung up is not run (gateway/pool.py)
            attempt.stash[CLIENT_GONE] = transport.is_closing
        return attempt

    def client_of(self, request: web.Request) -> tuple[IPAddress, bool]:
        """*request*'s client address, believing ``X-Forwarded-For`` only from trusted proxies,
        and whether its peer is one. On a connection whose TLS authgw terminated itself (a
        plugin's TLS listener) no peer is a proxy: a proxy in front of it can only pass TCP
        through, so every header was written by the client (review of issue 9.1)."""
        transport = request.transport
        if transport is not None and transport.get_extra_info("ssl_object") is not None:
            return self.resolver.resolve(request.remote, ())[0], False
        return self.resolver.resolve(request.remote, request.headers.getall("X-Forwarded-For", ()))

    @staticmethod
    def password_credential(username: str, password: str) -> tuple[PasswordCredential, str | None]:
        """A typed username and password, checked as ``/auth`` checks Basic credentials.

        :return: the credential and ``None``, or, for credentials the front doors refuse before
            the chain, a stand-in credential and the reason code to pass to :meth:`decide`.
        """
        try:
            return check_password_credential(username, password), None
        except MalformedCredentials as exc:
            # Audited under a printable, encodable form of the name (it may be why it was refused).
            return PasswordCredential(username.encode("utf-8", "replace").decode("utf-8")[:256], ""), exc.reason

    @staticmethod
    def tls_certificate(request: web.Request) -> CertificateCredential | None:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        if ssl_object is None:
            return None
        der = ssl_object.getpeercert(binary_form=True)
        return CertificateCredential((der,), source="tls") if der else None

    async def decide(self, attempt: Attempt, refused: str | None = None) -> Decision:
        """Decide *attempt* (throttle, chain, deadline, audit). With *refused* (a reason code for
        credentials the front door could not accept) it is denied without asking the chain."""
        if self.metrics:
            self.metrics.in_flight.inc()
        try:
            if refused is not None:
                decision = Decision.deny(Outcome.INVALID_CREDENTIALS, step="http", reason=refused)
                self.gateway.notify(attempt, decision)
                # Not throttled: a malformed header tests no password (gateway/throttle.py).
                return decision
            return await self.gateway.authenticate(attempt)
        finally:
            if self.metrics:
                self.metrics.in_flight.dec()

    # -- /auth ---------------------------------------------------------------------------------

    async def forward_auth(self, request: web.Request) -> Answer:
        refused = None
        credential = None
        try:
            credential = parse_authorization(single_authorization(request.headers))
        except MalformedCredentials as exc:
            refused = exc.reason
        attempt = self.attempt(
            request,
            "forward_auth",
            password=credential if isinstance(credential, PasswordCredential) else None,
            negotiate=credential if isinstance(credential, NegotiateCredential) else None,
            certificate=self.tls_certificate(request),
        )
        decision = await self.decide(attempt, refused)
        headers = {"X-Request-Id": attempt.request_id, "Cache-Control": "no-store"}
        if decision.success:
            identity = decision.identity
            headers.update(_identity_headers(identity, self.gateway.settings.identity_headers == "percent"))
            headers["Remote-Auth-Source"] = "cache" if decision.from_cache else "live"
            mutual = attempt.stash.get(MUTUAL_AUTH_KEY, None)
            if mutual:
                if isinstance(mutual, str) and mutual.isascii() and mutual.isprintable():
                    headers["WWW-Authenticate"] = mutual
                else:  # a third party's: the answer could not be written, the connection was reset
                    _mutual_warning("mutual", "a step's MUTUAL_AUTH_KEY token is not a header value (%s): the "
                                    "success is answered without it", type(mutual).__name__)
            return Answer(200, "", headers)
        return self.denied(request, attempt, decision, headers)

    def retry_after(self, request: web.Request, decision: Decision) -> str:
        """``Retry-After`` of a 503: short for overload (capacity returns within a second or
        so; the connection's next request is read no sooner, :mod:`gateway.http.protocol`),
        longer for a backend that is down."""
        if decision.reason == "overloaded":
            hold = getattr(request.protocol, "hold_after_refusal", None)
            if hold is not None:
                return str(math.ceil(hold()))
        if decision.reason in ("overloaded", "step_saturated"):
            return str(self.gateway.settings.limits.retry_after)
        return _RETRY_AFTER_UNAVAILABLE

    def denied(self, request: web.Request, attempt: Attempt, decision: Decision,
               headers: dict[str, str]) -> Answer:
        if decision.outcome is Outcome.UNAVAILABLE:
            headers["Retry-After"] = self.retry_after(request, decision)
            return Answer(503, "503 Service Unavailable\n", headers)
        if decision.outcome is Outcome.THROTTLED:
            headers["Retry-After"] = str(int(self.gateway.settings.throttle.window))
            return Answer(429, "429 Too Many Requests\n", headers)
        # Only steps that can answer a challenge offer one: a certificate-only chain must not make
        # a browser prompt for a password that can never succeed.
        return Answer(401, _DENY_BODY, headers, self.gateway.challenges(attempt))

    # -- /v1/authenticate ------------------------------------------------------------------------

    def api_client(self, request: web.Request) -> str | None:
        try:
            scheme, _, token = (single_authorization(request.headers) or "").partition(" ")
        except MalformedCredentials:
            return None
        if scheme.lower() != "bearer" or not token or not self.api_tokens:
            return None
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogatepass")).hexdigest()
        for stored, name in self.api_tokens.items():
            if hmac.compare_digest(stored, digest):
                return name
        return None

    def _api_refusal(self, request: web.Request, client: str | None) -> web.Response | None:
        """The answer to a ``/v1/authenticate`` request refused before its body is read (no API
        token, a declared body too large, a ``Content-Encoding``), or ``None``. Its body is then not waited for: the
        connection closes once the answer is written."""
        if client is None:  # (:meth:`api_client`)
            # Said (at most a line a minute, with a count): refused tokens left no trace at all
            # (review of the endpoints). Never the token.
            _token_warning("api_token", "refused /v1/authenticate requests without a valid API token (last from %s)",
                           self.client_of(request)[0])
            refusal = web.json_response({"error": "unauthorized", "detail": "a valid API token is required"},
                                        status=401, headers={"WWW-Authenticate": 'Bearer realm="authgw"'})
        elif (request.content_length or 0) > _MAX_JSON_BYTES:
            refusal = web.json_response({"error": "bad_request", "detail": "request body too large"}, status=400)
        elif content_encoded(request):  # never inflated (protocol.py): not invited either
            refusal = web.json_response({"error": "bad_request",
                                         "detail": "a body with a Content-Encoding, or a Transfer-Encoding "
                                                   "other than chunked, is not accepted"}, status=400)
        else:
            return None
        no_linger(request)
        return refusal

    async def api_expect(self, request: web.Request) -> web.Response | None:
        """``Expect: 100-continue`` on ``/v1/authenticate``: the body is invited only when it will
        be read; a request refused anyway gets its answer instead of ``100 Continue``."""
        refusal = self._api_refusal(request, self.api_client(request))
        if refusal is not None:
            return refusal
        return await continue_body(request)

    async def api_authenticate(self, request: web.Request) -> web.Response:
        client = self.api_client(request)
        refusal = self._api_refusal(request, client)
        if refusal is not None:
            return refusal
        try:
            body = await asyncio.wait_for(read_body(request, _MAX_JSON_BYTES),
                                          self.gateway.settings.limits.body_timeout)
        except (asyncio.TimeoutError, RequestPayloadError) as exc:
            # Any body the API cannot read is a 400 (issue 10 item 5); the connection is not reused.
            detail = ("the body did not arrive in time" if isinstance(exc, asyncio.TimeoutError)
                      else str(exc) if isinstance(exc, (BodyCutShort, MalformedBody))
                      else "a body with a Content-Encoding is not accepted")
            no_linger(request)  # what is left of it is not waited for
            return web.json_response({"error": "bad_request", "detail": detail},
                                     status=400, headers={"Connection": "close"})
        try:
            if len(body) > _MAX_JSON_BYTES:
                raise ValueError("request body too large")
            if _too_deep(body):
                raise ValueError("JSON nested too deeply")
            data = json.loads(_utf8_text(body), object_pairs_hook=_unique_keys)
            if not isinstance(data, dict) or set(data) - {"username", "password"}:
                raise ValueError("expected an object with `username` and `password`")
            username, password = data.get("username"), data.get("password")
            if not isinstance(username, str) or not isinstance(password, str):
                raise ValueError("`username` and `password` must be strings")
        except (ValueError, RecursionError) as exc:  # JSON and UTF-8 decoding errors, nesting
            # The detail is a fixed text: never a byte of the body, which may be a password's.
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc).split(":")[0]
            return web.json_response({"error": "bad_request", "detail": detail}, status=400)
        credential, refused = self.password_credential(username, password)
        # The API asks whether this username and password hold: the request's headers are the
        # calling service's, so no plugin may read them as the user's (a certificate forwarded
        # for the service answered "success" for any password: review of client certificates).
        attempt = self.attempt(request, "api", forwarded=False, password=credential)
        attempt.stash[API_CLIENT_KEY] = client  # (a token's name: _api_refusal refused None)
        decision = await self.decide(attempt, refused)
        status = {Outcome.UNAVAILABLE: 503, Outcome.THROTTLED: 429}.get(decision.outcome, 200)
        headers = {"Cache-Control": "no-store"}
        if status == 503:
            headers["Retry-After"] = self.retry_after(request, decision)
        return web.json_response({
            "request_id": attempt.request_id,
            "outcome": decision.outcome.value,
            "reason": decision.reason,
            "step": decision.step,
            "from_cache": decision.from_cache,
            "identity": decision.identity.to_json() if decision.identity else None,
        }, status=status, headers=headers)

    # -- health -----------------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> Answer:
        return Answer(200, f"ok authgw {authgw_version()}\n", {})

    def sees_details(self, request: web.Request) -> bool:
        """Health details (backend URLs, file paths) and /metrics only for ``health.details_from``:
        the socket peer, and when that peer is a trusted proxy, the client it forwards for too.
        The peer alone let every client of a proxy on the same host (loopback, the default) read
        them through it (review of what the gateway writes)."""
        networks = self.gateway.settings.health.details_from
        peer = parse_address(request.remote or "")
        if peer is None or not any(peer in net for net in networks):
            return False
        client, proxied = self.client_of(request)
        return not proxied or any(client in net for net in networks)

    async def readyz(self, request: web.Request) -> web.Response:
        health = self.gateway.health()  # one snapshot: the health thread decides concurrently
        body: dict = {"ready": health.ready}
        if not health.ready:
            body["reason"] = health.reason
        elif health.degraded:  # down but covered by something else (docs/design.md point 16)
            body["degraded"] = list(health.degraded)
        if self.sees_details(request):  # component names hold URLs, details hold paths and errors
            body["components"] = [{"name": c.name, "ready": c.ready, "detail": c.detail} for c in health.components]
        return web.json_response(body, status=200 if health.ready else 503, headers={"Cache-Control": "no-store"})

    async def metrics_text(self, request: web.Request) -> web.Response:
        if self.metrics is None or not self.sees_details(request):
            raise web.HTTPNotFound()
        return web.Response(body=self.metrics.exposition(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


class BodyCutShort(RequestPayloadError):
    """:func:`read_body`: the connection closed before the request's body ended."""


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, or its first ``limit + 1`` bytes when it is longer (so the caller can
    refuse it). Bound the wait with ``asyncio.wait_for(..., limits.body_timeout)``; a body with
    a ``Content-Encoding`` raises ``RequestPayloadError`` before a byte is read, a connection
    closed before the body ended :class:`BodyCutShort` (a ``RequestPayloadError`` too)."""
    if content_encoded(request):
        raise RequestPayloadError("a Content-Encoding, or a Transfer-Encoding other than chunked, is not accepted")
    body = b""
    while len(body) <= limit:  # read() returns what has arrived, not all of it
        try:
            chunk = await request.content.read(limit + 1 - len(body))
        except ConnectionResetError:
            # The client closed its connection before the body ended: its error, not a handler's
            # (it was logged at ERROR with a traceback, once a request: review of the doors).
            raise BodyCutShort("the connection closed before the body ended") from None
        if not chunk:
            break
        body += chunk
    return body


def _utf8_text(body: bytes) -> str:
    """The body as UTF-8 text (RFC 8259 8.1), without a byte order mark. ``json.loads`` given
    bytes guesses UTF-16 or UTF-32 and skips a BOM, so a body a proxy or WAF in front reads as
    UTF-8 (or as garbage) would be decided as something else."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the body is not UTF-8 text") from None
    if text.startswith("\ufeff"):
        raise ValueError("the body starts with a byte order mark")
    return text


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object, refused when a key comes twice: ``json`` keeps the last one, while a
    proxy or WAF in front may have read the first (``{"username": "bob", "username": "alice"}``
    checked as bob, decided as alice)."""
    data = dict(pairs)
    if len(data) != len(pairs):
        raise ValueError("a key given twice")
    return data


def _too_deep(body: bytes) -> bool:
    """Nesting deeper than ``_MAX_JSON_DEPTH`` (brackets inside strings are not counted)."""
    if body.count(b"[") + body.count(b"{") <= _MAX_JSON_DEPTH:  # the usual case, in C
        return False
    depth, in_string, escaped = 0, False, False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > _MAX_JSON_DEPTH:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


async def _no_versions(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp would send ``Server: Python/3.x aiohttp/3.y``: versions help only an attacker.
    response.headers["Server"] = SERVER_HEADER


def exact_targets(handle, targets: dict):
    """aiohttp's request handler *handle* (``Application._handle``), with the requests whose
    target is exactly a key of *targets* (no query) given to that handler directly. The router
    would find the same handler; resolving it, making its match information and the rest of
    ``_handle`` cost ~6 µs a request in a worker (docs/performance.md). A request with an
    ``Expect`` header goes the router's way, which answers it (``100 Continue`` or 417)."""
    async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
        handler = targets.get(request.raw_path)
        if handler is None or "Expect" in request.headers:
            return await handle(request)
        return await handler(request)

    return dispatch


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(authgw_version()))


def _front_doors(app: web.Application, door: FrontDoor) -> None:
    app[EXACT_TARGETS] = {"/auth": door.forward_auth}
    app.router.add_route("*", "/auth", door.forward_auth)
    app.router.add_post("/v1/authenticate", door.api_authenticate, expect_handler=door.api_expect)
    app.router.add_get("/v1/openapi.json", _openapi)
    app.router.add_get("/healthz", door.healthz)
    app.router.add_get("/readyz", door.readyz)
    app.router.add_get("/metrics", door.metrics_text)


def build_apps(gateway: Gateway, metrics=None, listeners=()) -> dict[str | None, web.Application]:
    """One application for the ``listen:`` sockets (key ``None``) and one per extra listener:
    the front doors plus plugin routes, or only the routes that name a listener with
    ``own_routes``."""
    door = FrontDoor(gateway, metrics)
    routes = gateway.http_routes(door)
    known = {listener.name for listener in listeners}
    for route in routes:
        if route.listener is not None and route.listener not in known:
            raise PluginLoadError(f"route {route.method} {route.path} names listener {route.listener!r}, "
                                  "which no plugin asked for")
    apps: dict[str | None, web.Application] = {}
    for name, own in [(None, False), *((x.name, x.own_routes) for x in listeners)]:
        app = web.Application(client_max_size=MAX_BODY)
        app[GATEWAY_KEY] = gateway
        app.on_response_prepare.append(_no_versions)
        if not own:
            _front_doors(app, door)
        for route in routes:
            if route.listener == name or (route.listener is None and not own):
                try:
                    app.router.add_route(route.method, route.path, route.handler)
                except (RuntimeError, ValueError) as exc:  # aiohttp: duplicate or malformed route
                    raise PluginLoadError(f"route {route.method} {route.path}: {exc}") from exc
        apps[name] = app
    return apps


def build_app(gateway: Gateway, metrics=None) -> web.Application:
    """The application of the ``listen:`` sockets (front doors and plugin routes)."""
    return build_apps(gateway, metrics)[None]
