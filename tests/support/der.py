"""DER encoding (X.690) of one element, for tests that build Kerberos and SPNEGO tokens byte by
byte: forged tickets, odd shapes the parsers must refuse."""

from __future__ import annotations

__all__ = ["der"]


def der(tag: int, body: bytes) -> bytes:
    """*body* under *tag*, with its definite length (short or long form)."""
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + body
