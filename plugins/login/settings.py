"""Settings of the ``login`` plugin (``login:`` in conf.d): the public URL, sessions, the pages'
strings, the optional TLS listener and the SAML service providers.

Unknown keys are errors; the SP's request-signing certificate is a path read at start-up.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from gateway import ConfigPath, PluginSettings, Secret
from gateway.settings import redis_url, shown_url

__all__ = ["LoginSettings", "OidcClient", "OidcSettings", "SamlServiceProvider", "SamlSettings", "SessionSettings", "TlsListenerSettings", "WsFedRelyingParty", "WsFedSettings"]

#: The NameID formats an SP may ask for, by their short names (SAML core section 8.3).
NAMEID_FORMATS = {
    "unspecified": "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified",
    "emailAddress": "urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress",
    "persistent": "urn:oasis:names:tc:SAML:2.0:nameid-format:persistent",
    "transient": "urn:oasis:names:tc:SAML:2.0:nameid-format:transient",
}
IDENTITY_FIELDS = Literal["username", "subject", "email", "display_name", "groups"]


#: A ``{name}`` in a page string, which the page replaces with a value.
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

#: The host (and port) of a plain http:// URL: the loopback itself, nothing that starts like it.
_LOOPBACK = re.compile(r"(127\.0\.0\.1|localhost|\[::1\])(:[0-9]{1,5})?", re.IGNORECASE)


def _https_or_loopback(url: str, *, fragment: bool = True) -> str:
    """*url* if it is https://, or http:// to the loopback itself (for tests). The host is read as
    a browser reads it (urlsplit), not by its prefix: ``http://localhost.evil.example/``,
    ``http://127.0.0.1.nip.io/`` and ``http://127.0.0.1@evil.example/`` are other hosts. Not
    *fragment*: a ``#`` is refused (RFC 6749 section 3.1.2 for redirect URIs; an ACS or reply
    URL answered with a fragment would lose it, or what is appended after it)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError(f"{shown_url(url)} is not a URL") from None
    if not url.startswith(("https://", "http://")) or not parts.hostname:
        raise ValueError(f"{shown_url(url)}: use an https:// URL (plain http only on the loopback, for tests)")
    if "@" in parts.netloc:
        raise ValueError(f"{shown_url(url)}: no user name or password in the URL")
    if parts.scheme == "http" and not _LOOPBACK.fullmatch(parts.netloc):
        raise ValueError(f"{shown_url(url)}: use an https:// URL (plain http only on the loopback: 127.0.0.1, localhost "
                         "or [::1], for tests)")
    if not fragment and "#" in url:
        raise ValueError(f"{shown_url(url)}: no fragment (#) in the URL")
    return url


class SessionSettings(PluginSettings):
    """Browser sessions. The cookie holds a random id signed with a key from the state
    directory; the session itself is kept server-side, so every worker and instance sees it."""

    idle: float = Field(1800.0, gt=0, le=366 * 86400, description="seconds without a request after which a session ends")
    absolute: float = Field(28800.0, gt=0, le=366 * 86400,
                            description="seconds after login after which a session ends anyway (at most a year)")
    store: Literal["sqlite", "redis"] = Field(
        "sqlite", description="`sqlite` (a file in the state directory, shared by this machine's workers) "
        "or `redis` (shared by several instances)")
    redis_url: str = Field("", description="`redis://HOST:PORT/DB` when `store: redis`")
    redis_timeout: float = Field(0.5, gt=0, le=10, description="with `store: redis`, seconds one call to Redis "
                                 "may take (connecting, then each answer); past it the request is answered 503 "
                                 "and, for the next 5 s, every request that needs the store is answered 503 at "
                                 "once, without asking Redis; then one request tries it again. The call blocks "
                                 "the worker, so keep it short")
    cookie_name: str = Field("authgw_session", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="session cookie name")
    secure_cookie: bool = Field(True, description="mark cookies `Secure` (turn off only for plain-HTTP tests)")
    requests_per_client: int = Field(30, ge=1, le=1_000_000, description="sign-ins one client address may "
                                     "start (SAML, WS-Federation, OIDC requests waiting for `/login`, "
                                     "SAML error Responses, unsigned SAML LogoutRequests): a burst of this many, then this many a minute; "
                                     "past it 429. Users behind one NAT or a proxy not in `trusted_proxies` share it. "
                                     "Counted in the session store, shared by the workers (and instances, with Redis). The same budget, per user, bounds the answers given from a user's "
                                     "existing sessions (SAML Responses, WS-Federation tokens, OIDC codes)")
    max_pending: int = Field(20_000, ge=100, le=10_000_000, description="requests waiting for `/login` in the "
                             "whole store (every worker and instance), about 8 KB each at most; past it 503")
    max_per_user: int = Field(20, ge=1, le=10_000, description="live sessions one user (subject) may have at "
                              "once, every browser, worker and instance: a new sign-in beyond it ends that "
                              "user's oldest sessions (their services are not told: no Single Logout round)")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> SessionSettings:
        if self.store == "redis" and not self.redis_url:
            raise ValueError("store: redis needs redis_url")
        if self.redis_url:
            redis_url(self.redis_url)
        if self.absolute < self.idle:
            raise ValueError("absolute must be at least idle")
        return self


