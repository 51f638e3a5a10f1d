"""``link``: the connector's outbound link to a relay (docs/connector.md). Not a chain step:
enabled with ``plugins: [link]``; it answers the relay's requests by running this gateway's own
chain (``authenticate``, through the same throttling and audit as ``/auth``) and directory
plugins (``lookup_user``, ``search_users``, ``list_groups``: plugins/link/directory.py), and its
self-tests (``selftest``).

Decides
    nothing itself: attempts arriving over the link are decided by the chain, audited with
    ``front_door: link``.
Settings (``link:`` in conf.d)
    ``ping_interval``, ``backoff_initial``, ``backoff_max``, ``max_clock_skew``,
    ``max_concurrent``, ``proxy``, ``proxy_username``, ``proxy_password``. Where to connect and
    with which certificate comes from enrolment, in ``STATE_DIR/link/``.
Commands
    ``authgw link enroll TICKET_URL [--ca FILE]``, ``authgw link status``.
Readiness
    ``link.relay`` (linked or not, to which relay, the WebSocket ping round trip),
    ``link.certificate`` and, while linked, ``link.relay_certificate`` ("valid until ...Z", and
    ``valid_until`` for the console's expiry warning).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime, timezone

import gateway
from gateway import Command, ComponentState, PluginContext, Route, SelfTest, hookimpl
from gateway.logs import printable

from gateway.plugins.linkproto.cli import accept_common_options

from . import state
from .client import LinkClient
from .enroll import EnrolError, enroll
from .settings import LinkSettings

__all__ = ["LinkPlugin"]

#: Seconds a stopping connector gives its link in all: the relay's acknowledgement of ``drain``,
#: the requests in flight, the close. Under the server's budget for every plugin's shutdown
#: (``gateway.lifecycle.CLOSE_GRACE``, 5 s): at 5 s, plus up to 10 s for an acknowledgement
#: that did not come, the server went on without this plugin (review of the link).
_DRAIN_BUDGET = 4.0


def _validity(what: str, not_after: float, now: float) -> str:
    until = datetime.fromtimestamp(not_after, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if not_after <= now:
        return f"{what} expired: valid until {until}; re-enrol with a new ticket (authgw link enroll TICKET_URL)"
    return f"{what} valid until {until} ({(not_after - now) / 86400:.1f} days left)"


class LinkPlugin:
    """Registered as ``link`` (listed under ``plugins:``)."""

    Settings = LinkSettings

    def __init__(self, settings: LinkSettings, context: PluginContext) -> None:
        self.settings = settings
        self.name = context.name
        self.state_dir = context.state_dir
        self.hook = context.hook
        self.client: LinkClient | None = None
        self._task: asyncio.Task | None = None

    @hookimpl
    def gateway_http_routes(self, door) -> list[Route]:
        # The one hook that runs on the worker's event loop: start dialling from there, so
        # that requests from the relay are decided with this worker's door.
        self.client = LinkClient(self.settings, self.state_dir, door, self.hook, gateway.__version__)
        self._task = asyncio.get_running_loop().create_task(self.client.run())
        return []

    @hookimpl
    def gateway_readiness(self) -> list[ComponentState] | None:
        # From memory only (the client keeps it current): the relay, the link's round trip,
        # and both certificates' ends (``valid_until``: the console warns ahead of an expiry).
        if self.client is None:
            return None
        status = self.client.status
        now = time.time()
        detail = status.detail
        if status.connected and status.round_trip is not None:
            detail += f"; round trip {status.round_trip * 1000:.1f} ms"
        states = [ComponentState(f"{self.name}.relay", status.connected, detail)]
        if status.certificate_not_after is not None:
            states.append(ComponentState(f"{self.name}.certificate", status.certificate_not_after > now,
                                         _validity("connector certificate", status.certificate_not_after, now),
                                         valid_until=status.certificate_not_after))
        if status.relay_certificate_not_after is not None:
            states.append(ComponentState(
                f"{self.name}.relay_certificate", status.relay_certificate_not_after > now,
                _validity(f"relay certificate {status.relay_certificate_subject}",
                          status.relay_certificate_not_after, now),
                valid_until=status.relay_certificate_not_after))
        return states

    @hookimpl
    def gateway_selftests(self) -> list[SelfTest]:
        from .selftests import selftests

        return selftests(self)

    @hookimpl
    def gateway_shutdown(self) -> None:
        # Called on a thread while the worker's loop still runs: drain the link there first.
        if self._task is None:
            return
        loop = self._task.get_loop()
        if self.client is not None and not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(self.client.drain(_DRAIN_BUDGET), loop).result(_DRAIN_BUDGET + 0.5)
            except Exception as exc:  # stopping regardless
                self.client.status.detail = f"drain failed: {exc}"
        loop.call_soon_threadsafe(self._task.cancel)
        if self.client is not None:
            self.client.close()

    @hookimpl
    def gateway_commands(self) -> list[Command]:
        def add_arguments(parser: argparse.ArgumentParser) -> None:
            sub = parser.add_subparsers(dest="link_command", required=True, metavar="COMMAND")
            enrol = accept_common_options(sub.add_parser("enroll", help="provision this connector from a ticket URL"))
            enrol.add_argument("ticket_url", help="the ticket URL, or - to read it from standard input (a "
                               "command line is readable by the host's other users while it runs)")
            enrol.add_argument("--ca", metavar="FILE", help="CA bundle to verify the relay with "
                               "(default: the system's)")
            accept_common_options(sub.add_parser("status", help="show this connector's enrolment"))

        def run(args: argparse.Namespace) -> int:
            if args.link_command == "enroll":
                from pathlib import Path

                ticket_url = sys.stdin.readline(4096).strip() if args.ticket_url == "-" else args.ticket_url
                try:
                    print(enroll(ticket_url, self.state_dir, Path(args.ca) if args.ca else None))
                except EnrolError as exc:
                    print(f"error: enrolment failed: {exc}", file=sys.stderr)
                    return 1
                return 0
            try:
                enrolment = state.load(self.state_dir)
            except state.EnrolmentDamaged as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            if enrolment is None:
                print("not enrolled: run `authgw link enroll TICKET_URL`")
                return 1
            # printable: link.json holds the relay's words (written by an older enrolment, or by hand)
            print(f"connector {printable(enrolment.connector)} of connection {printable(enrolment.connection)}\n"
                  f"link      {printable(enrolment.link_url)}\n"
                  f"expires   {enrolment.certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}")
            if enrolment.key_warning:
                print(f"warning: {enrolment.key_warning}", file=sys.stderr)
            return 0

        return [Command("link", "this connector's enrolment at a relay", add_arguments, run)]
