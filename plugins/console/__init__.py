"""``console``: a browser console on 127.0.0.1:8357 to set the connector up and watch it.

Not a chain step: enabled with ``plugins: [console]``. It decides no attempt; it adds

Listener ``console.http``
    on ``console.listen`` (default ``127.0.0.1:8357``) serving only the console's routes; plain
    HTTP on loopback only, HTTPS with ``tls_cert``/``tls_key`` anywhere else (refused at load
    time otherwise).
Routes
    ``/login/{token}`` (one-time link -> a session under a secret path prefix ``/s/{prefix}/``,
    its cookie scoped to that path), and below that prefix ``setup`` (ticket URL via
    ``authgw link enroll``, directory settings -> ``conf.d/50-console.yaml``), ``log/{run}``
    (the configuration log: every plugin's self-tests, live), ``status``; any other path is the
    sign-in page or a 404.
Command
    ``authgw console``: prints a one-time login link and writes it 0600 to
    ``<state_dir>/console-login-link``, only while a socket of this gateway's user listens on
    ``console.listen`` (``listening.py``: another user's server there would get the link).
Hooks
    ``gateway_auth_finished`` keeps the last audit events of this worker for the status page
    when the audit log goes to standard error.
Settings (``console:`` in conf.d; docs/console.md)
    ``listen``, ``tls_cert``, ``tls_key``, ``hosts``, ``login_link_ttl``, ``session_ttl``,
    ``session_lifetime``, ``audit_events``, ``certificate_warning_days``.

Shared state (tokens, sessions, configuration-log runs) is ``<state_dir>/console.sqlite``.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import time

from gateway import Attempt, Command, Decision, Listener, PluginContext, Route, hookimpl
from gateway.files import write_atomic
from gateway.plugins.console.listening import listening_sockets
from gateway.plugins.console.settings import ConsoleSettings, listen_address
from gateway.plugins.console.status import RecentEvents
from gateway.plugins.console.store import ConsoleStore

__all__ = ["ConsolePlugin", "ConsoleSettings"]

LISTENER = "console.http"
LINK_FILE = "console-login-link"


class ConsolePlugin:
    """Registered as ``console`` (listed under ``plugins:``)."""

    Settings = ConsoleSettings

    def __init__(self, settings: ConsoleSettings, context: PluginContext) -> None:
        self.settings = settings
        self.context = context
        self.tls = settings.tls_cert is not None
        self.store = ConsoleStore(context.state_dir / "console.sqlite")
        self.recent = RecentEvents(settings.audit_events)
        # With an audit file the status page reads it (all workers write there); the ring is
        # only for audit to standard error, so the hot path skips it otherwise.
        self._keep_events = context.gateway.audit.file == "-" and settings.audit_events > 0
        if self.tls:
            self._ssl_context()  # an unreadable certificate or key stops start-up, not the first visit

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.settings.tls_cert), str(self.settings.tls_key))
        return context

    def url(self) -> str:
        """The console's base URL with the address it binds (``listen`` is an IP literal, never
        a name that could resolve to another address: settings.py says why)."""
        address, port = listen_address(self.settings.listen)
        host = f"[{address}]" if address.version == 6 else str(address)
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    # -- hooks ----------------------------------------------------------------------------------

    @hookimpl
    def gateway_listeners(self) -> list[Listener]:
        return [Listener(LISTENER, self.settings.listen, self._ssl_context if self.tls else None, own_routes=True)]

    @hookimpl
    def gateway_http_routes(self, door) -> list[Route]:
        from gateway.plugins.console.pages import Pages

        pages = Pages(store=self.store, config_dir=self.context.config_dir, state_dir=self.context.state_dir,
                      settings=self.settings, recent=self.recent, gateway=door.gateway, tls=self.tls)
        return [Route(method, path, handler, LISTENER) for method, path, handler in pages.routes()]

    @hookimpl
    def gateway_auth_finished(self, attempt: Attempt, decision: Decision) -> None:
        if self._keep_events:
            self.recent.add(attempt, decision, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @hookimpl
    def gateway_commands(self) -> list[Command]:
        return [Command("console", "print a one-time login link for the browser console",
                        lambda parser: None, self._command)]

    # -- authgw console -------------------------------------------------------------------------

    def _command(self, args: argparse.Namespace) -> int:
        problem, sockets = self._not_ours()
        if problem:
            print(f"error: {problem}: no link printed", file=sys.stderr)
            return 1
        token = self.store.new_login_token(self.settings.login_link_ttl, sockets)
        link = f"{self.url()}/login/{token}"
        path = self.context.state_dir / LINK_FILE
        write_atomic(path, f"{link}\n".encode())
        minutes = self.settings.login_link_ttl / 60
        print(f"Open this link in a browser on this machine (it works once, for {minutes:.0f} minutes):",
              file=sys.stderr)
        print(link)
        forward = self.url().split("://", 1)[1]
        print(f"(also written to {path}; over SSH: ssh -L {forward.rpartition(':')[2]}:{forward} THIS-HOST, "
              "see docs/console.md)", file=sys.stderr)
        return 0

    def _not_ours(self) -> tuple[str, frozenset[int]]:
        """Why the link must not be printed (listening.py): nothing listens on the console's
        address yet, or a socket of a user who is neither this command's nor the state
        directory's owner (the gateway's) does; empty when the console is there. And the
        listening sockets the link is tied to (none where the system does not name them)."""
        address, port = listen_address(self.settings.listen)
        where = self.url().split("://", 1)[1]
        sockets = listening_sockets(address, port)
        if sockets is None:  # not Linux: nothing to ask
            print(f"warning: could not check who listens on {where}: open the link only while authgw serves "
                  "the console there", file=sys.stderr)
            return "", frozenset()
        if not sockets:
            return (f"nothing listens on {where}: start `authgw serve` with this configuration "
                    "(`plugins: [console]`), then run `authgw console` again"), frozenset()
        ours = {os.geteuid()}
        try:
            ours.add(self.context.state_dir.stat().st_uid)
        except OSError:
            pass
        others = sorted(set(sockets.values()) - ours)
        if others:
            return (f"{where} is held by another user (uid {', '.join(map(str, others))}), not by this gateway's "
                    "console: that server would receive the one-time link; stop it, then start the console"), frozenset()
        return "", frozenset(sockets)
