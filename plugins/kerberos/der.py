"""Just enough DER (X.690) to read SPNEGO and Kerberos framing.

Only what the plugin needs: low tag numbers (< 31, true of every SPNEGO and Kerberos tag),
definite lengths (DER forbids the indefinite form), and strict bounds. Anything else raises
:class:`DERError`, which callers turn into ``kerberos.malformed_token``. No value read here is
trusted for a decision; GSSAPI decides, this only routes and explains.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

__all__ = ["DERError", "TLV", "TooMany", "children", "oid_text", "read_int", "read_one", "tagged"]

#: Tokens are at most 64 KiB (the front door's limit); four length octets are plenty.
_MAX_LENGTH_OCTETS = 4
#: The mechanisms SPNEGO names take 6 to 10 octets. A client's longer OID names none of them,
#: and its text went whole into the log: 6,000 one-octet arcs made a 24 KB line per request,
#: one octet-run arc a big integer built at quadratic cost (review of the Kerberos plugin).
_MAX_OID_OCTETS = 32
#: The most elements read inside one constructed element. The SEQUENCEs of SPNEGO and Kerberos
#: hold at most 13 fields, a service name a few components: a client's service name of 10,000
#: components cost 12 ms of Python per request (review of the Kerberos plugin).
MOST_CHILDREN = 16


class DERError(ValueError):
    """The bytes are not the DER the caller expected."""


class TooMany(DERError):
    """A constructed element holds more elements than the caller reads."""


class TLV(NamedTuple):
    """One element: the identifier octet, and where its contents lie in the buffer. A named
    tuple, not a frozen dataclass: a login reads a dozen, and a tuple is built in C."""

    tag: int
    data: bytes
    start: int
    end: int

    @property
    def value(self) -> bytes:
        return self.data[self.start:self.end]


def read_one(data: bytes, pos: int = 0, limit: int | None = None) -> TLV:
    """Read the element starting at *pos*; it must end by *limit* (default: the buffer's end)."""
    limit = len(data) if limit is None else limit
    if pos + 2 > limit:
        raise DERError("truncated element")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise DERError("high tag numbers are not used by SPNEGO or Kerberos")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > _MAX_LENGTH_OCTETS:
            raise DERError("indefinite or oversized length")
        if pos + count > limit:
            raise DERError("truncated length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > limit:
        raise DERError("element runs past its container")
    return TLV(tag, data, pos, pos + length)


def children(parent: TLV, most: int = MOST_CHILDREN) -> list[TLV]:
    """The elements inside a constructed element, in order; they must fill it exactly, and be
    no more than *most* (else :class:`TooMany`, before the rest is read)."""
    items: list[TLV] = []
    pos = parent.start
    while pos < parent.end:
        if len(items) == most:
            raise TooMany(f"more than {most} elements in one")
        item = read_one(parent.data, pos, parent.end)
        items.append(item)
        pos = item.end
    return items


def tagged(parent: TLV) -> dict[int, TLV]:
    """A SEQUENCE of context-tagged ``[n] EXPLICIT`` fields, as ``{n: inner element}``."""
    fields: dict[int, TLV] = {}
    for item in children(parent):
        if item.tag & 0xE0 != 0xA0:
            raise DERError("expected a context-specific constructed field")
        inner = children(item)
        if len(inner) != 1:
            raise DERError("an explicit tag holds exactly one element")
        fields[item.tag & 0x1F] = inner[0]
    return fields


def read_int(item: TLV) -> int:
    if item.tag != 0x02 or not 0 < item.end - item.start <= 8:
        raise DERError("expected a small INTEGER")
    return int.from_bytes(item.value, "big", signed=True)


def oid_text(item: TLV) -> str:
    """The dotted form of an OBJECT IDENTIFIER element."""
    raw = item.value
    if item.tag != 0x06 or not raw or raw[-1] & 0x80:
        raise DERError("expected an OBJECT IDENTIFIER")
    if len(raw) > _MAX_OID_OCTETS:
        raise DERError(f"an OBJECT IDENTIFIER of {len(raw)} octets names no mechanism")
    return _dotted(raw)


@functools.lru_cache(maxsize=64)  # a login's tokens name the same few mechanisms; bounded for others
def _dotted(raw: bytes) -> str:
    arcs: list[int] = []
    value = 0
    for octet in raw:
        value = (value << 7) | (octet & 0x7F)
        if not octet & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])
