"""The connection layer under the front doors: slow clients, connection caps, malformed requests.

aiohttp has no header timeout, no cap on open connections, and on a request it cannot parse it
logs a traceback holding the raw bytes and echoes them in the 400 body (issue 9 item 7: base64
credentials, API tokens, JSON passwords). :class:`GuardedRequestHandler` is aiohttp's
connection protocol with those three things decided here instead:

* **header timeout** -- a connection must complete each request's headers within
  ``limits.header_timeout`` seconds of it opening or of its previous response; otherwise it is
  closed (one-byte-every-15-s floods exhausted the file descriptors). An idle keep-alive
  connection (no byte of a next request) is closed after ``limits.keepalive_timeout``;
* **connection caps** -- more than ``limits.max_connections`` open connections per worker, or
  ``limits.max_connections_per_client`` from one address (trusted proxies exempt: every client
  behind them shares their address), and a new connection is closed at once;
* **malformed requests** -- answered with a fixed body (``400 Bad Request``) and logged as one
  WARNING line naming the client and the parser's error class, never the bytes;
* **malformed bodies** -- a body whose framing breaks after its headers were handed on (a chunk
  size that is not hexadecimal, a chunk not ended by CRLF) fails the read of that body at once
  (:class:`MalformedBody`, a 400 from the door reading it), and the connection is closed once
  its answer is written. aiohttp's parser queued the error as the next request's, so the body
  being read waited for ``limits.body_timeout`` (the doors answered "the body did not arrive in
  time" 10 s later);
* **header bytes** -- aiohttp bounds each header line (8,190 bytes) and their number (128), not
  their sum: 120 lines of 8,000 bytes, never ended, held ~1.5 MB of a worker per connection,
  gigabytes for a few thousand. A connection may send ``limits.max_header_bytes`` from the start
  of a request to the end of its headers, also when pipelined behind a request being handled
  (answered ``431`` and closed beyond, or closed when an answer is under way); a body's bytes
  are not counted (aiohttp bounds them: ``client_max_size``, :data:`MAX_BODY`);
* **overload holds** -- a connection answered 503 ``overloaded`` has its next request kept,
  unparsed, for the ``Retry-After`` it was given: at least ``limits.retry_after``, longer past
  ``limits.overload_refusals`` refusals a second (turns spaced to keep to that rate), at most
  ``limits.max_hold``. A client resending at once cannot keep the event loop refusing and take
  the CPU from the logins; one that closes meanwhile is seen at once;
* **retirement at reload** -- an idle keep-alive connection of the retiring generation goes on
  with the new generation, which answers its next request (:func:`hand_over`): aiohttp closed
  it, and a request its client sent meanwhile got no answer (a proxy resends only idempotent
  ones: a POST, the login door's form or ``/v1/authenticate``, became a 502 at reloads under
  load). So does a connection the retiring generation accepted whose first request has not
  begun to arrive. One whose first request is arriving is not an idle keep-alive connection:
  its client sent a request on a fresh connection and, unlike one on a reused connection, does
  not retry it. aiohttp closes it at once and drops those bytes; here it is given up to 2 s
  (within ``limits.header_timeout`` and the shutdown grace) to send that request, which is
  answered, as is a request held after an overload refusal. At a stop, a connection silent
  for longer is a browser's preconnect or idle, and is closed as idle ones are. Responses of a
  retiring generation carry ``Connection: close``.

Every limit hit is logged at WARNING, at most once per 10 s per kind, with the count since.
``Server:`` carries no versions (``authgw``). Reads ``limits.*`` and ``trusted_proxies``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from asyncio.sslproto import SSLProtocol as _AsyncioSSLProtocol
from collections import Counter
from http import HTTPStatus
from typing import Callable

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from aiohttp.web_server import Server

from gateway.http.clientaddr import parse_address
from gateway.lifecycle import trim_freed_memory
from gateway.logs import RateLimitedWarning
from gateway.settings import LimitsSettings

try:
    from uvloop.loop import Loop as _UvLoop, SSLProtocol as _UvSSLProtocol
except ImportError:  # pragma: no cover - uvloop is an optional speed-up
    _UvLoop = _UvSSLProtocol = None

__all__ = ["ConnectionGuard", "GuardedSite", "MAX_BODY", "MalformedBody", "SERVER_HEADER", "hand_over"]

log = logging.getLogger("authgw.http")

SERVER_HEADER = "authgw"
#: The largest request body any listener reads (aiohttp's ``client_max_size``; the JSON API, the
#: login door's forms).
MAX_BODY = 64 * 1024
_HEADERS_TOO_LARGE_BODY = b"431: request headers too large\n"
_HEADERS_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nServer: " + SERVER_HEADER.encode() +
                      b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
                      b"Connection: close\r\n\r\n" % len(_HEADERS_TOO_LARGE_BODY) + _HEADERS_TOO_LARGE_BODY)
_LOG_EVERY = 10.0
#: Seconds a retiring generation waits for the first request of a connection it accepted: a
#: client sends it right after connecting; this covers a loaded machine's scheduling delays.
_FIRST_REQUEST_GRACE = 2.0
#: Bytes kept from a held connection before reading from it pauses until the hold ends (a
#: usual request fits). Small, since every open connection may be held: 4,096 x 8 KiB = 32 MiB.
#: Reading keeps a client's close visible; a paused one is seen when the hold ends.
_HOLD_BUFFER = 8 * 1024
#: Open connections that make a burst: when they fall to an eighth of such a peak, freed memory
#: is given back to the system (:func:`gateway.lifecycle.trim_freed_memory`).
_BURST = 256
_TRIM_AFTER = 1.0  # seconds from the fall below an eighth of the peak to the trim


class MalformedBody(RequestPayloadError):
    """What reading a request body raises when its framing broke after its headers arrived (a
    malformed chunk): the client's error, a 400. Its text is fixed, never the client's bytes."""

    def __init__(self) -> None:
        super().__init__("the body is malformed (its chunked framing)")


class ConnectionGuard:
    """The open connections of one worker, across all its sockets.

    ``limits.max_connections`` caps them all together (the process's descriptors), but a flood
    on one listener must not shut the others out (the relay's or the login door's public port
    against the forward-auth listener nginx uses): with several listeners, each keeps a reserve
    of ``max_connections / (4 x listeners)`` that the others cannot take while it is unused. The
    ``listen:`` sockets are one listener; each plugin listener is one. Connections from
    ``trusted_proxies`` are exempt from the per-client cap, and may go
    ``max_connections_per_client`` beyond the cap: a flood from elsewhere does not shut the
    gateway's own proxy out."""

    def __init__(self, limits: LimitsSettings, trusted_proxies=(), ipv6_prefix: int = 64) -> None:
        self.limits = limits
        self.trusted = tuple(trusted_proxies)
        self.ipv6_prefix = ipv6_prefix
        self.open = 0
        self.per_client: Counter[str] = Counter()
        self.listeners: Counter[str | None] = Counter()  # open connections by listener (None: listen:)
        self.warn = RateLimitedWarning(log, _LOG_EVERY)
        self._next_read = 0.0  # loop time before which no held connection reads again
        self._peak = 0  # most connections open at once since the last trim

    def hold_after_refusal(self, now: float) -> float:
        """Seconds a connection just refused for overload waits before its next request is read.

        At least ``limits.retry_after`` (what its ``Retry-After`` asks); beyond
        ``limits.overload_refusals`` a second, the held connections are given turns spaced so
        that the worker reads no more of their requests than that, up to ``limits.max_hold``.
        A client that resends at once, ignoring ``Retry-After``, then costs no CPU while it waits:
        refusing it again and again would take the cores from the logins (issue 10)."""
        # A duration, not a difference of loop times: (now + 30) - now may come out as
        # 30.000000000004, and its Retry-After as 31.
        hold = max(float(self.limits.retry_after), self._next_read - now)
        hold = min(hold, max(self.limits.max_hold, self.limits.retry_after))
        self._next_read = now + hold + 1.0 / self.limits.overload_refusals
        return hold

    def serve(self, listener: str | None) -> None:
        """*listener* (a name; ``None``: the ``listen:`` sockets) takes connections through this
        guard: it has a reserve of its own from now on."""
        self.listeners[listener] += 0

    def client(self, host: str) -> str:
        """Whom a connection from *host* counts against: its address, or for IPv6 its network of
        ``throttle.ipv6_prefix`` bits, as the throttle counts clients. One host is given a /64
        and may connect from any of its addresses: counted one by one, it could take every
        connection of ``limits.max_connections`` (review of the front door). A trusted proxy is
        counted by its own address: in its network's count it would shut its untrusted
        neighbours out."""
        if ":" not in host or "%" in host or self.trusted_host(host):  # IPv4; a zone; a proxy
            return host
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            return host
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, self.ipv6_prefix), strict=False))

    def admit(self, host: str, listener: str | None = None, client: str | None = None) -> bool:
        """Count a new connection from *host* on *listener*, or refuse it (False) with a
        logged warning. *client*: whom it counts against, :meth:`client` of *host* now (the
        default); pass the same to :meth:`release`."""
        limits = self.limits
        if self.open >= limits.max_connections - self._held_back(False) and not self._room(host, listener):
            return False
        client = client or self.client(host)
        if self.per_client[client] >= limits.max_connections_per_client and not self.trusted_host(host):
            self.warn("per_client", "%s has %d connections open (limits.max_connections_per_client); "
                      "closing its new ones", client, self.per_client[client])
            return False
        self.open += 1
        self.listeners[listener] += 1
        self.per_client[client] += 1
        if self.open > self._peak:
            self._peak = self.open
        return True

    def _held_back(self, listener: str | None | bool) -> int:
        """Slots the other listeners' unused reserves keep from *listener* (``None`` as a name
        is the ``listen:`` sockets; pass ``False`` for "any listener": the most that can be held
        back, every reserve unused but one)."""
        count = len(self.listeners)
        if count < 2:
            return 0
        reserve = self.limits.max_connections // (4 * count)
        if listener is False:
            return (count - 1) * reserve
        return sum(max(0, reserve - n) for name, n in self.listeners.items() if name != listener)

    def _room(self, host: str, listener: str | None) -> bool:
        """Near the cap: whether *listener* may take one more (its share, or a trusted proxy's
        margin beyond the cap); if not, logged."""
        limits = self.limits
        if self.open < limits.max_connections - self._held_back(listener):
            return True
        if self.open < limits.max_connections + limits.max_connections_per_client and self.trusted_host(host):
            return True
        held = self.listeners[listener]
        self.warn("max_connections", "%d connections open (limits.max_connections), %d on %s; closing its new "
                  "ones (each listener keeps a share for itself)", self.open, held,
                  "the listen: sockets" if listener is None else f"listener {listener}")
        return False

    def release(self, host: str, listener: str | None = None, client: str | None = None) -> None:
        """Count off a connection :meth:`admit` counted, against the *client* it was counted
        against. Worked out again here, it changed with a reload that made an IPv6 host a
        trusted proxy (its address, not its /64) or no longer one: the /64 kept the counts of
        connections open at that reload for good, and its clients were refused past
        ``max_connections_per_client`` minus those (review of the front door)."""
        self.open -= 1
        self.listeners[listener] -= 1
        client = client or self.client(host)
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]
        if self._peak >= _BURST and self.open <= self._peak // 8:
            # A burst of connections is ending: once the rest of it has closed too, give back the
            # memory its buffers left in holes of glibc's heaps (issue 10: RSS after a burst near
            # its level before), on a thread of its own.
            self._peak = self.open
            asyncio.get_running_loop().call_later(_TRIM_AFTER, self._trim)

    @staticmethod
    def _trim() -> None:
        threading.Thread(target=trim_freed_memory, name="authgw-trim", daemon=True).start()

    def trusted_host(self, host: str) -> bool:
        """*host* (a socket peer) is one of ``trusted_proxies``."""
        address = parse_address(host)
        return address is not None and any(address in net for net in self.trusted)