class TlsListenerSettings(PluginSettings):
    """An HTTPS listener for the login pages (browsers need it for `Secure` cookies)."""

    address: str = Field(description="`HOST:PORT` to listen on")
    certificate: ConfigPath = Field(description="PEM server certificate (chain)")
    key: ConfigPath = Field(description="PEM private key of the certificate")


class SamlServiceProvider(PluginSettings):
    """One SAML service provider (a cloud login service) allowed to send users here."""

    entity_id: str = Field(min_length=1, max_length=1024, description="the SP's entity id (its AuthnRequest `Issuer`)")
    acs_urls: list[str] = Field(min_length=1, description="Assertion Consumer Service URLs; answers go only "
                                "to these (the first is the default)")
    name_id_format: Literal["unspecified", "emailAddress", "persistent", "transient"] = Field(
        "unspecified", description="NameID format sent to this SP")
    name_id_source: IDENTITY_FIELDS = Field("username", description="identity field that becomes the NameID")
    attributes: dict[str, IDENTITY_FIELDS] = Field(
        {}, description="SAML attribute name -> identity field (`groups` becomes a multi-valued attribute)")
    sign_response: bool = Field(True, description="sign the whole Response")
    sign_assertion: bool = Field(True, description="sign the Assertion")
    request_certificate: ConfigPath | None = Field(
        None, description="PEM certificate the SP signs its AuthnRequests with; when set, unsigned or badly "
        "signed requests are refused")
    idp_initiated: bool = Field(False, description="allow logins started here (`/saml/idp?sp=ENTITY_ID`)")
    idp_initiated_relay_states: list[str] = Field(
        [], description="the RelayState values a login started here may carry to this SP, exactly (an SP "
        "reads it as where to go after the login, and anyone can write the link); another is refused")
    slo_url: str | None = Field(None, description="the SP's Single Logout endpoint (HTTP-POST binding): the "
                                "LogoutResponse to its LogoutRequest is posted there, and so is a LogoutRequest "
                                "when the user logs out elsewhere; without it the SP's LogoutRequests are refused")
    slo_binding: Literal["post", "redirect"] = Field(
        "post", description="how authgw's LogoutRequest and LogoutResponse reach `slo_url`: `post` (an "
        "auto-submitted form, XML signature) or `redirect` (HTTP-Redirect, DEFLATE and a query signature)")
    signed_logout: bool = Field(True, description="with `request_certificate`: the SP's LogoutRequests and "
                                "LogoutResponses must be signed with it (`false`: unsigned ones are accepted, "
                                "a signature that is there is still checked)")

    @field_validator("acs_urls")
    @classmethod
    def _check_acs(cls, value: list[str]) -> list[str]:
        return [_https_or_loopback(url, fragment=False) for url in value]

    @field_validator("slo_url")
    @classmethod
    def _check_slo(cls, value: str | None) -> str | None:
        return None if value is None else _https_or_loopback(value)

    @model_validator(mode="after")
    def _signed(self):
        # Neither signed, an assertion is anyone's to write: an SP that takes it (one configured
        # not to require a signature, say) takes a forged one just as well (review of the login door).
        if not (self.sign_response or self.sign_assertion):
            raise ValueError("`sign_response` and `sign_assertion` are both false: the SP would get "
                             "unsigned assertions, which anyone can forge; keep at least one")
        return self


