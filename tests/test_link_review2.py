"""The connector's side of the link against a relay that is not what it should be, second review:
each test runs a real connector (``authgw serve``, ``authgw link enroll``, ``authgw link status``,
``authgw check``) against a hostile relay on 127.0.0.1 (tests/support/hostile_relay.py).

- a renewed certificate that cannot be stored is asked for again, said in the log (the renewal
  task ended without a word, and no renewal was tried while that link lasted);
- credentials the front doors refuse before the chain (an empty password, one over 1 KiB, a
  name empty or too long once canonicalised) are refused the same way over the link;
- a private key others can read is said (``link status``, ``check``, the log);
- enrolment ends, with one line, when the relay answers with something else than a ticket's
  JSON object, or dribbles its answer;
- a ``link.json`` whose names are not text is a damaged enrolment.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time

import pytest
from aiohttp import web

from gateway.plugins import linkproto as proto
from support.gateway import authgw
from support.hostile_relay import (CONNECTOR, HandEnrolled, HostileRelay, after_hello, answer_hello,
                                   connector_certificate, connector_conf, frames, pem)
from support.net import free_port, wait_for
from support.pki import CA

TOKEN = "T0KEN_abcdefghijklmnopqrstuvwxyz0123"


# -- 1. a renewal whose certificate cannot be stored ---------------------------------------------------------


def test_a_renewed_certificate_that_cannot_be_stored_is_asked_for_again(tmp_path, stack):
    """The relay answers ``renew`` with a good certificate, but ``cert.pem`` cannot be replaced
    (here a directory stands at its name; a full disk or a read-only state directory alike). The
    write raised out of the renewal task: no line in the log, and no renewal again while the
    link lasted, until the certificate expired under it."""
    ca = CA.create("relay CA")
    renewals = []
    release = threading.Event()  # the first renew is answered once cert.pem cannot be written
    connector: HandEnrolled | None = None

    async def renew(ws, frame: dict) -> None:
        if frame["type"] != "renew":
            return
        renewals.append(frame)
        while len(renewals) == 1 and not release.is_set():
            await asyncio.sleep(0.05)
        now = time.time()
        cert = connector_certificate(ca, connector.key.public_key(), not_before=now - 10, not_after=now + 90 * 86400)
        await ws.send_str(proto.answer(frame["id"], {"certificate": pem(cert), "ca": ca.pem.decode()}))

    relay = HostileRelay(tmp_path, ca, [("GET", "/link", after_hello(renew))]).start()
    stack.append(relay)
    now = time.time()  # renewal due at once
    connector = HandEnrolled(tmp_path / "c", ca, f"wss://127.0.0.1:{relay.port}/link",
                             not_before=now - 3000, not_after=now + 600)
    cert_pem = connector.link_dir / "cert.pem"
    current = cert_pem.read_bytes()
    connector.start()
    stack.append(connector)
    wait_for(lambda: renewals, 30, what="a renew request", log=connector.output)
    cert_pem.unlink()
    cert_pem.mkdir()
    (cert_pem / "in-the-way").write_text("x")
    release.set()
    wait_for(lambda: "certificate renewal failed" in connector.output(), 30,
             what="the failed write to be said", log=connector.output)
    shutil.rmtree(cert_pem)
    cert_pem.write_bytes(current)
    wait_for(lambda: "certificate renewed over the link" in connector.output(), 30,
             what="the renewal asked for again and stored", log=connector.output)
    assert len(renewals) >= 2
    assert cert_pem.read_bytes() != current
    line = next(line for line in connector.output().splitlines() if "certificate renewal failed" in line)
    assert "ERROR" in line and "cert.pem" in line, line


# -- 2. credentials the front doors refuse -------------------------------------------------------------------


def _authenticate(key, username: str, password: str) -> tuple[str, str]:
    stamp = proto.new_stamp(now=time.time(), timeout=10)
    body = {"username": username, "client": "203.0.113.7", "request_id": "r", "front_door": "forward_auth"}
    body["password"] = proto.seal_password(key.public_key(), password, stamp, connector=CONNECTOR, body=body)
    return proto.request("authenticate", body, stamp=stamp)


CASES = {
    "right": ("alice", "Alice-Passw0rd"),
    "empty": ("alice", ""),
    "long": ("alice", "Alice-Passw0rd" + "x" * 1100),  # over 1 KiB: /auth refuses it unread
    "blank": ("   ", "Alice-Passw0rd"),  # nothing left once canonicalised
    "nfkc": ("\ufdfa" * 20, "Alice-Passw0rd"),  # 20 characters, 360 once NFKC made them longer
}


def test_credentials_the_front_doors_refuse_are_refused_over_the_link_before_the_chain(tmp_path, stack):
    """The connector built the credential itself and asked the chain: an empty password (an
    anonymous bind, which docs/security.md says no backend sees), a password over 1 KiB and a
    name over 256 bytes once canonicalised went to every step; /auth, the API and the login
    page refuse them before the chain (``empty_password``, ``password_too_long``,
    ``malformed_username``)."""
    ca = CA.create("relay CA")
    answers: dict[str, dict] = {}
    connector: HandEnrolled | None = None

    async def link(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        asked: dict[str, str] = {}
        async for frame in frames(ws):
            if frame["type"] == "hello":
                await answer_hello(ws, frame)
                for case, (username, password) in CASES.items():
                    request_id, text = _authenticate(connector.key, username, password)
                    asked[request_id] = case
                    await ws.send_str(text)
            elif frame["id"] in asked:
                answers[asked[frame["id"]]] = frame
        return ws

    relay = HostileRelay(tmp_path, ca, [("GET", "/link", link)]).start()
    stack.append(relay)
    connector = HandEnrolled(tmp_path / "c", ca, f"wss://127.0.0.1:{relay.port}/link").start()
    stack.append(connector)
    wait_for(lambda: len(answers) == len(CASES), 30, what="the answers", log=connector.output)
    outcomes = {case: (frame["type"], frame["body"].get("outcome"), frame["body"].get("reason"),
                       frame["body"].get("step")) for case, frame in answers.items()}
    assert outcomes == {
        "right": ("answer", "success", "", "static"),
        "empty": ("answer", "invalid_credentials", "empty_password", "http"),
        "long": ("answer", "invalid_credentials", "password_too_long", "http"),
        "blank": ("answer", "invalid_credentials", "malformed_username", "http"),
        "nfkc": ("answer", "invalid_credentials", "malformed_username", "http"),
    }, outcomes
    assert "Alice-Passw0rd" not in connector.output()


# -- 3. a private key others can read ------------------------------------------------------------------------


def test_a_private_key_others_can_read_is_said(tmp_path, stack):
    """Whoever reads ``key.pem`` can link as this connector and be sent its logins, passwords
    sealed to that key. One restored or copied 0644 was used without a word (conf.d's secret
    files are warned about)."""
    ca = CA.create("relay CA")
    connector = HandEnrolled(tmp_path / "c", ca, f"wss://127.0.0.1:{free_port()}/link")
    args = ("--config", str(connector.conf), "--state-dir", str(connector.state))
    key = connector.link_dir / "key.pem"

    def enrolment_line() -> str:
        check = authgw("check", *args)
        return next(line for line in check.stdout.splitlines() if "link.enrolment" in line)

    assert enrolment_line().startswith("PASS"), "a key of 0600 is fine"
    assert "private key" not in authgw("link", "status", *args).stderr
    key.chmod(0o644)
    status = authgw("link", "status", *args)
    assert status.returncode == 0 and f"private key {key} is open to group or others (mode 644)" in status.stderr
    line = enrolment_line()
    assert line.startswith("WARN  link.enrolment") and "chmod 600" in line, line
    connector.start()
    stack.append(connector)
    wait_for(lambda: "is open to group or others" in connector.output(), 30,
             what="serve to say the key is readable", log=connector.output)
    said = [line for line in connector.output().splitlines() if "is open to group or others" in line]
    assert "WARNING" in said[0]


# -- 4. enrolment against a relay that answers something else --------------------------------------------------


def _enrol(tmp_path, relay: HostileRelay, ca: CA, timeout: float = 60):
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    connector_conf(tmp_path / "conf.d")
    return authgw("link", "enroll", f"{relay.url}/p/{TOKEN}", "--ca", str(tmp_path / "ca.pem"),
                  "--config", str(tmp_path / "conf.d"), "--state-dir", str(tmp_path / "state"), timeout=timeout)


@pytest.mark.parametrize("info, said", [
    ([1, 2], "bad answer from the relay: not the JSON object it answers"),
    ("acme", "bad answer from the relay: not the JSON object it answers"),
    ({"protocol": 2, "connection": "acme", "connector": "a" * 65, "link_url": "wss://127.0.0.1:1/link"},
     "names no connector"),
], ids=["list", "string", "connector-too-long-for-a-cn"])
def test_enrolment_refuses_a_ticket_answer_it_cannot_use_in_one_line(tmp_path, stack, info, said):
    """A JSON array or string as the ticket's information raised AttributeError, and a connector
    id longer than a certificate's CN can hold a ValueError from the CSR builder: a traceback
    on the operator's terminal either way."""
    ca = CA.create("relay CA")

    async def ticket(request: web.Request) -> web.Response:
        return web.json_response(info)

    relay = HostileRelay(tmp_path, ca, [("*", "/p/{token}", ticket)]).start()
    stack.append(relay)
    result = _enrol(tmp_path, relay, ca)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert said in result.stderr and TOKEN not in result.stderr
    assert not (tmp_path / "state" / "link" / "link.json").exists()


