"""The connector's side of the link against relays that are not what they should be (review of
the link): each test runs a real connector (``authgw serve``, ``authgw link enroll``, ``authgw
check``) against a hostile relay on 127.0.0.1 (tests/support/hostile_relay.py), or a real relay.

- a redirect is never followed, on the link, its refusal's look-up or enrolment (a ``302`` to
  ``http://`` made the connector answer ``authenticate`` in cleartext to whoever was there);
  a link that is not TLS says no hello;
- a renewed certificate ending no later, or already due, is not stored (a tight renewal loop);
- a re-enrolment killed between its files is said to be damaged, not dialled with forever;
- ``authgw check`` ends when the relay never answers its probe;
- the relay's words reach the operator's terminal printable;
- stopping stays within the server's shutdown budget when the relay never acknowledges drain;
- a request before the hello answer is refused; closes the connector makes are not blamed on
  the relay.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from aiohttp import WSMsgType, web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.plugins import linkproto as proto
from support.gateway import authgw
from support.hostile_relay import (CONNECTOR, HandEnrolled, HostileRelay, after_hello, answer_hello,
                                   connector_certificate, connector_conf, frames, pem)
from support.linkenv import Connector, NoDirectory, Relay
from support.net import wait_for
from support.pki import CA

TOKEN = "T0KEN_abcdefghijklmnopqrstuvwxyz0123"


def _cleartext_link(seen: list):
    """A cleartext /link that does what an attacker would with a connector that says hello:
    answer it and ask about alice. *seen* gets every connection and frame."""

    async def link(request: web.Request) -> web.StreamResponse:
        seen.append(("request", request.method, request.headers.get("Upgrade", "")))
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.json_response({"error": "revoked", "detail": "over plain http"}, status=403)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for frame in frames(ws):
            seen.append(("frame", frame["type"]))
            if frame["type"] == "hello":
                await answer_hello(ws, frame)
                await ws.send_str(proto.request("lookup_user", {"username": "alice"}, now=time.time(), timeout=10)[1])
        return ws

    return link


# -- 1. no redirect on the link ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["upgrade", "refusal"])
def test_the_link_follows_no_redirect_to_cleartext(tmp_path, stack, where):
    """``upgrade``: /link answers the WebSocket upgrade with a 302 to ``http://``; the connector
    re-dialled there, said hello and answered. ``refusal``: /link refuses the upgrade (401) and
    redirects the GET that reads why; the connector followed it to ``http://``."""
    seen = []
    ca = CA.create("relay CA")
    plain = HostileRelay(tmp_path, None, [("GET", "/link", _cleartext_link(seen))]).start()
    stack.append(plain)

    async def link(request: web.Request) -> web.StreamResponse:
        if where == "refusal" and request.headers.get("Upgrade", "").lower() == "websocket":
            return web.json_response({"error": "certificate_required", "detail": "none"}, status=401)
        raise web.HTTPFound(f"http://127.0.0.1:{plain.port}/link?token=s3cret-in-location")

    relay = HostileRelay(tmp_path, ca, [("GET", "/link", link)]).start()
    stack.append(relay)
    connector = HandEnrolled(tmp_path / "c", ca, f"wss://127.0.0.1:{relay.port}/link").start()
    stack.append(connector)
    wait_for(lambda: seen or "redirect (HTTP 302)" in connector.output(), 30,
             what="the connector to refuse the redirect", log=connector.output)
    assert seen == []
    line = next(line for line in connector.output().splitlines() if "redirect (HTTP 302)" in line)
    assert "ERROR" in line and "s3cret" not in connector.output()


def test_a_link_that_is_not_tls_says_no_hello(tmp_path, stack):
    seen = []
    ca = CA.create("relay CA")
    plain = HostileRelay(tmp_path, None, [("GET", "/link", _cleartext_link(seen))]).start()
    stack.append(plain)
    connector = HandEnrolled(tmp_path / "c", ca, f"ws://127.0.0.1:{plain.port}/link").start()
    stack.append(connector)
    wait_for(lambda: ("frame", "hello") in seen or "the link is not TLS" in connector.output(), 30,
             what="the connector to refuse a link without TLS", log=connector.output)
    assert not [entry for entry in seen if entry[0] == "frame"]


