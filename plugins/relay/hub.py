"""The connectors linked to this relay process, and sending them requests (asyncio side).

Everything here runs on the worker's event loop; the chain step reaches it from its worker
thread with :func:`asyncio.run_coroutine_threadsafe`.

Routing rules (docs/connector.md#high-availability):

* a request goes to one **healthy** link of the connection (its ``hello`` answered, not closing,
  below ``max_in_flight``), the one with the fewest requests in flight, ties broken at random
  (a link just opened must not draw every login of an idle site);
* a connector id holds one link per relay process: a new link of the id replaces the older one
  (endpoints.py), so opening more links draws no more requests;
* a password check is sent **once**: when its frame was written and the link then fails, the
  attempt is UNAVAILABLE (``relay.link_lost``), never re-sent to another connector, because the
  first one may have reached the directory and counted a failure towards the lockout;
* read-only requests (``lookup_user``, ``search_users``, ``list_groups``, ``selftest``) are
  retried on another link when theirs is lost, or when its connector answers ``unavailable``
  (its directory did not answer) and another link is ready.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from aiohttp import web

from gateway.plugins import linkproto as proto

__all__ = ["Hub", "LinkSession", "Unreachable"]


class Unreachable(Exception):
    """No connector answered; ``reason`` is the UNAVAILABLE note's reason code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


class _NotSent(Exception):
    """The link closed before the request was written: safe to try another connector."""


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
        self.guard = proto.ReplayGuard()
        self.version = ""
        self.ready = False  # set once the connector's hello was answered
        self.closing = False
        self.draining = False  # the connector is stopping: no new requests, finish the ones in flight
        self.served = 0

    async def call(self, type_: str, body_for, timeout: float, stamp: proto.Stamp | None = None) -> proto.Message:
        """Send a request and wait for its answer or error. *body_for(stamp)* builds the body (a
        sealed password is bound to the stamp); *stamp* is given when another relay instance made
        it. Raises :class:`_NotSent` when nothing was written, :class:`Unreachable` when the link
        failed or time ran out after."""
        if self.closing or self.ws.closed:
            raise _NotSent()
        stamp = stamp or proto.new_stamp(now=time.time(), timeout=timeout)
        request_id, frame = proto.request(type_, body_for(stamp), stamp=stamp)
        future = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        self.in_flight += 1
        try:
            try:
                await self.ws.send_str(frame)
            except (ConnectionError, RuntimeError) as exc:
                raise _NotSent() from exc
            try:
                return await asyncio.wait_for(future, timeout)
            except asyncio.TimeoutError:
                raise Unreachable("relay.timeout", f"connector {self.connector} did not answer in time") from None
        finally:
            self.in_flight -= 1
            self.served += 1
            self.pending.pop(request_id, None)

    def answered(self, message: proto.Message) -> None:
        future = self.pending.get(message.id)
        if future is not None and not future.done():
            future.set_result(message)

    def lost(self) -> None:
        self.closing = True
        for future in self.pending.values():
            if not future.done():
                future.set_exception(Unreachable("relay.link_lost", f"the link to {self.connector} closed"))


class Hub:
    def __init__(self, max_in_flight: int) -> None:
        self.sessions: dict[str, list[LinkSession]] = {}
        self.max_in_flight = max_in_flight
        self.router = None  # a Router when relay instances share Redis

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
        return replaced

    def holds(self, connector: str) -> bool:
        """Whether a ready link of *connector* is held here (its route entry in Redis stays)."""
        return any(s.connector == connector and s.ready and not s.closing for s in self.all())

    def remove(self, session: LinkSession) -> None:
        session.lost()
        links = self.sessions.get(session.connection, [])
        if session in links:
            links.remove(session)

    def all(self) -> list[LinkSession]:
        return [s for links in self.sessions.values() for s in links]

    def _pick(self, connection: str, tried: set[int]) -> LinkSession | None:
        healthy = [s for s in self.sessions.get(connection, ())
                   if s.ready and not s.closing and not s.draining and not s.ws.closed and id(s) not in tried
                   and s.in_flight < self.max_in_flight]
        if not healthy:
            return None
        # Ties (an idle site) at random: idle links stay warm and tested, and a link opened just
        # now (served nothing yet) does not draw every login until it has served as many.
        fewest = min(s.in_flight for s in healthy)
        return random.choice([s for s in healthy if s.in_flight == fewest])

    async def call(self, connection: str, type_: str, body: dict[str, Any], timeout: float, *,
                   retry: bool, password: str | None = None) -> dict[str, Any]:
        """Send *type_* to one connector of *connection*; return the answer's body. A connector's
        error frame becomes :class:`Unreachable` with reason ``relay.connector_error``."""
        deadline = time.monotonic() + timeout
        tried: set[int] = set()
        while True:
            session = self._pick(connection, tried)
            if session is None and self.router is not None:
                # No link here: the instance holding one answers (router.py).
                message = await self.router.forward(connection, type_, body, max(0.05, deadline - time.monotonic()),
                                                    retry=retry, password=password)
                return _body(message)
            if session is None:
                raise Unreachable("relay.no_connector", f"no connector of {connection!r} is online")
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
                return _body(message)
            except Unreachable as exc:
                # A read-only request whose connector's directory did not answer: another
                # connector (another site, another domain controller) may reach its own.
                if retry and exc.reason == "relay.connector_unavailable" and time.monotonic() < deadline \
                        and self._pick(connection, tried) is not None:
                    continue
                raise


def _body(message: proto.Message) -> dict[str, Any]:
    """The answer's body; a connector's error frame becomes :class:`Unreachable`."""
    if message.type == proto.ERROR:
        code = message.body.get("code")
        if code == "unavailable":
            raise Unreachable("relay.connector_unavailable", str(message.body.get("detail"))[:200])
        raise Unreachable("relay.connector_error", f"{code}: {str(message.body.get('detail'))[:200]}")
    return message.body
