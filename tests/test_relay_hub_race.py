"""The relay's hub (plugins/relay/hub.py) in one process: a link that comes back at this relay
instance while a call is away asking Redis (``Router.forward``) must serve that call.

:meth:`Hub.make_ready` wakes the calls already waiting for a link; one still awaiting the forward
was not waiting yet, so it slept out the re-link window, and past its deadline failed with
``relay.no_connector`` although the link had been ready all along (review of the stop's diff).
The router here stands in for Redis (nothing elsewhere, a round trip of 50 ms); the hub, its
sessions and their futures are the real ones."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.plugins import linkproto as proto
from gateway.plugins.relay.hub import Hub, LinkSession, Unreachable


class _Socket:
    closed = False

    async def send_str(self, frame: str) -> None:
        pass


class _NothingElsewhere:
    """Other relay instances hold no link; asking takes a Redis round trip."""

    async def forward(self, connection, type_, body, timeout, *, retry, password):
        await asyncio.sleep(0.05)
        raise Unreachable("relay.no_connector", "no link at another instance", routes=frozenset())

    async def loss_left(self, connection, within):
        return 0.0

    async def routes_elsewhere(self, connection):
        return set()


@pytest.mark.parametrize("timeout", [60.0, 2.5])  # 2.5: the window (30 s) ends after the deadline
def test_a_link_back_here_while_the_call_asks_redis_serves_it(timeout):
    async def scenario() -> tuple[str, float]:
        hub = Hub(max_in_flight=10, relink_wait=30.0)
        hub.router = _NothingElsewhere()
        hub._lost["acme"] = time.monotonic()  # a ready link lost here just now
        session = LinkSession(_Socket(), "c1", "acme", None, time.time() + 3600)

        async def back_and_answering() -> None:
            await asyncio.sleep(0.01)  # while the call's forward is in flight
            hub.add(session)
            hub.make_ready(session)
            while True:
                await asyncio.sleep(0.005)
                for request_id, future in list(session.pending.items()):
                    if not future.done():
                        future.set_result(proto.Message(request_id, proto.ANSWER, {"ok": True}))

        helper = asyncio.create_task(back_and_answering())
        started = time.monotonic()
        try:
            answer = await hub.call("acme", "lookup_user", {"username": "x"}, timeout, retry=False)
            return f"answered {answer}", time.monotonic() - started
        except Unreachable as exc:
            return exc.reason, time.monotonic() - started
        finally:
            helper.cancel()

    outcome, took = asyncio.run(scenario())
    assert outcome == "answered {'ok': True}", (outcome, took)
    assert took < 15, took  # not the re-link window's 30 s (a bound on a wait, not a benchmark)
