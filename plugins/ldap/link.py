"""One pooled LDAP connection, and the records its operations return.

ldap3 opens a connection (TCP, LDAPS or StartTLS, certificate and host name verification) and
closes it; the binds and searches of the hot path go over its socket through :mod:`wire`.

A link works from a chain thread (a blocking socket with a timeout) and from the event loop (a
login whose chain runs there, :mod:`gateway.aio`): there its socket is non-blocking and each wait
for the server parks the login's greenlet, with the same timeout. On the loop the socket stays
registered for reading between operations (:meth:`Link._wait_readable`): registering it for each
answer and removing it after was a third of a wait's CPU (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import math
import select
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import ldap3
from ldap3.core.exceptions import LDAPCertificateError

from gateway import aio
from gateway.model import folded_username, plainly_spelt
from gateway.plugins.ldap import wire

if TYPE_CHECKING:
    from gateway.plugins.ldap.pool import Server

__all__ = ["TROUBLE_CODES", "Entry", "Link", "LinkBroken", "Result", "ServerTrouble", "describe"]

#: RFC 4511 result codes that say "this server cannot serve now", not "your request is wrong".
TROUBLE_CODES = frozenset({51, 52, 80})  # busy, unavailable, other


#: Empty pages in a row a paged search accepts before it calls the server's paging broken (AD
#: may send an empty page with a cookie when a page's time runs out; not forever).
_EMPTY_PAGES = 3
#: Reads on the event loop without a wait before the loop gets a turn (a server streaming).
_BURST = 64
#: Answers to other (abandoned) requests skipped while waiting for one answer.
_MAX_SKIPPED = 100
#: Entries one search reads at most when it asked for no size or page limit (a base search).
_MAX_ENTRIES = 10_000
#: Continuation references (RFC 4511 section 4.5.3) one search skips at most, and their bytes: AD
#: sends a few (its DNS and configuration partitions), a directory with referral objects one for
#: each in scope. Without a bound a server sending them without end was read until the answer's
#: time ran out, the login waiting all of it (review of the LDAP plugin, items left).
_MAX_REFERENCES = 1000
_MAX_REFERENCE_BYTES = 1024 * 1024
#: Seconds a wait's timer may fire before the wait's end and still end it: uvloop's timers
#: count whole milliseconds (a timer of its own for each wait fired as early).
_TIMER_SLACK = 0.001


class LinkBroken(Exception):
    """The connection failed (socket, TLS, timeout); the server may be at fault.

    ``sent``: the failing request had gone out whole, so the server may have acted on it (the
    link broke while its answer was awaited or read). A password bind that was sent may have
    been counted as a bad password already: the pool does not send it again (pool.py)."""

    def __init__(self, detail: str, *, timeout: bool = False, connect: bool = False, sent: bool = False,
                 short: bool = False) -> None:
        super().__init__(detail)
        self.timeout = timeout
        self.connect = connect
        self.sent = sent
        #: A connect timeout whose wait the attempt's deadline made shorter than the server is
        #: due (``Pool._connect``): no evidence against the server.
        self.short = short


class ServerTrouble(Exception):
    """The server answered, but with busy/unavailable: try another one."""


@dataclass(frozen=True, slots=True)
class Result:
    code: int
    message: str
    #: A bind's password policy response control (OpenLDAP ppolicy), when one came and parsed.
    policy: wire.PasswordPolicy | None = None

    @property
    def ok(self) -> bool:
        return self.code == 0


@dataclass(frozen=True, slots=True)
class Entry:
    dn: str
    attributes: dict[str, list[bytes]]
    #: The attributes by lower-case name, made once: a login looks up a dozen names, most of
    #: them absent (the account state attributes of other directories), each a full scan before.
    folded: dict[str, list[bytes]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "folded", {key.lower(): values for key, values in self.attributes.items()})

    def get(self, name: str) -> list[bytes]:
        """Values of *name*, matched case-insensitively as LDAP attribute names are."""
        values = self.attributes.get(name)
        if values is not None:
            return values
        return self.folded.get(name.lower(), [])

    def login_name(self, attr: str, typed: str) -> str | None:
        """The user's name in *attr* as the entry spells it: its only value; of several (``uid``
        is multi-valued), the one *typed* names (spelt so, else the one that is *typed* in
        :func:`~gateway.model.folded_username`'s spelling, as loose as the directory's matching);
        ``None`` without a value, or when *typed* names none of several, or two (see
        :meth:`names_ambiguously`). Without *typed* (a listing): the first.

        The first alone let an entry whose ``uid`` was ``[admin, eve]`` log in as ``eve`` and sign
        in as ``admin`` (review of the LDAP plugin), and, found by its mail, sign in as ``admin``
        still (items left by that review): a directory's order of values is no rule."""
        values = self.get(attr)
        if not values:
            return None
        texts = [v.decode("utf-8", errors="replace") if isinstance(v, (bytes, bytearray)) else v for v in values]
        if len(texts) == 1 or not typed:
            return texts[0]
        if typed in texts:
            return typed
        wanted = folded_username(typed)
        named = {text for text in texts if folded_username(text) == wanted}
        return named.pop() if len(named) == 1 else None

    def names_ambiguously(self, attr: str, typed: str) -> bool:
        """The entry has values of *attr*, and which one *typed* stands for is unknown
        (:meth:`login_name`): several login names, the entry found by another attribute."""
        return len(self.get(attr)) > 1 and self.login_name(attr, typed) is None  # one value: never

    def spelt_as(self, attr: str, typed: str) -> bool:
        """A value of *attr* is *typed* in its one spelling: canonical (no white space at an end,
        :func:`~gateway.model.plainly_spelt`) and, case folded, the typed name folded. A uid
        ``admin `` or ``ａｄｍｉｎ`` matches ``(uid=admin)`` in the directory, but is not so spelt."""
        wanted = folded_username(typed)
        for value in self.get(attr):
            text = value.decode("utf-8", errors="replace") if isinstance(value, (bytes, bytearray)) else value
            if plainly_spelt(text) and folded_username(text) == wanted:
                return True
        return False


