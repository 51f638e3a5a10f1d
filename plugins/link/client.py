"""The connector's side of the link: dial out, say hello, answer the relay's requests, renew the
certificate, and dial again with jittered exponential back-off whenever the link is lost.

Runs as a task on the worker's event loop (started when the worker builds its applications),
so ``authenticate`` goes through ``door.decide``: the same throttling, deadline, audit and chain
as a login at this connector's own ``/auth``. The connector opens no port for the link.

The relay keeps one link per connector id (the newest), so one worker dials: the one holding
``STATE_DIR/link/link.lock`` (the others, and a new generation during a reload, wait for it).
Requests the relay sends are bounded here, not by trusting the relay: at most
``max_concurrent`` run and as many wait; more are answered ``unavailable`` at once.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import fcntl
import ipaddress
import json
import logging
import math
import os
import random
import ssl
import statistics
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from gateway import Attempt, BackendUnavailable
from gateway.chain import SERVICE_CALLER
from gateway.checks import run_selftest
from gateway.logs import RateLimitedWarning, printable
from gateway.plugins import linkproto as proto

from . import directory, state
from .settings import LinkSettings

__all__ = ["LinkClient", "LinkStatus", "Misdirected", "Proxy", "Redirected", "check_renewed", "no_redirects",
           "proxy_for", "require_tls"]

log = logging.getLogger("authgw.plugin.link")
#: Refused frames: one WARNING a minute, counting the others (a relay can send them at will).
_refusals = RateLimitedWarning(log)

_HELLO_TIMEOUT = 10.0
#: Seconds a stopping connector waits for the relay to acknowledge ``drain``: the rest of its
#: budget (``drain``'s *budget*) goes to the requests in flight. At 10 s, a relay that never
#: acknowledged held the stop past the server's 5 s for every plugin's shutdown (review of the link).
_DRAIN_ACK = 2.0
#: Seconds of a drain's budget kept for the WebSocket close handshake.
_CLOSE_RESERVE = 0.5
#: Requests refused in a row for want of room after which the link is closed (1008), as the
#: relay closes a link after as many refused frames: an honest relay stays under its own
#: ``max_in_flight`` (64), below what is held here by default (2 x ``max_concurrent``).
_MAX_OVERRUNS = 20
#: Frames refused in a row (not JSON, expired, replayed, out of shape) after which the link is
#: closed (1008), as the relay closes a link after as many: each was logged and answered.
_MAX_REFUSED = 20
#: Characters of a peer's text (a refusal's detail, a relay's error) kept in a log line or frame.
_MAX_DETAIL = 200
#: Seconds a self-test run's results answer the relay's next requests (measured from the run's
#: start): each run may try the directory's test login (``ldap.test_login``). A relay asking back
#: to back turned a stale test password into the account's lockout at the directory; at 60 s, one
#: asking once a minute (a monitor, or a hostile relay in a loop) still made a failed bind a
#: minute, 30 in a lockout window of 30 minutes (review of the connector's side of the link).
#: At 300 s, at most 6 in such a window, 12 an hour. A new configuration (a reload) starts afresh.
SELFTEST_REUSE = 300.0
_MAX_USERNAME = 256
_MAX_PASSWORD = 1024
#: Seconds between looks at the clock while a certificate renewal is not due yet.
RENEWAL_CHECK = 3600.0
#: Seconds between looks at ``STATE_DIR/link`` for a new enrolment while a link is up (a stat of
#: two files; the enrolment is read again only when one of them changed).
ENROLMENT_CHECK = 1.0
#: Seconds a link retired for a new enrolment gives the requests it carries (as a stopping one).
_RETIRE_BUDGET = 4.0
#: Seconds a link cut for a flood waits for the relay's close frame before dropping the connection:
#: aiohttp's close reads (and drops) what comes until then, the rest of the flood included.
_CUT_WAIT = 0.5


def _peer_text(text: str) -> str:
    """The relay's words (a refusal's code and detail) as they may reach the log, ``/readyz``
    and the console: printable (no terminal escapes, no forged line) and cut."""
    return printable(text)[:_MAX_DETAIL]


class Misdirected(ConnectionError):
    """The link would not be with the relay as enrolled (a redirect, no TLS): refused before
    ``hello``, and logged as an ERROR at each dial, not a WARNING like a network failure."""


class Redirected(Misdirected):
    """The relay (or what stands in front of it) answered the link or its refusal with a
    redirect. The link follows none: a ``302`` to ``http://`` made the connector re-dial in
    cleartext, say hello and answer ``authenticate`` to the unauthenticated peer, a password
    oracle, even with the relay CA pinned (review of the link). The message names the status,
    not the ``Location`` (it may hold anything)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the relay answered with a redirect (HTTP {status}); the link follows no redirect: "
                         "check link_url in link.json and what stands in front of the relay")
        self.status = status


async def _refuse_redirect(session, context, params: aiohttp.TraceRequestRedirectParams) -> None:
    params.response.close()
    raise Redirected(params.response.status)


def no_redirects() -> aiohttp.TraceConfig:
    """For the link's :class:`aiohttp.ClientSession` (``trace_configs``): a redirect raises
    :class:`Redirected` before it is followed. ``ws_connect`` takes no ``allow_redirects``
    (aiohttp 3.14); this hook runs before each hop, for every request of the session."""
    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(_refuse_redirect)
    return trace


