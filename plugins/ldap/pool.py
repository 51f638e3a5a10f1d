"""Servers, connections and failover for the ``ldap`` plugin.

Why not ldap3's ``ServerPool``: it fails over only when a socket cannot be opened, never on a
read timeout, and it remembers failed addresses on shared ``Server`` objects (DESIGN.md section
9). Here a server is skipped for ``backoff`` seconds after a connect failure, a TLS failure or a
timeout, the next one in the operator's order is tried, and a server in back-off is still tried
(last) when nothing else is left, so a lone restarted directory is used again at once.

Connections are pooled per server and per kind:

* ``service`` links are bound as the service account once, then only search;
* ``bind`` links carry user binds: each login rebinds a pooled link (RFC 4511 section 4.2.1
  allows a bind on an existing connection) instead of paying TCP + TLS per attempt.

A link taken from the pool is checked for readability first: an idle LDAP connection has
nothing to read unless the server closed it or sent a Notice of Disconnection (RFC 4511 section
4.4.1). Either way it is dropped. A reused link that still fails mid-operation is retried once
on a fresh connection before the server is blamed, and an operation that fails on a fresh one
goes to the next server; except a user bind that was sent whole before the link broke (without
a timeout): the server may have counted it as a bad password, and it is not sent again.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, TypeVar
from urllib.parse import urlsplit

import ldap3
from ldap3.core.exceptions import LDAPExceptionError

from gateway import aio
from gateway.plugins.ldap.link import TROUBLE_CODES, Link, LinkBroken, ServerTrouble, close_connection, describe

__all__ = ["BIND", "SERVICE", "DirectoryUnavailable", "Pool", "Server", "ServiceBindFailed"]

T = TypeVar("T")

SERVICE = "service"
BIND = "bind"

#: Seconds a pooled bind link may sit idle before a password goes over it unchecked: past them
#: it is asked "Who am I?" first (Pool._still_there). Links of a busy gateway never wait this long.
_PROBE_IDLE = 20.0

class DirectoryUnavailable(Exception):
    """No server could serve the operation. ``reason`` is a stable ``ldap.*`` code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ServiceBindFailed(Exception):
    """The service account was refused; the configuration, not the server, is at fault.
    ``message``: the server's diagnosticMessage, as sent (AD's sub-code is read from it)."""

    def __init__(self, detail: str, message: str = "") -> None:
        super().__init__(detail)
        self.message = message


