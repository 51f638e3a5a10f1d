"""The connectors linked to this relay process, and sending them requests (asyncio side).

Everything here runs on the worker's event loop; the chain step reaches it from its worker
thread with :func:`asyncio.run_coroutine_threadsafe`.

Routing rules (docs/connector.md#high-availability):

* a request goes to one **healthy** link of the connection (its ``hello`` answered, not closing
  or draining, below ``max_in_flight``: :meth:`Hub.routable`, which requests forwarded from
  another relay instance pass too), the one with the fewest requests in flight, ties broken at
  random (a link just opened must not draw every login of an idle site);
* when links are linked but every one is at ``max_in_flight``, the attempt is UNAVAILABLE
  ``relay.busy`` with no offline answer: the relay's cache stands in only while no connector is
  linked (``relay.no_connector``), not during a flood, when it would log in users the directory
  disabled since;
* a connection that lost a ready link less than ``relink_wait`` seconds ago, here or at another
  relay instance sharing Redis (``PREFIX lost:<connection>``, router.py), and has no link to go
  to now holds a call until then (within its deadline) for its connector to dial again, here or
  at any instance (the load balancer may send it to another one), then tries again: a link
  here, else forwarded (:meth:`Hub._relinked`): a dropped link costs a login a short wait, not
  a 503. One window per loss, shared by every call and every instance; nothing is waited for
  when nothing was lost, nor after a forwarded request may have been handed on (a password is
  sent once); with Redis unavailable the wait is this process's own, as with one instance;
* a connector id holds one link per relay process: a new link of the id replaces the older one
  (endpoints.py), so opening more links draws no more requests;
* what one connector id can make this process hold is bounded, not per link: at most
  :data:`MAX_LINKS` open links (:data:`MAX_PROBES` of them probes), one replay record shared by
  them (:class:`ConnectorGuard`, sized from the request rate it accepts), and a link that says
  no ``hello`` is closed (endpoints.py) — a stolen key cannot fill the relay's memory; new links
  are bounded in rate too (:data:`DIAL_BURST`, :data:`DIAL_RATE`, checked before the registry
  is read), and requests before identification per client address (:data:`ANONYMOUS_RATE`),
  each the relay's whole budget shared out among its workers (:class:`DialBudgets`);
* a password check is sent **once**: when its frame was written and the link then fails, the
  attempt is UNAVAILABLE (``relay.link_lost``), never re-sent to another connector, because the
  first one may have reached the directory and counted a failure towards the lockout;
* read-only requests (``lookup_user``, ``search_users``, ``list_groups``, ``selftest``) are
  retried on another link when theirs is lost, or when its connector answers ``unavailable``
  (its directory did not answer) and another link is ready.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Set
from typing import Any

from aiohttp import web

from gateway.plugins import linkproto as proto

__all__ = ["ConnectorGuard", "ControlBudget", "DialBudgets", "Hub", "LinkSession", "MAX_LINKS", "MAX_PROBES",
           "Unreachable"]

log = logging.getLogger("authgw.plugin.relay")

#: Open links one connector id may hold at a relay process: its link, one re-dialled while the
#: old one is not known dead yet, links that have not said hello yet, and probes. Beyond it a
#: new link is refused before the WebSocket upgrade (429 ``too_many_links``).
MAX_LINKS = 8
#: Of those, links whose hello was a probe (``authgw check``, several workers or operators at once).
MAX_PROBES = 4
#: Requests (``hello``, ``renew``, ``drain``) one connector id may send, all its links together:
#: a burst of :data:`REQUEST_BURST`, then :data:`REQUEST_RATE` a second. A connector sends one
#: ``hello`` per dial; beyond the rate a request is answered ``unavailable`` (a refused frame).
REQUEST_BURST = 32
REQUEST_RATE = 1.0
#: WebSocket pings and pongs one connector id may send, all its links together, are bounded by
#: the link protocol's :data:`~gateway.plugins.linkproto.CONTROL_BURST` and ``CONTROL_RATE``;
#: beyond them the link that sent one is closed (1008). Answered inside aiohttp (``autoping``),
#: they were counted nowhere: one connector's flood of pings over one link made the relay's
#: worker answer 130,000 a second, and a third of the logins of every connection it served ran
#: past their 5 s deadline (review of the relay side).
CONTROL_BURST, CONTROL_RATE = proto.CONTROL_BURST, proto.CONTROL_RATE
#: New links one connector id may open at a relay (its workers together): a burst of
#: :data:`DIAL_BURST`, then :data:`DIAL_RATE` a second; beyond it ``/link`` is refused (429
#: ``too_many_dials``) before the registry is read. Bounded in number only (:data:`MAX_LINKS`),
#: a connector dialling in a loop (a stolen key, a broken connector) cost the relay a registry
#: read, a WebSocket upgrade and two log lines per link, 150 links a second from one client,
#: and the other connectors' logins waited behind them (review of the relay, items left). A
#: connector dials once per network blip and backs off: the burst lets one re-dial at once
#: after many blips in a row.
DIAL_BURST = 20
DIAL_RATE = 1.0
#: Requests one client address (an IPv6 client by its /64) may make at the relay's listener
#: before it is identified (enrolment, ``/p/TOKEN``, and a ``/link`` without a certificate),
#: each a registry read for enrolment: a burst of :data:`ANONYMOUS_BURST`, then
#: :data:`ANONYMOUS_RATE` a second (429 ``too_many_requests`` beyond it). Identified links are
#: bounded per connector id only: behind a TCP load balancer every connector has one address.
ANONYMOUS_BURST = 60
ANONYMOUS_RATE = 2.0
#: Keys a :class:`DialBudgets` table keeps at most; a full table forgets the one used least
#: recently (a forgotten key starts again from a full burst).
_BUDGET_KEYS = 4096



#: Seconds between two looks at the routes in Redis while calls wait for a lost link to come
#: back at another relay instance (:meth:`Hub._watch_routes`, one task per connection).
RELINK_POLL = 0.15


class Unreachable(Exception):
    """No connector answered; ``reason`` is the UNAVAILABLE note's reason code, ``offline``
    whether a cache may answer instead (:attr:`gateway.model.Note.offline`): not when connectors
    are linked but busy (``relay.busy``). For ``relay.no_connector`` from another instance
    (router.py): ``unsent``, that nothing was handed on (to a link or to another instance's
    inbox), so the call may be tried again; ``routes``, the ``(connector, instance)`` routes of
    other instances the forwarder found (and that failed), ``None`` when Redis did not say.
    ``connector``: the connector whose error frame this is (``relay.connector_unavailable``,
    ``relay.connector_error``: it answered), empty otherwise."""

    def __init__(self, reason: str, detail: str = "", *, offline: bool = True, unsent: bool = True,
                 routes: Set[tuple[str, str]] | None = None, connector: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.offline = offline
        self.unsent = unsent
        self.routes = routes
        self.connector = connector


def busy(detail: str) -> Unreachable:
    """Every link that could take the request is at ``max_in_flight``."""
    return Unreachable("relay.busy", detail, offline=False)


class _NotSent(Exception):
    """The link closed before the request was written: safe to try another connector."""


class ConnectorGuard(proto.ReplayGuard):
    """The replay record of one connector id at this process, shared by all its links (nonces
    and ids are unique per sender, not per link: a request copied onto another link of the same
    connector is a replay too), with the rate limit that sizes it.

    An entry lives until its request's ``deadline + skew``, at most ``MAX_AHEAD + 2 × skew``
    seconds (the *window*) after it was accepted; at most ``REQUEST_BURST + REQUEST_RATE ×
    window`` requests are accepted in any window, two entries each (nonce and id), so a
    connector keeping to the rate never finds it full. When it is full anyway (a wall clock
    stepping back) a request is refused (``replayed``, saying why), never a live nonce forgotten."""

    def __init__(self, skew: float, clock=time.monotonic) -> None:
        self.window = proto.MAX_AHEAD + 2 * skew
        super().__init__(max_entries=2 * (REQUEST_BURST + math.ceil(REQUEST_RATE * self.window)) + 2)
        self._clock = clock
        self._tokens = float(REQUEST_BURST)
        self._at = clock()

    def fresh(self, nonce: str, until: float, now: float, request_id: str | None = None) -> bool:
        at = self._clock()
        self._tokens = min(float(REQUEST_BURST), self._tokens + max(0.0, at - self._at) * REQUEST_RATE)
        self._at = at
        if self._tokens < 1.0:
            raise proto.ProtocolError("unavailable", f"too many requests from this connector: at most "
                                      f"{REQUEST_RATE:g} a second after {REQUEST_BURST}", request_id)
        self._tokens -= 1.0
        return super().fresh(nonce, until, now, request_id)

    def live_until(self) -> float:
        """When its last entry expires (wall clock); ``-inf`` when empty."""
        return max(self._seen.values(), default=-math.inf)


class ControlBudget(proto.ControlBudget):
    """The WebSocket pings and pongs one connector id may still send, all its links together
    (:class:`gateway.plugins.linkproto.ControlBudget`), with what the relay logs of it."""

    def __init__(self, clock=time.monotonic) -> None:
        super().__init__(clock)
        self.closed = 0  # links closed for spending it
        self.last_logged = -math.inf


class DialBudgets:
    """Token buckets by key (a connector id, a client network): *burst*, refilled at *rate* a
    second, for the relay as a whole; this process, one of *workers*, keeps its share of each
    (a *workers*-th of the burst, at least one, and of the rate). O(1) a look, in memory; at
    most :data:`_BUDGET_KEYS` keys, the least recently used forgotten beyond (a forgotten key
    starts again from a full burst).

    Shares, not one bucket in the relay's store: the workers together admit at most the budget
    (each worker held all of it, and ``workers: 2`` let a client dial and look tickets up twice
    as much), and the path a flood takes costs no store write and has no store to wait for or
    lose (the budgets are there to spare the registry its reads). The price: a client whose
    connections all reach one worker gets that worker's share only. The workers accept from
    the relay listener's one socket, each new connection going to a worker free to take it, a
    refusal closes the connection, and a connector dials again after a back-off: a client
    spending its budget meets every worker. *workers* is ``workers:`` (a plugin is not told
    ``authgw serve --workers``: run with more workers than it says, the relay admits more than
    its budget, one share a worker; with fewer, less)."""

    def __init__(self, burst: int, rate: float, clock=time.monotonic, *, workers: int = 1) -> None:
        share = max(1, workers)
        self.burst, self.rate = max(1.0, burst / share), rate / share
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, at]; insertion order = recency
        self.refused: dict[str, int] = {}  # refusals not logged yet, per key
        self._logged: dict[str, float] = {}

    def take(self, key: str) -> bool:
        """Spend one token of *key*; False (nothing spent) when it has none left."""
        at = self._clock()
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = [self.burst, at]
            if len(self._buckets) >= _BUDGET_KEYS:
                self._forget()
        tokens = min(self.burst, bucket[0] + max(0.0, at - bucket[1]) * self.rate)
        self._buckets[key] = bucket  # the most recent last
        bucket[1] = at
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _forget(self) -> None:
        """Forget the key used least recently (the first: a take moves its key last), O(1): a
        scan for full buckets at each new key cost a flood from many networks the whole table."""
        oldest = next(iter(self._buckets))
        del self._buckets[oldest]
        self.refused.pop(oldest, None)
        self._logged.pop(oldest, None)

    def should_log(self, key: str, interval: float = 60.0) -> int | None:
        """A refusal of *key*: the count of refusals since the last line when one is due now
        (at most one per *interval* per key), else None (counted)."""
        at = self._clock()
        self.refused[key] = self.refused.get(key, 0) + 1
        if at - self._logged.get(key, -math.inf) < interval:
            return None
        self._logged[key] = at
        return self.refused.pop(key)


class _Connector:
    """What one connector id holds at this process: its open links (said hello or not, replaced
    ones until closed), their shared replay record and ping budget, and the refusal log's state."""

    def __init__(self, skew: float) -> None:
        self.links: list[LinkSession] = []
        self.guard = ConnectorGuard(skew)
        self.control = ControlBudget()
        self.refusing = False  # a burst of refusals is going on: logged once
        self.refused = 0  # refusals not logged
        self.last_logged = -math.inf