class _NoDelayAlreadySet(BaseProtocol):
    """Sits between aiohttp's ``RequestHandler`` and ``BaseProtocol`` in
    :class:`GuardedRequestHandler`'s MRO: keeps the transport, as ``BaseProtocol.connection_made``
    does, without setting ``TCP_NODELAY`` on the connection. Every connection has it already,
    from its listening socket (``gateway.server.bind``; uvloop sets it on each as well). aiohttp's
    setsockopt went through uvloop's socket stand-in, which makes and drops a socket object each
    call: ~25 µs of a certificate login, which opens a connection per login
    (docs/performance.md). Tested (tests/test_connection_setup.py): the connections of either
    loop, plain and TLS, have ``TCP_NODELAY``, and this leaves a protocol as aiohttp's own does,
    but for the system call."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]


#: The HTTP versions answered (:meth:`GuardedRequestHandler._refuse_unanswerable`).
_VERSIONS = (HttpVersion11, HttpVersion10)


class GuardedRequestHandler(RequestHandler, _NoDelayAlreadySet):
    """aiohttp's connection protocol with a header timeout, connection caps, and malformed
    requests answered without echoing or logging their bytes."""

    def __init__(self, manager, *, guard: ConnectionGuard, listener: str | None = None, **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._listener = listener  # its name in the guard (None: the listen: sockets)
        self._host: str | None = None  # set when the connection was admitted (and counted)
        self._client: str | None = None  # whom the guard counted it against (ConnectionGuard.client)
        self._headers_since: float | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._first_request: asyncio.Future | None = None  # set while retirement waits for it
        #: At a reload: the server of the new generation this connection goes on with, or None
        #: when there is none any more (the worker stops) (:func:`hand_over`).
        self._successor: Callable[[], Server | None] | None = None
        self._hold: float | None = None  # seconds to hold the next request after this response
        self._held: bytearray | None = None  # what the client sent while held (None: not held)
        self._hold_timer: asyncio.TimerHandle | None = None  # ends the hold; set exactly while held
        self._no_linger = False  # close right after this response (no_linger)
        self._unparsed = 0  # bytes since a request's headers last ended (or its answer, below)
        self._was_busy = False  # a request was handled, or its body read, after the previous read
        self._last_payload = None  # the body of the last request parsed (its bytes may still come)
        self._malformed = None  # a body failed with MalformedBody: its request's answer closes the connection
        self._write_timer: asyncio.TimerHandle | None = None  # set exactly while writing is paused
        #: The client, when :class:`_TlsAccept` counted this connection at its TCP accept, and
        #: whom it counted it against.
        self.admitted: str | None = None
        self.admitted_as: str | None = None

    # -- connection caps --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        host = self.admitted or _peer_host(transport)
        client = self.admitted_as or self._guard.client(host)
        if self.admitted is None and not self._guard.admit(host, self._listener, client):
            transport.abort()
            return
        self._host, self._client = host, client
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._first_request is not None and not self._first_request.done():
            self._first_request.set_result(None)
        if self._host is None:  # refused in connection_made: aiohttp never saw it
            return
        self._guard.release(self._host, self._listener, self._client)
        self._host = None
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self._held = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)

    # -- write timeout --------------------------------------------------------------------------------

    def pause_writing(self) -> None:
        """The transport's buffer is full: the client reads nothing of what it asked for (a
        pipeline of requests whose answers it never reads). Nothing in aiohttp bounds that wait,
        and the header clock stops while a request is handled: without this, such a connection
        is held for ever, and enough of them take every slot (``limits.max_connections``)."""
        super().pause_writing()
        if self._write_timer is None and self._host is not None:
            self._write_timer = self._loop.call_later(self._guard.limits.write_timeout, self._write_stalled)

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().resume_writing()

    def _write_stalled(self) -> None:
        self._write_timer = None
        if self.transport is None:
            return
        self._guard.warn("write_timeout", "closed a connection from %s: it read none of its answers for "
                         "%.0f s (limits.write_timeout)", self._host, self._guard.limits.write_timeout)
        self.transport.abort()  # what is buffered for a client that does not read is dropped

    # -- header timeout -----------------------------------------------------------------------------

    def _await_headers(self) -> None:
        """Start the clock for the next request's headers."""
        self._headers_since = self._loop.time()
        if self._header_timer is None:
            self._header_timer = self._loop.call_at(self._headers_since + self._guard.limits.header_timeout,
                                                    self._check_headers)

    def _busy(self) -> bool:
        """A request's headers have arrived: it is queued or being handled (its body, if any,
        has ``limits.body_timeout``)."""
        return bool(self._messages) or getattr(self, "_request_in_progress", False) or \
            self._current_request is not None

    def _check_headers(self) -> None:
        self._header_timer = None
        if self._host is None or self._headers_since is None:
            return
        if self._busy():
            self._headers_since = None
            return
        due = self._headers_since + self._guard.limits.header_timeout
        if self._loop.time() < due:
            self._header_timer = self._loop.call_at(due, self._check_headers)
            return
        self._guard.warn("header_timeout", "closed a connection from %s: no complete request headers "
                         "within %.0f s (limits.header_timeout)", self._host, self._guard.limits.header_timeout)
        self.force_close()
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._held is not None:  # kept unparsed until the hold ends (overload, below)
            self._held += data
            if len(self._held) > _HOLD_BUFFER:
                self.transport.pause_reading()  # resumed when the hold ends
            return
        if self._payload_parser is None and not self._upgraded and self._too_many_header_bytes(data):
            return  # (a WebSocket's frames, after an upgrade, are not requests)
        counted, payload = self._request_count, self._last_payload
        body_open = payload is not None and not payload.is_eof()
        super().data_received(data)
        if self._request_count != counted:
            self._unparsed = 0  # a request's headers ended in this read
            self._refuse_unanswerable(self._request_count - counted)
            # A body that broke stays the last one: what its client sends after it is no headers.
            if not (body_open and not payload.is_eof() and self._malformed_body(payload)):
                self._last_payload = self._messages[-1][1] if self._messages else None
        elif body_open and payload.is_eof():
            self._unparsed = 0  # a request's body ended in this read: the next request starts
        self._was_busy = busy = self._busy()
        if self._first_request is not None and self._request_count and not self._first_request.done():
            self._first_request.set_result(None)
        if busy:
            self._headers_since = None
        elif data and self._headers_since is None:
            self._await_headers()  # the first byte of a request after a keep-alive pause

    def _malformed_body(self, payload) -> bool:
        """The open body *payload* broke its framing in this read: aiohttp's parser (the C one)
        raised, and aiohttp queued the error as a request of its own (400, answered after the
        one whose body it is), leaving *payload* open: the handler reading it waited for
        ``limits.body_timeout``. The error is the body's: the read fails now
        (:class:`MalformedBody`), the request's answer closes the connection (nothing after a
        broken framing can be read), and one queued 400 is not written after it. An answer
        already written (aiohttp reading the rest of the body before the next request): closed
        at once. Whether it was so (else the body had ended and a request was parsed)."""
        error = self._messages[-1][0] if self._messages else None
        if not isinstance(error, _ErrInfo):
            return False
        self._messages.pop()
        self._guard.warn("malformed_body", "refused a malformed request body from %s: %s (400)", self._host,
                         error.exc.__class__.__name__ if error.exc is not None else "error")
        payload.set_exception(MalformedBody())
        if self._request_in_progress or any(queued is payload for _, queued in self._messages):
            self._malformed = payload  # finish_response closes the connection after its answer
        else:
            self.force_close()
        return True

    def _refuse_unanswerable(self, parsed: int) -> None:
        """The last *parsed* requests queued, each refused (answered, then the connection closed)
        when no answer to it can be read right:

        * a version other than HTTP/1.0 and 1.1: ``505`` in HTTP/1.0. aiohttp answers in the
          version the request line names: a line without one (HTTP/0.9) or with ``HTTP/2.0`` got
          ``HTTP/0.9 200 OK`` or ``HTTP/2.0 200 OK`` with HTTP/1 headers, a status line no client
          or proxy reads right;
        * an HTTP/1.0 request with ``Transfer-Encoding``: ``400``. Its framing is faulty
          (RFC 9112 section 6.1: treated so and the connection closed, whatever else it says);
          aiohttp read it as chunked and kept the connection for the bytes after it, which a
          proxy that reads HTTP/1.0 framing by the RFC takes for the body: a request smuggled
          past it (review of the supervisor and the HTTP layer).

        (aiohttp's own way to answer an unparsable request: an ``_ErrInfo`` in the queue; its
        answer closes the connection, so nothing queued after it is answered.)"""
        queue = self._messages
        for at in range(len(queue) - parsed, len(queue)):
            message = queue[at][0]
            if not isinstance(message, RawRequestMessage):
                continue
            if message.version not in _VERSIONS:
                queue[at] = (_ErrInfo(status=505, exc=None, message=""), EMPTY_PAYLOAD)
            elif message.version == HttpVersion10 and "Transfer-Encoding" in message.headers:
                queue[at] = (_ErrInfo(status=400, exc=None, message=""), EMPTY_PAYLOAD)

    def _too_many_header_bytes(self, data: bytes) -> bool:
        """Count *data* against ``limits.max_header_bytes``; past it, refuse (431 when no
        answer is under way) and close. A request body's bytes are not counted: aiohttp bounds
        what it keeps of one (``client_max_size``, and its buffer pauses reading)."""
        payload = self._last_payload
        if payload is not None and not payload.is_eof():
            return False  # the last request's body is still coming (even after its answer)
        busy = self._busy()
        if self._was_busy and not busy:
            self._unparsed = 0  # the previous request is answered: the next one starts here
        end = data.find(b"\r\n\r\n")
        head = self._unparsed + (len(data) if end < 0 else end + 4)  # up to the end of the headers
        self._unparsed += len(data)
        if head <= self._guard.limits.max_header_bytes:
            # Within it (a read that ends the headers counts up to their end, then from 0 again
            # for the next request). A read that ended them was not counted at all: 56 KiB, a
            # pause, then 100 KiB more and the end in one read passed a limit of 64 KiB.
            return False
        self._guard.warn("max_header_bytes", "closed a connection from %s: more than %d bytes of request headers "
                         "(limits.max_header_bytes)", self._host, self._guard.limits.max_header_bytes)
        if not busy and self.transport is not None:
            self.transport.write(_HEADERS_TOO_LARGE)  # else an answer is being written: just close
        self.force_close()
        if self.transport is not None:
            self.transport.close()
        return True

    # -- hand-over at reload, retirement at a stop ------------------------------------------------------

    def _between_requests(self) -> bool:
        """A connection waiting for its next request: open, none in progress or queued, no byte
        of one received, and aiohttp's loop waiting for it: an idle keep-alive connection, and
        a new one whose first request has not begun to arrive (the new generation answers it as
        well). Not one whose request is partly received, nor one held after an overload refusal
        (:meth:`shutdown` has the retiring generation answer those), nor a WebSocket (the
        relay's link)."""
        if self.transport is None or self._close or self._force_close or self._upgraded or self._unread():
            return False
        if self._messages or self._request_in_progress or self._current_request is not None:
            return False
        return self._waiter is not None and not self._waiter.done()

    def _hand_over(self) -> bool:
        """Go on with the successor's server, if this connection is between requests: aiohttp's
        loop takes the request handler and factory afresh for each request, so the next one is
        the new generation's. Its counts in the guard stay (one guard for every generation)."""
        server = self._successor() if self._successor is not None else None
        if server is None or not self._between_requests():
            return False
        transport = self._manager._connections.pop(self, None)
        if transport is None:
            return False
        self._successor = None
        server._connections[self] = transport
        self._manager = server
        self._request_handler, self._request_factory = server.request_handler, server.request_factory
        return True

    def _fresh(self) -> bool:
        """Accepted, open, and no request received yet (not even partly parsed)."""
        return self._request_count == 0 and self.transport is not None and not self._force_close

    def _unread(self) -> bool:
        """A request is probably on its way that aiohttp has not seen: the connection is fresh,
        or held after an overload 503 (its client resent at once)."""
        return self._fresh() or self._held is not None

    def close(self) -> None:
        # aiohttp's pre-shutdown close() would drop such a request's bytes (data_received
        # ignores them once closing); shutdown() below serves that request, or hands the
        # connection over.
        if self._successor is None and not self._unread():
            super().close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        if self._successor is not None:
            for _ in range(3):  # a request just answered: aiohttp's loop waits for the next in a turn
                if self._hand_over():
                    return
                if self._request_in_progress or self._messages:
                    break  # answered here, with Connection: close
                await asyncio.sleep(0)
            self._successor = None
        if self._held is not None:  # parse the held request now: this generation answers it
            self._hold_timer.cancel()
            self._end_hold()
        if self._fresh():
            self._first_request = self._loop.create_future()
            wait = min(_FIRST_REQUEST_GRACE, self._guard.limits.header_timeout, timeout or _FIRST_REQUEST_GRACE)
            try:
                await asyncio.wait_for(asyncio.shield(self._first_request), wait)
            except asyncio.TimeoutError:
                pass  # it sent nothing: closed as any idle connection
        # aiohttp finishes a request it has received (in progress or queued) before closing.
        await super().shutdown(timeout)

    async def finish_response(self, request, resp, start_time):
        if self._force_close or self._first_request is not None:
            resp.force_close()  # retiring: the client opens its next connection to the new generation
        # A body left unread (no_linger): the connection is closed once the answer is written,
        # and the answer says so (``Connection: close``), or a keep-alive client sends its next
        # request into the closing connection and gets none.
        close_unread, self._no_linger = self._no_linger and not request.content.is_eof(), False
        if self._malformed is not None and request.content is self._malformed:
            self._malformed, close_unread = None, True  # a broken framing: nothing after it is read
        if close_unread:
            resp.force_close()
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            if close_unread and self.transport is not None:
                self.force_close()  # the response is written: close now, not after lingering
            hold, self._hold = self._hold, None
            # Already held (the refused request was pipelined behind another refused one): that
            # hold stands, with what it has kept so far.
            if (hold and self._held is None and self.transport is not None
                    and not self.transport.is_closing() and not self._force_close):
                self._held = bytearray()
                self._hold_timer = self._loop.call_later(hold, self._end_hold)

    def no_linger(self) -> None:
        """Close the connection as soon as this request's response is written, without
        aiohttp's lingering (up to 10 s reading the rest of a body nobody will read): for
        refusals on a listener that needs no credentials, where a slow body would otherwise
        hold the connection."""
        self._no_linger = True

    # -- overload ---------------------------------------------------------------------------------------

    def hold_after_refusal(self) -> float:
        """Called by a front door answering 503 ``overloaded``: the seconds this connection's
        next request will wait (:meth:`ConnectionGuard.hold_after_refusal`), for its
        ``Retry-After``. Once the 503 is written, what the client sends is kept, unparsed, until
        then; a client that closes meanwhile is seen at once (its connection is not held open)."""
        if self._host is not None and self._guard.trusted_host(self._host):
            # A proxy's keep-alive connection carries other clients' requests next: it is not
            # held, so one client's refusal does not delay theirs. The proxy passes the 503 on.
            return float(self._guard.limits.retry_after)
        self._hold = self._guard.hold_after_refusal(self._loop.time())
        return self._hold

    def _end_hold(self) -> None:
        self._hold_timer = None
        held, self._held = self._held, None
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.resume_reading()  # if the buffer filled up
        if held:
            self.data_received(bytes(held))

    # -- malformed requests ---------------------------------------------------------------------------

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # aiohttp's own version logs a traceback whose message holds the raw request bytes and
        # echoes *message* (those bytes again) in the body: neither may happen here.
        remote = self._host or "?"
        if isinstance(exc, MalformedBody):  # a handler that let it through: the client's error
            status = 400
        if isinstance(exc, ConnectionResetError) and (self.transport is None or self.transport.is_closing()):
            # A handler reading from a client that has gone (a plugin route reading its body
            # itself): the client's doing, said briefly, not an ERROR with a traceback a request.
            self._guard.warn("client_gone", "a client closed its connection before its request was read "
                             "(last: %s)", request.remote or remote)
        elif status >= 500 and exc is not None:
            log.error("a request handler raised %s (client %s)", exc.__class__.__name__, remote, exc_info=exc)
        else:
            self._guard.warn(f"bad_request_{status}", "refused a malformed request from %s: %s (%d)", remote,
                             exc.__class__.__name__ if exc is not None else "error", status)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        response = web.Response(status=status, text=f"{status} {phrase}\n",
                                headers={"Server": SERVER_HEADER, "Cache-Control": "no-store"})
        response.force_close()
        return response

    def log_exception(self, *args, **kw) -> None:
        # aiohttp's last-resort "Unhandled exception" path: name the error, not its text.
        exc = kw.get("exc_info")
        log.error("connection error: %s", exc.__class__.__name__ if isinstance(exc, BaseException) else args[0])


