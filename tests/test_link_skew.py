"""Clock skew between a connector and its relay: request deadlines are stamped with the sender's
wall clock, so each end tolerates a bounded skew on the other's (``relay.max_clock_skew`` for the
connector's hello, renew and drain; ``link.max_clock_skew`` for the relay's requests).

A real relay (``authgw serve``) and a connector enrolled with ``authgw link enroll``; the
connector's LinkClient runs in-process on a real core with its wall clock shifted (its ``clock``).
Before the relay tolerated skew, a connector 11 s behind could never say hello."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from gateway import Decision, Identity, Outcome, hookimpl
from gateway.http.app import FrontDoor
from gateway.passwords import hash_password
from gateway.plugins.link import state
from gateway.plugins.link.client import LinkClient
from gateway.plugins.link.settings import LinkSettings
from support.chainhelp import build
from support.gateway import authgw, static_users, write_conf
from support.linkenv import Relay
from support.net import wait_for

PASSWORD = "Corr3ct-horse-skewed"


class Directory:
    """A chain step that knows one password."""

    def __init__(self, settings, context) -> None:
        pass

    @hookimpl
    def gateway_authenticate(self, attempt):
        if attempt.password.password != PASSWORD:
            return Decision.deny(Outcome.INVALID_CREDENTIALS, step="dir", reason="dir.invalid")
        user = attempt.password.username
        return Decision.allow(Identity(subject=f"uid={user}", username=user, method="dir"), step="dir")


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    server = Relay(tmp_path_factory.mktemp("relay"), cache=False).setup().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory, relay):
    """The state directory of a connector enrolled at *relay*, and its connector id."""
    directory = tmp_path_factory.mktemp("connector")
    conf, state_dir = directory / "conf.d", directory / "state"
    write_conf(conf, {"gateway.yaml": "chain: [static]\nplugins: [link]\nthrottle: {enabled: false}\n",
                      **static_users({"alice": hash_password(PASSWORD)})})
    result = authgw("link", "enroll", relay.ticket(), "--ca", str(relay.ca_file), "--config", str(conf),
                    "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stderr
    return state_dir, json.loads((state_dir / "link" / "link.json").read_text())["connector"]


def _client(tmp_path, state_dir, offset: float, **settings) -> LinkClient:
    """A LinkClient on a real core whose wall clock is *offset* seconds from ours (the relay's)."""
    runtime = build(tmp_path, {"chain": ["dir"]}, targets={"dir": "test_link_skew:Directory"})
    return LinkClient(LinkSettings(backoff_initial=0.2, backoff_max=1.0, **settings), state_dir,
                      FrontDoor(runtime.gateway), runtime.gateway.pm.hook, "test",
                      clock=lambda: time.time() + offset)


@pytest.mark.parametrize("offset, settings", [
    (-30.0, {}),                         # behind: its hello's deadline passed by the relay's clock
    (30.0, {"max_clock_skew": 60.0}),    # ahead: the relay's deadlines passed by its clock
    (0.0, {"max_clock_skew": 150.0}),    # in sync, a wide tolerance: not "deadline too far ahead"
])
def test_a_connector_whose_clock_is_off_within_tolerance_links_and_serves(tmp_path, relay, enrolled, offset,
                                                                         settings):
    state_dir, connector = enrolled
    client = _client(tmp_path, state_dir, offset, **settings)

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(client.run())
        try:
            await loop.run_in_executor(None, lambda: wait_for(lambda: client.status.connected, 20,
                                                              what="the link", log=lambda: client.status.detail))
            await loop.run_in_executor(None, lambda: wait_for(lambda: connector in relay.ready_links(), 20,
                                                              what="the relay to list the link"))
            # the relay's clock minus the connector's, within half the hello's round trip (< 10 s)
            assert abs(client.status.skew + offset) <= 5
            ok = await loop.run_in_executor(None, relay.login, "alice", PASSWORD)  # relay -> connector
            assert (ok.status, ok.json()["outcome"]) == (200, "success"), ok.json()
            ws, pending, reader = client._live
            assert await client._ask(ws, pending, "drain", {}, reader) == {"in_flight": 0}  # connector -> relay
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(main())
    finally:
        client.close()


def test_a_connector_beyond_the_relays_tolerance_is_told_its_hello_expired(tmp_path, relay, enrolled):
    state_dir, _ = enrolled
    client = _client(tmp_path, state_dir, -60.0)  # relay.max_clock_skew: 30 s by default

    async def main():
        with pytest.raises(ConnectionError) as refused:
            await client._session(state.load(state_dir))
        return str(refused.value)

    try:
        detail = asyncio.run(main())
    finally:
        client.close()
    assert detail.startswith("the relay refused hello: expired: deadline passed ")
    assert detail.endswith("s ago, more than the 30s of clock skew tolerated")
