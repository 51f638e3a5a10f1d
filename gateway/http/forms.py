"""Reading a form body the client wrote: a body aiohttp cannot parse is the client's error (a
400), never a 500 with a traceback. Shared by the front doors that take forms (the login door,
the console)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiDictProxy

__all__ = ["UnreadableForm", "read_form"]

#: What ``request.post()`` raises for a body it cannot read: an invalid byte for the charset
#: (UnicodeDecodeError), an unknown or non-text charset (LookupError), a multipart body without
#: its boundary or cut short (ValueError), an unknown transfer or content encoding of a part
#: (RuntimeError, aiohttp ``multipart.py``), a malformed part header (``BadHttpMessage``).
_UNREADABLE = (ValueError, LookupError, UnicodeDecodeError, AssertionError, RuntimeError, HttpProcessingError)


class UnreadableForm(Exception):
    """The body is not a form that can be read. The message names only the kind of error: the
    exception's own text holds client-chosen values (a charset name, a header line)."""


async def read_form(request: web.Request) -> MultiDictProxy:
    """``await request.post()``, a body aiohttp cannot parse raising :class:`UnreadableForm`. A
    body over the size limit stays aiohttp's 413 (an ``HTTPException``)."""
    try:
        return await request.post()
    except _UNREADABLE as exc:
        raise UnreadableForm(f"unreadable body: {exc.__class__.__name__}") from None
