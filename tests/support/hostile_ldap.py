"""LDAP servers of a test's own that answer as no directory should: a few dozen lines of asyncio on
127.0.0.1 (support.loopserver) that read LDAP messages (RFC 4511 section 4.1.1, BER) and leave
each answer to a subclass.

What a hostile server sends is the test's to cap (a few MB, then silence with the connection
open), so that code without the bounds under test fails on what the gateway says, not by
eating the machine.
"""

from __future__ import annotations

import asyncio

from support.der import der
from support.loopserver import LoopServer

__all__ = ["LdapMessageServer", "header", "message", "result"]


def header(buf: bytes, pos: int) -> tuple[int, int]:
    """Where the content of the element at *pos* starts and ends (IndexError: its header is not
    all in *buf* yet)."""
    first = buf[pos + 1]
    if first < 0x80:
        return pos + 2, pos + 2 + first
    start = pos + 2 + (first & 0x7F)
    return start, start + int.from_bytes(buf[pos + 2:start], "big")


def message(message_id: bytes, op: bytes) -> bytes:
    """An LDAPMessage: *message_id*'s octets and the protocolOp *op* (already encoded)."""
    return der(0x30, der(0x02, message_id) + op)


def result(tag: int, code: int = 0) -> bytes:
    """An LDAPResult under *tag* (a response's protocolOp) with *code*, no DN, no message."""
    return der(tag, der(0x0A, bytes((code,))) + der(0x04, b"") + der(0x04, b""))


class LdapMessageServer(LoopServer):
    """Reads each connection's LDAP messages and answers each with :meth:`answer` (a subclass's);
    the connection is closed when the client closes it or :meth:`answer` says to hang up."""

    async def answer(self, writer: asyncio.StreamWriter, message_id: bytes, op: int) -> bool:
        """Answer one request (its message id's octets, its protocolOp tag); False: hang up."""
        raise NotImplementedError

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        try:
            while data := await reader.read(65536):
                buf += data
                while len(buf) >= 2:
                    try:
                        start, end = header(buf, 0)
                    except IndexError:
                        break
                    if len(buf) < end:
                        break
                    request, buf = buf[start:end], buf[end:]
                    id_start, id_end = header(request, 0)
                    if not await self.answer(writer, request[id_start:id_end], request[id_end]):
                        return
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
