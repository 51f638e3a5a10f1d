"""The connector's side of the link: items earlier reviews left (review of the link, left items),
each against real components (``authgw serve`` relay and connector, a real slapd, ``authgw link
enroll`` against a relay of the test's on 127.0.0.1):

- ``authgw link enroll`` run while the connector serves retires the old link at once (drained,
  closed 1000) and links with the new enrolment: the old identity went on answering until its
  link dropped or renewed, weeks later, with the new connector offline at the relay;
- a relay asking for self-tests once a minute gets the last run's results (and when it started,
  ``ran_at``) for :data:`SELFTEST_REUSE` seconds: every ask a minute apart ran the directory's test
  login again, a failed bind a minute with a stale test password;
- a link URL or connection name that is not one (control characters, a bracket left open, a
  port that is not a number, no host, an empty name) is refused at enrolment, one line, nothing
  written: control characters were stored, a bracket raised a traceback, a bad port broke every
  self-test of ``authgw check`` after.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web
from cryptography import x509

from gateway.checks import CheckResult, SelfTest
from gateway.http.app import FrontDoor
from gateway.plugins.link.client import SELFTEST_REUSE, LinkClient
from gateway.plugins.link.settings import LinkSettings
from gateway.plugins.linkproto import Message
from gateway.registry import hookimpl
from support.chainhelp import build
from support.gateway import authgw
from support.hostile_relay import CONNECTOR, HandEnrolled, HostileRelay, connector_certificate, connector_conf, pem
from support.linkdir import slapd  # noqa: F401 - fixture
from support.linkenv import Connector, Relay
from support.net import wait_for
from support.pki import CA

TOKEN = "T0KEN_abcdefghijklmnopqrstuvwxyz0123"


# -- 1. a re-enrolment while serving ---------------------------------------------------------------------


def test_a_reenrolment_while_serving_retires_the_old_link(tmp_path, stack, slapd):
    relay = Relay(tmp_path / "relay", cache=False).setup().start()
    stack.append(relay)
    connector = Connector(tmp_path / "c1", slapd).enroll(relay.ticket(), relay.ca_file)
    stack.append(connector)
    connector.start().wait_linked(relay)
    old = connector.connector_id
    again = connector.cli("link", "enroll", relay.ticket(), "--ca", str(relay.ca_file))
    assert again.returncode == 0, again.stderr
    new = json.loads((connector.state / "link" / "link.json").read_text())["connector"]
    assert new != old
    wait_for(lambda: relay.ready_links() == f"1 connector link(s): {new}", 20,
             what="the new enrolment to take the link over", log=connector.process.output)
    output = connector.process.output()
    assert f"changed since this link opened (authgw link enroll): it holds the enrolment of connector {new}" in output
    assert "closed by the connector (1000: enrolled again)" in output
    assert f"link up: {relay.url.replace('https', 'wss')}/link as {new}" in output

    def listed() -> dict[str, str]:  # "online" is a lease the relay's store lets run out
        return {line.split()[0]: line.split()[2] for line in relay.cli("relay", "connectors").stdout.splitlines()[1:]}

    wait_for(lambda: listed() == {old: "offline", new: "online"}, 30, what="the old connector offline at the relay",
             log=lambda: str(listed()))
    # the new identity answers: a login through the relay is decided by this connector
    assert relay.login("alice", "Alice-Passw0rd").json()["outcome"] == "success"
    # and the old one no more: its link stays closed
    assert relay.ready_links() == f"1 connector link(s): {new}"


# -- 2. self-tests asked again and again ---------------------------------------------------------------------


def test_selftests_asked_a_minute_apart_run_the_test_login_once(tmp_path, stack, slapd):
    """A stale test password: each run is a failed bind of that account at the directory."""
    relay = Relay(tmp_path / "relay", cache=False).setup().start()
    stack.append(relay)
    connector = Connector(tmp_path / "c1", slapd, env={"TEST_PASSWORD": "Stale-Passw0rd"})
    settings = {**slapd.plugin_settings("plain", backoff=0),
                "test_login": {"username": "alice", "password": {"env": "TEST_PASSWORD"}}}
    (connector.conf / "ldap.yaml").write_text("ldap: " + json.dumps(settings) + "\n")
    connector.enroll(relay.ticket(), relay.ca_file)
    stack.append(connector)
    connector.start().wait_linked(relay)
    auth = {"Authorization": f"Bearer {relay.token}"}

    def ask():
        before = slapd.bind_count()
        answer = relay.process.post("/v1/relay/selftest", b"", auth, timeout=30)
        assert answer.status == 200, answer.body
        login = [r for r in answer.json()["results"] if r["name"] == "ldap.login[alice]"]
        assert [r["status"] for r in login] == ["fail"]
        return slapd.bind_count() - before, login[0]["detail"]

    binds, detail = ask()
    assert binds >= 1 and "ldap.invalid_password" in detail  # the run bound as alice, and failed
    time.sleep(61)  # past the 60 s the results were reused for
    assert ask() == (0, detail)  # the last run's results: no bind at the directory


class CountingTests:
    """A plugin whose one self-test counts its runs (a test login would bind each time)."""

    runs: list[float] = []

    def __init__(self, settings, context) -> None:
        pass

    @hookimpl
    def gateway_selftests(self):
        def run() -> CheckResult:
            CountingTests.runs.append(time.time())
            return CheckResult.ok(f"run {len(CountingTests.runs)}")
        return [SelfTest("counting.login", run)]


class Frames:
    closed = False

    def __init__(self) -> None:
        self.sent: list[dict] = []

    async def send_str(self, text: str) -> None:
        self.sent.append(json.loads(text))


def test_selftest_results_are_reused_for_minutes_and_say_when_they_ran(tmp_path):
    """In-process, the real LinkClient and core: the run's start is moved back rather than the
    test waiting minutes."""
    runtime = build(tmp_path, {"chain": ["a"], "plugins": ["counting"]}, {"a": {"action": "abstain"}},
                    targets={"counting": "test_link_left45:CountingTests"})
    client = LinkClient(LinkSettings(max_clock_skew=0), tmp_path, FrontDoor(runtime.gateway), runtime.gateway.pm.hook,
                        "test")
    ws = Frames()
    CountingTests.runs.clear()

    async def ask(i: int) -> dict:
        await client._answer(ws, None, Message(f"selftest{i}", "selftest", {}, time.time() + 10))
        return ws.sent[-1]

    async def main():
        first = await ask(0)
        assert first["type"] == "answer" and len(CountingTests.runs) == 1, first
        assert first["body"]["results"] == [{"name": "counting.login", "status": "pass", "detail": "run 1",
                                             "hint": ""}]
        assert abs(first["body"]["ran_at"] - CountingTests.runs[0]) < 5
        client._selftest_started -= SELFTEST_REUSE - 30  # four and a half minutes ago, at 300 s
        assert SELFTEST_REUSE >= 300
        again = await ask(1)
        assert again["body"] == first["body"] and len(CountingTests.runs) == 1
        client._selftest_started -= 31  # past the reuse: a new run
        fresh = await ask(2)
        assert len(CountingTests.runs) == 2 and fresh["body"]["results"][0]["detail"] == "run 2"
        assert fresh["body"]["ran_at"] > first["body"]["ran_at"]

    try:
        asyncio.run(main())
    finally:
        client.close()
        runtime.discard()


# -- 3. the relay's link URL and connection name at enrolment ---------------------------------------------------

_GOOD_URL = "wss://127.0.0.1:1/link"


@pytest.mark.parametrize("connection, link_url, refused", [
    ("acme", "wss://127.0.0.1:1/li\x1b]0;owned\x07nk", "link URL"),
    ("acme", "wss://127.0.0.1:1/link\nenrolled", "link URL"),
    ("acme", "wss://127.0.0.1:1/li\u2028nk", "link URL"),
    ("acme", "wss://[::1/link", "link URL"),  # a traceback
    ("acme", "wss://127.0.0.1:abc/link", "link URL"),  # stored; `authgw check` lost every self-test
    ("acme", "wss:///link", "link URL"),
    ("acme", "wss://user:pw@127.0.0.1:1/link", "link URL"),
    ("acme", 7, "link URL"),
    ("ac\nme", _GOOD_URL, "connection name"),
    ("acme\x1b[2J", _GOOD_URL, "connection name"),
    ("", _GOOD_URL, "connection name"),  # stored: `link status` called it damaged at once
    (["acme"], _GOOD_URL, "connection name"),
])
def test_enrolment_refuses_a_link_url_or_connection_that_is_not_one(tmp_path, stack, connection, link_url, refused):
    ca = CA.create("relay CA")

    async def ticket(request: web.Request) -> web.Response:
        if request.method == "GET":
            return web.json_response({"protocol": 2, "connection": "acme", "connector": CONNECTOR,
                                      "link_url": _GOOD_URL})
        csr = x509.load_pem_x509_csr((await request.json())["csr"].encode())
        now = time.time()
        cert = connector_certificate(ca, csr.public_key(), not_before=now - 60, not_after=now + 86400)
        return web.json_response({"protocol": 2, "connection": connection, "connector": CONNECTOR,
                                  "certificate": pem(cert), "ca": ca.pem.decode(), "link_url": link_url})

    relay = HostileRelay(tmp_path, ca, [("*", "/p/{token}", ticket)]).start()
    stack.append(relay)
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    connector_conf(tmp_path / "conf.d")
    enrolled = authgw("link", "enroll", f"{relay.url}/p/{TOKEN}", "--ca", str(tmp_path / "ca.pem"),
                      "--config", str(tmp_path / "conf.d"), "--state-dir", str(tmp_path / "state"), timeout=60)
    assert enrolled.returncode == 1, enrolled.stdout
    assert len(enrolled.stderr.splitlines()) == 1 and "Traceback" not in enrolled.stderr, enrolled.stderr
    assert enrolled.stderr.startswith(f"error: enrolment failed: the relay's {refused} ")
    assert "nothing was written" in enrolled.stderr
    assert enrolled.stderr.isascii() and all(c.isprintable() for c in enrolled.stderr.rstrip("\n"))
    assert not (tmp_path / "state" / "link" / "link.json").exists()


def test_check_says_a_hand_edited_link_url_is_not_one(tmp_path):
    """A link.json edited by hand (or by an older enrolment) with a port that is not a number:
    ``authgw check`` reported ``gateway_selftests raised ValueError`` and lost every link test."""
    connector = HandEnrolled(tmp_path / "c", CA.create("relay CA"), "wss://127.0.0.1:abc/link")
    check = authgw("check", "--config", str(connector.conf), "--state-dir", str(connector.state), timeout=90)
    assert check.returncode == 1
    assert "gateway_selftests raised" not in check.stdout, check.stdout
    assert "FAIL  link.enrolment: the link URL in" in check.stdout
    assert "(wss://127.0.0.1:abc/link) is not wss://HOST[:PORT]/PATH" in check.stdout