# -- 2. no redirect on enrolment -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_enrolment_follows_no_redirect(tmp_path, stack, method):
    seen = []

    async def cleartext(request: web.Request) -> web.Response:
        seen.append((request.method, request.path))
        return web.json_response({"protocol": 2, "connection": "acme", "connector": CONNECTOR,
                                  "link_url": "wss://127.0.0.1:1/link"})

    plain = HostileRelay(tmp_path, None, [("*", "/p/{token}", cleartext)]).start()
    stack.append(plain)

    async def ticket(request: web.Request) -> web.Response:
        if request.method == "GET" and method == "POST":  # the ticket's information, then the CSR redirected
            return web.json_response({"protocol": 2, "connection": "acme", "connector": CONNECTOR,
                                      "link_url": f"wss://127.0.0.1:{relay.port}/link"})
        # urllib followed a 302 to http://, a POST as a GET: the token in cleartext either way
        raise web.HTTPFound(f"http://127.0.0.1:{plain.port}{request.path}")

    ca = CA.create("relay CA")
    relay = HostileRelay(tmp_path, ca, [("*", "/p/{token}", ticket)]).start()
    stack.append(relay)
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    connector_conf(tmp_path / "conf.d")
    state = tmp_path / "state"
    result = authgw("link", "enroll", f"{relay.url}/p/{TOKEN}", "--ca", str(tmp_path / "ca.pem"),
                    "--config", str(tmp_path / "conf.d"), "--state-dir", str(state), timeout=60)
    assert seen == []
    assert result.returncode == 1
    assert "the relay redirected the enrolment (HTTP 302)" in result.stderr and TOKEN not in result.stderr
    assert not (state / "link" / "link.json").exists()


# -- 3. renewal -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, why", [
    ("due", "is due for renewal already"),
    ("shorter", "ends no later than the current one"),
])
def test_a_renewed_certificate_already_due_or_shorter_is_not_stored(tmp_path, stack, answer, why):
    """The relay answers ``renew`` with a valid certificate of its CA for our key and id, but one
    whose renewal point has passed (stored, it was renewed again at once: 131 renewals a second,
    forever), or one ending before the current one."""
    ca = CA.create("relay CA")
    renewals = []
    connector: HandEnrolled | None = None

    async def renew(ws, frame: dict) -> None:
        if frame["type"] == "renew":
            renewals.append(frame)
            now = time.time()
            # due: ends later than the current one (by 100 s, beyond X.509's whole seconds),
            # its two thirds long past; shorter: its renewal point ahead, its end before ours
            not_before, not_after = (now - 3000, now + 700) if answer == "due" else (now - 10, now + 500)
            cert = connector_certificate(ca, connector.key.public_key(), not_before=not_before,
                                         not_after=not_after)
            await ws.send_str(proto.answer(frame["id"], {"certificate": pem(cert), "ca": ca.pem.decode()}))

    relay = HostileRelay(tmp_path, ca, [("GET", "/link", after_hello(renew))]).start()
    stack.append(relay)
    now = time.time()  # renewal due at once: two thirds of the current certificate's life are over
    connector = HandEnrolled(tmp_path / "c", ca, f"wss://127.0.0.1:{relay.port}/link",
                             not_before=now - 3000, not_after=now + 600)
    current = (connector.link_dir / "cert.pem").read_text()
    connector.start()
    stack.append(connector)
    wait_for(lambda: len(renewals) >= 2, 30, what="two renewal answers", log=connector.output)
    assert (connector.link_dir / "cert.pem").read_text() == current
    failures = [line for line in connector.output().splitlines() if "certificate renewal failed" in line]
    assert "certificate renewed over the link" not in connector.output()
    assert len(failures) >= len(renewals) - 1 and all(why in line for line in failures)


# -- 4. re-enrolment killed midway ---------------------------------------------------------------------