def test_enrolment_ends_when_the_relay_dribbles_its_answer(tmp_path, stack):
    """The relay sends its headers, then a byte every second, forever: each read came within
    urllib's 15 s, and ``authgw link enroll`` waited for the 100 kB announced (a day)."""
    ca = CA.create("relay CA")

    async def ticket(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "100000"})
        await response.prepare(request)
        try:
            while True:
                await response.write(b" ")
                await asyncio.sleep(1.0)
        except (ConnectionError, RuntimeError):  # the connector hung up
            pass
        return response

    relay = HostileRelay(tmp_path, ca, [("*", "/p/{token}", ticket)]).start()
    stack.append(relay)
    result = _enrol(tmp_path, relay, ca, timeout=120)  # ends, unlike the dribble
    assert result.returncode == 1
    assert f"the relay at 127.0.0.1:{relay.port} did not answer within" in result.stderr, result.stderr
    assert TOKEN not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "state" / "link" / "link.json").exists()


# -- 5. a link.json whose names are not text ---------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("link_url", 5), ("connection", None)])
def test_a_link_json_whose_names_are_not_text_is_a_damaged_enrolment(tmp_path, field, value):
    """``link status`` printed ``link 5`` and exited 0; ``authgw check`` failed with the
    AttributeError its self-tests raised."""
    ca = CA.create("relay CA")
    connector = HandEnrolled(tmp_path / "c", ca, "wss://127.0.0.1:1/link")
    info = json.loads((connector.link_dir / "link.json").read_text())
    info[field] = value
    (connector.link_dir / "link.json").write_text(json.dumps(info))
    args = ("--config", str(connector.conf), "--state-dir", str(connector.state))
    status = authgw("link", "status", *args)
    assert status.returncode == 1 and "is damaged" in status.stderr and "link.json" in status.stderr, status
    check = authgw("check", *args)
    assert "FAIL  link.enrolment" in check.stdout and "is damaged" in check.stdout, check.stdout
    assert "raised" not in check.stdout


# -- 7. stray answers between refused frames --------------------------------------------------------------------


def test_stray_answers_between_refused_frames_do_not_keep_a_hostile_relays_link_open(tmp_path, stack):
    """An answer to nothing the connector asked reset its count of refused frames in a row, so a
    relay alternating garbage and stray answers was never closed (1008), however long it went on
    (left by the review of the connector's side of the link). A stray answer counts as refused."""
    ca = CA.create("relay CA")
    closed: list[int | None] = []

    async def link(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for frame in frames(ws):
            if frame["type"] == "hello":
                await answer_hello(ws, frame)
                for n in range(40):
                    await ws.send_str("not a frame")
                    await ws.send_str(proto.answer(f"stray-{n}", {}))
        closed.append(ws.close_code)
        return ws

    relay = HostileRelay(tmp_path, ca, [("GET", "/link", link)]).start()
    stack.append(relay)
    connector = HandEnrolled(tmp_path / "c", ca, f"wss://127.0.0.1:{relay.port}/link").start()
    stack.append(connector)
    wait_for(lambda: closed, 30, what="the link to close", log=connector.output)
    assert closed[0] == 1008, closed
    assert "refused frames in a row; closing the link" in connector.output()
