"""A whole Redis call bounded in time, not each socket read (redis-py's ``socket_timeout``).

redis-py bounds each read of a socket by ``socket_timeout``: a Redis that sends its answer a
byte at a time (or a middlebox that does) keeps a call for as long as the answer is long. The
throttle store and the login door's session store make calls the gateway waits for (the login
door's on the worker's event loop), so each call gets a deadline: :class:`CallDeadline` holds it
for the calling thread, and the connections of a client whose pool uses
:func:`bounded_connection_class` end their connect, sends and reads by it. A call past it
raises ``TimeoutError`` (redis-py's ``TimeoutError`` to the caller) and redis-py drops that
connection, so no half-read answer is left on a pooled one.

An answer is bounded in size too (:data:`MAX_ANSWER_BYTES` a call: a bulk string announced at
1 GB and sent fast held ~500 MB per call within 0.5 s), and an answer that is no Redis answer
(an array nested 200,000 deep: ``RecursionError`` in redis-py's parser; a handshake answered
``+PONG``: ``AttributeError``) is a broken connection, dropped, ``redis.ConnectionError`` to the
caller: such errors passed the stores' ``except RedisError`` and every ``/auth`` was a 500 with a
2,000-frame traceback (review of the reliability modules).

    deadline = CallDeadline()
    pool.connection_class = bounded_connection_class(pool.connection_class, deadline)
    with deadline.within(0.5):
        client.get(key)
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from collections.abc import Iterator

__all__ = ["CallDeadline", "MAX_ANSWER_BYTES", "bounded_connection_class"]

#: Bytes one call may read (its answers, a pipeline's included): the gateway's answers are small
#: (counts, session records of bounded forms, ``INFO memory``), so far more is no Redis of ours.
MAX_ANSWER_BYTES = 16 * 1024 * 1024


class CallDeadline(threading.local):
    """When the Redis call of this thread must end (``time.monotonic``), or None."""

    at: float | None = None
    #: Bytes the call may still read (:data:`MAX_ANSWER_BYTES`), while :attr:`at` is set.
    left: int = 0

    @contextlib.contextmanager
    def within(self, seconds: float) -> Iterator[None]:
        """A call of at most *seconds*, in all. Inside another ``within`` (several calls made
        for one purpose, such as the throttle's take-back and reservation for one attempt), the
        earlier end holds: an inner call never extends the whole, nor its bytes."""
        outer = self.at
        at = time.monotonic() + seconds
        self.at = at if outer is None else min(outer, at)
        if outer is None:
            self.left = MAX_ANSWER_BYTES
        try:
            yield
        finally:
            self.at = outer

    def took(self, count: int) -> None:
        """*count* bytes were read for the call in progress; raises past its budget (an
        ``OSError``: redis-py drops the connection and raises its ``ConnectionError``)."""
        if self.at is not None:
            self.left -= count
            if self.left < 0:
                raise OSError(errno.EMSGSIZE, f"a Redis answer over {MAX_ANSWER_BYTES} bytes")


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
        data = self._io(self._sock.recv, *args)
        self._deadline.took(len(data))
        return data

    def recv_into(self, *args):
        count = self._io(self._sock.recv_into, *args)
        self._deadline.took(count)
        return count

    def send(self, *args):
        return self._io(self._sock.send, *args)

    def sendall(self, *args):
        return self._io(self._sock.sendall, *args)


def _not_redis(connection, exc: Exception):
    """The connection's peer sent what no Redis sends: drop the connection (nothing of it may be
    read again) and say so as a connection failure, which the stores answer fail-closed (503)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    connection.disconnect()
    return RedisConnectionError(f"the Redis server sent what is not a Redis answer ({exc.__class__.__name__})")


def bounded_connection_class(base: type, deadline: CallDeadline) -> type:
    """*base* (redis-py's ``Connection``, ``SSLConnection``, ...) whose sockets are
    :class:`_BoundedSocket`, whose connecting ends by the call's deadline too, and whose
    answers that are not Redis's raise ``redis.ConnectionError`` (:func:`_not_redis`)."""
    from redis.exceptions import RedisError

    expected = (RedisError, OSError)

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

    def connect(self, *args, **kwargs):
        try:
            return super(bounded, self).connect(*args, **kwargs)
        except expected:
            raise
        except Exception as exc:  # the handshake's answer (HELLO, AUTH, SELECT) was no Redis answer
            raise _not_redis(self, exc) from None

    def read_response(self, *args, **kwargs):
        try:
            return super(bounded, self).read_response(*args, **kwargs)
        except expected:
            raise
        except Exception as exc:  # RecursionError (nested arrays), a malformed length ...
            raise _not_redis(self, exc) from None

    bounded = type(f"Bounded{base.__name__}", (base,), {
        "_connect": _connect, "connect": connect, "read_response": read_response})
    return bounded
