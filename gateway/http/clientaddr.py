"""The client's address: the socket peer, unless that peer is a trusted proxy.

Behind trusted proxies, ``X-Forwarded-For`` is walked from the right (the hop nearest to us),
skipping trusted hops; the first untrusted address is the client. Everything to the left of it
was written by the client itself and is ignored. A peer that is not a trusted proxy cannot move
its address at all.

A trusted proxy's ``X-Forwarded-For`` whose hop cannot be read where the client should be
(``unknown``, an obfuscated identifier, an empty value) names no client: the address is then
:data:`UNKNOWN_CLIENT`, in no network an operator lists (Kerberos ranges, ``details_from``), not
the proxy's own, which sat in those lists and shared its throttle budget with every client
behind it. A trusted peer that sends no ``X-Forwarded-For`` at all is the client itself.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Iterable

__all__ = ["UNKNOWN_CLIENT", "ClientAddressResolver"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The client of a trusted proxy whose X-Forwarded-For names none it can read: the first address
#: of the discard-only prefix (RFC 6666, 100::/64), which no client has.
UNKNOWN_CLIENT = ipaddress.IPv6Address("100::")


@functools.lru_cache(maxsize=4096)
def parse_address(text: str) -> IPAddress | None:
    text = text.strip()
    if text.startswith("["):  # [v6] or [v6]:port, as some proxies write it; nothing else
        text, closed, port = text[1:].partition("]")
        if not closed or (port and not (port[:1] == ":" and port[1:].isdigit())):
            return None  # "[::1" or "[::1]x": unreadable, not ::1
    elif text.count(":") == 1:  # v4:port
        text, _, port = text.partition(":")
        if not port.isdigit():
            return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            return address.ipv4_mapped
        if address.scope_id is not None:
            # fe80::1%<zone>: the zone is the proxy's interface name, any text ipaddress keeps
            # (it reached the audit line and the throttle's keys as written); the address stays
            return ipaddress.IPv6Address(address.packed)
    return address


class ClientAddressResolver:
    def __init__(self, trusted_proxies: Iterable[IPNetwork]) -> None:
        self.trusted = tuple(trusted_proxies)

    def is_trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self.trusted)

    def resolve(self, peer: str | None, forwarded_for: list[str]) -> tuple[IPAddress, bool]:
        """Return the client address and whether the peer is a trusted proxy.

        :param peer: the socket peer's address text.
        :param forwarded_for: every ``X-Forwarded-For`` header value, in order received.
        """
        address = parse_address(peer or "") or ipaddress.ip_address("0.0.0.0")
        if not self.trusted or not self.is_trusted(address):
            return address, False
        if not forwarded_for:
            return address, True  # the proxy's own request (a health check), or one that forwards none
        hops = [hop for value in forwarded_for for hop in value.split(",")]
        for hop in reversed(hops):
            parsed = parse_address(hop)
            if parsed is None:  # where the client should be: garbage, so no client we can name
                return UNKNOWN_CLIENT, True
            address = parsed
            if not self.is_trusted(parsed):
                break
        return address, True
