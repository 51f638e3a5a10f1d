"""A whole Redis call bounded in time, not each socket read (redis-py's ``socket_timeout``).

redis-py bounds each read of a socket by ``socket_timeout``: a Redis that sends its answer a
byte at a time (or a middlebox that does) keeps a call for as long as the answer is long. The
throttle store and the login door's session store make calls the gateway waits for (the login
door's on the worker's event loop), so each call gets a deadline: :class:`CallDeadline` holds it
for the calling thread, and the connections of a client whose pool uses
:func:`bounded_connection_class` end their connect, sends and reads by it. A call past it
raises ``TimeoutError`` (redis-py's ``TimeoutError`` to the caller) and redis-py drops that
connection, so no half-read answer is left on a pooled one.

    deadline = CallDeadline()
    pool.connection_class = bounded_connection_class(pool.connection_class, deadline)
    with deadline.within(0.5):
        client.get(key)
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

__all__ = ["CallDeadline", "bounded_connection_class"]


class CallDeadline(threading.local):
    """When the Redis call of this thread must end (``time.monotonic``), or None."""

    at: float | None = None

    @contextlib.contextmanager
    def within(self, seconds: float) -> Iterator[None]:
        """A call of at most *seconds*, in all. Inside another ``within`` (several calls made
        for one purpose, such as the throttle's take-back and reservation for one attempt), the
        earlier end holds: an inner call never extends the whole."""
        outer = self.at
        at = time.monotonic() + seconds
        self.at = at if outer is None else min(outer, at)
        try:
            yield
        finally:
            self.at = outer


class _BoundedSocket:
    """A Redis connection's socket whose blocking reads and writes end by the deadline of the
    Redis call in progress on this thread (:class:`CallDeadline`). redis-py's ``socket_timeout``
    bounds each read alone: a Redis sending its answer a byte at a time kept a call for seconds.
    Shortens a timeout, never lengthens it; a poll (timeout 0, redis-py's ``can_read``) is left
    alone. Everything else is the socket's."""

    __slots__ = ("_deadline", "_sock")

    def __init__(self, sock, deadline: CallDeadline) -> None:
        self._sock = sock
        self._deadline = deadline

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def _io(self, op, *args):
        at = self._deadline.at
        if at is None:
            return op(*args)
        current = self._sock.gettimeout()
        if current == 0:
            return op(*args)
        left = at - time.monotonic()
        if left <= 0:
            raise TimeoutError("the Redis call's time is up")
        if current is not None and current <= left:
            return op(*args)
        self._sock.settimeout(left)
        try:
            return op(*args)
        finally:
            self._sock.settimeout(current)

    def recv(self, *args):
        return self._io(self._sock.recv, *args)

    def recv_into(self, *args):
        return self._io(self._sock.recv_into, *args)

    def send(self, *args):
        return self._io(self._sock.send, *args)

    def sendall(self, *args):
        return self._io(self._sock.sendall, *args)


def bounded_connection_class(base: type, deadline: CallDeadline) -> type:
    """*base* (redis-py's ``Connection``, ``SSLConnection``, ...) whose sockets are
    :class:`_BoundedSocket`, and whose connecting ends by the call's deadline too."""

    def _connect(self):
        at = deadline.at
        configured = self.socket_connect_timeout
        if at is not None:
            left = at - time.monotonic()
            if left <= 0:
                raise TimeoutError("the Redis call's time is up")
            if configured is None or configured > left:
                self.socket_connect_timeout = left
        try:
            return _BoundedSocket(super(bounded, self)._connect(), deadline)
        finally:
            self.socket_connect_timeout = configured

    bounded = type(f"Bounded{base.__name__}", (base,), {"_connect": _connect})
    return bounded
