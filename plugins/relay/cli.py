"""``authgw relay connection add NAME | ticket CONNECTION | connectors | revoke CONNECTOR``.

Run against the relay's configuration and state directory (``--config``, ``--state-dir``): they
share the SQLite registry with the serving process, which closes a revoked connector's link
within a second. A ticket URL is printed once on standard output; only its hash is stored.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from gateway import Command
from gateway.logs import printable
from gateway.plugins.linkproto.cli import accept_common_options as _common

from .settings import MAX_TICKET_LIFETIME

if TYPE_CHECKING:
    from . import RelayPlugin

__all__ = ["relay_command"]

EXIT_OK, EXIT_FAILED = 0, 1


def _when(timestamp: float | None) -> str:
    """A stored time as UTC text; ``?`` for one no date holds (a tampered row, a bad clock:
    ``1e20`` or ``inf`` raised OverflowError and ended the listing; review of time)."""
    if timestamp is None:
        return "-"
    try:
        return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, OSError, ValueError, TypeError):
        return "?"


def _lifetime(text: str) -> float:
    """``--lifetime``: finite seconds > 0 and at most :data:`MAX_TICKET_LIFETIME`, checked before
    anything is stored (``1e308`` stored a ticket then failed to print it; ``nan`` an
    IntegrityError). argparse prints the refusal and exits 2."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= MAX_TICKET_LIFETIME:  # NaN and infinity fail this too
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds > 0 and at most {MAX_TICKET_LIFETIME:.0f} (30 days)")
    return value


#: The most connectors one ticket may enrol (``--uses``): a larger count is no plan, and one
#: beyond 64 bits was a traceback from SQLite, or a ticket Redis could never count down.
MAX_TICKET_USES = 100_000


def _uses(text: str) -> int:
    """``--uses``: a whole number from 1 to :data:`MAX_TICKET_USES` (argparse prints the refusal)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_TICKET_USES:
        raise argparse.ArgumentTypeError(f"{text!r}: give 1 to {MAX_TICKET_USES}")
    return value


def relay_command(plugin: RelayPlugin) -> Command:
    store = plugin.store

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="relay_command", required=True, metavar="COMMAND")
        connection = sub.add_parser("connection", help="manage connections")
        connection_sub = connection.add_subparsers(dest="connection_command", required=True, metavar="COMMAND")
        _common(connection_sub.add_parser("add", help="create a connection")).add_argument("name")
        _common(connection_sub.add_parser("list", help="list connections"))
        ticket = _common(sub.add_parser("ticket", help="print a one-time enrolment ticket URL for a connector"))
        ticket.add_argument("connection")
        ticket.add_argument("--uses", type=_uses, default=1, metavar="N",
                            help="a reusable connection ticket: N connectors may enrol with it, each with its own key")
        ticket.add_argument("--lifetime", type=_lifetime, metavar="SECONDS",
                            help=f"seconds the ticket stays usable (default {plugin.settings.ticket_lifetime:.0f}, "
                                 f"at most {MAX_TICKET_LIFETIME:.0f})")
        _common(sub.add_parser("connectors", help="enrolled connectors: online, version, last seen, certificate expiry"))
        _common(sub.add_parser("revoke", help="cut a connector off now and refuse it from then on")).add_argument("connector")

    def run(args: argparse.Namespace) -> int:
        if args.relay_command == "connection":
            if args.connection_command == "list":
                for name in store.connections():
                    print(name)
                return EXIT_OK
            name = args.name
            if not plugin.valid_name(name):
                print(f"error: {name!r} is not a connection name (letters, digits, `_.-`, up to 63)", file=sys.stderr)
                return EXIT_FAILED
            print(f"connection {name} " + ("created" if store.add_connection(name) else "already exists"))
            return EXIT_OK
        if args.relay_command == "ticket":
            if args.connection not in store.connections():
                print(f"error: no connection {args.connection!r}; create it with: authgw relay connection add NAME",
                      file=sys.stderr)
                return EXIT_FAILED
            lifetime = args.lifetime if args.lifetime is not None else plugin.settings.ticket_lifetime
            token = secrets.token_urlsafe(32)
            connector = f"{args.connection}-{secrets.token_hex(4)}" if args.uses == 1 else ""
            expires = time.time() + lifetime
            store.add_ticket(args.connection, token, connector, expires, args.uses)
            what = f"one-time ticket for connector {connector}" if connector else \
                f"ticket for {args.uses} connectors of {args.connection}"
            print(f"{what}, valid until {_when(expires)}; on the connector run: authgw link enroll URL",
                  file=sys.stderr)
            print(f"{plugin.settings.public_url}/p/{token}")
            return EXIT_OK
        if args.relay_command == "connectors":
            now = time.time()
            print(f"{'CONNECTOR':<28} {'CONNECTION':<16} {'STATE':<8} {'VERSION':<10} {'LAST SEEN':<21} CERT EXPIRES")
            for c in store.connectors():
                state = ("revoked" if c.revoked is not None else "expired" if c.not_after < now
                         else "online" if c.online_until is not None and c.online_until >= now else "offline")
                print(f"{c.id:<28} {c.connection:<16} {state:<8} {printable(c.version) if c.version else '-':<10} {_when(c.last_seen):<21} "
                      f"{_when(c.not_after)}")
            return EXIT_OK
        if args.relay_command == "revoke":
            if store.connector(args.connector) is None:
                print(f"error: no enrolled connector {args.connector!r} (see: authgw relay connectors)", file=sys.stderr)
                return EXIT_FAILED
            done = store.revoke(args.connector)
            print(f"connector {args.connector} " + ("revoked; its link closes within a second, and the relay's cache "
                                                     "no longer answers on its word" if done
                                                     else "was already revoked"))
            return EXIT_OK
        return EXIT_FAILED

    return Command("relay", "the relay's connections, tickets and connectors", add_arguments, run)