def hand_over(server: Server, successor: Callable[[], Server | None]) -> None:
    """At a reload: the idle keep-alive connections of *server* (the retiring generation's, which
    no longer accepts) go on with ``successor()`` (the new generation's server for the same
    listener, None once there is none): those idle now at once, the others if their request is
    answered by the time the retiring generation shuts its connections down (else that answer
    says ``Connection: close``)."""
    for handler in server.connections:
        if isinstance(handler, GuardedRequestHandler):
            handler._successor = successor
            handler._hand_over()


def content_encoded(request: web.Request) -> bool:
    """Whether *request*'s body comes with a ``Content-Encoding`` (other than ``identity``), or
    a ``Transfer-Encoding`` other than ``chunked`` alone. Request bodies are not decoded here
    (``auto_decompress`` is off): such a body is refused, never read as if it were plain.
    aiohttp reads ``gzip, chunked`` as chunked and hands the gzip bytes on as they are: a proxy
    that decodes them would have read another body (review of the front doors)."""
    if any(value.strip().lower() not in ("", "identity") for value in request.headers.getall("Content-Encoding", ())):
        return True
    codings = [c.strip().lower() for v in request.headers.getall("Transfer-Encoding", ()) for c in v.split(",")]
    return bool(codings) and codings != ["chunked"]


