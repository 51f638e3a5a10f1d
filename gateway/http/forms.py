"""Reading a form body the client wrote: a body aiohttp cannot parse is the client's error (a
400), never a 500 with a traceback, and a body that does not come in ``limits.body_timeout`` is
not waited for. Shared by the front doors that take forms (the login door, the console)."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import MultiDictProxy

from gateway.http.app import GATEWAY_KEY
from gateway.http.protocol import content_encoded, no_linger

__all__ = ["UnreadableForm", "read_form"]

#: What ``request.post()`` raises for a body it cannot read: an invalid byte for the charset
#: (UnicodeDecodeError), an unknown or non-text charset (LookupError), a multipart body without
#: its boundary or cut short (ValueError), an unknown transfer or content encoding of a part
#: (RuntimeError, aiohttp ``multipart.py``), a malformed part header (``BadHttpMessage``), a
#: ``Content-Encoding`` that does not decode (``RequestPayloadError``). A connection closed before
#: the body ended (``ConnectionResetError``) is unreadable too (:func:`read_form`).
_UNREADABLE = (ValueError, LookupError, UnicodeDecodeError, AssertionError, RuntimeError, HttpProcessingError,
               RequestPayloadError)
#: ``limits.body_timeout``'s default, for an application built without a gateway (tests).
_BODY_TIMEOUT = 10.0


class UnreadableForm(Exception):
    """The body is not a form that can be read. The message names only the kind of error: the
    exception's own text holds client-chosen values (a charset name, a header line)."""


async def read_form(request: web.Request) -> MultiDictProxy:
    """``await request.post()`` within ``limits.body_timeout``. A body that cannot be read or
    does not come in time raises :class:`UnreadableForm`; a declared ``Content-Length`` over the
    size limit is aiohttp's 413 before a byte is read. Either way the connection is closed once
    the answer is written: what is left of the body is not waited for."""
    if content_encoded(request):  # never decoded (protocol.py, auto_decompress): not a form
        no_linger(request)
        raise UnreadableForm("a body with a Content-Encoding, or a Transfer-Encoding other than chunked, is not accepted")
    if (request.content_length or 0) > request.client_max_size:
        no_linger(request)
        raise web.HTTPRequestEntityTooLarge(max_size=request.client_max_size, actual_size=request.content_length)
    try:
        return await asyncio.wait_for(request.post(), _body_timeout(request))
    except asyncio.TimeoutError:
        no_linger(request)
        raise UnreadableForm("the body did not arrive in time") from None
    except _UNREADABLE as exc:
        no_linger(request)
        raise UnreadableForm(f"unreadable body: {exc.__class__.__name__}") from None
    except ConnectionResetError:
        # The client closed its connection before the body ended (aiohttp's payload says so):
        # a client gone, not a failure of the door. Left to the handler, it was logged at ERROR
        # with a traceback, once a request (the login door's, anonymous: the log filled), and
        # the login door took it for its session store's (review of the doors).
        raise UnreadableForm("the connection closed before the body ended") from None


def _body_timeout(request: web.Request) -> float:
    gateway = request.app.get(GATEWAY_KEY)
    return gateway.settings.limits.body_timeout if gateway is not None else _BODY_TIMEOUT
