"""Who listens on the console's address: ``authgw console`` prints its one-time link only when a
socket of this gateway's user does.

The link is a bearer token for a session that can rewrite the directory settings, and a browser
gives it to whatever answers at the link's address and port. While the console is not running
(the gateway not started yet, restarting, or ``plugins: [console]`` added but not loaded yet),
another local user may listen there: that server received the token when the operator opened
the link, and opened a session with it once the console was up (review of the console). Linux
names the owner of every TCP socket (the ``uid`` column of ``/proc/net/tcp`` and
``/proc/net/tcp6``); an address held by a socket of another user is refused, and so is one where
nothing listens yet (the token would wait there for 15 minutes for whoever binds first).

The link is also tied to the sockets the command saw (their inodes): a gateway restarted after
the link was printed listens on new ones, and refuses it. Meanwhile another user may have bound
the address and received the token when the operator opened the link (review of the console
and static users file); with the console up again, that token opens nothing.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

__all__ = ["listening_sockets", "listening_uids"]

_LISTEN = "0A"  # TCP_LISTEN in include/net/tcp_states.h, as /proc/net/tcp prints it
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str) -> IPAddress:
    """An address as /proc/net/tcp{,6} prints it: each 32-bit word in the host's byte order."""
    raw = b"".join(int(text[i:i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(text), 8))
    return ipaddress.ip_address(raw)


def _reaching(address: IPAddress) -> set[IPAddress]:
    """The bound addresses whose listening socket would receive a connection to *address*: it,
    the wildcard of its family and, for IPv4, the IPv6 wildcard and mapped form (a dual-stack
    socket)."""
    if address.version == 4:
        return {address, ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::"),
                ipaddress.ip_address(f"::ffff:{address}")}
    return {address, ipaddress.ip_address("::")}


def listening_uids(address: IPAddress, port: int, proc: Path = Path("/proc/net")) -> set[int] | None:
    """The owners (uids) of the TCP sockets listening where a connection to *address*:*port*
    arrives; ``None`` when the system does not say (no ``/proc/net/tcp``: not Linux)."""
    sockets = listening_sockets(address, port, proc)
    return None if sockets is None else set(sockets.values())


def listening_sockets(address: IPAddress, port: int, proc: Path = Path("/proc/net")) -> dict[int, int] | None:
    """The TCP sockets listening where a connection to *address*:*port* arrives, as {inode:
    owner uid}; ``None`` when the system does not say (not Linux). A socket's inode names it
    for its life: a console that restarted listens on new ones (``authgw console`` ties its
    link to those it saw)."""
    # /proc/net/tcp6 prints no zone, and an address with one (fe80::1%lo) equals none without it
    reaching = _reaching(ipaddress.ip_address(str(address).partition("%")[0]))
    owners: dict[int, int] = {}
    read_any = False
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc / name).read_text(encoding="ascii", errors="replace").splitlines()[1:]
        except OSError:
            continue
        read_any = True
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            host, _, port_text = fields[1].partition(":")
            try:
                if int(port_text, 16) == port and _address(host) in reaching:
                    owners[int(fields[9])] = int(fields[7])
            except ValueError:
                continue
    return owners if read_any else None