def require_tls(ws) -> None:
    """Raise :class:`Misdirected` unless the WebSocket *ws* runs over TLS: a link without
    it has no relay certificate verified and no client certificate presented, and must not carry
    a ``hello``, let alone a sealed password's answer. aiohttp dials a ``ws://`` URL in
    cleartext even when given an SSL context (a ``link.json`` edited by hand, or a redirect had
    one been followed)."""
    if ws.get_extra_info("ssl_object") is None:
        raise Misdirected("the link is not TLS (wss://); refused before hello")


def _identity_json(identity) -> dict[str, Any]:
    """The identity with its account and password state: the relay must refuse a disabled or
    locked account on its Kerberos and certificate paths too (docs/security.md)."""
    return {**identity.to_json(), "account_state": identity.account_state,
            "password_state": identity.password_state}


@dataclasses.dataclass(frozen=True, slots=True)
class Proxy:
    """The HTTP proxy the link is tunnelled through (``CONNECT``): its URL without credentials,
    and the ``Proxy-Authorization`` value its CONNECT carries, if any."""

    url: str
    authorization: str | None = dataclasses.field(default=None, repr=False)

    @property
    def headers(self) -> dict[str, str] | None:
        return {"Proxy-Authorization": self.authorization} if self.authorization else None


def _basic(username: str, password: str) -> str:
    # RFC 7617, UTF-8. By hand: aiohttp 3.14 deprecates BasicAuth, and encode_basic_auth is recent
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def proxy_for(settings: LinkSettings, link_url: str) -> Proxy | None:
    """The proxy for the link to *link_url*: ``proxy`` (with ``proxy_username``/``proxy_password``)
    if set, else the environment's as urllib (enrolment) picks it for an ``https://`` URL of the
    same host: ``HTTPS_PROXY`` unless ``NO_PROXY`` names the host, credentials in its URL becoming
    Basic. Not aiohttp's ``trust_env``: it looks a ``wss://`` URL's proxy up in ``WSS_PROXY``."""
    if settings.proxy is not None:
        authorization = None
        if settings.proxy_username is not None:
            authorization = _basic(settings.proxy_username, settings.proxy_password.reveal())
        return Proxy(settings.proxy, authorization)
    url = urllib.request.getproxies().get("https")
    host = urlsplit(link_url).netloc.rpartition("@")[2]
    if not url or urllib.request.proxy_bypass(host):
        return None
    if "://" not in url:  # "host:port", as urllib takes it
        url = "http://" + url
    parts = urlsplit(url)
    authorization = None
    if parts.username is not None:
        authorization = _basic(unquote(parts.username), unquote(parts.password or ""))
    return Proxy(parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl(), authorization)


#: WebSocket pong round trips the reported latency is the median of.
_ROUND_TRIPS = 5


class LinkStatus:
    """What the link is doing, for readiness, the console and logs. Only memory: readiness
    reads it without I/O."""

    def __init__(self) -> None:
        self.connected = False
        self.connector = ""
        self.detail = "not started"
        self.skew: float | None = None
        #: the hello's round trip, then the median of the last WebSocket ping/pong round trips
        self.round_trip: float | None = None
        self.round_trips: collections.deque[float] = collections.deque(maxlen=_ROUND_TRIPS)
        #: notAfter (Unix time) of this connector's certificate, and of the relay's while linked
        self.certificate_not_after: float | None = None
        self.relay_certificate_not_after: float | None = None
        self.relay_certificate_subject = ""

    def add_round_trip(self, seconds: float) -> None:
        self.round_trips.append(seconds)
        self.round_trip = statistics.median(self.round_trips)


