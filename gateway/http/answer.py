"""The front doors' answers, written in one piece.

Every attempt at ``/auth`` ends in a small answer: a status, a dozen header fields, a short text.
aiohttp's :class:`~aiohttp.web.Response` builds it in layers (a ``CIMultiDict``, the
``on_response_prepare`` signal, header preparation, serialisation by the writer, the body as a
second step): about a fifth of the CPU of a cached login (docs/performance.md). :class:`Answer`
is the same answer, as aiohttp would send it, formatted at once and handed to the connection's
writer in one write.

It is still a :class:`~aiohttp.web.StreamResponse` to aiohttp: the connection's loop calls its
:meth:`prepare` and :meth:`write_eof` and reads its ``keep_alive``, as for any response, so
keep-alive, ``force_close()`` (the connection layer's retirement and unread bodies), HEAD and
HTTP/1.0 behave as they do for aiohttp's responses; ``tests/test_answer.py`` compares the bytes
of the two on a real connection.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from http import HTTPStatus

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time
from multidict import CIMultiDict

from gateway.http.protocol import SERVER_HEADER

__all__ = ["Answer"]

#: What may not be in a header field (RFC 9110 section 5.5): aiohttp's writer refuses the same.
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_PHRASES = {status.value: status.phrase for status in HTTPStatus}
_FIXED = f"Content-Type: text/plain; charset=utf-8\r\nServer: {SERVER_HEADER}\r\n"


class Answer(web.StreamResponse):
    """*status*, the header fields *fields* (and one ``WWW-Authenticate`` per *challenges*),
    and *text* as ``text/plain; charset=utf-8``; ``Content-Length``, ``Date``, ``Server`` and,
    where aiohttp would send one, ``Connection`` are added as aiohttp adds them."""

    def __init__(self, status: int, text: str, fields: dict[str, str], challenges: Sequence[str] = ()) -> None:
        # Not StreamResponse.__init__: its CIMultiDict is part of what this class saves. What
        # aiohttp's connection reads of a response (keep_alive, prepared, status) works from these.
        self._state = {}
        self._status = status
        self._reason = _PHRASES.get(status, "Unknown")
        self._body = text.encode()
        self._fields = fields
        self._challenges = challenges

    @property
    def headers(self) -> CIMultiDict[str]:
        """A copy of the fields given, for reading: changing it changes nothing that is sent."""
        headers = CIMultiDict(self._fields)
        for challenge in self._challenges:
            headers.add("WWW-Authenticate", challenge)
        return headers

    @property
    def text(self) -> str:
        return self._body.decode()

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        self._req = request
        keep_alive = self._keep_alive  # False after force_close()
        if keep_alive is None:
            keep_alive = self._keep_alive = request.keep_alive
        lines = [f"{name}: {value}" for name, value in self._fields.items()]
        lines += [f"WWW-Authenticate: {challenge}" for challenge in self._challenges]
        if _FORBIDDEN.search("\t".join(lines)):  # as aiohttp's writer: a response is never split
            raise ValueError("a control character in a response header")
        body = self._body
        if request.method == "HEAD":  # the length of the body a GET gets, without the body
            if body:
                lines.append(f"Content-Length: {len(body)}")
            body = b""
        else:
            lines.append(f"Content-Length: {len(body)}")
        lines.append(f"Date: {rfc822_formatted_time()}")
        version = request.version
        if keep_alive:
            if version == HttpVersion10:
                lines.append("Connection: keep-alive")
        elif version == HttpVersion11:
            lines.append("Connection: close")
        lines.append("\r\n")  # the empty line that ends the head
        head = f"HTTP/{version.major}.{version.minor} {self._status} {self._reason}\r\n{_FIXED}"
        self._eof_sent = True
        writer = self._payload_writer = request.writer
        await writer.write((head + "\r\n".join(lines)).encode() + body)
        await writer.drain()  # a client that reads nothing holds the next answer back (write_timeout)
        return writer

    async def write_eof(self, data: bytes = b"") -> None:
        """Written whole by :meth:`prepare`."""
