"""Routing between relay instances through Redis: a request that reaches an instance holding no
link of the connection goes to the instance that holds one.

* ``PREFIX route:<connection>`` (hash): connector id -> instance id, written when a link is
  ready, removed when it closes; ``PREFIX instance:<id>`` (expiring key) says an instance is alive.
* ``PREFIX lost:<connection>`` (expiring key, ``PX`` = ``relink_wait``, value the instance id):
  written, before the route entry is removed, when an instance loses a ready link (not one a
  newer link of its connector replaced, not a probe): the connection's relink window, known to
  every instance. A request finding no link at any instance within it waits (hub.py
  ``Hub._relinked``, within its deadline and this instance's own ``relink_wait``) until a link
  is ready here or a route to a live other instance appears (polled every ``RELINK_POLL``
  seconds by one task per connection while calls wait), then is tried again; a connector dialling
  again after a blip may land on any instance behind the load balancer.
* A forwarded request is a JSON item pushed to ``PREFIX inbox:<instance>``; the holder answers on
  ``PREFIX reply:<request id>`` (a list, expiring). Lists with BLPOP, not pub/sub: an item waits
  for a consumer busy for a moment instead of being lost.
* The forwarding instance seals the password to the chosen connector's key (its certificate is
  in the registry) under the stamp (id, nonce, deadline) the holder then sends it with: no
  password crosses Redis in clear, and the holder cannot re-address it to another connector.
* The holder sends a forwarded request only on a link local routing would choose
  (:meth:`Hub.routable`: not draining, below ``max_in_flight``), and only before its deadline;
  otherwise it answers ``relay.not_sent`` (``"busy": true`` when the link is at
  ``max_in_flight``) and the forwarder tries another instance's connector.
* ``relay.no_connector`` from :meth:`Router.forward` says whether nothing was handed on
  (``Unreachable.unsent``): Redis lost after a request went to an inbox may have let the holder
  send it, and a password is sent once, so such a call is not tried again after a relink wait.
* Every Redis command a wait makes is bounded by ``redis.timeout``; Redis unavailable, a wait is
  the instance's own (as with one instance) and no error of the step: ``relay.no_connector``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from typing import TYPE_CHECKING, Any

from cryptography import x509

from gateway.plugins import linkproto as proto

from .hub import Unreachable, _NotSent, busy

if TYPE_CHECKING:
    from .hub import Hub

__all__ = ["Router"]

log = logging.getLogger("authgw.plugin.relay")
#: Seconds by which the clocks of two relay instances may differ when the holder judges a
#: forwarded request's deadline (the forwarder's wall clock).
_INSTANCE_SKEW = 1.0


class Router:
    def __init__(self, settings, store, hub: Hub, ping_interval: float) -> None:
        import redis.asyncio

        self.prefix = settings.key_prefix
        self.instance = secrets.token_hex(6)
        self.store = store
        self.hub = hub
        self.ping_interval = ping_interval
        self.redis = redis.asyncio.Redis.from_url(
            settings.url, password=settings.password.reveal() if settings.password else None,
            socket_connect_timeout=settings.timeout, decode_responses=True)
        self.timeout = settings.timeout
        self._keys: dict[str, Any] = {}
        self._lost = (redis.RedisError, OSError)  # Redis gone mid-way (imported here: an optional extra)

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- the holder's side ---------------------------------------------------------------------------

    async def linked(self, connection: str, connector: str) -> None:
        await self.redis.hset(self._k("route", connection), connector, self.instance)

    async def unlinked(self, connection: str, connector: str, *, lost: bool = False) -> None:
        """*connector*'s link here closed and no newer one of it is ready here: its route entry
        goes (unless another instance wrote it since). *lost*: the link was ready (not replaced,
        not a probe): the connection's relink window opens at every instance first, so that one
        finding the route gone finds the window (``lost:``)."""
        if lost and self.hub.relink_wait > 0:
            try:
                await asyncio.wait_for(self.redis.set(self._k("lost", connection), self.instance,
                                                      px=max(1, int(self.hub.relink_wait * 1000))), self.timeout)
            except Exception as exc:  # noqa: BLE001 - the other instances do not wait; the route goes still
                log.info("relay routing: cannot tell the other instances that a link of %s was lost: %s",
                         connection, exc.__class__.__name__)
        if await self.redis.hget(self._k("route", connection), connector) == self.instance:
            await self.redis.hdel(self._k("route", connection), connector)

    async def restore(self, connection: str) -> None:
        """Write again the route entries of the links held here that Redis lost (a restart from
        a snapshot older than the link, a failover, an eviction): a route is written once, at
        the link's hello, and without it no other instance forwards to the link, so the logins
        they received were ``relay.no_connector`` until the connector dialled again (review of
        the relay side). ``HSETNX``: an entry another instance wrote since (a newer link of the
        connector there) stays. One that closed while this ran is taken out again, as its own
        :meth:`unlinked` may have gone before."""
        held = sorted({s.connector for s in self.hub.all()
                       if s.connection == connection and s.ready and not s.closing})
        if not held:
            return
        key = self._k("route", connection)
        async with self.redis.pipeline(transaction=False) as pipe:
            for connector in held:
                pipe.hsetnx(key, connector, self.instance)
            written = await asyncio.wait_for(pipe.execute(), self.timeout)
        for connector, new in zip(held, written):
            if not new:
                continue
            if self.hub.holds(connector):
                log.warning("relay routing: the route to connector %s, linked here, was missing in Redis "
                            "(lost with its data?); written again", connector)
            else:
                await self.unlinked(connection, connector)

    # -- a relink window (hub.Hub._relinked) -----------------------------------------------------------

    async def loss_left(self, connection: str, within: float) -> float:
        """Seconds left of *connection*'s relink window (an instance lost a link of it), ``0.0``
        when none, or when Redis does not answer within *within* seconds (and ``redis.timeout``)."""
        if within <= 0:
            return 0.0
        try:
            ms = await asyncio.wait_for(self.redis.pttl(self._k("lost", connection)), min(within, self.timeout))
        except Exception:  # noqa: BLE001 - Redis away: the wait is this instance's own
            return 0.0
        return ms / 1000 if isinstance(ms, int) and ms > 0 else 0.0

    async def routes_elsewhere(self, connection: str) -> set[tuple[str, str]]:
        """The ``(connector, instance)`` routes of *connection* at other instances that are alive;
        bounded by ``redis.timeout`` (raises when Redis does not answer)."""

        async def look() -> set[tuple[str, str]]:
            routes = await self.redis.hgetall(self._k("route", connection))
            others = {(c, i) for c, i in routes.items() if i != self.instance}
            instances = sorted({i for _, i in others})
            if not instances:
                return set()
            async with self.redis.pipeline(transaction=False) as pipe:
                for instance in instances:
                    pipe.exists(self._k("instance", instance))
                alive = await pipe.execute()
            live = {i for i, n in zip(instances, alive) if n}
            return {(c, i) for c, i in others if i in live}

        return await asyncio.wait_for(look(), self.timeout)

    async def heartbeat(self) -> None:
        await self.redis.set(self._k("instance", self.instance), "1", ex=max(2, int(3 * self.ping_interval)))

    async def serve(self) -> None:
        """Take forwarded requests from this instance's inbox, forever."""
        inbox = self._k("inbox", self.instance)
        away = False  # said once per outage, not every second
        while True:
            try:
                item = await self.redis.blpop([inbox], timeout=1)
            except Exception as exc:  # Redis away: keep the links, retry
                if not away:
                    log.warning("relay routing: Redis unavailable (%s); retrying every second", exc)
                away = True
                await asyncio.sleep(1.0)
                continue
            if away:
                log.warning("relay routing: Redis answers again")
            away = False
            if item is None:
                continue
            try:
                forwarded = json.loads(item[1])
                if not isinstance(forwarded, dict) or not isinstance(forwarded.get("id"), str):
                    raise ValueError("not a forwarded request")
            except (ValueError, RecursionError):  # only whoever can write to Redis; never end the inbox
                log.warning("relay routing: dropped an unreadable item from this instance's inbox")
                continue
            asyncio.ensure_future(self._handle(forwarded))

    async def _handle(self, item: dict[str, Any]) -> None:
        try:
            reply = await self._reply(item)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # An item without its fields (only whoever writes to Redis): nothing was sent on a
            # link (the stamp and body are read before), answered so; before, the task died with
            # a traceback and its forwarder waited out its deadline (review of the relay).
            log.warning("relay routing: dropped a malformed forwarded request from this instance's inbox (%s)",
                        exc.__class__.__name__)
            reply = {"unreachable": "relay.not_sent"}
        key = self._k("reply", item["id"])
        await self.redis.rpush(key, json.dumps(reply))
        await self.redis.expire(key, 60)

    async def _reply(self, item: dict[str, Any]) -> dict[str, Any]:
        """Send a forwarded request on this instance's link of its connector; the reply item."""
        links = [s for s in self.hub.all() if s.connector == item["connector"]]
        session = next((s for s in links if self.hub.routable(s)), None)
        if session is None:
            # Draining (a planned restart must fail no login) or at max_in_flight: nothing was
            # sent, so the forwarder tries another instance (relay.not_sent: what instances
            # before "busy" knew to retry).
            if self.hub.saturated(links):
                return {"unreachable": "relay.not_sent", "busy": True}
            return {"unreachable": "relay.not_sent" if links else "relay.no_connector"}
        if "nonce" not in item:  # an instance of link protocol 1 sealed it
            return {"unreachable": "relay.no_connector"}
        # The deadline is the stamp's (the forwarder's wall clock): an item that waited in the
        # inbox past it is not sent, since the user was answered already; the connector would
        # otherwise check a password nobody waits for, counting towards its lockout. The two
        # instances' clocks may differ by a little (_INSTANCE_SKEW).
        late = time.time() - float(item["deadline"])
        left = min(float(item["timeout"]), _INSTANCE_SKEW - late)
        if left <= 0:
            log.info("relay routing: a forwarded %s request for %s arrived %.1f s past its deadline; not sent "
                     "(often: a long wait in the inbox; else this instance's clock ahead of the forwarder's)",
                     item["type"], item["connector"], late)
            return {"unreachable": "relay.timeout"}
        try:
            stamp = proto.Stamp(item["id"], item["nonce"], item["deadline"])
            message = await session.call(item["type"], lambda _: item["body"], left, stamp=stamp)
        except _NotSent:
            return {"unreachable": "relay.not_sent"}
        except Unreachable as exc:
            return {"unreachable": exc.reason}
        return {"message": {"type": message.type, "body": message.body}}

    # -- the forwarder's side ------------------------------------------------------------------------

    async def forward(self, connection: str, type_: str, body: dict[str, Any], timeout: float, *,
                      retry: bool, password: str | None) -> tuple[proto.Message, str]:
        """Hand the request to an instance holding a link of *connection*; its connector's answer
        and that connector's id: the one this instance chose from the routes (ids the holders
        took from their links' certificates) and sealed the password to, which the holder sends
        it to and to no other (:meth:`_reply`); not a name its reply or the answer gives."""
        deadline = time.monotonic() + timeout
        try:
            routes = await self.redis.hgetall(self._k("route", connection))
        except Exception as exc:
            raise Unreachable("relay.no_connector", f"Redis unavailable: {exc}") from None
        candidates = [(c, i) for c, i in routes.items() if i != self.instance]
        random.shuffle(candidates)
        pushed: list[str] = []  # request ids handed to another instance's inbox
        try:
            return await self._forward(candidates, connection, type_, body, deadline, retry=retry, password=password,
                                       pushed=pushed)
        except self._lost as exc:  # Redis lost mid-way: unavailable (503), not an error of the step
            # After a push the holder may have sent it (a password is sent once): not unsent.
            raise Unreachable("relay.no_connector", f"Redis unavailable: {exc.__class__.__name__}",
                              unsent=not pushed) from None

    async def _forward(self, candidates: list[tuple[str, str]], connection: str, type_: str, body: dict[str, Any],
                       deadline: float, *, retry: bool, password: str | None,
                       pushed: list[str]) -> tuple[proto.Message, str]:
        saturated = False  # a holder's link was at max_in_flight: busy, not "no connector"
        for connector, instance in candidates:
            if not await self.redis.exists(self._k("instance", instance)):
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            stamp = proto.new_stamp(now=time.time(), timeout=left)
            request_id = stamp.id
            sealed = dict(body)
            if password is not None:
                key = await self._public_key(connector)
                if key is None:
                    continue
                sealed["password"] = proto.seal_password(key, password, stamp, connector=connector, body=body)
            pushed.append(request_id)
            await self.redis.rpush(self._k("inbox", instance), json.dumps(
                {"id": request_id, "nonce": stamp.nonce, "deadline": stamp.deadline, "connector": connector,
                 "type": type_, "body": sealed, "timeout": left}))
            item = await self.redis.blpop([self._k("reply", request_id)], timeout=max(1, int(left + 1)))
            if item is None:
                raise Unreachable("relay.timeout", f"relay instance {instance} did not answer")
            reply = json.loads(item[1])
            if "message" in reply:
                return proto.Message(request_id, reply["message"]["type"], reply["message"]["body"]), connector
            saturated = saturated or reply.get("busy") is True
            # Not sent at all, or a read-only request: another instance's connector may answer.
            if reply["unreachable"] in ("relay.not_sent", "relay.no_connector") or retry:
                continue
            raise Unreachable(reply["unreachable"])
        if saturated:
            raise busy(f"every link of {connection!r} that could take it carries its max_in_flight")
        # Nothing was sent: every holder answered so (or none was alive), so a relink wait may
        # try again; the routes tried are not a link come back (hub.Hub._watch_routes).
        raise Unreachable("relay.no_connector", f"no connector of {connection!r} is online at any relay instance",
                          routes=frozenset(candidates))

    async def _public_key(self, connector: str):
        record = await asyncio.get_running_loop().run_in_executor(None, self.store.connector, connector)
        if record is None or not record.cert or record.revoked is not None:
            return None
        return x509.load_pem_x509_certificate(record.cert.encode()).public_key()