#: Seconds between two WARNINGs about one connector's refused links, whatever the bursts.
_REFUSAL_LOG_INTERVAL = 60.0


class LinkSession:
    """One connector's live WebSocket."""

    def __init__(self, ws: web.WebSocketResponse, connector: str, connection: str, public_key, not_after: float,
                 peer: str = "") -> None:
        self.ws = ws
        self.peer = peer  # the address the link came from, for the logs
        self.connector = connector
        self.connection = connection
        self.public_key = public_key
        self.not_after = not_after
        self.in_flight = 0
        self.pending: dict[str, asyncio.Future] = {}
        #: ids of requests this link carried that ended unanswered (timed out), oldest first, at
        #: most _UNANSWERED_KEPT: the one late answer each may still get (:meth:`answered`).
        self.unanswered: dict[str, None] = {}
        self.guard: proto.ReplayGuard | None = None  # its connector's, shared (Hub.admit)
        self.control: ControlBudget | None = None  # its connector's pings and pongs, shared (Hub.admit)
        self.version = ""
        self.ready = False  # set once the connector's hello was answered
        self.greeted = False  # a hello (probe or not) was answered: the hello timeout is over
        self.probe = False  # its hello was a probe (`authgw check`): never routed to
        self.refused = False  # its hello was refused for too many links: close it
        self.closing = False
        self.dropped = False  # lost while ready (not replaced, not a probe): a relink window began
        self.draining = False  # the connector is stopping: no new requests, finish the ones in flight
        self.served = 0

    async def call(self, type_: str, body_for, timeout: float, stamp: proto.Stamp | None = None) -> proto.Message:
        """Send a request and wait for its answer or error. *body_for(stamp)* builds the body (a
        sealed password is bound to the stamp); *stamp* is given when another relay instance made
        it. Raises :class:`_NotSent` when nothing was written, :class:`Unreachable` when the link
        failed or time ran out after."""
        if self.closing or self.ws.closed:
            raise _NotSent()
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        stamp = stamp or proto.new_stamp(now=time.time(), timeout=timeout)
        request_id, frame = proto.request(type_, body_for(stamp), stamp=stamp)
        future = loop.create_future()
        self.pending[request_id] = future
        self.in_flight += 1
        try:
            try:
                # Bounded: a connector that stops reading fills the socket and the write waits
                # for room, holding this request (and its in_flight) after its answer was due.
                await asyncio.wait_for(self._write(frame), timeout)
            except (ConnectionError, RuntimeError) as exc:
                raise _NotSent() from exc
            except asyncio.TimeoutError:
                # The frame may sit in the transport's buffer and still reach the connector:
                # not _NotSent, since a password is sent once.
                raise Unreachable("relay.timeout", f"connector {self.connector} did not read the request "
                                  "in time") from None
            try:
                return await asyncio.wait_for(future, max(0.0, until - loop.time()))
            except asyncio.TimeoutError:
                raise Unreachable("relay.timeout", f"connector {self.connector} did not answer in time") from None
        finally:
            self.in_flight -= 1
            self.served += 1
            future = self.pending.pop(request_id, future)
            if future.cancelled() or not future.done():  # no answer (timed out): a late one is legitimate
                self.unanswered[request_id] = None
                if len(self.unanswered) > _UNANSWERED_KEPT:
                    del self.unanswered[next(iter(self.unanswered))]

    async def _write(self, frame: str) -> None:
        """Write *frame*, unless the connector said it is stopping (or the link is closing) by
        now: ``wait_for`` runs this a turn of the loop after the link was picked, and the
        connector's ``drain`` may have been taken and acknowledged meanwhile. A request written
        after that acknowledgement reached a connector that had stopped waiting for new ones,
        and its login fell to the cache (the CI-like run). The check and the write happen in one
        step of the loop (aiohttp writes a small frame to the transport before it awaits)."""
        if self.draining or self.closing or self.ws.closed:
            raise _NotSent()
        await self.ws.send_str(frame)

    def answered(self, message: proto.Message) -> bool:
        """Take *message*, an answer (or error) of the connector; False when it answers no
        request this link carried, or one answered already: the caller counts it as a refused
        frame. Such answers were parsed and dropped without end: a connector streaming 48 KB
        answers to made-up ids raised the relay's median latency from 1.6 to 38 ms (review of
        the relay side). A late answer, to a request that timed out, is legitimate, once."""
        future = self.pending.get(message.id)
        if future is not None:
            if future.cancelled():  # its call timed out this turn of the loop: late, legitimate
                return True
            if future.done():
                return False
            future.set_result(message)
            return True
        if message.id in self.unanswered:
            del self.unanswered[message.id]
            return True
        return False

    def lost(self) -> None:
        self.closing = True
        for future in self.pending.values():
            if not future.done():
                future.set_exception(Unreachable("relay.link_lost", f"the link to {self.connector} closed"))