def no_linger(request: web.Request) -> None:
    """Close *request*'s connection once its answer is written, without waiting for what is left
    of its body (aiohttp would read and drop it for up to its lingering time)."""
    close = getattr(request.protocol, "no_linger", None)  # GuardedRequestHandler
    if close is not None:
        close()


async def continue_body(request: web.Request) -> None:
    """What aiohttp's default ``Expect`` handler does, for routes whose own handler decides
    first whether the body is wanted: ``100 Continue`` for ``100-continue`` on HTTP/1.1, 417
    for any other expectation."""
    if request.version != HttpVersion11:
        return
    if request.headers.get("Expect", "").lower() != "100-continue":
        raise web.HTTPExpectationFailed(text="Unknown Expect\n")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the answer's own size starts after it


def _peer_host(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return peer[0] if isinstance(peer, tuple) and peer else str(peer)


class _TlsAccept(asyncio.Protocol):
    """A new connection to a TLS listener: counted and given its handshake here, at TCP accept.

    With ``create_server(ssl=...)`` the HTTP protocol hears of a connection only once its TLS
    handshake is done, so a client that connected and never finished one (or sent nothing) was
    neither counted against the connection caps nor timed out before the event loop's 60-s
    handshake timeout: 400 such connections from one client under a cap of 100 were all held,
    and nothing was logged. Here the connection is counted (or refused) at once, its handshake
    must end within ``limits.header_timeout`` (the time a request's headers get), and the TLS
    protocol the event loop would have used is put in this one's place before the first byte is
    read. A connection whose handshake fails or times out is counted off when it ends; one that
    completes goes to :class:`GuardedRequestHandler`, which counts it off when it closes.
    """

    def __init__(self, app_factory, tls_protocol, context, guard: ConnectionGuard,
                 loop: asyncio.AbstractEventLoop, listener: str | None = None) -> None:
        self._app_factory = app_factory
        self._tls_protocol = tls_protocol  # the event loop's own TLS protocol class
        self._context = context
        self._guard = guard
        self._loop = loop
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        host = _peer_host(transport)
        client = self._guard.client(host)
        if not self._guard.admit(host, self._listener, client):
            transport.abort()
            return
        app = self._app_factory()
        app.admitted, app.admitted_as = host, client
        timeout = self._guard.limits.header_timeout
        started = self._loop.time()
        waiter = self._loop.create_future()

        def settled(future: asyncio.Future) -> None:
            if future.cancelled() or future.exception() is not None:  # no error of this process
                transport.abort()  # as the loop's own server does with a failed handshake
            if app._host is None:  # the HTTP protocol never had it: failed, timed out or gone
                self._guard.release(host, self._listener, client)
                if self._loop.time() - started >= timeout:
                    self._guard.warn("handshake_timeout", "closed a connection from %s: no TLS handshake within "
                                     "%.0f s (limits.header_timeout)", host, timeout)

        waiter.add_done_callback(settled)
        tls = self._tls_protocol(self._loop, app, self._context, waiter, server_side=True,
                                 ssl_handshake_timeout=timeout)
        # Before the loop reads the first byte (it starts reading when this method returns).
        transport.set_protocol(tls)
        tls.connection_made(transport)


class GuardedSite(web.BaseSite):
    """``web.SockSite`` serving with :class:`GuardedRequestHandler` on an already bound socket;
    on a TLS listener each connection is accepted through :class:`_TlsAccept`."""

    def __init__(self, runner: web.BaseRunner, sock, guard: ConnectionGuard, *, ssl_context=None,
                 listener: str | None = None) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=2048)
        self._sock = sock
        self._guard = guard
        self._listener = listener  # None: the listen: sockets; else a plugin listener's name
        guard.serve(listener)

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"{'https' if self._ssl_context else 'http'}://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        guard, listener = self._guard, self._listener

        def protocol() -> GuardedRequestHandler:
            # auto_decompress off: aiohttp inflates a gzip or deflate body on the event loop, and
            # reading a body nobody asked for (lingering after the answer) does not yield while
            # the inflater has output: 2 MB of gzip held a worker's loop 2 s, and a few dozen such
            # requests every worker's past the watchdog (review of the front door). No handler
            # accepts an encoded body (content_encoded); the raw bytes are what is read or dropped.
            # One header line may take the whole header budget (limits.max_header_bytes, which
            # bounds them all): aiohttp's own 8,190 bytes refused the Negotiate token of a user
            # in many AD groups (a PAC of up to MaxTokenSize, 48,000 bytes) with a 400 before
            # the plugin saw it (review of the Kerberos plugin).
            return GuardedRequestHandler(server, loop=loop, guard=guard, listener=listener, access_log=None,
                                         keepalive_timeout=guard.limits.keepalive_timeout, auto_decompress=False,
                                         max_field_size=guard.limits.max_header_bytes,
                                         tcp_keepalive=False)  # inherited from the listening socket (server.bind)

        context = self._ssl_context
        # uvloop's TLS protocol (compiled) on uvloop's loop, asyncio's on asyncio's
        tls_protocol = _UvSSLProtocol if _UvLoop is not None and isinstance(loop, _UvLoop) else _AsyncioSSLProtocol

        def tls() -> _TlsAccept:
            return _TlsAccept(protocol, tls_protocol, context, guard, loop, listener)

        self._server = await loop.create_server(tls if context is not None else protocol, sock=self._sock,
                                                backlog=self._backlog)