def close_connection(conn: ldap3.Connection) -> None:
    """Unbind *conn* and close its socket, whatever happens to the unbind. ldap3's ``unbind``
    sends the request and only then closes: when the send fails (a connection the server reset,
    a socket shut at the deadline, a non-blocking socket whose buffer is full) it raises before
    the close, and the socket stayed open until a garbage collection found the connection (one
    per pooled link after a directory restart)."""
    try:
        conn.unbind()
    except Exception:  # noqa: BLE001 - unbinding a broken connection may fail in any way
        pass
    sock = getattr(conn, "socket", None)
    if sock is None:
        return
    try:
        conn.strategy.close()  # ldap3's own close: shut, close, the connection marked closed
    except Exception:  # noqa: BLE001
        pass
    try:
        sock.close()  # closing twice is harmless; never left to the garbage collector
    except OSError:
        pass


def describe(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    if isinstance(exc, LDAPCertificateError) and "doesn't match any name in" in text:
        # ldap3 puts the whole certificate (a dict) in this message: say what to do instead.
        tried = text.rsplit("doesn't match any name in", 1)[1].strip()
        return (f"the server certificate does not name {tried}: use the DNS name in the certificate "
                "(its subjectAltName) in ldap.servers, not an IP address")
    return text if len(text) < 300 else text[:300] + "..."


class Link:
    """One LDAP connection. ldap3 opened it (TCP, TLS, StartTLS) and will close it; binds and
    searches go over its socket through :mod:`wire`. Used by one attempt at a time."""

    __slots__ = ("conn", "server", "created", "last_used", "reused", "_reader", "_next_id", "_on_loop",
                 "_answer_time", "_deadline", "_until", "_asked", "_watched_by", "_watched_fd", "_waiter", "_idle_wakes",
                 "_burst", "_timer", "_timer_at", "_wait_until", "_poll")

    def __init__(self, conn: ldap3.Connection, server: Server) -> None:
        self.conn = conn
        self.server = server
        self.created = self.last_used = time.monotonic()
        self.reused = False
        self._reader = wire.Reader(self)
        self._next_id = 1000  # above the IDs ldap3 used while opening (StartTLS)
        self._on_loop = False
        self._answer_time = 1.0  # set by settimeout() before every operation
        self._deadline = math.inf  # the attempt's, set with it
        self._until = 0.0  # when the answer to the last request must be complete (set by _send)
        self._asked = False  # a request went out since the last read: its answer cannot be there yet
        self._watched_by: asyncio.AbstractEventLoop | None = None  # the loop the socket is registered with
        self._watched_fd = -1  # and its descriptor there
        self._waiter: asyncio.Future | None = None  # what a greenlet waiting for an answer is parked on
        self._idle_wakes = 0  # readiness callbacks with nobody waiting, since the last wait
        self._burst = 0  # reads on the loop without a wait, since the last wait
        self._timer: asyncio.TimerHandle | None = None  # the waits' timeout on the loop (_wait_readable)
        self._timer_at = 0.0  # the loop time it fires at
        self._wait_until = 0.0  # the loop time the current wait times out at
        # For alive(): poll(2), not select(2), which refuses a descriptor from FD_SETSIZE (1024)
        # on (ValueError). A worker holding a thousand client connections (max_connections is
        # 4096) gets no lower descriptors, and every pooled link looked dead: each login opened
        # two connections (TCP, TLS, a service bind) and pooled nothing (review of the LDAP
        # plugin). Registered once: a poll of a ready-made set is cheaper than a select.
        self._poll = select.poll()
        self._poll.register(conn.socket.fileno(), select.POLLIN)

    def alive(self) -> bool:
        """Nothing is pending on an idle connection; readable means closed or disconnected."""
        sock = self.conn.socket
        if sock is None or self.conn.closed or self._reader.buffer:
            return False
        try:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return False
            events = self._poll.poll(0)  # readable, hung up or in error: any event is not idle
        except (OSError, ValueError):
            return False
        return not events

    def settimeout(self, seconds: float, deadline: float = math.inf) -> None:
        """The time each answer may take from its request, in all: a server that dribbles an
        answer a byte at a time gets no more than one that sends nothing. No answer is waited
        for past *deadline* (the attempt's), however many requests an operation makes (a
        paged search). Also where the link learns whether it is used from the event loop
        (non-blocking) or a thread (blocking)."""
        self._answer_time = max(seconds, 0.01)
        self._deadline = deadline
        self._on_loop = aio.on_loop()
        if self._on_loop:
            # Non-blocking: each read and send waits through gateway.aio. From a thread, each one
            # sets the socket's timeout to the time the answer has left instead. Set only when
            # it changes: settimeout() is an ioctl each time, even to the value it has.
            sock = self.conn.socket
            if sock.gettimeout() != 0.0:
                sock.settimeout(0.0)

    def _left(self) -> float:
        left = self._until - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return left

    def recv(self, size: int) -> bytes:
        """Bytes from the server (for :class:`wire.Reader`), within the answer's time."""
        sock = self.conn.socket
        if not self._on_loop:
            sock.settimeout(self._left())
            return sock.recv(size)
        if self._asked:
            # Just after a request the answer is still on its way: wait for it before the first
            # read, which would fail (EAGAIN, raised and caught) on nearly every request.
            self._asked = False
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                self._wait_readable()
        # A server that never stops sending is never waited for: the answer's time is checked
        # before each read, and the loop gets a turn every _BURST reads. It was checked only in
        # a wait: a directory streaming entries held the worker's loop, /healthz included, for
        # as long as it sent (64 s in the review of the LDAP plugin, 3 GB read).
        self._left()
        self._burst += 1
        if self._burst > _BURST:
            self._wait_readable()
        while True:
            try:
                return sock.recv(size)
            except (BlockingIOError, ssl.SSLWantReadError):
                self._wait_readable()
            except ssl.SSLWantWriteError:  # TLS may need to write before it can read
                aio.wait_io(sock, write=True, timeout=self._left())

    def _sendall(self, data: bytes) -> None:
        sock = self.conn.socket
        if not self._on_loop:
            sock.settimeout(self._left())  # sendall's timeout is for all of it (Python 3.5+)
            sock.sendall(data)
            return
        try:  # nearly always sent whole at once: no view, no slices
            sent = sock.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError):
            sent = 0
            aio.wait_io(sock, write=True, timeout=self._left())
        except ssl.SSLWantReadError:
            sent = 0
            self._wait_readable()
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            try:
                view = view[sock.send(view):]
            except (BlockingIOError, ssl.SSLWantWriteError):
                aio.wait_io(sock, write=True, timeout=self._left())
            except ssl.SSLWantReadError:
                self._wait_readable()

    def _wait_readable(self) -> None:
        """Park the login's greenlet until the socket is readable, within the answer's time.

        The socket is registered with the loop at the first wait and stays registered while the
        link is pooled. Readiness with no greenlet waiting comes once after an answer was read
        (the loop saw the socket readable in the same turn as the greenlet read it); twice in a
        row, the socket is readable with nobody to read it (the server closed the idle
        connection, or sent a Notice of Disconnection), and the registration is taken back, so
        that an unread socket cannot wake the loop over and over; :meth:`alive` then finds it
        readable and the pool drops the link. :meth:`close` takes it back before the socket
        closes.

        The wait's timeout is a timer the link keeps armed from one wait to the next: a timer
        made and cancelled for every answer cost an LDAP login ~7 µs of gateway CPU on uvloop
        (two answers; issue 15, tools/bench/ldap_cpu.py). It is moved only when a wait must end
        before it fires; firing earlier than the current wait's end, it is set again for that
        end (:meth:`_timed_out`); firing with nobody waiting, it is dropped until the next wait.
        So every wait still ends by its own time, as a timer of its own would end it."""
        left = self._left()
        loop = asyncio.get_running_loop()
        if self._watched_by is not loop:
            self._unwatch()
            fd = self.conn.socket.fileno()
            loop.add_reader(fd, self._readable)
            self._watched_by, self._watched_fd = loop, fd
        self._waiter = future = loop.create_future()
        self._idle_wakes = self._burst = 0
        self._wait_until = until = loop.time() + left
        timer = self._timer
        if timer is None or self._timer_at > until:
            if timer is not None:
                timer.cancel()
            self._timer, self._timer_at = loop.call_at(until, self._timed_out), until
        try:
            aio.wait(future)
        finally:
            self._waiter = None

    def _timed_out(self) -> None:
        """The link's timer (see :meth:`_wait_readable`), on its loop: the current wait's time
        is up (the timer's resolution: a millisecond), or the timer is set again for it."""
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next wait arms a timer
        loop = asyncio.get_running_loop()
        if loop.time() >= self._wait_until - _TIMER_SLACK:
            aio.expire(waiter)
        else:
            self._timer, self._timer_at = loop.call_at(self._wait_until, self._timed_out), self._wait_until

    def _readable(self) -> None:
        waiter = self._waiter
        if waiter is None:  # nobody waits for an answer: see _wait_readable
            self._idle_wakes += 1
            if self._idle_wakes > 1:
                self._unwatch()
        elif not waiter.done():
            waiter.set_result(None)

    def _unwatch(self) -> None:
        """Take the socket's registration back from the loop it is with. On that loop's thread,
        or while it does not run: :meth:`close` from another thread hands the close to it."""
        loop, self._watched_by = self._watched_by, None
        timer, self._timer = self._timer, None  # armed on that loop only
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._watched_fd)
            if timer is not None:
                timer.cancel()

    def _send(self, build, *args) -> int:
        """``build(message_id, *args)`` sent whole; returns the message ID."""
        message_id = self._next_id
        self._next_id = message_id + 1 if message_id < 0x7FFFFFFF else 1000
        self._until = min(time.monotonic() + self._answer_time, self._deadline)  # this request's answer
        try:
            self._sendall(build(message_id, *args))
            self._asked = True
        except OSError as exc:
            # Not sent whole: the server cannot have read the request, let alone acted on it.
            raise LinkBroken(describe(exc), timeout=isinstance(exc, TimeoutError)) from None
        return message_id

    def _receive(self, message_id: int) -> tuple[int, bytes, bytes]:
        try:
            got, tag, body, controls = self._reader.message()
            if got == message_id:  # nearly always
                return tag, body, controls
            for _ in range(_MAX_SKIPPED):
                if got == 0:  # Notice of Disconnection (RFC 4511 section 4.4.1)
                    raise wire.ProtocolError("the server sent a notice of disconnection")
                # an answer to an abandoned request: skip it (a few; not an endless stream)
                got, tag, body, controls = self._reader.message()
                if got == message_id:
                    return tag, body, controls
            if got == 0:
                raise wire.ProtocolError("the server sent a notice of disconnection")
            raise wire.ProtocolError(f"more than {_MAX_SKIPPED} answers to other requests")
        except (OSError, wire.ProtocolError, IndexError, ValueError) as exc:
            # Only called after _send: the request is with the server, which may have done it.
            raise LinkBroken(describe(exc), timeout=isinstance(exc, TimeoutError), sent=True) from None

    def bind(self, dn: str, password: str) -> Result:
        """A simple bind on this connection (RFC 4511 section 4.2: a new bind replaces the
        connection's identity; a failed one leaves it anonymous)."""
        message_id = self._send(wire.bind_request, dn, password)
        tag, body, controls = self._receive(message_id)
        if tag != wire.BIND_RESPONSE:
            raise LinkBroken(f"unexpected answer {tag:#x} to a bind", sent=True)
        try:
            # The control rides in the same answer: no extra round trip. Unreadable = absent.
            return Result(*wire.parse_result(body), wire.password_policy(controls) if controls else None)
        except (wire.ProtocolError, IndexError, ValueError) as exc:
            raise LinkBroken(describe(exc), sent=True) from None

    def search(self, base: str, filter_: str | bytes, attributes: list[str] | tuple[str, ...], *,
               scope: str = "subtree", size_limit: int = 0, paged_size: int | None = None,
               cookie: bytes | None = None, most: int | None = None) -> tuple[Result, list[Entry], bytes | None]:
        """A search with *filter_* as RFC 4515 text, or already encoded (:class:`FilterTemplate`).
        At most *most* entries are read (default: *size_limit*, else :data:`_MAX_ENTRIES`); a
        server sending more is broken (:class:`LinkBroken`)."""
        # FilterError: a bug or a bad template, not the server
        filter_ber = filter_ if isinstance(filter_, bytes) else wire.compile_filter(filter_)
        message_id = self._send(wire.search_request, base, scope, filter_ber, attributes, size_limit, paged_size,
                                cookie or b"")
        entries: list[Entry] = []
        # No more entries than asked for: a server that sends them without end was read without
        # end, into memory (review of the LDAP plugin).
        most = most or size_limit or _MAX_ENTRIES
        references = referred = 0
        while True:
            tag, body, controls = self._receive(message_id)
            try:
                if tag == wire.SEARCH_ENTRY:
                    if len(entries) >= most:
                        raise LinkBroken(f"more than the {most} entries asked for", sent=True)
                    entries.append(Entry(*wire.parse_entry(body)))
                elif tag == wire.SEARCH_DONE:
                    result = Result(*wire.parse_result(body))
                    next_cookie = wire.paged_cookie(controls) if paged_size and controls else None
                    return result, entries, next_cookie
                elif tag == wire.SEARCH_REFERENCE:  # not followed, only counted
                    references += 1
                    referred += len(body)
                    if references > _MAX_REFERENCES or referred > _MAX_REFERENCE_BYTES:
                        raise LinkBroken(f"more than {_MAX_REFERENCES} continuation references or "
                                         f"{_MAX_REFERENCE_BYTES} bytes of them to one search", sent=True)
                else:
                    raise LinkBroken(f"unexpected answer {tag:#x} to a search", sent=True)
            except (wire.ProtocolError, IndexError, ValueError) as exc:
                raise LinkBroken(describe(exc), sent=True) from None

    def search_pages(self, base: str, filter_: str, attributes: list[str] | tuple[str, ...], *, page_size: int,
                     limit: int, scope: str = "subtree", size_limit: int = 0) -> tuple[Result, list[Entry]]:
        """A paged search (RFC 2696), page after page until the server has no more, a page is
        not a success, or *limit* entries have come: the last page's result and every entry.

        :raises ServerTrouble: the server pages without progress (a cookie it sent before, or
            empty pages that go on): a broken or hostile server is not waited on page by page.
        """
        entries: list[Entry] = []
        cookies: set[bytes] = set()
        cookie: bytes | None = None
        empty = 0
        while True:
            # A page holds at most what is kept in all: paging is a non-critical control, and a
            # server without it answers everything at once (a page bigger than asked).
            result, page, cookie = self.search(base, filter_, attributes, scope=scope, size_limit=size_limit,
                                               paged_size=page_size, cookie=cookie,
                                               most=max(page_size, limit, size_limit))
            entries.extend(page)
            if not result.ok or not cookie or len(entries) >= limit:
                return result, entries
            empty = 0 if page else empty + 1
            if cookie in cookies or empty > _EMPTY_PAGES:
                raise ServerTrouble(f"a paged search made no progress after {len(cookies) + 1} pages "
                                    f"({len(entries)} entries)")
            cookies.add(cookie)

    def who_am_i(self) -> tuple[Result, str]:
        """The server's name for the identity this connection is bound as (RFC 4532): its
        authzId, ``dn:<DN>`` or ``u:<user id>`` (AD: ``u:DOMAIN\\name``), empty for anonymous."""
        message_id = self._send(wire.extended_request, wire.WHO_AM_I_OID)
        tag, body, _ = self._receive(message_id)
        if tag != wire.EXTENDED_RESPONSE:
            raise LinkBroken(f"unexpected answer {tag:#x} to an extended request", sent=True)
        try:
            code, message, value = wire.parse_extended(body)
        except (wire.ProtocolError, IndexError, ValueError) as exc:
            raise LinkBroken(describe(exc), sent=True) from None
        return Result(code, message), (value or b"").decode("utf-8", errors="replace")

    def close(self) -> None:
        loop = self._watched_by
        if loop is not None:
            if loop.is_running() and not aio.running_on(loop):
                # From a chain thread (a pool drained after a failure there, a probe): the
                # registration must go before the socket closes, or the loop would be left
                # watching a descriptor number the next socket may get. The loop does both.
                try:
                    loop.call_soon_threadsafe(self.close)
                    return
                except RuntimeError:  # closed meanwhile: nothing left to take back
                    pass
            self._unwatch()
        close_connection(self.conn)