class WsFedRelyingParty(PluginSettings):
    """One WS-Federation relying party (an Auth0 ADFS connection, Entra domain federation)."""

    realm: str = Field(min_length=1, max_length=1024, description="the `wtrealm` it sends (its audience)")
    reply_urls: list[str] = Field(min_length=1, description="allowed `wreply` URLs (the first is the default)")
    name_id_format: Literal["unspecified", "emailAddress", "persistent", "transient"] = Field(
        "unspecified", description="NameID format in the assertion")
    name_id_source: IDENTITY_FIELDS = Field("username", description="identity field that becomes the NameID")
    attributes: dict[str, IDENTITY_FIELDS] = Field({}, description="attribute name -> identity field; for "
                                                   "`saml11`, a claim URI (namespace/name)")
    token: Literal["saml2", "saml11"] = Field("saml2", description="assertion in the RSTR: SAML 2.0, or SAML 1.1 "
                                              "(what Entra domain federation and older ADFS relying parties want)")
    signout_urls: list[str] = Field([], description="`wreply` URLs allowed after `wa=wsignout1.0`, besides "
                                    "`reply_urls` (matched exactly)")

    @field_validator("reply_urls")
    @classmethod
    def _check_reply(cls, value: list[str]) -> list[str]:
        return [_https_or_loopback(url, fragment=False) for url in value]

    @field_validator("signout_urls")
    @classmethod
    def _check_signout(cls, value: list[str]) -> list[str]:
        return [_https_or_loopback(url) for url in value]


class WsFedSettings(PluginSettings):
    relying_parties: list[WsFedRelyingParty] = Field([], description="realms allowed to log users in here")

    @field_validator("relying_parties")
    @classmethod
    def _unique(cls, value: list[WsFedRelyingParty]) -> list[WsFedRelyingParty]:
        if len({rp.realm for rp in value}) != len(value):
            raise ValueError("a realm is declared twice")
        return value


class OidcClient(PluginSettings):
    """One OpenID Connect relying party. It authenticates at the token endpoint with a secret
    (`client_secret_basic` or `client_secret_post`) or with a JWT signed by its key
    (`private_key_jwt`, RFC 7523): give exactly one of `client_secret` and `public_key`."""

    client_id: str = Field(min_length=1, max_length=256, description="the client's id")
    redirect_uris: list[str] = Field(min_length=1, description="allowed redirect URIs, matched exactly")
    client_secret: Secret | None = Field(None, description="`{env: NAME}` or `{file: PATH}`")
    public_key: ConfigPath | None = Field(None, description="PEM public key (or certificate) for `private_key_jwt`")
    post_logout_redirect_uris: list[str] = Field([], description="where RP-initiated logout may send the browser "
                                                 "afterwards (`post_logout_redirect_uri`, matched exactly)")

    @field_validator("redirect_uris")
    @classmethod
    def _check_redirects(cls, value: list[str]) -> list[str]:
        return [_https_or_loopback(url, fragment=False) for url in value]

    @field_validator("post_logout_redirect_uris")
    @classmethod
    def _check_post_logout(cls, value: list[str]) -> list[str]:
        return [_https_or_loopback(url) for url in value]

    @model_validator(mode="after")
    def _one_credential(self) -> OidcClient:
        if (self.client_secret is None) == (self.public_key is None):
            raise ValueError("give exactly one of client_secret and public_key")
        return self


