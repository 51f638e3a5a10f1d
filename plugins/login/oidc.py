"""OpenID Connect provider: authorization code flow with PKCE (S256 required), ``query`` or
``form_post`` response mode, id_token (RS256, joserfc) and userinfo. Reads ``login.oidc`` and
``login.base_url`` (the issuer).

Endpoints: ``/.well-known/openid-configuration``, ``/oidc/jwks`` (current and next key, and the
previous one a rotation left, ``signing-previous.*``, until the next rotation), ``/oidc/authorize``
(GET, or POST with a form body: OIDC Core 3.1.2.1), ``/oidc/token``, ``/oidc/userinfo``,
``/oidc/logout`` (RP-initiated logout, the discovery's ``end_session_endpoint``).

RP-initiated logout needs an ``id_token_hint`` this provider signed (current, next or previous
key; an expired one is fine, it only names the session): without one any page could log the user out,
so the user is asked instead (the "Sign out" button). Only the browser's own session is ever
ended: without asking when the hint is of it (its ``sid`` is the session's index; a hint without
``sid``: its ``sub`` is the session's user), with the SAML Single Logout round of :mod:`.slo`.
A hint of any other session (another browser's, another user's, an earlier one) ends nothing,
whoever holds it (id_tokens travel in logout URLs, so in history and proxy logs): a browser with
a session of its own is asked (OpenID Connect RP-Initiated Logout 1.0 section 2: the "Sign out"
page, whose confirmation goes on to the ``post_logout_redirect_uri``), one without goes straight
to it (nothing to end here) or sees "signed out". The ``post_logout_redirect_uri`` (with
``state``) is only ever one of the client's ``post_logout_redirect_uris`` exactly. A POST that
comes without the session cookie (a relying party's page posting across sites: ``SameSite=Lax``)
is kept (single use, the client's budget) and continued at ``GET /oidc/logout?held=``, which
carries it. Checks: ``oidc.id_token_hint_invalid``,
``oidc.unknown_client``, ``oidc.client_mismatch`` (``client_id`` not the hint's audience),
``oidc.post_logout_redirect_uri_not_registered``, ``login.parameter_too_large``.

Named checks at ``/oidc/authorize`` refused on a page, never redirected, so a bad request cannot
bounce the browser anywhere: ``login.parameter_too_large``, ``login.malformed`` (``client_id`` or
``redirect_uri`` given twice, an unreadable POST body), ``oidc.unknown_client``,
``oidc.redirect_uri_not_registered`` (exact match). Once the client and its ``redirect_uri`` are
known, every other error is answered at the ``redirect_uri`` (with ``state`` and ``iss``; by
``form_post`` when that was asked, else in the query), as RFC 6749 section 4.1.2.1 and OIDC Core
section 3.1.2.6 have it, and logged with its reason: ``invalid_request`` for a parameter given
twice (``oidc.repeated_parameter``), a ``response_mode`` other than ``query``/``form_post``
(``oidc.unsupported_response_mode``), no ``response_type``, no PKCE S256 challenge
(``oidc.pkce_required``), ``prompt=none`` with another value or a ``max_age`` that is not a number
of seconds; ``request_not_supported`` / ``request_uri_not_supported`` (OIDC Core 6.1, 6.2: request
objects are not read); ``unsupported_response_type`` (not ``code``); ``invalid_scope`` (no
``openid``, ``oidc.scope_missing_openid``); ``login_required`` for ``prompt=none`` when no session
may answer (none, too old for ``max_age``, its account gone, another user's than the request
names: no page is ever shown). ``login``
among the ``prompt`` values, or a sign-in older than ``max_age`` (``0``: any), makes the user
sign in again; ``auth_time`` is always in the id_token, and ``acr``: the SAML authentication
context class of the session's sign-in (:func:`.saml.authn_context_class`).

Who and how (OIDC Core 3.1.2.1, 5.5.1): an ``id_token_hint`` must be an id_token this provider
signed (current, next or previous key; its issuer; expired is fine: it only names the user), else
``invalid_request`` (``oidc.id_token_hint_invalid``); a ``claims`` parameter must be a JSON object
of objects (``invalid_request``, ``oidc.claims_invalid``). Its ``sub`` (``id_token`` or
``userinfo``) with ``value``/``values`` and the hint's ``sub`` name the users the answer may be
about: a session of another user does not answer (the form is shown; ``prompt=none``:
``login_required``), and a code is only made for one of them, also after a new sign-in
(``login_required``, ``oidc.subject_mismatch``). An essential ``id_token`` ``acr`` with
``value``/``values`` must be met by the sign-in (``unmet_authentication_requirements``,
``oidc.acr_unmet``: at once when none of the provider's classes is listed, else when the answer
is made). ``acr_values`` is voluntary (3.1.2.1) and not enforced: the id_token's ``acr`` says
what the sign-in was.
At ``/oidc/token`` (RFC 6749 section 5.2 JSON errors): ``invalid_request`` (a parameter given
twice), ``invalid_client`` (secret or client JWT; a ``client_secret_basic`` pair is taken
form-decoded, as RFC 6749 section 2.3.1 has it, or as sent), ``invalid_grant`` (unknown, used or
expired code; another client's, refused before the code is used up; redirect_uri or PKCE
verifier mismatch, or a ``code_verifier`` that is not 43 to 128 unreserved characters: RFC 7636
4.1), ``invalid_client`` also for a client assertion whose ``exp``, ``nbf`` or
``iat`` is not a finite number. Codes and client-assertion ``jti`` are single use (the session
store); a code its own client presents again revokes the access token issued from it (RFC 6749
section 4.1.2; a tombstone ``code-used:`` names it and that client while the code or the token
could be in use); another client presenting it revokes nothing. A code's record keeps only what
the token endpoint reads (:data:`GRANT_FIELDS`, the identity, the ``sid``), and codes answered
from an existing session spend its user's budget (:meth:`.web.LoginDoor.admit_answer`).
``/oidc/userinfo`` answers while the token's client is registered (a reload that removes a client
ends its tokens, ``oidc.unknown_client``), the sign-in session the token was issued in lives and
its account passes the account check of :mod:`.web` (else ``invalid_token``), with the profile as
that check refreshed it. A bearer token that cannot be one of ours (not the 43 URL-safe characters of
:data:`_ACCESS_TOKEN`) is ``invalid_token`` without asking the session store: an anonymous
client cannot make the door wait for it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import re
import secrets
import time
from urllib.parse import unquote_plus, urlencode

from aiohttp import web
from multidict import MultiDict
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, RSAKey

from gateway import Identity, Route
from gateway.http.credentials import MalformedCredentials, single_authorization
from gateway.logs import printable

from .keys import KeyPair
from .saml import ISSUED_CONTEXTS, authn_context_class
from .sessions import identity_from_json, identity_to_json, same
from .settings import LoginSettings, OidcClient
from .web import Refused, SharedBudget, read_form, request_cookie

__all__ = ["AuthorizationError", "OidcProvider"]

log = logging.getLogger("authgw.plugin.login")

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_PARAM = 2048
MAX_HINT = 8192  # an id_token with many groups is longer than the other parameters
#: The ``acr`` values (OIDC Core 2, 3.1.2.1, 5.5.1.1) this provider states, one per sign-in method:
#: the SAML authentication context classes its assertions carry (password over TLS, Kerberos,
#: client certificate); the id_token's ``acr`` is the one of the session's sign-in.
ACR_VALUES = ISSUED_CONTEXTS
#: The most values a ``claims`` request's ``values`` may list.
MAX_CLAIM_VALUES = 16


def _rsa(pair: KeyPair) -> RSAKey:
    key = RSAKey.import_key(pair.key_pem)
    key.ensure_kid()
    return key


#: RFC 7636 4.2: an S256 challenge is the BASE64URL of a SHA-256, without padding: 43 characters.
_S256_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")
#: RFC 7636 4.1: a code_verifier is 43 to 128 unreserved characters (at least 256 bits as its
#: clients make it). A shorter one is found from its challenge, which travels in the browser's
#: URL (history, proxy and referrer logs), by trying every value: it protects the code from no one.
_CODE_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")


def _basic(request: web.Request) -> tuple[bool, str | None]:
    """Whether a token request authenticates with Basic, and its decoded ``id:secret`` (None: not
    base64 of UTF-8). Raises :class:`MalformedCredentials` for two ``Authorization`` headers."""
    scheme, _, value = (single_authorization(request.headers) or "").partition(" ")
    if scheme.lower() != "basic":
        return False, None
    try:
        return True, base64.b64decode(value, validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return True, None


def _claimed_client(request: web.Request, form) -> str:
    """The client id a token request claims (Basic's user part, else the body's), for the log."""
    try:
        basic, raw = _basic(request)
    except MalformedCredentials:
        return "(two Authorization headers)"
    if basic:
        if raw is None:
            return "(unreadable Basic credentials)"
        # Without a ':' the whole credential is the secret as much as an id (a client sending
        # an API key as Basic): it is not logged (docs/security.md: never log a secret).
        user, colon, _ = raw.partition(":")
        return unquote_plus(user) if colon else "(Basic credentials without ':')"
    return str(form.get("client_id", "(assertion)" if "client_assertion" in form else ""))


def _error(code: str, status: int = 400, description: str = "", *, logged: bool = False) -> web.Response:
    """An OAuth error answer (RFC 6749 section 5.2), logged unless the caller did (*logged*)."""
    if not logged and code != "invalid_client":  # (invalid_client: logged where it is decided)
        log.warning("oidc token request refused: error=%s %s", code, description)
    body = {"error": code, **({"error_description": description} if description else {})}
    headers = {"Cache-Control": "no-store"}
    if code == "invalid_client":
        headers["WWW-Authenticate"] = 'Basic realm="authgw"'
    return web.json_response(body, status=status, headers=headers)


class AuthorizationError(Exception):
    """A request from a known client to a registered ``redirect_uri`` that is answered there with
    an OAuth error (RFC 6749 section 4.1.2.1, OIDC Core section 3.1.2.6), not on a page;
    *reason* is the code logged with it (docs/reasons.md)."""

    def __init__(self, error: str, description: str, pending: dict, reason: str = "") -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.pending = pending
        self.reason = reason or f"oidc.{error}"


#: Authorization request parameters OAuth 2.0 and OIDC Core define: each may be given once
#: (RFC 6749 section 3.1). Others (RFC 8707 ``resource`` may repeat) are not looked at.
AUTHORIZATION_PARAMETERS = frozenset({
    "response_type", "client_id", "redirect_uri", "scope", "state", "response_mode", "nonce", "display",
    "prompt", "max_age", "ui_locales", "id_token_hint", "login_hint", "acr_values", "claims_locales", "claims",
    "request", "request_uri", "registration", "code_challenge", "code_challenge_method"})
#: Token request parameters (RFC 6749 section 4.1.3, RFC 7636, RFC 7523): each may be given once.
TOKEN_PARAMETERS = frozenset({"grant_type", "code", "redirect_uri", "code_verifier", "client_id", "client_secret",
                              "client_assertion", "client_assertion_type"})


def _repeated(params, names: frozenset) -> list[str]:
    """The names among *names* that *params* (a multidict) holds more than once."""
    counts: dict[str, int] = {}
    for key, _ in params.items():  # items(): keys() names each key once (multidict 7)
        if key in names:
            counts[key] = counts.get(key, 0) + 1
    return sorted(k for k, n in counts.items() if n > 1)


#: What a code's record keeps of its authorization request: what the token endpoint reads.
GRANT_FIELDS = ("client_id", "redirect_uri", "challenge", "nonce", "scope")

#: max_age: ASCII digits, up to about 31 years (str.isdigit() takes "²").
_MAX_AGE = re.compile(r"[0-9]{1,9}")
#: The shape of the access tokens :meth:`OidcProvider.token` issues: ``secrets.token_urlsafe(32)``,
#: 32 random bytes in unpadded base64url. Another is refused before any store lookup.
_ACCESS_TOKEN_BYTES = 32
_ACCESS_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")

#: The longest a client assertion may still be valid when it arrives (RFC 7523 leaves it to the
#: server): its jti is remembered that long, so a longer one would make the replay store hold
#: each for longer. An hour, as client libraries commonly sign them.
MAX_ASSERTION_LIFETIME = 3600
#: The longest client assertion read: a JWT with a few claims is well under 2 KiB.
MAX_ASSERTION_BYTES = 8 * 1024

class OidcProvider:
    def __init__(self, settings: LoginSettings, current: KeyPair, upcoming: KeyPair) -> None:
        self.settings = settings
        self.issuer = settings.base_url
        self.clients = {c.client_id: c for c in settings.oidc.clients}
        self.signing = _rsa(current)
        # The next key is published before it signs, so relying parties have it when it does; the
        # previous one (``signing-previous.*``, left by the last rotation) until the next
        # rotation, so that id_tokens it signed before the reload still verify.
        keys = [self.signing, _rsa(upcoming)] + ([_rsa(current.replaced)] if current.replaced is not None else [])
        self.public = {"keys": [{**k.as_dict(private=False), "use": "sig", "alg": "RS256"}
                                for k in {k.kid: k for k in keys}.values()]}
        self.own_keys = KeySet.import_key_set(self.public)  # id_token_hint: signed here, current, next or previous
        self.client_keys = {c.client_id: _client_key(c) for c in settings.oidc.clients if c.public_key}
        self.token_url = f"{self.issuer}/oidc/token"

    def routes(self, web_door) -> list[Route]:
        self.web = web_door
        budget = web_door.sessions.settings.requests_per_client
        #: Failed client authentications at the token endpoint, by client address and the
        #: registered client they claim to be (:meth:`_failure_key`): a secret is not guessed at
        #: thousands a second (in the session store, shared by every worker). Every token
        #: request spends a token before its client is authenticated, given back on success.
        self.auth_failures = SharedBudget(web_door.sessions, "oidc-client-failures", burst=budget, rate=budget / 60)
        web_door.completers["oidc"] = self.complete
        web_door.answerable["oidc"] = self.answer_target
        web_door.redirects["oidc"] = self.redirect_of
        web_door.declined["oidc"] = self.login_required
        web_door.unavailable["oidc"] = self.temporarily_unavailable
        web_door.logout_targets["oidc"] = self.logout_target
        return [Route("GET", "/.well-known/openid-configuration", self.discovery),
                Route("GET", "/oidc/jwks", self.jwks), Route("GET", "/oidc/authorize", self.authorize),
                Route("POST", "/oidc/authorize", self.authorize),
                Route("POST", "/oidc/token", self.token), Route("GET", "/oidc/userinfo", self.userinfo),
                Route("POST", "/oidc/userinfo", self.userinfo),
                Route("GET", "/oidc/logout", self.end_session), Route("POST", "/oidc/logout", self.end_session)]

    # -- discovery ---------------------------------------------------------------------------------

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response({
            "issuer": self.issuer, "authorization_endpoint": f"{self.issuer}/oidc/authorize",
            "token_endpoint": self.token_url, "userinfo_endpoint": f"{self.issuer}/oidc/userinfo",
            "jwks_uri": f"{self.issuer}/oidc/jwks", "response_types_supported": ["code"],
            "end_session_endpoint": f"{self.issuer}/oidc/logout",
            "response_modes_supported": ["query", "form_post"], "grant_types_supported": ["authorization_code"],
            # RFC 9207 section 3: every answer at the redirect_uri carries `iss`; a relying party
            # checks it (mix-up defence) only when this says so (absent: false).
            "authorization_response_iss_parameter_supported": True,
            "subject_types_supported": ["public"], "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"], "scopes_supported": ["openid", "profile", "email", "groups"],
            # OIDC Core 6: no request objects (request_uri_parameter_supported is true when omitted).
            "request_parameter_supported": False, "request_uri_parameter_supported": False,
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS256", "ES256"],
            "claims_parameter_supported": True, "acr_values_supported": list(ACR_VALUES),
            "claims_supported": ["sub", "name", "preferred_username", "email", "groups", "nonce", "auth_time", "acr"]})

    async def jwks(self, request: web.Request) -> web.Response:
        return web.json_response(self.public, headers={"Cache-Control": "max-age=300"})

    # -- authorization -----------------------------------------------------------------------------

    def check(self, query) -> dict:
        """The pending authorization for a request's parameters (a multidict of strings):
        :class:`Refused` (a page) while its client and ``redirect_uri`` are not known to be good,
        :class:`AuthorizationError` (answered at that ``redirect_uri``) after; no I/O."""
        if any(len(v) > (MAX_HINT if k == "id_token_hint" else MAX_PARAM) for k, v in query.items()):
            raise Refused("login.parameter_too_large", "an authorization parameter")
        # Which client and where to answer must be beyond doubt before anything is sent there.
        repeated = _repeated(query, frozenset({"client_id", "redirect_uri"}))
        if repeated:
            raise Refused("login.malformed", f"{' and '.join(repeated)} given more than once")
        client = self.clients.get(query.get("client_id", ""))
        if client is None:
            raise Refused("oidc.unknown_client", query.get("client_id", "")[:100])
        redirect_uri = query.get("redirect_uri", "")
        if redirect_uri not in client.redirect_uris:
            raise Refused("oidc.redirect_uri_not_registered", redirect_uri[:200])
        # From here on errors go to the redirect_uri (RFC 6749 4.1.2.1, OIDC Core 3.1.2.6), by the
        # requested response mode when it is one of ours, else by this code flow's default (query).
        mode = query.get("response_mode", "query")
        challenge = query.get("code_challenge", "")
        pending = {"protocol": "oidc", "client_id": client.client_id, "redirect_uri": redirect_uri,
                   "state": query.get("state", ""), "nonce": query.get("nonce", ""), "challenge": challenge,
                   "mode": mode if mode in ("query", "form_post") else "query", "scope": query.get("scope", "")}

        def error(code: str, description: str, reason: str = "") -> AuthorizationError:
            return AuthorizationError(code, description, pending, reason)

        repeated = _repeated(query, AUTHORIZATION_PARAMETERS)
        if repeated:
            raise error("invalid_request", f"{', '.join(repeated)} given more than once", "oidc.repeated_parameter")
        if mode not in ("query", "form_post"):
            raise error("invalid_request", "response_mode must be query or form_post", "oidc.unsupported_response_mode")
        # OIDC Core 6.1, 6.2: a provider without request objects MUST say so, not ignore them.
        if "request" in query:
            raise error("request_not_supported", "request objects are not supported")
        if "request_uri" in query:
            raise error("request_uri_not_supported", "request_uri is not supported")
        if "response_type" not in query:
            raise error("invalid_request", "response_type is missing", "oidc.unsupported_response_type")
        if query["response_type"] != "code":
            raise error("unsupported_response_type", "only the code flow (response_type=code) is supported")
        if "openid" not in query.get("scope", "").split(" "):  # RFC 6749 3.3: spaces only, not U+0085
            raise error("invalid_scope", "the openid scope is required", "oidc.scope_missing_openid")
        # RFC 7636 4.4.1: a missing challenge or another transform is invalid_request.
        if not _S256_CHALLENGE.fullmatch(challenge):  # a BASE64URL SHA-256: anything else never matches a verifier
            raise error("invalid_request", "code_challenge (PKCE, S256) is required", "oidc.pkce_required")
        if query.get("code_challenge_method") != "S256":
            raise error("invalid_request", "code_challenge_method must be S256", "oidc.pkce_required")
        # OIDC Core 3.1.2.1: prompt is a space-separated list; none may not come with another value.
        prompts = set(query.get("prompt", "").split(" ")) - {""}
        if "none" in prompts and len(prompts) > 1:
            raise error("invalid_request", "prompt=none with another value", "oidc.prompt_invalid")
        max_age = query.get("max_age")
        if max_age is not None and not _MAX_AGE.fullmatch(max_age):
            raise error("invalid_request", "max_age is not a number of seconds", "oidc.max_age_invalid")
        pending.update(force_authn="login" in prompts, prompt_none="none" in prompts,
                       max_age=int(max_age) if max_age is not None else None)
        # Who the answer may be about (OIDC Core 3.1.2.1 id_token_hint, 5.5.1 a claims "sub" with
        # a value) and how the user must have signed in (5.5.1.1 an essential "acr"): checked
        # when the answer is made (complete), and a session of another user does not answer.
        # An empty parameter is an absent one (RFC 6749 3.1).
        try:
            subjects, essential_acr = _claims_request(query.get("claims") or None)
        except ValueError as exc:
            raise error("invalid_request", f"claims: {exc}", "oidc.claims_invalid") from None
        hint = query.get("id_token_hint")
        if hint:
            claims = self._verified_hint(hint)
            if claims is None:  # expired is fine (it only names the user); ours and intact it must be
                raise error("invalid_request", "id_token_hint is not an id_token of this provider",
                            "oidc.id_token_hint_invalid")
            subjects.append({claims["sub"]})
        if subjects:
            allowed = set.intersection(*subjects)
            if not allowed:
                raise error("invalid_request", "id_token_hint and claims name different users", "oidc.claims_invalid")
            pending["principals"] = sorted(allowed)
        if essential_acr is not None:
            if not set(essential_acr) & set(ACR_VALUES):  # no sign-in here could: a failed authentication
                raise error("unmet_authentication_requirements", "no sign-in method of this provider meets the "
                            "essential acr", "oidc.acr_unmet")
            pending["acr"] = essential_acr
        return pending

    async def authorize(self, request: web.Request) -> web.StreamResponse:
        """``GET`` (the query) or ``POST`` (a form body, alone: OIDC Core 3.1.2.1) ``/oidc/authorize``.
        A POST comes from another site, so the browser's ``SameSite=Lax`` session cookie is not
        sent with it: the request waits at ``/login`` (a GET, which gets the cookie), where a
        session answers it or ``prompt=none`` declines it, as it would have here."""
        if request.method == "POST":
            form = await read_form(request)  # gateway.http.forms: the size and time limits of /login
            if not all(isinstance(v, str) for v in form.values()):
                raise Refused("login.malformed", "a file in an authorization request")
            params = MultiDict(form.items())
        else:
            params = request.query
        try:
            pending = self.check(params)
        except Refused as exc:
            return self.web.refused(request, exc)
        except AuthorizationError as exc:
            log.info("oidc authorization answered with error=%s reason=%s (%s) client=%s", exc.error, exc.reason,
                     exc.description, exc.pending["client_id"])
            return self.error_answer(exc.pending, exc.error, exc.description)
        if request.method == "POST":
            return await self.web.wait_at_login(request, pending, 600)
        return await self.web.begin(request, pending, 600)

    def answer_target(self, pending: dict) -> OidcClient:
        """The client to answer *pending* for, as configured now: a reload while the user signed
        in may have removed it (``oidc.unknown_client``) or its ``redirect_uri``
        (``oidc.redirect_uri_not_registered``); the answer, a code or an error, would then go to
        an address no longer registered."""
        client = self.clients.get(pending["client_id"])
        if client is None:
            raise Refused("oidc.unknown_client", pending["client_id"][:100])
        if pending["redirect_uri"] not in client.redirect_uris:
            raise Refused("oidc.redirect_uri_not_registered", pending["redirect_uri"][:200])
        return client

    @staticmethod
    def redirect_of(pending: dict) -> str | None:
        """Where *pending* is answered by a redirect (``response_mode=query``); ``form_post``
        answers with a page."""
        return pending["redirect_uri"] if pending["mode"] == "query" else None

    async def login_required(self, request: web.Request, pending: dict, *, parked: bool = False) -> web.StreamResponse:
        """``prompt=none`` and no session may answer: the RP is told, no page is shown (a redirect,
        nothing signed: *parked* or not, nothing is spent)."""
        return self.error_answer(pending, "login_required")

    async def temporarily_unavailable(self, request: web.Request, pending: dict) -> web.StreamResponse:
        """The request cannot be served now (a spent budget, the session store or the directory
        down): the RP is told at its validated ``redirect_uri`` (RFC 6749 section 4.1.2.1), no
        page is shown."""
        return self.error_answer(pending, "temporarily_unavailable")

    def error_answer(self, pending: dict, error: str, description: str = "") -> web.Response:
        fields = [("error", error)] + ([("error_description", description)] if description else [])
        return self._answer(pending, fields)

    async def complete(self, request: web.Request, pending: dict, session) -> web.StreamResponse:
        self.answer_target(pending)  # before a code exists
        identity = session.identity
        # No code for another user than the request names (OIDC Core 5.5.1: "MUST NOT reply with
        # an ID Token or Access Token for a different user"), from a live session (only when
        # prompt=none declined nothing: web.reusable) or after a new sign-in; the new session
        # stays, as SAML's subject_mismatch leaves it.
        principals = pending.get("principals")
        if principals is not None and identity.subject not in principals:
            return self._refuse(pending, "login_required", "the user signed in is not the one the request names",
                                "oidc.subject_mismatch", identity)
        # An essential acr the sign-in does not meet is a failed authentication (5.5.1.1).
        acr = pending.get("acr")
        if acr is not None and authn_context_class(identity) not in acr:
            return self._refuse(pending, "unmet_authentication_requirements",
                                "the sign-in does not meet the essential acr", "oidc.acr_unmet", identity)
        code = secrets.token_urlsafe(32)
        # Only what the token endpoint reads (not state, mode, prompt, max_age, principals, acr).
        grant = {**{name: pending[name] for name in GRANT_FIELDS},
                 "identity": identity_to_json(session.identity), "sid": session.index}
        store = self.web.sessions.store
        await store.call(store.put_pending, "code:" + _digest(code), grant,
                         time.time() + self.settings.oidc.code_lifetime)
        return self._answer(pending, [("code", code)])

    def _refuse(self, pending: dict, error: str, description: str, reason: str, identity: Identity) -> web.Response:
        """*error* at the ``redirect_uri`` for a request the signed-in user's session may not
        answer; logged with *reason* and the user."""
        log.warning("oidc authorization answered with error=%s reason=%s (%s; signed in: %s, by %s) client=%s",
                    error, reason, description, printable(identity.username[:100]), authn_context_class(identity),
                    pending["client_id"])
        return self.error_answer(pending, error, description)

    def _answer(self, pending: dict, fields: list[tuple[str, str]]) -> web.Response:
        """*fields* (with ``iss`` and ``state``) to the validated ``redirect_uri``, by the
        request's response mode; :class:`Refused` when a reload removed it."""
        self.answer_target(pending)
        answer = fields + [("iss", self.issuer)] + ([("state", pending["state"])] if pending["state"] else [])
        if pending["mode"] == "form_post":
            return self.web.auto_post(pending["redirect_uri"], answer)
        separator = "&" if "?" in pending["redirect_uri"] else "?"
        # Returned, not raised: /login sets the new session cookie on this very response.
        return web.Response(status=303, headers={"Location": pending["redirect_uri"] + separator + urlencode(answer),
                                                 "Cache-Control": "no-store"})

    # -- token ---------------------------------------------------------------------------------------

    async def _client(self, request: web.Request, form) -> OidcClient | None:
        """The authenticated client (secret in Basic or the body, or a signed JWT), or ``None``."""
        try:
            basic, raw = _basic(request)
        except MalformedCredentials:  # two Authorization headers: no client
            return None
        if basic:
            return self._basic_client(raw) if raw is not None else None
        if form.get("client_assertion_type") == ASSERTION_TYPE:
            return await self._assertion_client(str(form.get("client_assertion", "")))
        return self._secret_client([(str(form.get("client_id", "")), str(form.get("client_secret", "")))])

    def _failure_key(self, request: web.Request, form) -> str:
        """The registered client a token request claims to be, whose budget of failed client
        authentications it spends (:attr:`auth_failures`, with the client address), or ``""``
        for any other claim: clients of one cloud share an address, and one's wrong secret
        spent the budget of all (review of the login door); ids made up do not buy budgets (all
        share the one of ``""``). The claim is not verified: one who claims another's id spends
        that id's budget at this address, as guessing its secret must."""
        try:
            basic, raw = _basic(request)
        except MalformedCredentials:
            return ""
        if basic:
            if raw is None:
                return ""
            user = unquote_plus(raw.partition(":")[0])  # as _basic_client reads it, either way
            if user in self.clients:
                return user
            return next((client_id for client_id in self.clients if raw.startswith(client_id + ":")), "")
        if form.get("client_assertion_type") == ASSERTION_TYPE:
            try:  # the unverified iss, as _assertion_client reads it to choose the key
                assertion = str(form.get("client_assertion", ""))[:MAX_ASSERTION_BYTES]
                payload = assertion.split(".")[1]
                claimed = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["iss"]
            except (KeyError, ValueError, IndexError, TypeError, RecursionError):
                return ""
        else:
            claimed = form.get("client_id")
        return claimed if isinstance(claimed, str) and claimed in self.clients else ""

    async def _authenticated(self, request: web.Request, form) -> OidcClient | None:
        """:meth:`_client`, when the request names no other: a ``client_id`` in the body must be
        the authenticated client's (RFC 6749 section 3.2.1, RFC 7523 section 3), and a request
        using more than one method (Basic, a secret or an assertion in the body) is refused
        (section 2.3)."""
        client = await self._client(request, form)
        if client is None:
            return None
        named = form.get("client_id")
        if named is not None and named != client.client_id:
            log.warning("oidc: client %s named client_id %s in the body: invalid_client",
                        printable(client.client_id[:100]), printable(str(named)[:100]))
            return None
        methods = _basic(request)[0] + ("client_secret" in form) + ("client_assertion" in form)
        return client if methods == 1 else None

    def _basic_client(self, raw: str) -> OidcClient | None:
        """``client_secret_basic``. RFC 6749 section 2.3.1 form-encodes id and secret before
        joining them with ``:``, but common clients (Authlib, many others) send them as they are,
        so a ``+`` or ``%`` in a secret would make them fail: both readings are tried, the
        form-decoded one and the raw one (its client id is a registered one followed by ``:``, as
        an id may hold ``:``). Every candidate is compared in constant time; the answer says
        nothing about which failed."""
        encoded_id, colon, encoded_secret = raw.partition(":")
        if not colon:
            return None
        pairs = [(unquote_plus(encoded_id), unquote_plus(encoded_secret))]
        pairs += [(client_id, raw[len(client_id) + 1:]) for client_id in self.clients if raw.startswith(client_id + ":")]
        return self._secret_client(pairs)

    def _secret_client(self, pairs: list[tuple[str, str]]) -> OidcClient | None:
        """The client one of *pairs* (client id, secret) authenticates, or ``None``. All of them
        are compared (no early exit), each in constant time."""
        found = None
        for client_id, secret in pairs:
            client = self.clients.get(client_id)
            if client is None or client.client_secret is None:
                continue
            if same(secret, client.client_secret.reveal()) and found is None:
                found = client
        return found

    async def _assertion_client(self, assertion: str) -> OidcClient | None:
        """``private_key_jwt`` (RFC 7523 section 3): a JWT signed by the client's registered key,
        ``iss`` = ``sub`` = client id, ``aud`` this token endpoint or issuer, unexpired, ``jti``
        used once."""
        if len(assertion) > MAX_ASSERTION_BYTES:
            return None
        try:
            # The unverified `iss` only chooses which registered key must have signed.
            payload = assertion.split(".")[1]
            issuer = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["iss"]
            claims = jwt.decode(assertion, self.client_keys[issuer], algorithms=["RS256", "ES256"]).claims
        except (JoseError, KeyError, ValueError, IndexError, TypeError, RecursionError):  # deep JSON: not a client
            return None
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        exp, now, skew = claims.get("exp"), time.time(), self.settings.clock_skew
        # exp, nbf and iat must be finite numbers: a NaN passes both bounds of exp (every
        # comparison with it is false) and made the jti's expiry NaN (a 500 with Redis).
        if (claims.get("iss") != issuer or claims.get("sub") != issuer
                or not all(isinstance(a, str) for a in audiences) or not {self.token_url, self.issuer} & set(audiences)
                or not _finite_number(exp) or exp < now - skew
                or exp > now + MAX_ASSERTION_LIFETIME + skew
                or not isinstance(claims.get("jti"), str)
                or any(claims.get(name) is not None and not _finite_number(claims[name]) for name in ("nbf", "iat"))
                or (claims.get("nbf") is not None and claims["nbf"] > now + skew)):
            return None
        # Remembered until it expires: a captured assertion is refused for as long as it is valid.
        if not await self.web.sessions.afirst_use("oidc-jti", f"{issuer} {claims['jti']}", exp - now + skew):
            return None
        return self.clients.get(issuer)

    async def token(self, request: web.Request) -> web.Response:
        form = await read_form(request)
        repeated = _repeated(form, TOKEN_PARAMETERS)
        if repeated:  # RFC 6749 3.1 and 5.2: a repeated parameter is invalid_request
            return _error("invalid_request", description=f"{', '.join(repeated)} given more than once")
        address = self.web.client_key(request)
        claimed = self._failure_key(request, form)
        key = f"{address} {claimed}"
        # A token is spent before any secret is compared and given back when the client
        # authenticates: checked first and spent only on a failure, concurrent wrong secrets in
        # two workers all passed the check on the last token (review of stop 46: 2 comparisons on
        # a budget of 1 for 16 addresses of 40).
        wait = await self.auth_failures.spend(key)  # a lock held on the store: waited for off the loop
        if wait:  # past the budget, right or wrong is not told
            if self.auth_failures.first_refusal(key):
                log.warning("oidc token requests refused: reason=oidc.too_many_client_failures client=%s "
                            "client_id=%s (%d failed client authentications a minute per address and client, "
                            "burst %d)", address, printable(claimed[:100]) or "(unregistered)",
                            round(self.auth_failures.rate * 60), self.auth_failures.burst)
            # (logged once per address, client and spent budget, above: not a line per request of a flood)
            response = _error("invalid_request", 429, "too many failed client authentications; try again later",
                              logged=True)
            response.headers["Retry-After"] = str(math.ceil(wait))
            return response
        client = await self._authenticated(request, form)
        if client is None:  # the token stays spent
            log.warning("oidc token request refused: reason=oidc.invalid_client client_id=%s client=%s",
                        printable(_claimed_client(request, form)[:100]), address)
            return _error("invalid_client", 401)
        await self.auth_failures.give_back(key)  # a success spends nothing
        if "grant_type" not in form:
            return _error("invalid_request", description="grant_type is missing")
        if form.get("grant_type") != "authorization_code":
            return _error("unsupported_grant_type")
        code = str(form.get("code", ""))[:MAX_PARAM]
        if not code or "redirect_uri" not in form:  # RFC 6749 4.1.3: both required
            return _error("invalid_request", description="code and redirect_uri are required")
        store, code_key = self.web.sessions.store, _digest(code)
        # Another client's code is refused before it is taken (RFC 6749 4.1.3: the code must have
        # been issued to the authenticated client): it stays redeemable by its own client, and
        # no tombstone names a token of it.
        grant = store.get_pending("code:" + code_key, time.time())
        if grant is not None and grant["client_id"] != client.client_id:
            log.warning("oidc: client %s presented a code issued to another client: invalid_grant",
                        printable(client.client_id[:100]))
            return _error("invalid_grant", description="unknown, used or expired code")
        if grant is not None:
            # Checked before the code is taken: a request without the right verifier (one who
            # read the code somewhere, the case PKCE is for) or with another redirect_uri must
            # not use it up for the client it was issued to.
            if form.get("redirect_uri") != grant["redirect_uri"]:
                return _error("invalid_grant", description="redirect_uri differs")
            verifier = form.get("code_verifier", "")
            if not isinstance(verifier, str) or not _CODE_VERIFIER.fullmatch(verifier):
                # (a verifier of one character, "a", redeemed the code its challenge was made for)
                return _error("invalid_grant", description="code_verifier is not 43 to 128 unreserved characters")
            computed = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
            if not same(computed, grant["challenge"]):
                return _error("invalid_grant", description="PKCE verifier does not match")
        grant = await store.call(store.take_pending, "code:" + code_key, time.time()) if grant is not None else None
        if grant is None:
            await self._code_replayed(code_key, client.client_id)
            return _error("invalid_grant", description="unknown, used or expired code")
        # The code is redeemed now (whatever follows): the tombstone names the access token it is
        # about to give and the client it was issued to, so that a second redemption by that
        # client can revoke it (RFC 6749 4.1.2), and is kept while either the code or that token
        # could still be in use.
        access = secrets.token_urlsafe(_ACCESS_TOKEN_BYTES)
        lifetime = int(self.settings.oidc.token_lifetime)
        await store.call(store.put_pending, "code-used:" + code_key,
                         {"at": [_digest(access)], "client_id": client.client_id},
                         time.time() + max(self.settings.oidc.code_lifetime, lifetime) + 1)
        identity = identity_from_json(grant["identity"])
        # The session the code was issued in must still be there: a code given just before the
        # user signed out (here, by an RP's or a SAML logout, or an account check) made an
        # id_token for a session that was over, and OIDC has no back channel to take it back.
        session = await self.web.sessions.aby_index(grant["sid"])
        if session is None or session.identity.subject != identity.subject:
            log.warning("oidc: a code of a session that has ended since (client=%s): invalid_grant",
                        printable(client.client_id[:100]))
            return _error("invalid_grant", description="the session this code was issued in has ended")
        now = int(time.time())
        # sid: the client's own name for the session (SessionManager.public_sid); the grant and
        # the access token keep the index, which finds the session here
        claims = {"iss": self.issuer, "sub": identity.subject, "aud": client.client_id, "iat": now,
                  "exp": now + lifetime, "auth_time": int(identity.authenticated_at),
                  "sid": self.web.sessions.public_sid(grant["sid"], client.client_id),
                  "acr": authn_context_class(identity),
                  **self._profile(identity, grant["scope"])}
        if grant["nonce"]:
            claims["nonce"] = grant["nonce"]
        claims["at_hash"] = base64.urlsafe_b64encode(hashlib.sha256(access.encode()).digest()[:16]).decode().rstrip("=")
        id_token = await asyncio.to_thread(jwt.encode, {"alg": "RS256", "kid": self.signing.kid}, claims, self.signing)
        await store.call(store.put_pending, "at:" + _digest(access),
                         {"identity": grant["identity"], "scope": grant["scope"], "sid": grant["sid"],
                          "client_id": client.client_id},
                         now + lifetime)
        if store.get_pending(_replay_mark(code_key, client.client_id), time.time()) is not None:
            # A second redemption came while this one ran, before its tombstone named the token
            # or before the token was stored: it could not revoke it, so it is not given.
            await store.call(store.take_pending, "at:" + _digest(access), time.time())
            log.warning("oidc: code redeemed twice at once (client=%s): no token given", client.client_id)
            return _error("invalid_grant", description="unknown, used or expired code")
        return web.json_response({"access_token": access, "token_type": "Bearer", "expires_in": lifetime,
                                  "id_token": id_token, "scope": grant["scope"]},
                                 headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    async def _code_replayed(self, code_key: str, client_id: str) -> None:
        """A code that is not (or no longer) redeemable was presented by the authenticated client
        *client_id*: when it was redeemed before, by that same client, the access token issued
        from it is revoked (RFC 6749 section 4.1.2: "SHOULD revoke ... all tokens previously
        issued based on that authorization code"). Another client presenting it gets
        ``invalid_grant`` and changes nothing: it could otherwise burn a code it read somewhere
        and revoke the token its own client was given. The mark left first (per client) tells a
        redemption by that client still running that it must not give its token (it checks after
        storing it; see :meth:`token`)."""
        store, now = self.web.sessions.store, time.time()
        await store.call(store.put_pending, _replay_mark(code_key, client_id), {},
                         now + max(self.settings.oidc.code_lifetime, 60))
        tombstone = store.get_pending("code-used:" + code_key, now)
        # (A tombstone an earlier version wrote names no client: it is taken as this one's.)
        if tombstone is None or tombstone.get("client_id", client_id) != client_id:
            return
        revoked = [digest for digest in tombstone.get("at", [])
                   if await store.call(store.take_pending, "at:" + digest, now) is not None]
        if revoked:
            log.warning("oidc: an authorization code was redeemed again: %d access token(s) issued from it revoked",
                        len(revoked))

    @staticmethod
    def _profile(identity, scope: str) -> dict:
        scopes = set(scope.split(" "))
        claims: dict = {}
        if "profile" in scopes:
            claims.update(name=identity.display_name or identity.username, preferred_username=identity.username)
        if "email" in scopes and identity.email:
            claims["email"] = identity.email
        if "groups" in scopes:
            claims["groups"] = list(identity.groups)
        return claims

    async def userinfo(self, request: web.Request) -> web.Response:
        try:
            scheme, _, token = (single_authorization(request.headers) or "").partition(" ")
        except MalformedCredentials:
            scheme = token = ""
        record = None
        token = token.strip()
        if scheme.lower() == "bearer" and _ACCESS_TOKEN.fullmatch(token):  # else not one of ours: not looked up
            record = self.web.sessions.store.get_pending("at:" + _digest(token), time.time())
        identity = await self._userinfo_identity(record, request) if record is not None else None
        if identity is None:
            # RFC 6750 3.1: a request without a token gets the scheme alone, no error code
            challenge = 'Bearer error="invalid_token"' if "Authorization" in request.headers else "Bearer"
            return web.json_response({"error": "invalid_token"}, status=401,
                                     headers={"WWW-Authenticate": challenge, "Cache-Control": "no-store"})
        return web.json_response({"sub": identity.subject, **self._profile(identity, record["scope"])},
                                 headers={"Cache-Control": "no-store"})


    async def _userinfo_identity(self, record: dict, request: web.Request) -> Identity | None:
        """The identity to answer for an access token: that of the live session it was issued in,
        its account and the chain's policy checked again (:meth:`.web.LoginDoor.recheck`; the
        attempt's client is the relying party's server); ``None`` when the token's client is no
        longer registered, the session is over or the account is gone (that session then ends:
        no browser is here to take the Single Logout round, so its participants are not told)."""
        # The client must still be registered: a reload that removes one (a relying party
        # retired or compromised) ends its tokens here as it ends its codes at /oidc/token; they
        # answered until they expired, up to `token_lifetime` (a day). A token recorded before
        # tokens named their client (an earlier version, up to a day ago) is taken as it was.
        client_id = record.get("client_id")
        if client_id is not None and client_id not in self.clients:
            log.warning("oidc userinfo refused: reason=oidc.unknown_client (an access token of client %s, which is "
                        "no longer registered)", printable(str(client_id)[:100]))
            return None
        sessions = self.web.sessions
        session = await sessions.aby_index(record.get("sid"))
        if session is None or session.identity.subject != identity_from_json(record["identity"]).subject:
            return None
        checked = await self.web.recheck(session, request)
        if checked is None:
            await sessions.aend_key(session.key, session.index)
            return None
        return checked.identity

    # -- RP-initiated logout -------------------------------------------------------------------------

    def _verified_hint(self, token: str) -> dict | None:
        """The claims of an id_token this provider signed (current, next or previous key) with
        its issuer and a subject, expired or not (a hint only names a user); else ``None``."""
        try:
            claims = jwt.decode(token, self.own_keys, algorithms=["RS256"]).claims
        except (JoseError, ValueError, TypeError, RecursionError):
            return None
        if claims.get("iss") != self.issuer or not isinstance(claims.get("sub"), str) or not claims["sub"]:
            return None
        return claims

    def _hint(self, token: str) -> dict:
        claims = self._verified_hint(token)
        if claims is None:
            raise Refused("oidc.id_token_hint_invalid", "not an id_token signed by this provider")
        return claims

    def check_logout(self, params) -> tuple[dict | None, dict | None]:
        """The hint's claims and where to go afterwards (``client_id``, the registered ``uri``,
        ``state``: :meth:`logout_target`), or :class:`Refused` (no I/O)."""
        if any(len(v) > (MAX_HINT if k == "id_token_hint" else MAX_PARAM) for k, v in params.items()):
            raise Refused("login.parameter_too_large", "a logout parameter")
        hint = params.get("id_token_hint", "")
        claims = self._hint(hint) if hint else None
        audience = claims.get("aud", []) if claims else []
        audience = [audience] if isinstance(audience, str) else list(audience)
        client_id = params.get("client_id", "")
        if claims and client_id and client_id not in audience:
            raise Refused("oidc.client_mismatch", client_id[:100])
        uri = params.get("post_logout_redirect_uri", "")
        if not uri or claims is None:
            return claims, None
        client = self.clients.get(client_id or (audience[0] if len(audience) == 1 else ""))
        if client is None:
            raise Refused("oidc.unknown_client", client_id[:100])
        if uri not in client.post_logout_redirect_uris:
            raise Refused("oidc.post_logout_redirect_uri_not_registered", uri[:200])
        return claims, {"client_id": client.client_id, "uri": uri, "state": params.get("state", "")}

    def logout_target(self, target: dict) -> str | None:
        """Where a logout the user confirmed goes (:meth:`.web.LoginDoor.confirm_logout`): the
        ``post_logout_redirect_uri`` kept when it was asked, if it is still one of its client's
        (a reload may have removed it; then the signed-out page), with its ``state``."""
        client = self.clients.get(target.get("client_id", ""))
        uri = target.get("uri", "")
        if client is None or uri not in client.post_logout_redirect_uris:
            return None
        return _with_state(uri, target.get("state", ""))

    def _own_session(self, claims: dict, session) -> bool:
        """Whether the hint belongs to *session* (the browser's): its ``sid`` is the session's,
        as the hint's client was told it (:meth:`.sessions.SessionManager.public_sid`), or, for
        a hint without one, its ``sub`` is the session's user."""
        sid = claims.get("sid")
        if session.identity.subject != claims["sub"]:
            return False
        if sid is None:
            return True
        audience = claims.get("aud")
        if isinstance(audience, list):
            audience = audience[0] if len(audience) == 1 else None
        return isinstance(sid, str) and isinstance(audience, str) and \
            same(sid, self.web.sessions.public_sid(session.index, audience))

    async def end_session(self, request: web.Request) -> web.StreamResponse:
        """RP-initiated logout. Only the browser's own session is ever ended, and without asking
        only when the hint is of that session (OpenID Connect RP-Initiated Logout 1.0 section
        2: the user is asked when the hint is not of the current session). A POST that came
        without the session cookie (a relying party's page posting across sites: the
        ``SameSite=Lax`` cookie stays behind) is continued at a GET, which carries it."""
        if request.method == "POST":
            form = await read_form(request)
            params = {k: v for k, v in form.items() if isinstance(v, str)}
        else:
            held = request.query.get("held")
            if held is not None:  # a POST continued here; used once (a reload asks nothing of it)
                record = await self.web.sessions.arelease(held[:64])
                params = record.get("oidc_logout", {}) if record is not None else {}
            else:
                params = {k: v for k, v in request.query.items()}
        try:
            claims, target = self.check_logout(params)
        except Refused as exc:
            return self.web.refused(request, exc)
        after = self.logout_target(target) if target is not None else None
        if request.method == "POST" and request_cookie(request, self.web.cookie) is None:  # read as the door reads it
            await self.web.prepay_park()  # its token, off the event loop
            key = await self.web.sessions.ahold({"oidc_logout": params}, 600)
            raise web.HTTPSeeOther(f"/oidc/logout?{urlencode({'held': key})}", headers={"Cache-Control": "no-store"})
        session = await self.web.asession(request)
        if claims is None:  # nothing proves the request comes from the relying party: ask the user
            if session is None:
                return self.web.html(self.web.pages.message("signed_out"))
            raise web.HTTPSeeOther("/login", headers={"Cache-Control": "no-store"})  # "signed in as", Sign out
        if session is not None and self._own_session(claims, session):
            response = await self.web.logout_round(request, {session.key: session.index}, after)
            self.web.drop_cookie(response)
            return response
        # The hint is not of this browser's session (another browser's, another user's, an old
        # one's, or this browser has none): the session it names is not ended from here, whoever
        # holds the hint (id_tokens travel in logout URLs: history, proxy logs).
        log.info("oidc logout: the id_token_hint (client %s) is not of the browser's session: %s",
                 printable(str(target["client_id"] if target else claims.get("aud"))[:100]),
                 "the user is asked" if session is not None else "it has none, nothing is ended")
        if session is None:  # nothing to end here: back to the relying party, or "signed out"
            if after is not None:
                return web.Response(status=303, headers={"Location": after, "Cache-Control": "no-store"})
            return self.web.html(self.web.pages.message("signed_out"))
        return await self.web.confirm_logout(request, session, target, after)


def _claim_request(member: dict | None, name: str) -> dict | None:
    """The request for the claim *name* in a ``claims`` member (OIDC Core 5.5.1): ``None`` when
    not requested (or requested with ``null``: no condition), else ``{"essential", "allowed"}``
    (``allowed``: the set ``value`` or ``values`` name, ``None`` without either). ``ValueError``
    for what 5.5.1 does not define: a request that is not an object, ``essential`` not a
    boolean, ``value`` not a string, ``values`` not a short list of strings, or both."""
    request = member.get(name) if member is not None else None
    if request is None:
        return None
    if not isinstance(request, dict):
        raise ValueError(f"the request for {name} is neither null nor an object")
    essential = request.get("essential", False)
    if not isinstance(essential, bool):
        raise ValueError(f"{name}: essential is not a boolean")
    if "value" in request and "values" in request:
        raise ValueError(f"{name}: both value and values")
    allowed = None
    if "value" in request:
        if not isinstance(request["value"], str):
            raise ValueError(f"{name}: value is not a string")
        allowed = {request["value"]}
    elif "values" in request:
        values = request["values"]
        if (not isinstance(values, list) or not 0 < len(values) <= MAX_CLAIM_VALUES
                or not all(isinstance(v, str) for v in values)):
            raise ValueError(f"{name}: values is not a list of up to {MAX_CLAIM_VALUES} strings")
        allowed = set(values)
    return {"essential": essential, "allowed": allowed}


def _claims_request(text: str | None) -> tuple[list[set[str]], list[str] | None]:
    """What a ``claims`` parameter (OIDC Core 5.5; at most :data:`MAX_PARAM` characters, like
    every parameter) asks that this provider must honour: the sets of subjects a ``sub`` with
    ``value``/``values`` allows (in ``id_token`` or ``userinfo``: the same subject either way),
    and the values an essential ``id_token`` ``acr`` allows (``None``: not asked; a voluntary
    one is not a condition). Other claims are not conditions either (the scopes decide what is
    returned). ``ValueError`` for a parameter that is not a JSON object of objects (deep
    nesting included)."""
    if text is None:
        return [], None
    try:
        claims = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError("not JSON") from None
    if not isinstance(claims, dict):
        raise ValueError("not a JSON object")
    members = {}
    for name in ("id_token", "userinfo"):
        member = claims.get(name)
        if member is not None and not isinstance(member, dict):
            raise ValueError(f"{name} is not an object")
        members[name] = member
    subjects = []
    for member in members.values():
        sub = _claim_request(member, "sub")
        if sub is not None and sub["allowed"] is not None:
            subjects.append(sub["allowed"])
    acr = _claim_request(members["id_token"], "acr")
    essential = acr is not None and acr["essential"] and acr["allowed"] is not None
    return subjects, (sorted(acr["allowed"]) if essential else None)


def _with_state(uri: str, state: str) -> str:
    """*uri* (a registered ``post_logout_redirect_uri``) with the request's ``state`` in its
    query, before a fragment (RFC 3986 section 3: appended after a ``#`` it was part of the
    fragment, which the browser never sends: the relying party did not get it)."""
    if not state:
        return uri
    base, hash_, fragment = uri.partition("#")
    return base + ("&" if "?" in base else "?") + urlencode({"state": state}) + hash_ + fragment


def _replay_mark(code_key: str, client_id: str) -> str:
    """The store key of the mark a presentation of a used code by *client_id* leaves."""
    return "code-replayed:" + _digest(f"{code_key} {client_id}")


def _finite_number(value) -> bool:
    """A JSON number that is a number: not a boolean, not NaN or an infinity (Python's JSON
    reader takes ``NaN`` and ``Infinity``, which pass or fail every comparison), and an integer
    no float can hold (``10**400``: math.isfinite raised OverflowError, a 500) is none either."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _client_key(client: OidcClient) -> RSAKey | ECKey:
    """The client's registered public key (a PEM key or certificate), RSA or EC."""
    data = client.public_key.read_bytes()
    if b"CERTIFICATE" in data:
        public = x509.load_pem_x509_certificate(data).public_key()
    else:
        public = serialization.load_pem_public_key(data)
    return (ECKey if isinstance(public, ec.EllipticCurvePublicKey) else RSAKey).import_key(public)
