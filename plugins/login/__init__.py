"""``login``: the browser login front door (docs/login.md). A user is signed in at ``/login``
(client certificate, Kerberos, or a password form, through the same chain as ``/auth``) and gets a
server-side session; service providers send users here and get signed answers back (SAML 2.0
IdP in :mod:`.saml`).

Decides
    nothing in the chain: it is a front door (``front_door: login`` in the audit), not a step.
Routes
    ``/login``, ``/logout``; ``/saml/metadata``, ``/saml/sso`` (HTTP-Redirect and HTTP-POST
    bindings), ``/saml/idp`` (IdP-initiated), ``/saml/slo`` (Single Logout, :mod:`.slo`), ``/wsfed`` (WS-Federation, :mod:`.wsfed`), the OpenID
    Connect provider (:mod:`.oidc`: discovery, ``/oidc/*``), on the ``listen:`` sockets and on every listener
    that serves the front doors (``client_cert``'s TLS listener, this plugin's ``listener``).
Commands
    ``authgw saml metadata`` (the IdP metadata to upload), ``authgw saml rotate`` (make the next
    signing key current).
Settings (``login:`` in conf.d)
    ``base_url``, ``entity_id``, ``clock_skew``, ``max_parameter_bytes``, ``max_inflated_bytes``,
    ``max_relay_state_bytes``, ``title``, ``messages``, ``sessions`` (``idle``, ``absolute``,
    ``store``, ``redis_url``, ``cookie_name``, ``secure_cookie``), ``listener`` (``address``,
    ``certificate``, ``key``), ``saml`` (``assertion_lifetime``, ``request_lifetime``,
    ``service_providers``), ``wsfed`` (``relying_parties``), ``oidc`` (``code_lifetime``,
    ``token_lifetime``, ``clients``).
"""

from __future__ import annotations

import argparse
import ssl
from urllib.parse import urlsplit

from gateway import Command, ComponentState, Listener, PluginContext, Route, hookimpl
from gateway.redis_eviction import EvictingRedis, EvictionWatch

from .keys import KeyStore
from .oidc import OidcProvider
from .pages import Pages
from .saml import SamlIdp
from .sessions import RedisStore, SessionManager, SqliteStore
from .settings import LoginSettings
from .slo import SingleLogout
from .web import LoginDoor
from .wsfed import WsFed

__all__ = ["LoginPlugin"]


class LoginPlugin:
    """Registered as ``login`` (list it under ``plugins:``)."""

    Settings = LoginSettings

    def __init__(self, settings: LoginSettings, context: PluginContext) -> None:
        self.settings = settings
        self.context = context
        self.pages = Pages(settings.title, settings.messages)
        self.entity_id = settings.entity_id or f"{settings.base_url}/saml/metadata"
        self.keys = KeyStore(context.state_dir, urlsplit(settings.base_url).hostname or "authgw")
        self.current, self.next, self.cookie_key = self.keys.ensure()
        self.saml = SamlIdp(settings, self.entity_id, self.current, self.next)
        self.slo = SingleLogout(self.saml)
        self.wsfed = WsFed(settings, self.saml)
        self.oidc = OidcProvider(settings, self.current, self.next)
        self._probe_store: RedisStore | None = None
        #: What the probe found of the Redis's eviction policy, shared by the door's stores.
        self._eviction = EvictionWatch("login session store")
        self._managers: list[SessionManager] = []  # the door's session stores, closed at shutdown
        self._sessions_state: ComponentState | None = None

    def _store(self):
        sessions = self.settings.sessions
        if sessions.store == "redis":
            return RedisStore(sessions.redis_url, sessions.absolute, timeout=sessions.redis_timeout,
                              eviction=self._eviction)
        return SqliteStore(self.context.state_dir / "login" / "sessions.sqlite3")

    @hookimpl
    def gateway_probe(self) -> None:
        """A Redis session store is pinged on the health round (its own client, made in the
        worker). Not a chain step: when it is down ``/readyz`` lists ``login`` as degraded."""
        if self.settings.sessions.store != "redis":
            return
        if self._probe_store is None:
            self._probe_store = self._store()
        try:
            self._sessions_state = ComponentState("login.sessions", True, self._probe_store.ping())
        except Exception as exc:  # noqa: BLE001 - any failure means the store is down
            detail = str(exc) if isinstance(exc, EvictingRedis) else \
                f"{self._probe_store.location}: {exc.__class__.__name__}"  # (the first holds no secret)
            self._sessions_state = ComponentState("login.sessions", False, detail)

    @hookimpl
    def gateway_readiness(self) -> list[ComponentState] | None:
        return [self._sessions_state] if self._sessions_state is not None else None

    @hookimpl
    def gateway_shutdown(self) -> None:
        # After the generation's requests: its store connections (the purge's too) would
        # otherwise outlive it, one more at every reload.
        for manager in self._managers:
            manager.store.close()
        self._managers.clear()
        if self._probe_store is not None:
            self._probe_store.close()

    @hookimpl
    def gateway_listeners(self):
        listener = self.settings.listener
        if listener is None:
            return None

        def context() -> ssl.SSLContext:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(listener.certificate, listener.key)
            return ctx

        return [Listener("login.tls", listener.address, context)]

    @hookimpl
    def gateway_http_routes(self, door):
        # Built in each worker: the store's connection must not cross a fork.
        sessions = SessionManager(self.settings.sessions, self._store(), self.cookie_key)
        self._managers.append(sessions)
        web = LoginDoor(door, sessions, self.pages, self.settings, self.context.hook)
        routes = [
            Route("GET", "/login", web.login_get),
            Route("POST", "/login", web.login_post),
            Route("*", "/logout", web.logout),
            *self.saml.routes(web),
            *self.slo.routes(web),
            *self.wsfed.routes(web),
            *self.oidc.routes(web),
        ]
        return [Route(r.method, r.path, web.guarded(r.handler, json=r.path in ("/oidc/token", "/oidc/userinfo")),
                      r.listener) for r in routes]

    @hookimpl
    def gateway_commands(self):
        def add_arguments(parser: argparse.ArgumentParser) -> None:
            parser.add_argument("saml_action", choices=["metadata", "rotate"],
                                help="`metadata`: print the IdP metadata (current and next signing certificates); "
                                "`rotate`: make the next signing key current and make a new next key")

        def run(args: argparse.Namespace) -> int:
            if args.saml_action == "rotate":
                current, upcoming = self.keys.rotate()
                print(f"signing certificate now: {current.cert.fingerprint(_sha256()).hex()}")
                print(f"next certificate:        {upcoming.cert.fingerprint(_sha256()).hex()}")
                print("reload authgw to sign with it (kill -HUP $(cat STATE_DIR/authgw.pid), or systemctl reload "
                      "authgw); service providers that read the metadata already trust it")
                return 0
            print(self.saml.metadata().decode())
            return 0

        return [Command("saml", "SAML identity provider: metadata, key rotation", add_arguments, run)]


def _sha256():
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()