class LinkClient:
    def __init__(self, settings: LinkSettings, state_dir: Path, door, hook, version: str, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        #: the wall clock deadlines are stamped and checked with (the relay's differs by the skew)
        self._clock = clock
        self.state_dir = state_dir
        self.door = door
        self.hook = hook
        self.version = version
        self.status = LinkStatus()
        self._busy = asyncio.Semaphore(settings.max_concurrent)
        self._selftesting: asyncio.Future | None = None  # the self-test run going on, if any
        self._selftest_started = -math.inf  # monotonic time the last run started
        self._selftest_ran_at = 0.0  # wall-clock time the last run started, told to the relay (``ran_at``)
        #: The relay's directory questions (lookup_user, search_users, list_groups): threads of
        #: their own, max_concurrent of them. On the loop's default executor, questions given up
        #: on at their deadline went on holding its threads, and the login door's signing and
        #: look-ups (asyncio.to_thread) waited behind them (review of the link).
        self._directory_pool: ThreadPoolExecutor | None = None
        self._tasks: set[asyncio.Task] = set()  # one per request from the relay, running or waiting
        #: requests held at once: max_concurrent running, as many waiting for a slot
        self._max_held = 2 * settings.max_concurrent
        #: nonces and ids of the relay's requests, for this process and across its links: a
        #: request copied onto the next link is as much a replay as one repeated on the same
        self._guard = proto.ReplayGuard()
        self._lock: int | None = None  # fd of STATE_DIR/link/link.lock while this client may dial
        self._live: tuple | None = None  # (ws, pending, reader) of the link while it is up
        self._pings: dict[bytes, float] = {}  # payload of a ping in flight -> monotonic time sent
        #: how the current link ended when the relay did not close it ("closed by the connector
        #: (1007: ...)", "lost (...)"), or None
        self._closed_why: str | None = None
        #: the link just ended for a new enrolment: dial with it at once, not after a back-off
        self._enrolled_again = False

    def close(self) -> None:
        """Let the directory threads go (a question still hanging ends by itself, unwaited), and
        the link to another worker or generation."""
        if self._directory_pool is not None:
            self._directory_pool.shutdown(wait=False, cancel_futures=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _may_dial(self) -> bool:
        """Whether this client holds ``link.lock``: the relay keeps one link per connector id,
        so of several workers (or two generations during a reload) one dials; the lock goes
        with its process, and another worker takes the link over."""
        if self._lock is not None:
            return True
        try:
            fd = os.open(state.directory(self.state_dir) / "link.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:  # a read-only state directory: nothing to coordinate with
            log.warning("link: cannot open link.lock (%s); dialling without it", exc)
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock = fd
        return True

    # -- the dialling loop --------------------------------------------------------------------------

    def delay(self, failures: int) -> float:
        """Full back-off times a random factor in [0.5, 1): connectors cut off together (a relay
        restart) come back spread out, not in the same second."""
        ceiling = min(self.settings.backoff_max, self.settings.backoff_initial * 2 ** min(failures, 30))
        return ceiling * random.uniform(0.5, 1.0)

    async def run(self) -> None:
        failures = 0
        said = warned = ""
        loop = asyncio.get_running_loop()
        while True:
            if not await loop.run_in_executor(None, self._may_dial):
                self.status.detail = "another worker of this connector holds the link"
                await asyncio.sleep(self.settings.backoff_initial)
                continue
            try:
                enrolment, problem = await loop.run_in_executor(None, state.load, self.state_dir), ""
            except state.EnrolmentDamaged as exc:  # said, and looked at again after the back-off
                enrolment, problem = None, str(exc)
            if enrolment is None and not problem:
                problem = "not enrolled: run `authgw link enroll TICKET_URL`"
            elif enrolment is not None and enrolment.not_after <= self._clock():
                expired = enrolment.certificate.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%SZ")
                problem = (f"the link certificate expired at {expired}: "
                           "re-enrol with a new ticket (authgw link enroll TICKET_URL)")
            if enrolment is not None:
                self.status.certificate_not_after = enrolment.not_after
                if enrolment.key_warning and enrolment.key_warning != warned:
                    log.warning("link: %s", enrolment.key_warning)  # once, and again should it change
                warned = enrolment.key_warning
            if problem:
                if problem != said:
                    log.error("link: %s", problem)
                    said = problem
                self.status.detail = problem
                await asyncio.sleep(self.delay(failures))
                failures = min(failures + 1, 30)
                continue
            said = ""
            started = time.monotonic()
            try:
                await self._session(enrolment)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure means: wait, then dial again (never exit)
                self.status.detail = f"{exc.__class__.__name__}: {exc}"
                log.log(logging.ERROR if isinstance(exc, Misdirected) else logging.WARNING,
                        "link to %s failed: %s", enrolment.link_url, self.status.detail)
            finally:
                self.status.connected = False
            if time.monotonic() - started > 2 * self.settings.backoff_max:
                failures = 0  # it was up a good while: this is a fresh outage
            if self._enrolled_again:  # closed by this end, to take the new enrolment up
                self._enrolled_again, failures = False, 0
                continue
            wait = self.delay(failures)
            failures += 1
            log.info("link: dialling again in %.1fs", wait)
            await asyncio.sleep(wait)

    async def _session(self, enrolment: state.Enrolment) -> None:
        context = enrolment.ssl_context()
        proxy = proxy_for(self.settings, enrolment.link_url)
        url, headers = (proxy.url, proxy.headers) if proxy else (None, None)
        # Opening the link is bounded (aiohttp's default is 300 s in all: a relay address that
        # takes the TCP connection and then says nothing held every re-dial that long); the link,
        # once open, is not (its pings are).
        dial = aiohttp.ClientTimeout(total=None, connect=self.settings.dial_timeout,
                                     sock_read=self.settings.dial_timeout)
        # no trust_env: the proxy was chosen above; no redirect followed (no_redirects)
        async with aiohttp.ClientSession(timeout=dial, trace_configs=[no_redirects()]) as http:
            try:
                await self._linked(http, enrolment, context, url, headers)
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status not in (401, 403, 429):  # 429: too_many_links (docs/link-protocol.md)
                    raise
                # The relay says why in a JSON body the WebSocket handshake does not show.
                https = "https://" + enrolment.link_url.split("://", 1)[1]
                async with http.get(https, ssl=context, proxy=url, proxy_headers=headers,
                                    allow_redirects=False) as response:
                    if 300 <= response.status < 400:
                        raise Redirected(response.status)
                    try:
                        problem = json.loads(await response.content.read(4096))  # a few words, not a flood
                        why = _peer_text(f"{problem['error']}: {problem['detail']}")
                    except Exception:
                        why = f"HTTP {exc.status}"
                raise ConnectionError(f"the relay refused the link: {why}") from None

    async def _linked(self, http, enrolment: state.Enrolment, context, proxy, proxy_headers) -> None:
        async with http.ws_connect(enrolment.link_url, ssl=context, heartbeat=self.settings.ping_interval,
                                   max_msg_size=proto.MAX_FRAME, proxy=proxy, proxy_headers=proxy_headers,
                                   # autoping off: pongs reach _read, which times them (latency)
                                   # and answers the relay's pings itself
                                   autoping=False, timeout=aiohttp.ClientWSTimeout(ws_close=5.0)) as ws:
            if isinstance(context, ssl.SSLContext):  # (in-process tests dial a plain ws:// with ssl=False)
                require_tls(ws)
            self._closed_why = None
            pending: dict[str, asyncio.Future] = {}
            self._pings.clear()
            self.status.round_trips.clear()
            self._note_relay_certificate(ws)
            reader = asyncio.ensure_future(self._read(ws, enrolment, pending))
            try:
                await self._ask(ws, pending, "hello", {
                    "version": self.version, "time": self._clock(), "not_after": enrolment.not_after}, reader)
                self.status.connected = True
                self._live = (ws, pending, reader)
                self.status.connector = enrolment.connector
                self.status.detail = f"linked to {enrolment.link_url} as {enrolment.connector}"
                log.info("link up: %s as %s (clock skew %+.3fs)", enrolment.link_url, enrolment.connector,
                         self.status.skew if self.status.skew is not None else 0.0)
                renewer = asyncio.ensure_future(self._renew_when_due(ws, pending, enrolment, reader))
                pinger = asyncio.ensure_future(self._ping(ws))
                watcher = asyncio.ensure_future(self._watch_enrolment(ws, pending, enrolment, reader))
                try:
                    await reader
                finally:
                    renewer.cancel()
                    pinger.cancel()
                    watcher.cancel()
            finally:
                self._live = None
                self.status.relay_certificate_not_after = None
                reader.cancel()
                for future in pending.values():
                    future.cancel()
            # A close this end made (a missing pong, a frame that is not UTF-8, too many refused
            # frames, a drain) is not the relay's doing: saying so sent operators to the relay.
            close = self._closed_why or f"closed by the relay ({ws.close_code})"
            self.status.detail = close
            log.warning("link to %s %s", enrolment.link_url, close)

    def _note_relay_certificate(self, ws) -> None:
        """The relay's TLS certificate (already verified: state.Enrolment.ssl_context) for the status."""
        try:
            der = ws.get_extra_info("ssl_object").getpeercert(binary_form=True)
            cert = x509.load_der_x509_certificate(der)
        except Exception:  # no TLS object (a future transport): the status just lacks it
            return
        self.status.relay_certificate_not_after = cert.not_valid_after_utc.timestamp()
        self.status.relay_certificate_subject = cert.subject.rfc4514_string()

    async def _ping(self, ws) -> None:
        """A WebSocket ping every ``ping_interval`` with a random payload; _read times its pong.
        Pings unanswered are forgotten after a few rounds (the heartbeat closes a dead link)."""
        while not ws.closed:
            payload = os.urandom(8)
            if len(self._pings) > 2 * _ROUND_TRIPS:
                self._pings.clear()
            self._pings[payload] = time.monotonic()
            try:
                await ws.ping(payload)
            except (ConnectionError, RuntimeError):  # the link is closing: the reader ends it
                return
            await asyncio.sleep(self.settings.ping_interval)

    async def drain(self, budget: float) -> None:
        """A clean stop within *budget* seconds in all: tell the relay to send nothing new (its
        acknowledgement awaited at most ``_DRAIN_ACK``), answer what is in flight, then close.
        A planned restart of one connector fails no login; a relay that never acknowledges
        does not hold the stop past the server's shutdown budget (``CLOSE_GRACE``)."""
        if self._live is None:
            return
        await self._retire(*self._live, budget, 1001, "stopping", b"connector stopping")

    async def _retire(self, ws, pending, reader, budget: float, code: int, why: str, message: bytes) -> None:
        """Drain the link *ws* (above) and close it with *code* and *message* (*why* for the log),
        within *budget* seconds."""
        loop = asyncio.get_running_loop()
        end = loop.time() + budget
        try:
            await self._ask(ws, pending, "drain", {}, reader, timeout=min(_DRAIN_ACK, budget / 2))
        except Exception as exc:  # the link is going anyway
            log.warning("link: drain not acknowledged: %s", exc)
        # Every request read before the relay's acknowledgement has its task by now; one read
        # after it (a relay that wrote it as it took the drain) is answered too, within the budget.
        while self._tasks and (left := end - _CLOSE_RESERVE - loop.time()) > 0:
            await asyncio.wait(set(self._tasks), timeout=left)
        self._closed_why = f"closed by the connector ({code}: {why})"
        try:
            await asyncio.wait_for(ws.close(code=code, message=message), max(end - loop.time(), 0.1))
        except asyncio.TimeoutError:  # the relay does not answer the close: going regardless
            pass

    async def _watch_enrolment(self, ws, pending, enrolment: state.Enrolment, reader) -> None:
        """Retire this link once ``STATE_DIR/link`` holds another enrolment than the one it was
        opened with (``authgw link enroll`` run while the connector serves, without a reload).
        The link of the retired identity ran on until it dropped or renewed (weeks), answering
        as the old connector while the relay listed the new one offline (review of the connector's
        side of the link). Its requests are answered first (a drain), then the run loop dials
        with the new enrolment at once. An enrolment being written (or damaged) is left alone."""
        loop = asyncio.get_running_loop()
        seen: object = None
        while True:
            marks = await loop.run_in_executor(None, self._enrolment_marks)
            if marks != seen:
                seen = marks
                now = await loop.run_in_executor(None, self._current_enrolment, enrolment)
                if now is not None:
                    break
            await asyncio.sleep(ENROLMENT_CHECK)
        await self._retire_for(ws, pending, reader, enrolment, now)

    async def _retire_for(self, ws, pending, reader, enrolment: state.Enrolment, now: str) -> None:
        if self._enrolled_again:  # being retired already (the watcher, or a renewal answered meanwhile)
            return
        self._enrolled_again = True
        log.warning("link: the enrolment in %s changed since this link opened (authgw link enroll): it holds %s; "
                    "the link of connector %s is drained and closed, to dial with the new enrolment",
                    enrolment.directory, now, enrolment.connector)
        await self._retire(ws, pending, reader, _RETIRE_BUDGET, 1000, "enrolled again", b"enrolled again")

    def _enrolment_marks(self) -> tuple:
        """What changes when an enrolment's ``key.pem`` or ``link.json`` is replaced (they are
        renamed over: another inode), for :meth:`_watch_enrolment`."""
        marks = []
        for name in ("key.pem", "link.json"):
            try:
                info = (self.state_dir / "link" / name).stat()
            except OSError:
                marks.append(None)
            else:
                marks.append((info.st_ino, info.st_mtime_ns, info.st_size))
        return tuple(marks)

    def _current_enrolment(self, enrolment: state.Enrolment) -> str | None:
        """What ``STATE_DIR/link`` holds instead of *enrolment* ("the enrolment of connector X",
        "no enrolment"), or ``None`` while it still holds it (a renewed certificate is the same
        enrolment), or holds one being written or damaged (the next dial says so)."""
        try:
            current = state.load(self.state_dir)
        except state.EnrolmentDamaged:
            return None
        if current is None:
            return "no enrolment"
        if (current.connector, current.link_url, _spki(current.key)) == \
                (enrolment.connector, enrolment.link_url, _spki(enrolment.key)):
            return None
        return f"the enrolment of connector {printable(current.connector)}"

    async def _ask(self, ws, pending: dict[str, asyncio.Future], type_: str, body: dict[str, Any],
                   reader: asyncio.Future, timeout: float = _HELLO_TIMEOUT) -> dict[str, Any]:
        request_id, frame = proto.request(type_, body, now=self._clock(), timeout=timeout)
        future = asyncio.get_running_loop().create_future()
        pending[request_id] = future
        sent = self._clock()
        try:
            await ws.send_str(frame)
            done, _ = await asyncio.wait({future, reader}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if future not in done:
                raise ConnectionError(f"no answer to {type_} from the relay")
            message = future.result()
        finally:
            pending.pop(request_id, None)
        if message.type == proto.ERROR:
            raise ConnectionError(f"the relay refused {type_}: "
                                  + _peer_text(f"{message.body['code']}: {message.body['detail']}"))
        if type_ == "hello" and isinstance(message.body.get("time"), (int, float)):
            received = self._clock()
            self.status.round_trip = received - sent
            self.status.skew = message.body["time"] - (sent + received) / 2
        return message.body

    async def _too_many_refused(self, ws, refused: int) -> bool:
        """Close the link (1008) once the relay has sent :data:`_MAX_REFUSED` refused frames in
        a row; whether it was closed."""
        if refused < _MAX_REFUSED:
            return False
        log.warning("link: the relay sent %d refused frames in a row; closing the link", refused)
        await self._cut(ws, 1008, "too many refused frames")
        return True

    async def _cut(self, ws, code: int, why: str) -> None:
        """Close the link with *code* without reading a flood until the relay's close frame comes
        (RFC 6455 7.1.7): aiohttp's close drops the connection when it is given up on."""
        self._closed_why = f"closed by the connector ({code}: {why})"
        try:
            await asyncio.wait_for(ws.close(code=code, message=why.encode()), _CUT_WAIT)
        except (asyncio.TimeoutError, ConnectionError):
            pass

    async def _read(self, ws, enrolment: state.Enrolment, pending: dict[str, asyncio.Future]) -> None:
        overruns = 0  # requests refused in a row for want of room
        refused = 0  # frames refused in a row
        helloed = False  # the relay answered our hello (before it, the one answer awaited is the hello's)
        # The relay's pings and pongs, bounded as the relay bounds a connector's: each was answered
        # without count on the loop this connector's own front doors share, and a relay flooding
        # pings took its /auth from a 64 ms median to 4.2 s (review of the link, fourth round).
        control = proto.ControlBudget()
        async for msg in ws:
            if msg.type in (aiohttp.WSMsgType.PING, aiohttp.WSMsgType.PONG) and not control.spend():
                log.warning("link: the relay sent WebSocket pings and pongs beyond %d, then %g a second; "
                            "closing the link", proto.CONTROL_BURST, proto.CONTROL_RATE)
                await self._cut(ws, 1008, "too many pings")
                return
            if msg.type == aiohttp.WSMsgType.PING:
                await ws.pong(msg.data)
                continue
            if msg.type == aiohttp.WSMsgType.PONG:
                sent = self._pings.pop(msg.data, None)
                if sent is not None:
                    self.status.add_round_trip(time.monotonic() - sent)
                continue
            if msg.type == aiohttp.WSMsgType.ERROR:
                # aiohttp closes the link itself: no pong in time (1006), a text frame that is
                # not UTF-8 (1007), a frame over max_msg_size (1009)
                error = ws.exception() or msg.data
                what = _peer_text(f"{error.__class__.__name__}: {error}" if str(error) else error.__class__.__name__)
                if isinstance(error, (aiohttp.ServerTimeoutError, aiohttp.WebSocketError)):
                    self._closed_why = f"closed by the connector ({ws.close_code}: {what})"
                else:  # the connection failed under the link (reset, TLS error): nobody closed it
                    self._closed_why = f"lost ({ws.close_code}: {what})"
                continue
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                # Deadlines are the relay's clock: tolerate the configured skew, no more.
                message = proto.decode(msg.data, now=self._clock(), skew=self.settings.max_clock_skew,
                                       guard=self._guard, accept=proto.RELAY_TO_CONNECTOR)
            except proto.ProtocolError as exc:
                # The detail may quote the frame (a version of any size): cut, and printable.
                detail = printable(str(exc.detail))[:_MAX_DETAIL]
                _refusals("refused", "link: refused a request: %s: %s", exc.code, detail)
                await ws.send_str(proto.error(exc.request_id, exc.code, detail,
                                              version=exc.peer_version or proto.VERSION))
                refused += 1
                if await self._too_many_refused(ws, refused):
                    return
                continue
            if not message.is_request:
                future = pending.get(message.id)
                if future is not None and not future.done():
                    refused = 0
                    helloed = True
                    future.set_result(message)
                    continue
                # An answer to nothing this end asked (or asked and got already) is a refused
                # frame too: one in between reset the count, and a relay alternating garbage
                # and stray answers was never closed (review of the connector's side of the link).
                refused += 1
                if await self._too_many_refused(ws, refused):
                    return
                continue
            if not helloed:
                # The relay sends no request before it answers hello (docs/link-protocol.md): one
                # that does is not a relay that has taken this link, and gets no answer but this.
                _refusals("refused", "link: refused a %s request sent before the hello was answered", message.type)
                await ws.send_str(proto.error(message.id, "bad_request", "no request before the hello is answered"))
                refused += 1
                if await self._too_many_refused(ws, refused):
                    return
                continue
            refused = 0
            if len(self._tasks) >= self._max_held:
                # Counted here, before any task: a relay sending faster than the directory
                # answers gets refusals, not a task (and its frame kept) per request.
                overruns += 1
                await ws.send_str(proto.error(message.id, "unavailable",
                                              f"the connector is busy: {len(self._tasks)} requests held"))
                if overruns >= _MAX_OVERRUNS:
                    log.warning("link: the relay sent %d requests in a row beyond %d held (max_concurrent %d "
                                "and as many waiting); closing the link", overruns, self._max_held,
                                self.settings.max_concurrent)
                    await self._cut(ws, 1008, "too many requests beyond max_concurrent")
                    return
                continue
            overruns = 0
            task = asyncio.ensure_future(self._answer(ws, enrolment, message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- requests from the relay ----------------------------------------------------------------------

    async def _answer(self, ws, enrolment: state.Enrolment, message: proto.Message) -> None:
        async with self._busy:
            try:
                if self._time_left(message) <= 0:  # waited for a slot past its deadline: nobody waits for it
                    raise BackendUnavailable("no request slot free before the deadline (max_concurrent)")
                body = await self._serve(enrolment, message)
                frame = proto.answer(message.id, body)
                if len(frame) > proto.MAX_FRAME // 4 and len(frame.encode()) > proto.MAX_FRAME:
                    # The relay reads at most a frame: a larger one closed the whole link (1009),
                    # and every request on it failed, at each login of that user (a thousand
                    # long group names, a photo claim). This request fails alone, and says why.
                    _refusals("oversized", "link: the answer to %s is %d bytes, more than a link frame (%d): answered "
                              "as an error; map fewer claims or lower groups.max_groups", message.type,
                              len(frame.encode()), proto.MAX_FRAME)
                    frame = proto.error(message.id, "internal", f"the answer does not fit one link frame "
                                                                f"({proto.MAX_FRAME} bytes)")
            except proto.ProtocolError as exc:
                frame = proto.error(message.id, exc.code, exc.detail)
            except BackendUnavailable as exc:
                frame = proto.error(message.id, "unavailable", str(exc)[:200])
            except asyncio.TimeoutError:
                frame = proto.error(message.id, "unavailable", "no answer before the deadline")
            except Exception as exc:  # fail closed: the relay maps this to UNAVAILABLE, never a success
                log.exception("link: %s request failed", message.type)
                frame = proto.error(message.id, "internal", exc.__class__.__name__)
        if not ws.closed:
            await ws.send_str(frame)

    def _time_left(self, message: proto.Message) -> float:
        return max(0.0, message.deadline + self.settings.max_clock_skew - self._clock())

    async def _serve(self, enrolment: state.Enrolment, message: proto.Message) -> dict[str, Any]:
        body = message.body
        if message.type == "ping":
            return {"time": self._clock()}
        if message.type == "authenticate":
            username, sealed = body.get("username"), body.get("password")
            if not isinstance(username, str) or not 0 < len(username) <= _MAX_USERNAME or not username.isprintable():
                raise proto.ProtocolError("bad_request", "`username` must be 1-256 printable characters", message.id)
            if not isinstance(sealed, str) or len(sealed) > 4 * _MAX_PASSWORD:
                raise proto.ProtocolError("bad_request", "`password` must be a sealed string", message.id)
            password = proto.open_password(enrolment.key, sealed, message, connector=enrolment.connector)
            try:
                client = ipaddress.ip_address(str(body.get("client", "")))
            except ValueError:
                raise proto.ProtocolError("bad_request", "`client` must be an IP address", message.id) from None
            if getattr(client, "scope_id", None) is not None:  # fe80::1%<any text>: audited and keyed on
                raise proto.ProtocolError("bad_request", "`client` must be an IP address without a zone",
                                          message.id)
            # Checked as every front door checks a typed name and password, before the chain: an
            # empty password (an anonymous bind), one over 1 KiB, or a name empty or over 256 bytes
            # once canonicalised went from the relay to every step (review of the connector's side
            # of the link). Refused the same way, audited, never throttled.
            credential, refused = self.door.password_credential(username, password)
            attempt = Attempt(request_id=self.door.request_ids.next(), client=client, front_door="link",
                              deadline=time.monotonic() + min(self._time_left(message), proto.MAX_AHEAD),
                              password=credential, peer=None)
            if body.get("front_door") == "api":  # the relay's API: its `client` is a portal, not a user's
                attempt.stash[SERVICE_CALLER] = True
            decision = await self.door.decide(attempt, refused)
            return {"outcome": decision.outcome.value, "reason": decision.reason, "step": decision.step,
                    "from_cache": decision.from_cache,
                    "identity": _identity_json(decision.identity) if decision.identity else None}
        if message.type == "lookup_user":
            username = body.get("username")
            # printable: a lone surrogate cannot be encoded for the directory (it failed in the
            # pool, with a traceback and a new connection per request)
            if not isinstance(username, str) or not 0 < len(username) <= _MAX_USERNAME or not username.isprintable():
                raise proto.ProtocolError("bad_request", "`username` must be 1-256 printable characters", message.id)
            identity, looked_up = await self.directory_call(
                lambda: (self.hook.gateway_lookup_user(username=username), self._looks_up_users()),
                self._time_left(message))
            answer = {"found": identity is not None, "identity": _identity_json(identity) if identity else None}
            if identity is None and not looked_up:
                answer["looked_up"] = False
            return answer
        if message.type == "search_users":
            return await directory.search_users(self.hook, body, message.id, self._time_left(message),
                                                run=self.directory_call)
        if message.type == "list_groups":
            return await directory.list_groups(self.hook, body, message.id, self._time_left(message),
                                               run=self.directory_call)
        if message.type == "selftest":
            return await self._selftest_run(self._time_left(message))
        raise proto.ProtocolError("unknown_type", f"{message.type} is not served", message.id)

    def _looks_up_users(self) -> bool:
        """Whether some directory plugin that can look users up answered the lookup just made."""
        return any(getattr(impl.plugin, "looks_up_users", True) is not False
                   for impl in self.hook.gateway_lookup_user.get_hookimpls()
                   if not (impl.wrapper or impl.hookwrapper))

    async def directory_call(self, fn: Callable[[], Any], time_left: float) -> Any:
        """*fn* (a directory hook) on this link's own threads, waited for *time_left* seconds
        (:class:`asyncio.TimeoutError` then). A question given up on before it started is not
        run; one already running ends by itself, holding one of these threads, not the loop's."""
        if self._directory_pool is None:
            self._directory_pool = ThreadPoolExecutor(max_workers=self.settings.max_concurrent,
                                                      thread_name_prefix="authgw-link-directory")
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(self._directory_pool, fn), time_left)

    async def _selftest_run(self, time_left: float) -> dict[str, Any]:
        """One run of the self-tests at a time, answered within the request's deadline. A run
        still going (a test that hangs) refuses the next request as unavailable: repeated
        requests cannot pile up threads, nor hold the link's request slots (``max_concurrent``)
        that logins need; each test is bounded by ``run_selftest``'s timeout on a runner thread
        of its own. A run's results answer the requests of the next :data:`SELFTEST_REUSE`
        seconds, with its start (``ran_at``): the relay learns how old they are, the directory
        sees no test login."""
        if self._selftesting is not None and not self._selftesting.done():
            raise BackendUnavailable("a self-test run is still going on")
        last = self._selftesting
        if last is not None and time.monotonic() - self._selftest_started < SELFTEST_REUSE \
                and not last.cancelled() and last.exception() is None:
            return {"results": last.result(), "ran_at": self._selftest_ran_at}  # no new test login yet
        self._selftest_started, self._selftest_ran_at = time.monotonic(), self._clock()
        ran_at, self._selftesting = self._selftest_ran_at, asyncio.get_running_loop().run_in_executor(
            None, self._selftests)
        return {"results": await asyncio.wait_for(asyncio.shield(self._selftesting), time_left), "ran_at": ran_at}

    def _selftests(self) -> list[dict[str, str]]:
        results = []
        for test in self.door.gateway.selftests():  # plugin by plugin: one raising loses only its own
            if test.name.startswith("link."):
                continue  # the relay asked through the link: it works
            result = run_selftest(test)  # a hung test fails after its timeout
            results.append({"name": test.name, "status": result.status.value, "detail": result.detail,
                            "hint": result.hint})
        return results

    # -- renewal --------------------------------------------------------------------------------------

    async def _renew_when_due(self, ws, pending, enrolment: state.Enrolment, reader) -> None:
        """At two thirds of the certificate's life, send a CSR for the same name and key over
        the link and store the new certificate: this link goes on, the next dial presents it.
        Renewals are at least ``backoff_max`` apart, whatever the relay answers: one answering
        with certificates whose renewal point had passed made 131 renewals a second, forever
        (review of the link; ``check_renewed`` refuses those now as well)."""
        asked = -math.inf  # monotonic time of the last renew request
        while True:
            # An hour at a time: one sleep until a moment of the wall clock would oversleep a
            # suspended host or a clock stepped forward by as much (review of time).
            while (left := enrolment.renew_at - self._clock()) > 0:
                await asyncio.sleep(min(left, RENEWAL_CHECK))
            if (gap := asked + self.settings.backoff_max - time.monotonic()) > 0:
                await asyncio.sleep(gap)
            asked = time.monotonic()
            csr = (x509.CertificateSigningRequestBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, enrolment.connector)]))
                   .sign(enrolment.key, hashes.SHA256()))
            try:
                answer = await self._ask(ws, pending, "renew",
                                         {"csr": csr.public_bytes(serialization.Encoding.PEM).decode("ascii")}, reader)
                cert = x509.load_pem_x509_certificate(answer["certificate"].encode("ascii"))
                relay_ca = await asyncio.get_running_loop().run_in_executor(
                    None, (enrolment.directory / "relay-ca.pem").read_bytes)
                check_renewed(cert, enrolment, x509.load_pem_x509_certificate(relay_ca), self._clock(),
                              self.settings.max_clock_skew)
                if not await asyncio.get_running_loop().run_in_executor(None, self._still_enrolled, enrolment):
                    # `authgw link enroll` ran while this link lasted (since _watch_enrolment last
                    # looked): a certificate of the old key stored over the new enrolment's cert.pem
                    # left it damaged (not for key.pem), a ticket spent and the connector unable to
                    # dial until enrolled once more (review of the connector's side of the link).
                    await self._retire_for(ws, pending, reader, enrolment,
                                           "another enrolment (the renewed certificate is not stored)")
                    return
                # Stored within the retry: a write that failed (a full disk, a read-only or
                # damaged state directory) ended this task without a word, and no renewal was
                # tried again while the link lasted, until the certificate expired under it
                # (review of the connector's side of the link).
                await asyncio.get_running_loop().run_in_executor(
                    None, state.write_file, enrolment.directory / "cert.pem",
                    cert.public_bytes(serialization.Encoding.PEM))
            except Exception as exc:  # the old certificate stays: a bad one stored would end the link for good
                log.error("link: certificate renewal failed (%s); it expires at %s; retrying in %.0fs", exc,
                          enrolment.certificate.not_valid_after_utc.isoformat(), self.settings.backoff_max)
                await asyncio.sleep(self.settings.backoff_max)
                continue
            enrolment = dataclasses.replace(enrolment, certificate=cert)
            self.status.certificate_not_after = enrolment.not_after
            log.info("link: certificate renewed over the link, valid until %s", cert.not_valid_after_utc.isoformat())

    def _still_enrolled(self, enrolment: state.Enrolment) -> bool:
        """Whether ``STATE_DIR/link`` still holds *enrolment*, the one this link opened with: not
        when ``key.pem`` is another key or ``link.json`` names another connector (enrolled again
        since, or being: ``key.pem`` is renamed first). What cannot be read is left to the write
        that follows, to fail there and be retried (a damaged ``cert.pem`` is what it replaces)."""
        directory = state.directory(self.state_dir)
        try:
            key = serialization.load_pem_private_key((directory / "key.pem").read_bytes(), None)
            if _spki(key) != _spki(enrolment.key):
                return False
        except (OSError, ValueError, TypeError):
            pass
        try:
            info = json.loads((directory / "link.json").read_text())
            return not isinstance(info, dict) or info.get("connector") in (None, enrolment.connector)
        except (OSError, ValueError, RecursionError):
            return True


def _spki(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_renewed(cert: x509.Certificate, enrolment: state.Enrolment, relay_ca: x509.Certificate, now: float,
                  skew: float) -> None:
    """Raise :class:`ValueError` unless *cert*, the relay's answer to ``renew``, can replace the
    enrolment's: our key, issued by the relay CA kept at enrolment (not the one the answer
    names: that would let a faulty relay move the pin), our connector id as CN, valid now (within
    *skew*). Stored without these checks, a bad answer would fail every later dial until the
    connector enrols again. And it must improve on the current one: end later, with its own
    renewal point (two thirds of its life) still ahead; one already due was stored and renewed
    again at once, in a loop as fast as the relay answered (review of the link)."""
    if cert.public_key().public_numbers() != enrolment.key.public_key().public_numbers():
        raise ValueError("the renewed certificate is for another key")
    try:
        cert.verify_directly_issued_by(relay_ca)
    except Exception:  # noqa: BLE001 - another issuer, a bad signature, an unusable CA: not the relay CA's
        raise ValueError("the renewed certificate is not issued by the relay CA") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or names[0].value != enrolment.connector:
        raise ValueError(f"the renewed certificate is not for connector {enrolment.connector}")
    not_before, not_after = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    if not_before > now + skew or not_after <= now:
        raise ValueError("the renewed certificate is not valid now")
    if not_after <= enrolment.not_after:
        raise ValueError("the renewed certificate ends no later than the current one")
    if not_before + (not_after - not_before) * 2 / 3 <= now:
        raise ValueError("the renewed certificate is due for renewal already (two thirds of its life are over)")