#: ``python -c`` running ``authgw``, killed (as by SIGKILL or a power cut) right after the
#: KILL_AFTER_RENAMES-th file is renamed into place in the link directory.
_KILLED_AFTER_RENAMES = """
import os, runpy, sys
real, renamed = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    real(src, dst, *args, **kwargs)
    if os.path.basename(os.path.dirname(os.path.abspath(os.fspath(dst)))) == "link":
        renamed[0] += 1
        if renamed[0] >= int(os.environ["KILL_AFTER_RENAMES"]):
            os._exit(137)
os.replace = replace
sys.argv = ["gateway"] + sys.argv[1:]
runpy.run_module("gateway", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def real_relay(tmp_path_factory):
    relay = Relay(tmp_path_factory.mktemp("relay"), cache=False).setup().start()
    yield relay
    relay.stop()


@pytest.mark.parametrize("renames", [1, 2])
def test_a_reenrolment_killed_between_its_files_is_said_to_be_damaged(tmp_path, real_relay, renames):
    """Killed after key.pem (1) or key.pem and cert.pem (2) were replaced: the old key was gone,
    cert.pem (or link.json) no longer matched, ``link status`` exited 0 and the connector retried
    forever on a TLS error. Now status, check and serve say the enrolment is damaged."""
    connector = Connector(tmp_path / "c1", NoDirectory()).enroll(real_relay.ticket(), real_relay.ca_file)
    killed = subprocess.run([sys.executable, "-c", _KILLED_AFTER_RENAMES, "link", "enroll", real_relay.ticket(),
                             "--ca", str(real_relay.ca_file), "--config", str(connector.conf),
                             "--state-dir", str(connector.state)],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "KILL_AFTER_RENAMES": str(renames)})
    assert killed.returncode == 137, killed.stderr
    status = connector.cli("link", "status")
    assert status.returncode == 1 and "is damaged" in status.stderr, (status.stdout, status.stderr)
    assert "Traceback" not in status.stderr
    check = connector.cli("check")
    assert "FAIL  link.enrolment" in check.stdout and "is damaged" in check.stdout
    try:
        connector.start()
        wait_for(lambda: "is damaged" in connector.process.output(), 20, what="serve to say the enrolment is damaged",
                 log=connector.process.output)
        assert "KEY_VALUES_MISMATCH" not in connector.process.output()
    finally:
        connector.stop()


# -- 5. authgw check ends ------------------------------------------------------------------------------


def test_check_ends_when_the_relay_never_answers_the_probe(tmp_path, stack):
    """The relay takes the probe's hello and sends frames of other ids each second, never its
    answer: each frame restarted the wait, and ``authgw check`` never ended."""
    ca = CA.create("relay CA")

    async def link(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        while not ws.closed:
            await ws.send_str(proto.answer("another-id", {}))
            try:
                await ws.receive(timeout=1.0)
            except TimeoutError:
                pass
        return ws

    relay = HostileRelay(tmp_path, ca, [("GET", "/link", link)]).start()
    stack.append(relay)
    connector = HandEnrolled(tmp_path / "c", ca, f"wss://127.0.0.1:{relay.port}/link")
    check = authgw("check", "--config", str(connector.conf), "--state-dir", str(connector.state), timeout=90)
    assert check.returncode == 1
    assert "FAIL  link.link: the link did not come up" in check.stdout and "no answer to hello" in check.stdout


# -- 6. the relay's words on the operator's terminal ----------------------------------------------------------

_FORGED = "\x1b]0;owned\x07\x1b[2K\rok\nenrolled as connector acme-1 of connection acme"


def test_enrolment_shows_the_relays_words_printable(tmp_path, stack):
    ca = CA.create("relay CA")
    refuse = [True]

    async def ticket(request: web.Request) -> web.Response:
        if refuse[0]:
            return web.json_response({"error": "ticket_unknown", "detail": _FORGED}, status=404)
        if request.method == "GET":
            return web.json_response({"protocol": 2, "connection": "acme", "connector": CONNECTOR,
                                      "link_url": "wss://127.0.0.1:1/link"})
        csr = x509.load_pem_x509_csr((await request.json())["csr"].encode())
        now = time.time()
        cert = connector_certificate(ca, csr.public_key(), not_before=now - 60, not_after=now + 86400)
        return web.json_response({"protocol": 2, "connection": "acme" + _FORGED, "connector": CONNECTOR,
                                  "certificate": pem(cert), "ca": ca.pem.decode(),
                                  "link_url": "wss://127.0.0.1:1/link" + _FORGED})

    relay = HostileRelay(tmp_path, ca, [("*", "/p/{token}", ticket)]).start()
    stack.append(relay)
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    connector_conf(tmp_path / "conf.d")

    def enrol():
        return authgw("link", "enroll", f"{relay.url}/p/{TOKEN}", "--ca", str(tmp_path / "ca.pem"),
                      "--config", str(tmp_path / "conf.d"), "--state-dir", str(tmp_path / "state"), timeout=60)

    refused = enrol()
    assert refused.returncode == 1 and "ticket_unknown" in refused.stderr
    assert "\x1b" not in refused.stderr and "\x07" not in refused.stderr and len(refused.stderr.splitlines()) == 1
    refuse[0] = False
    # A link URL and a connection with control characters are refused (tests/test_link_left45.py),
    # and the refusal shows them printable too.
    refused = enrol()
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert "\x1b" not in refused.stderr and "\x07" not in refused.stderr
    assert "the relay's link URL 'wss://127.0.0.1:1/link\\x1b]0;owned" in refused.stderr
    assert not (tmp_path / "state" / "link" / "link.json").exists()


# -- 7. stopping within the shutdown budget ---------------------------------------------------------------


def test_stopping_stays_within_the_shutdown_budget_when_drain_is_not_acknowledged(tmp_path, stack):
    ca = CA.create("relay CA")
    drains = []

    async def drain(ws, frame: dict) -> None:
        if frame["type"] == "drain":
            drains.append(frame)  # never acknowledged

    relay = HostileRelay(tmp_path, ca, [("GET", "/link", after_hello(drain))]).start()
    stack.append(relay)
    connector = HandEnrolled(tmp_path / "c", ca, f"wss://127.0.0.1:{relay.port}/link").start()
    stack.append(connector)
    wait_for(lambda: "link up" in connector.output(), 30, what="the link to come up", log=connector.output)
    connector.stop()
    output = connector.output()
    assert drains and "drain not acknowledged" in output
    assert "still in its gateway_shutdown" not in output
    assert "closed by the relay" not in output


# -- 8. requests before hello, closes the connector makes ------------------------------------------------------


def test_a_request_before_the_hello_answer_is_refused(tmp_path, stack):
    ca = CA.create("relay CA")
    answers = {}

    async def link(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        asked = None
        async for frame in frames(ws):
            if frame["type"] == "hello" and asked is None:
                asked, text = proto.request("lookup_user", {"username": "alice"}, now=time.time(), timeout=10)
                await ws.send_str(text)  # before the hello's answer: the protocol has none
                await answer_hello(ws, frame)
            elif frame["id"] == asked:
                answers[asked] = frame
        return ws

    relay = HostileRelay(tmp_path, ca, [("GET", "/link", link)]).start()
    stack.append(relay)
    connector = HandEnrolled(tmp_path / "c", ca, f"wss://127.0.0.1:{relay.port}/link").start()
    stack.append(connector)
    wait_for(lambda: answers, 30, what="the connector's answer to the early request", log=connector.output)
    (frame,) = answers.values()
    assert frame["type"] == "error" and frame["body"]["code"] == "bad_request", frame
    assert "link up" in connector.output()


@pytest.mark.parametrize("how, code", [("not_utf8", 1007), ("no_pong", 1006)])
def test_closes_the_connector_makes_are_not_blamed_on_the_relay(tmp_path, stack, how, code):
    """A text frame that is not UTF-8 (aiohttp closes 1007) and pongs that never come (the
    heartbeat closes, 1006) were logged as "closed by the relay"."""
    ca = CA.create("relay CA")

    async def link(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=how != "no_pong")  # no_pong: pings read, never answered
        await ws.prepare(request)
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            if frame["type"] == "hello":
                await answer_hello(ws, frame)
                if how == "not_utf8":
                    await ws.send_frame(b"\xff\xfe not UTF-8", WSMsgType.TEXT)
        return ws

    relay = HostileRelay(tmp_path, ca, [("GET", "/link", link)]).start()
    stack.append(relay)
    connector = HandEnrolled(tmp_path / "c", ca, f"wss://127.0.0.1:{relay.port}/link").start()
    stack.append(connector)

    def ended() -> list[str]:
        return [line for line in connector.output().splitlines() if "/link closed by" in line or "/link lost" in line]

    wait_for(ended, 30, what="the link to end", log=connector.output)
    assert f"closed by the connector ({code}" in ended()[0], ended()
