"""A link that drops and is dialled again (a network blip; a connector held up past the relay's
pong deadline, as a loaded machine did in CI): a login that reaches the relay in between waits
a moment for the link instead of failing with ``relay.no_connector``, and gets its answer; with
no link back within ``relink_wait`` of the loss, it is ``relay.no_connector`` as before."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from support.linkenv import Connector, Relay
from support.net import wait_for
from support.slapd import Slapd

PASSWORD = "Alice-Passw0rd-relinked"


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap")).start()
    server.add_user("alice", PASSWORD, cn="Alice A")
    yield server
    server.stop()


@pytest.fixture
def linked(tmp_path, slapd, request):
    # A long wait where the link must come back in it, however loaded the machine; 1 s where not.
    relay = Relay(tmp_path / "relay", cache=False, settings={"relink_wait": request.param}).setup().start()
    connector = Connector(tmp_path / "c1", slapd).enroll(relay.ticket(), relay.ca_file)
    connector.start()
    try:
        connector.wait_linked(relay, timeout=60)
        yield relay, connector
    finally:
        os.kill(connector.process.proc.pid, signal.SIGCONT)
        connector.stop()
        relay.stop()


def _answer(relay: Relay) -> tuple[int, str]:
    response = relay.login("alice", PASSWORD)
    return response.status, response.json()["reason"]


def _frozen_until_the_relay_drops_it(relay: Relay, connector: Connector) -> None:
    # Stopped, the connector answers no ping: the relay closes the link within ~1.5 ping
    # intervals (1 s here) and takes it out of routing.
    os.kill(connector.process.proc.pid, signal.SIGSTOP)
    wait_for(lambda: relay.ready_links() == "", timeout=60, interval=0.05, what="the relay to drop the link",
             log=relay.process.output)


@pytest.mark.parametrize("linked", [30.0], indirect=True)
def test_a_login_during_a_relink_waits_for_the_link(linked):
    relay, connector = linked
    assert _answer(relay) == (200, "")
    _frozen_until_the_relay_drops_it(relay, connector)
    answers: list[tuple[int, str]] = []
    login = threading.Thread(target=lambda: answers.append(_answer(relay)))
    login.start()
    # The login is held at the relay (no link); the connector resumes, finds its link closed and
    # dials again (backoff 0.2 s), and the held login goes over the new link.
    wait_for(lambda: "authgw_attempts_in_flight 1.0" in relay.process.get("/metrics").text, timeout=30,
             interval=0.05, what="the login held at the relay", log=relay.process.output)
    os.kill(connector.process.proc.pid, signal.SIGCONT)
    login.join(60)
    assert answers == [(200, "")], relay.process.output()[-3000:]


@pytest.mark.parametrize("linked", [1.0], indirect=True)
def test_without_a_link_back_in_time_it_is_no_connector(linked):
    relay, connector = linked
    _frozen_until_the_relay_drops_it(relay, connector)
    assert _answer(relay) == (503, "relay.no_connector")  # the link not back within the wait
    os.kill(connector.process.proc.pid, signal.SIGCONT)
    connector.wait_linked(relay, timeout=60)
    assert _answer(relay) == (200, "")