class OidcSettings(PluginSettings):
    code_lifetime: float = Field(60.0, gt=0, le=600, description="seconds an authorization code may be redeemed")
    token_lifetime: float = Field(300.0, ge=1, le=86400, description="seconds id_token and access_token are valid")
    clients: list[OidcClient] = Field([], description="registered relying parties")

    @field_validator("clients")
    @classmethod
    def _unique(cls, value: list[OidcClient]) -> list[OidcClient]:
        if len({c.client_id for c in value}) != len(value):
            raise ValueError("a client_id is declared twice")
        return value


class SamlSettings(PluginSettings):
    assertion_lifetime: float = Field(300.0, gt=0, le=3600, description="seconds an assertion may be used")
    request_lifetime: float = Field(300.0, gt=0, le=3600, description="seconds after its IssueInstant an "
                                    "AuthnRequest is still accepted (plus `clock_skew`)")
    service_providers: list[SamlServiceProvider] = Field([], description="SPs allowed to log users in here")

    @field_validator("service_providers")
    @classmethod
    def _unique(cls, value: list[SamlServiceProvider]) -> list[SamlServiceProvider]:
        seen = set()
        for sp in value:
            if sp.entity_id in seen:
                raise ValueError(f"service provider {sp.entity_id!r} is declared twice")
            seen.add(sp.entity_id)
        return value


class LoginSettings(PluginSettings):
    """The browser login front door: `/login`, sessions, SAML 2.0 IdP (docs/login.md)."""

    base_url: str = Field(description="public URL of this front door as browsers reach it, e.g. "
                          "`https://login.example.com` (endpoints and the SAML entity id derive from it)")
    entity_id: str = Field("", description="SAML IdP entity id; default `BASE_URL/saml/metadata`")
    clock_skew: float = Field(120.0, ge=0, le=900, description="seconds of clock difference tolerated with SPs")
    max_parameter_bytes: int = Field(16384, ge=1024, le=65536,
                                     description="largest SAMLRequest / form parameter accepted")
    max_inflated_bytes: int = Field(262144, ge=4096, le=4194304,
                                    description="largest HTTP-Redirect AuthnRequest after DEFLATE decoding")
    max_relay_state_bytes: int = Field(80, ge=80, le=4096,
                                       description="largest RelayState (SAML bindings section 3.4.3 says 80)")
    title: str = Field("Sign in", max_length=200, description="heading of the login page")
    messages: dict[str, str] = Field({}, description="replacements of the page strings (localisation), "
                                     "by key; see docs/login.md")
    sessions: SessionSettings = Field(SessionSettings(), description="browser sessions")
    listener: TlsListenerSettings | None = Field(None, description="an HTTPS listener for the login pages")
    saml: SamlSettings = Field(SamlSettings(), description="the SAML 2.0 identity provider")
    wsfed: WsFedSettings = Field(WsFedSettings(), description="WS-Federation passive requestor profile")
    oidc: OidcSettings = Field(OidcSettings(), description="OpenID Connect provider (issuer = `base_url`)")

    @field_validator("base_url")
    @classmethod
    def _check_base(cls, value: str) -> str:
        return _https_or_loopback(value.rstrip("/"))

    @field_validator("messages")
    @classmethod
    def _known_messages(cls, value: dict[str, str]) -> dict[str, str]:
        from .pages import MESSAGES  # the page strings are defined beside their templates

        unknown = sorted(set(value) - set(MESSAGES))
        if unknown:
            raise ValueError(f"unknown message keys {', '.join(unknown)}; known: {', '.join(MESSAGES)}")
        for key, text in value.items():
            # Only the default's own {name}s are replaced (LoginPages.message); another one
            # (`Angemeldet als {benutzer}`) showed on every page as written.
            known = set(_PLACEHOLDER.findall(MESSAGES[key]))
            stray = sorted(set(_PLACEHOLDER.findall(text)) - known)
            if stray:
                offered = f"use {', '.join('{' + n + '}' for n in sorted(known))}" if known else "it has none"
                raise ValueError(f"messages.{key}: {', '.join('{' + n + '}' for n in stray)} is not replaced "
                                 f"({offered})")
        return value