#: Requests that ended unanswered whose late answers a link still takes (per link, the most
#: recent): one that comes after 16,384 more timed out counts as a refused frame.
_UNANSWERED_KEPT = 16_384


class _Waiter:
    """A call waiting for a link of its connection (:meth:`Hub._relinked`): *future* is set when
    one is ready here (:meth:`Hub.make_ready`) or at another live instance (:meth:`Hub._watch_routes`:
    a route not in *known*, the routes of other instances that failed this call already)."""

    __slots__ = ("future", "known")

    def __init__(self, future: asyncio.Future, known: Set[tuple[str, str]] | None) -> None:
        self.future = future
        self.known = None if known is None else set(known)


class _Relink:
    """One call's relink window (:meth:`Hub._relinked`): when its wait ends (monotonic; ``None``
    before its first wait), and whether one more try is due when the window (not the deadline)
    ends."""

    __slots__ = ("until", "last_try")

    def __init__(self) -> None:
        self.until: float | None = None
        self.last_try = False


class Hub:
    def __init__(self, max_in_flight: int, relink_wait: float = 3.0, *, workers: int = 1) -> None:
        self.sessions: dict[str, list[LinkSession]] = {}
        self.max_in_flight = max_in_flight
        #: seconds after a lost link during which a call waits for a new one (:meth:`_relinked`)
        self.relink_wait = relink_wait
        self.router = None  # a Router when relay instances share Redis
        #: per connector id: its open links and their shared replay record (kept, once the last
        #: link closed, until its nonces expire: a request copied onto the next link is refused)
        self.connectors: dict[str, _Connector] = {}
        #: per connection: when it last lost a ready link here (time.monotonic(); with Redis, every
        #: instance also knows of it: router.py ``lost:``), the calls waiting for one to be ready
        #: again (:meth:`_relinked`), and the task watching Redis's routes for them
        self._lost: dict[str, float] = {}
        self._relink_waiters: dict[str, list[_Waiter]] = {}
        self._watchers: dict[str, asyncio.Task] = {}
        #: new links per connector id, and requests per client network before identification:
        #: this worker's share of the relay's budgets (*workers*: the processes serving it)
        self.dials = DialBudgets(DIAL_BURST, DIAL_RATE, workers=workers)
        self.anonymous = DialBudgets(ANONYMOUS_BURST, ANONYMOUS_RATE, workers=workers)

    def admit(self, session: LinkSession, skew: float) -> bool:
        """Count *session* as an open link of its connector and give it the connector's replay
        record; ``False`` (nothing counted) when the connector holds :data:`MAX_LINKS` already.
        Synchronous: no other link of the connector is admitted between check and count."""
        self._forget_idle(time.time())
        state = self.connectors.get(session.connector)
        if state is None:
            state = self.connectors[session.connector] = _Connector(skew)
        if len(state.links) >= MAX_LINKS:
            self._refused(state, session, f"it holds {len(state.links)} open links already (at most {MAX_LINKS})")
            return False
        state.links.append(session)
        session.guard = state.guard
        session.control = state.control
        return True

    def control_frame(self, session: LinkSession) -> bool:
        """*session* received a WebSocket ping or pong: False when its connector spent its
        budget (:data:`CONTROL_RATE`), and the link is to be closed. Said once a minute per
        connector, with the count of links closed since."""
        budget = session.control
        if budget is None or budget.spend():
            return True
        budget.closed += 1
        now = time.monotonic()
        if now - budget.last_logged >= _REFUSAL_LOG_INTERVAL:
            budget.last_logged = now
            log.warning("closing a link of connector %s from %s: it sent WebSocket pings and pongs beyond %d, then "
                        "%g a second (%d link(s) of it closed for that since the last warning; a hostile or "
                        "broken connector)", session.connector, session.peer, CONTROL_BURST, CONTROL_RATE,
                        budget.closed)
            budget.closed = 0
        return False

    def may_probe(self, session: LinkSession) -> bool:
        """Whether *session* may become a probe link: its connector holds fewer than
        :data:`MAX_PROBES` (refusals are logged once per burst)."""
        state = self.connectors.get(session.connector)
        probes = sum(1 for s in state.links if s.probe) if state is not None else 0
        if state is not None and probes >= MAX_PROBES:
            self._refused(state, session, f"its hello is a probe and it holds {probes} probe links already "
                          f"(at most {MAX_PROBES})")
            return False
        return True

    def release(self, session: LinkSession) -> None:
        """*session*'s WebSocket is closed: it no longer counts against its connector."""
        state = self.connectors.get(session.connector)
        if state is None or session not in state.links:
            return
        state.links.remove(session)
        if state.refusing:  # below the limit again: the burst of refusals is over
            state.refusing = False
            if state.refused:
                log.info("connector %s: %d more links refused (too many links) since the last warning",
                         session.connector, state.refused)
                state.refused = 0

    def _refused(self, state: _Connector, session: LinkSession, why: str) -> None:
        """Log a refused link once per burst (and at most once a minute), count the others."""
        now = time.monotonic()
        if state.refusing or now - state.last_logged < _REFUSAL_LOG_INTERVAL:
            state.refused += 1
            return
        state.refusing, state.last_logged = True, now
        more = f" ({state.refused} more refused before)" if state.refused else ""
        state.refused = 0
        log.warning("refused a link of connector %s from %s: %s; further refusals are not logged until one of "
                    "its links closes%s (several processes sharing one enrolment? a stolen key?)",
                    session.connector, session.peer, why, more)

    def _forget_idle(self, now: float) -> None:
        """Drop the replay records of connectors with no open link whose entries all expired."""
        idle = [name for name, state in self.connectors.items()
                if not state.links and state.guard.live_until() < now]
        for name in idle:
            del self.connectors[name]

    def add(self, session: LinkSession) -> None:
        self.sessions.setdefault(session.connection, []).append(session)

    def make_ready(self, session: LinkSession) -> list[LinkSession]:
        """*session* said hello: it is now the link of its connector. Returns the older links
        of that connector it replaces, taken out of routing here (the caller closes them)."""
        if session.closing:  # itself replaced already (its hello came late): it stays out
            return []
        links = self.sessions.get(session.connection, [])
        replaced = [s for s in links if s.connector == session.connector and s is not session]
        for old in replaced:
            links.remove(old)
            old.closing = True
        session.ready = True
        session.probe = False
        for waiter in self._relink_waiters.pop(session.connection, ()):
            if not waiter.future.done():
                waiter.future.set_result(None)
        return replaced

    def holds(self, connector: str) -> bool:
        """Whether a ready link of *connector* is held here (its route entry in Redis stays)."""
        return any(s.connector == connector and s.ready and not s.closing for s in self.all())

    def remove(self, session: LinkSession) -> None:
        """*session* is closed or closing: out of routing, what it carries fails. A ready link
        lost (not replaced, not a probe) opens its connection's relink window here; the link's
        handler tells the other instances (``session.dropped``, :meth:`Router.unlinked`)."""
        if session.ready and not session.closing and not session.probe:
            self._lost[session.connection] = time.monotonic()
            session.dropped = True
        session.lost()
        links = self.sessions.get(session.connection, [])
        if session in links:
            links.remove(session)

    def all(self) -> list[LinkSession]:
        return [s for links in self.sessions.values() for s in links]

    @staticmethod
    def serving(session: LinkSession) -> bool:
        """Whether *session* takes new requests at all: its hello answered (not a probe), not
        closing, not draining (its connector is stopping), its WebSocket open."""
        return session.ready and not session.closing and not session.draining and not session.ws.closed

    def routable(self, session: LinkSession) -> bool:
        """Whether a new request may go to *session* now: serving and below ``max_in_flight``.
        The one rule for requests from this process and those forwarded by another (router.py)."""
        return self.serving(session) and session.in_flight < self.max_in_flight

    def saturated(self, sessions, tried: Set[int] = frozenset()) -> bool:
        """Whether some of *sessions* (not in *tried*) serve, all of those at ``max_in_flight``."""
        serving = [s for s in sessions if self.serving(s) and id(s) not in tried]
        return bool(serving) and not any(self.routable(s) for s in serving)

    def _pick(self, connection: str, tried: set[int]) -> LinkSession | None:
        healthy = [s for s in self.sessions.get(connection, ()) if self.routable(s) and id(s) not in tried]
        if not healthy:
            return None
        # Ties (an idle site) at random: idle links stay warm and tested, and a link opened just
        # now (served nothing yet) does not draw every login until it has served as many.
        fewest = min(s.in_flight for s in healthy)
        return random.choice([s for s in healthy if s.in_flight == fewest])

    async def call(self, connection: str, type_: str, body: dict[str, Any], timeout: float, *,
                   retry: bool, password: str | None = None) -> dict[str, Any]:
        """Send *type_* to one connector of *connection*; return the answer's body (:meth:`ask`
        says which connector answered too). A connector's error frame becomes
        :class:`Unreachable` with reason ``relay.connector_error``."""
        answer, _ = await self.ask(connection, type_, body, timeout, retry=retry, password=password)
        return answer

    async def ask(self, connection: str, type_: str, body: dict[str, Any], timeout: float, *,
                  retry: bool, password: str | None = None) -> tuple[dict[str, Any], str]:
        """As :meth:`call`, and the id of the connector that answered: the one whose link the
        request went on, here or at the instance holding it (router.py: the connector the
        forwarder chose and sealed the password to, which the holder sends to alone). This
        relay's own record of the link, from its enrolment and certificate, never a name the
        answer gives: a connector that vouches falsely cannot put another's name on it."""
        deadline = time.monotonic() + timeout
        tried: set[int] = set()
        relink = _Relink()
        while True:
            session = self._pick(connection, tried)
            if session is None:
                local_busy = self.saturated(self.sessions.get(connection, ()), tried)
                if self.router is None:
                    if local_busy:
                        raise busy(f"every link of {connection!r} carries {self.max_in_flight} requests")
                    if await self._relinked(connection, deadline, relink, tried=tried):
                        continue
                    raise Unreachable("relay.no_connector", f"no connector of {connection!r} is online")
                # No link free here: the instance holding one answers (router.py).
                try:
                    message, connector = await self.router.forward(connection, type_, body,
                                                                   max(0.05, deadline - time.monotonic()),
                                                                   retry=retry, password=password)
                except Unreachable as exc:
                    if local_busy and exc.reason == "relay.no_connector":
                        raise busy(f"every link of {connection!r} here carries {self.max_in_flight} requests "
                                   "and no other instance took it") from None
                    # Only when nothing was handed on: Redis lost after the request went to another
                    # instance's inbox may have let its connector check the password.
                    if exc.reason == "relay.no_connector" and exc.unsent \
                            and await self._relinked(connection, deadline, relink, exc.routes, tried=tried):
                        continue
                    raise
                return _body(message, connector), connector
            tried.add(id(session))

            def body_for(stamp: proto.Stamp, session=session) -> dict[str, Any]:
                if password is None:
                    return body
                return {**body, "password": proto.seal_password(session.public_key, password, stamp,
                                                                connector=session.connector, body=body)}

            try:
                message = await session.call(type_, body_for, max(0.05, deadline - time.monotonic()))
            except _NotSent:
                continue  # nothing reached this connector: another may answer
            except Unreachable as exc:
                if retry and exc.reason == "relay.link_lost" and time.monotonic() < deadline:
                    continue
                raise
            try:
                return _body(message, session.connector), session.connector
            except Unreachable as exc:
                # A read-only request whose connector's directory did not answer: another
                # connector (another site, another domain controller) may reach its own.
                if retry and exc.reason == "relay.connector_unavailable" and time.monotonic() < deadline \
                        and self._pick(connection, tried) is not None:
                    continue
                raise

    async def _relinked(self, connection: str, deadline: float, relink: _Relink,
                        failed: Set[tuple[str, str]] | None = None, *, tried: Set[int] = frozenset()) -> bool:
        """Whether the call should try again: a link of *connection* is ready again, here or at
        another relay instance, within ``relink_wait`` seconds of a relay instance losing one
        (and within the call's deadline). A connector whose link dropped (a network blip, the
        connector's loop held up past its pong deadline) dials again at once, possibly through a
        load balancer to another instance, and a login that arrives meanwhile waits for it rather
        than failing with ``relay.no_connector``. One window per loss, shared by every call and,
        through Redis (``PREFIX lost:<connection>``), by every instance: a connector that does
        not come back costs the logins of those few seconds a wait, not those after.

        With Redis, a link ready at another live instance ends the wait too: a route there that
        is not one of *failed* (what the forward just tried) or that came back since
        (:meth:`_watch_routes`); and when the window ends before the deadline the call tries once
        more, for what that watch cannot see. *relink* is the call's: it waits again, if a try
        failed, only within the same window. Redis unavailable: the wait is this process's own."""
        if relink.until is None:  # the call's first wait: its window, from the last loss known
            now = time.monotonic()
            lost = self._lost.get(connection)
            end = lost + self.relink_wait if lost is not None else -math.inf
            if self.router is not None and self.relink_wait > 0:
                shared = await self.router.loss_left(connection, max(0.0, min(self.relink_wait, deadline - now)))
                if shared > 0:
                    end = max(end, time.monotonic() + min(shared, self.relink_wait))
            relink.until = min(end, deadline - 0.1)
            # A router's view of other instances may miss a link (a route written again within one
            # look, an instance of an older version): one more try when the window ends in time.
            relink.last_try = self.router is not None and time.monotonic() < end < deadline - 0.1
        # A link ready here while this call awaited Redis (the forward, the window) woke nobody:
        # it was not waiting yet. Not one the call tried already (no loop on a link that failed).
        if self._pick(connection, set(tried)) is not None:
            return True
        wait = relink.until - time.monotonic()
        if wait <= 0:
            last, relink.last_try = relink.last_try, False
            return last
        waiter = _Waiter(asyncio.get_running_loop().create_future(), failed)
        waiters = self._relink_waiters.setdefault(connection, [])
        waiters.append(waiter)
        if self.router is not None:
            task = self._watchers.get(connection)
            if task is None or task.done():
                self._watchers[connection] = asyncio.get_running_loop().create_task(self._watch_routes(connection))
        try:
            await asyncio.wait_for(waiter.future, wait)
            return True
        except asyncio.TimeoutError:
            last, relink.last_try = relink.last_try, False
            return last or self._pick(connection, set(tried)) is not None
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters and self._relink_waiters.get(connection) is waiters:
                del self._relink_waiters[connection]

    async def _watch_routes(self, connection: str) -> None:
        """While calls wait for a link of *connection* (:meth:`_relinked`), look at its routes in
        Redis every :data:`RELINK_POLL` seconds and wake those for which a link is ready at
        another live instance: a route that failed them (``known``) is not one, unless it went
        away and came back since. One task per connection, whatever the number of calls; it
        ends with the last of them (each bounded by its window). Redis unavailable: nobody is
        woken by it (a link here still wakes them)."""
        try:
            while self._relink_waiters.get(connection):
                try:
                    routes = await self.router.routes_elsewhere(connection)
                except Exception:  # noqa: BLE001 - Redis away or slow: the local wait goes on
                    routes = None
                if routes is not None:
                    for waiter in list(self._relink_waiters.get(connection, ())):
                        if waiter.known is None:  # the forward did not say: what is there failed it
                            waiter.known = set(routes)
                            continue
                        waiter.known &= routes  # gone since: back later, it is a new link
                        if routes - waiter.known and not waiter.future.done():
                            waiter.future.set_result(None)
                await asyncio.sleep(RELINK_POLL)
        finally:
            if self._watchers.get(connection) is asyncio.current_task():
                del self._watchers[connection]


def _body(message: proto.Message, connector: str) -> dict[str, Any]:
    """The answer's body; a connector's error frame becomes :class:`Unreachable` naming
    *connector*, the one that sent it. Not one a cache may answer for (``offline`` false): a
    connector answered, busy (``max_concurrent``), past the deadline or failing. A flood on a
    linked connector turned logins into this relay's cache answers, which ``relay.busy`` is
    there to prevent, and could sign in a user the directory had disabled since (review of
    the relay)."""
    if message.type == proto.ERROR:
        code = message.body.get("code")
        if code == "unavailable":
            raise Unreachable("relay.connector_unavailable", str(message.body.get("detail"))[:200],
                              offline=False, connector=connector)
        raise Unreachable("relay.connector_error", f"{code}: {str(message.body.get('detail'))[:200]}",
                          offline=False, connector=connector)
    return message.body