class _Cutoff:
    """Shut *conn*'s socket after *seconds* unless :meth:`done` comes first (a timer thread)."""

    def __init__(self, conn: ldap3.Connection, seconds: float) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._over = False
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._over:
                return
            self._over = self.fired = True
        sock = getattr(self._conn, "socket", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def done(self) -> bool:
        """The set-up is over: no shut from now on. False when the deadline shut it first."""
        with self._lock:
            self._over = True
        self._timer.cancel()
        return not self.fired


@dataclass(eq=False)
class Server:
    """One directory server and what this process knows about it. Guarded by the pool's lock."""

    url: str
    host: str
    port: int
    use_ssl: bool
    down_until: float = 0.0
    failures: int = 0
    last_error: str = ""
    last_ok: float | None = None  # monotonic(); None: never (0.0 is a real time on a fresh boot)
    idle: dict[str, deque[Link]] = field(default_factory=lambda: {SERVICE: deque(), BIND: deque()})
    #: Why the service account was refused (the server answers, but cannot serve): "" when not.
    service_refused: str = ""

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_url(cls, url: str) -> Server:
        parts = urlsplit(url)
        use_ssl = parts.scheme == "ldaps"
        return cls(url, parts.hostname or "", parts.port or (636 if use_ssl else 389), use_ssl)


class Pool:
    """The servers in operator order, their pooled links, and failover around an operation."""

    def __init__(self, urls: list[str], *, tls: ldap3.Tls | None, start_tls: bool, connect_timeout: float,
                 receive_timeout: float, backoff: float, pool_size: int, idle_timeout: float,
                 service: tuple[str, str] | None, log) -> None:
        self.servers = [Server.from_url(u) for u in urls]
        self.tls = tls
        self.start_tls = start_tls
        self.connect_timeout = connect_timeout
        self.receive_timeout = receive_timeout
        self.backoff = backoff
        self.pool_size = pool_size
        self.idle_timeout = idle_timeout
        self._service = service
        self._connects: ThreadPoolExecutor | None = None  # see _connector()
        self.log = log
        self.active: Server | None = None
        self._lock = threading.Lock()
        self._closed = False  # close() ran: a link coming back from an operation is closed, not kept

    # -- server selection ----------------------------------------------------------------------

    def order(self) -> list[Server]:
        """Servers to try: those not backing off, in operator order, then the others, soonest
        retry first (a lone directory that came back is used without waiting out its back-off)."""
        if len(self.servers) == 1:  # the usual set-up, twice a login: nothing to order
            return self.servers
        now = time.monotonic()
        with self._lock:
            ready = [s for s in self.servers if s.down_until <= now]
            waiting = sorted((s for s in self.servers if s.down_until > now), key=lambda s: s.down_until)
        return ready + waiting

    def _mark_down(self, server: Server, detail: str) -> None:
        with self._lock:
            was_down = server.failures > 0
            server.failures += 1
            server.last_error = detail
            server.down_until = time.monotonic() + self.backoff
            if self.active is server:
                self.active = None
        self._drain(server)
        if not was_down:
            self.log.warning("LDAP server %s failed (%s); skipping it for %.0fs", server.url, detail, self.backoff)

    def _mark_up(self, server: Server) -> None:
        if server.failures == 0 and self.active is server:
            return  # the hot path: nothing changed
        with self._lock:
            if server.failures:
                self.log.info("LDAP server %s answers again", server.url)
            server.failures = 0
            server.down_until = 0.0
            server.last_ok = time.monotonic()
            self.active = server

    # -- links ---------------------------------------------------------------------------------

    def _take_idle(self, server: Server, kind: str) -> Link | None:
        now = time.monotonic()
        while True:
            with self._lock:
                queue = server.idle[kind]
                link = queue.pop() if queue else None
            if link is None:
                return None
            if now - link.last_used > self.idle_timeout or not link.alive():
                link.close()
                continue
            link.reused = True
            return link

    def open(self, server: Server, kind: str, deadline: float) -> Link:
        """A new connection to *server*: TCP, TLS (or StartTLS), and for ``service`` the bind.
        ldap3 connects and blocks while it does: from the event loop, on a thread
        (:func:`gateway.aio.blocking`)."""
        conn = aio.blocking(self._connect, server, deadline, executor=self._connector())
        link = Link(conn, server)
        link.settimeout(max(0.05, min(self.receive_timeout, deadline - time.monotonic())), deadline)
        if kind == SERVICE and self._service is not None:
            try:
                result = link.bind(*self._service)
            except BaseException:  # a broken or timed-out link, or a cancelled login: not left open
                link.close()
                raise
            if result.code in TROUBLE_CODES:
                link.close()
                raise ServerTrouble(f"service bind answered {result.code}: {result.message}")
            if not result.ok:
                link.close()
                raise ServiceBindFailed(f"service account bind refused ({result.code}: {result.message})",
                                        result.message)
            server.service_refused = ""
        return link

    def _connector(self) -> ThreadPoolExecutor | None:
        """Threads for ldap3's connects from the event loop, only this pool's: connects to a dead
        or hung server wait up to ``connect_timeout`` each, and must not fill the loop's default
        executor, which other work (a network throttle store) shares. Made on first use; a
        chain thread connects itself."""
        if not aio.on_loop():
            return None
        with self._lock:
            if self._connects is None:
                self._connects = ThreadPoolExecutor(max_workers=max(2, self.pool_size),
                                                    thread_name_prefix="authgw-ldap-connect")
            return self._connects

    def _connect(self, server: Server, deadline: float) -> ldap3.Connection:
        left = deadline - time.monotonic()
        connect_timeout = max(0.05, min(self.connect_timeout, left))
        # Whether the wait under way is shorter than the server is due, because the attempt's
        # deadline is near: such a timeout says nothing against the server (LinkBroken.short).
        # One slow attempt marked a healthy server down for `backoff` seconds, out of /readyz
        # and of rotation (items left by the review of the LDAP plugin).
        short = connect_timeout < self.connect_timeout
        # A fresh ldap3.Server per connection: ldap3 remembers failed addresses on the object for
        # a while, which would hide a directory that has just come back.
        target = ldap3.Server(server.host, port=server.port, use_ssl=server.use_ssl, tls=self.tls,
                              get_info=ldap3.NONE, connect_timeout=connect_timeout, mode=ldap3.IP_V4_PREFERRED)
        conn = ldap3.Connection(target, client_strategy=ldap3.SAFE_SYNC, raise_exceptions=False,
                                check_names=False, auto_referrals=False, read_only=True, auto_escape=False,
                                return_empty_attributes=False, receive_timeout=None)
        # ldap3's socket timeouts bound each read, not the whole: a server (or anyone on the path
        # to it, before TLS) answering StartTLS or the TLS handshake a byte at a time held this
        # thread, the first health round and so the worker's start for as long as it liked
        # (review of the LDAP plugin). At the deadline the socket is shut: the read ends.
        cut = _Cutoff(conn, max(0.05, deadline - time.monotonic()))
        try:
            conn.open()
            read_timeout = min(self.receive_timeout, deadline - time.monotonic())
            short = read_timeout < self.receive_timeout
            conn.socket.settimeout(max(0.05, read_timeout))
            if self.start_tls and not server.use_ssl:
                conn.start_tls()
                if not conn.tls_started:  # ldap3 may decline without raising: never go on in clear
                    raise LDAPExceptionError("StartTLS did not start")
            if not cut.done():
                raise LDAPExceptionError("the connection was not set up before the deadline")
        except Exception as exc:  # noqa: BLE001 - whatever ldap3 raises here, the server or the path to it caused
            # Not only LDAPExceptionError, OSError (ssl.SSLError) and UnicodeError (a name the
            # resolver cannot encode): ldap3's decoder raises KeyError or IndexError on a malformed
            # StartTLS answer, which anyone on the path can send (it is plaintext). Raised as they
            # were, they skipped the next server and made every login a crash, a 401 the throttle
            # counts as a guess (review of the LDAP plugin).
            cut.done()
            close_connection(conn)  # shut at the deadline, its unbind cannot be sent
            if cut.fired:
                # At the deadline. Given a connect and an answer's time (as a probe is), the set-up
                # is the server's fault (one dribbling StartTLS); given less, not evidence.
                raise LinkBroken("the connection was not set up before the deadline", timeout=True, connect=True,
                                 short=left < self.connect_timeout + self.receive_timeout) from None
            detail = describe(exc)
            if not isinstance(exc, (LDAPExceptionError, OSError, UnicodeError)):
                detail = f"an answer ldap3 could not read while connecting ({exc.__class__.__name__}: {detail})"
            timeout = isinstance(exc, TimeoutError)
            raise LinkBroken(detail, timeout=timeout, connect=True, short=timeout and short) from None
        return conn

    def call(self, kind: str, operation: Callable[[Link], T], deadline: float) -> T:
        """Run *operation* on a link of *kind*, failing over to the next server on connect
        failures, broken connections, timeouts and busy answers, until *deadline*. A ``bind``
        operation whose request went out whole before the connection broke (no timeout) is
        not run again: one guess, one bind.

        :raises DirectoryUnavailable: no server could answer in time.
        """
        problems: list[str] = []
        reason = "ldap.unavailable"
        for server in self.order():
            fresh_only = False
            while True:
                left = deadline - time.monotonic()
                if left <= 0.01:
                    raise DirectoryUnavailable("ldap.timeout", "; ".join(problems) or "no time left before the deadline")
                link = None
                budget = min(self.receive_timeout, left)
                try:
                    link = (None if fresh_only else self._take_idle(server, kind)) or self.open(server, kind, deadline)
                    link.settimeout(budget, deadline)
                    if kind == BIND and link.reused and time.monotonic() - link.last_used > _PROBE_IDLE:
                        if not self._still_there(link):  # forgotten by a middlebox: a fresh one
                            link.close()
                            self._drain(server)
                            fresh_only = True
                            continue
                    value = operation(link)
                except LinkBroken as exc:
                    reused = link is not None and link.reused
                    if link is not None:
                        link.close()
                    if kind == BIND and exc.sent and not exc.timeout:
                        # One guess, one bind. The bind went out whole and the connection broke
                        # before its answer: a DC or load balancer that reset it after the server
                        # checked the password has counted a bad one (AD's badPwdCount). Sent
                        # again, here or to the next server, one guess would count two, while the
                        # throttle keeps below the lockout threshold counting one. (A timeout still
                        # fails over, as below: a hung server must not stop every login.)
                        if reused:
                            self._drain(server)  # a stale pooled link: its siblings are too
                        else:
                            self._mark_down(server, str(exc))
                        lost = (f"{server.url}: the connection was lost after the bind was sent ({exc}); "
                                "not sent again, since the server may have counted it")
                        self.log.warning("LDAP server %s", lost)
                        problems.append(lost)
                        raise DirectoryUnavailable("ldap.unavailable", "; ".join(problems)) from None
                    if reused and not fresh_only and not exc.timeout:
                        # A pooled link the server had closed (restart, idle timeout): so are its
                        # siblings, opened before the same event. One fresh try, same server.
                        self._drain(server)
                        fresh_only = True
                        continue
                    if exc.timeout and (exc.short if exc.connect else (budget < self.receive_timeout
                                                                        or time.monotonic() >= deadline)):
                        # The attempt's deadline cut the wait short: not evidence against the server.
                        raise DirectoryUnavailable("ldap.timeout", f"{server.url}: {exc}") from None
                    problems.append(f"{server.url}: {exc}")
                    self._mark_down(server, str(exc))
                    break
                except ServerTrouble as exc:
                    if link is not None:
                        link.close()
                    problems.append(f"{server.url}: {exc}")
                    self._mark_down(server, str(exc))
                    break
                except ServiceBindFailed as exc:
                    problems.append(f"{server.url}: {exc}")
                    reason = "ldap.service_bind_failed"
                    with self._lock:
                        server.last_error = str(exc)
                        server.service_refused = str(exc)
                    break
                except BaseException:
                    if link is not None:
                        link.close()
                    raise
                self._mark_up(server)
                self._release(link, kind)
                return value
        raise DirectoryUnavailable(reason, "; ".join(problems) or "no server configured")

    @staticmethod
    def _still_there(link: Link) -> bool:
        """A round trip without a password (Who am I?) on a bind link that sat idle: a load
        balancer or firewall that forgot the connection resets it at its next packet, and that
        packet must not be a password bind, which would not be sent again (one guess, one bind)."""
        try:
            link.who_am_i()
        except LinkBroken:
            return False
        return True

    def _drain(self, server: Server) -> None:
        with self._lock:
            links = [*server.idle[SERVICE], *server.idle[BIND]]
            server.idle[SERVICE].clear()
            server.idle[BIND].clear()
        for link in links:
            link.close()

    def _release(self, link: Link, kind: str) -> None:
        link.last_used = time.monotonic()
        link.reused = False
        with self._lock:
            queue = link.server.idle[kind]
            if not self._closed and link.server.down_until <= link.last_used and len(queue) < self.pool_size:
                queue.append(link)
                return
        link.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            links = [link for s in self.servers for q in s.idle.values() for link in q]
            for server in self.servers:
                for queue in server.idle.values():
                    queue.clear()
            connects, self._connects = self._connects, None
        for link in links:
            link.close()
        if connects is not None:
            connects.shutdown(wait=False)  # a connect still running ends by its own timeout

    def snapshot(self) -> list[tuple[Server, str, bool]]:
        """(server, state text, ready) for readiness: from memory only, no network I/O."""
        now = time.monotonic()
        out = []
        with self._lock:
            for server in self.servers:
                if server.service_refused:
                    out.append((server, server.service_refused, False))
                elif server.failures and server.down_until > now:
                    out.append((server, f"backing off for {server.down_until - now:.0f}s after: {server.last_error}", False))
                elif server.failures:
                    out.append((server, f"down, retried on the next attempt; last error: {server.last_error}", False))
                elif server is self.active:
                    out.append((server, "active", True))
                elif server.last_ok is not None:
                    out.append((server, "standby (answered before)", True))
                else:
                    out.append((server, "standby (not contacted yet)", True))
        return out

    def probe(self) -> None:
        """Open one link to every server (with the service bind when there is a service
        account) and record what happened, as a login would: run by the plugin at start-up and
        every ``health.probe_interval``, so readiness is known before the first login fails."""
        kind = SERVICE if self._service is not None else BIND
        for server in self.servers:
            deadline = time.monotonic() + self.connect_timeout + self.receive_timeout
            try:
                link = self.open(server, kind, deadline)
            except (LinkBroken, ServerTrouble) as exc:
                self._mark_down(server, str(exc))
                continue
            except ServiceBindFailed as exc:
                with self._lock:
                    server.last_error = server.service_refused = str(exc)
                continue
            with self._lock:  # up, without making a standby server the active one
                if server.failures:
                    self.log.info("LDAP server %s answers again", server.url)
                server.failures = 0
                server.down_until = 0.0
                server.last_ok = time.monotonic()
            self._release(link, kind)
