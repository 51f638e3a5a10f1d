"""Review of the relay side of the link: what a ticket holder or an enrolled connector can send
the relay (CSRs at enrolment and renewal, answers to its directory requests). A real relay
(``authgw serve``) and a connector played by the test over its enrolled key; every refusal is
a 4xx or a protocol error, never a 500 or a crashed link handler."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.error
import urllib.request

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.plugins import linkproto as proto
from support.der import der
from support.linkenv import Connector, NoDirectory, Relay, link_tls

#: A relay-side plugin calling gateway_list_groups as its hookspec says: BackendUnavailable is
#: the hook's word for "cannot answer" (503 here); anything else escapes (a 500).
PROBE = {"groupsprobe.py": '''
    import asyncio
    from aiohttp import web
    from gateway import BackendUnavailable, Route, hookimpl

    class GroupsProbe:
        def __init__(self, settings, context):
            self.hook = context.hook

        @hookimpl
        def gateway_http_routes(self, door):
            async def groups(request):
                name = request.match_info["name"]
                try:
                    found = await asyncio.get_running_loop().run_in_executor(
                        None, lambda: self.hook.gateway_list_groups(username=name))
                except BackendUnavailable as exc:
                    return web.json_response({"unavailable": str(exc)}, status=503)
                return web.json_response(found)
            return [Route("GET", "/probe/groups/{name}", groups)]
'''}


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    from support.fakedist import make_dist

    base = tmp_path_factory.mktemp("relay")
    site = make_dist(base / "site-packages", "groups-probe", {"groupsprobe": "groupsprobe:GroupsProbe"}, PROBE)
    server = Relay(base / "relay", plugins=("groupsprobe",), env={"PYTHONPATH": str(site)}).setup().start()
    yield server
    server.stop()


def _no_server_errors(relay) -> None:
    log = relay.process.output()
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]
    assert relay.process.get("/healthz").status == 200


def _csr(subject_value: bytes, key=None) -> str:
    """A PEM CSR, correctly signed by *key*, whose subject is one CN attribute with the DER
    *subject_value* as its value: cryptography loads it and verifies its signature, and decodes
    the value only when the subject is read."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    name = der(0x30, der(0x31, der(0x30, der(0x06, bytes([0x55, 0x04, 0x03])) + subject_value)))
    info = der(0x30, der(0x02, b"\x00") + name + spki + der(0xA0, b""))
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    ecdsa_sha256 = der(0x30, der(0x06, bytes.fromhex("2a8648ce3d040302")))
    body = base64.encodebytes(der(0x30, info + ecdsa_sha256 + der(0x03, b"\x00" + signature))).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


#: CN values that load and verify but do not decode: an INTEGER, a UTF8String that is not
#: UTF-8, a BIT STRING (cryptography raises TypeError for the last, ValueError for the others).
UNREADABLE = {"integer": der(0x02, b"\x01"), "not utf-8": der(0x0C, b"\xff\xfe"), "bit string": der(0x03, b"\x00\x01")}


def _odd_csrs(cn: str, key=None) -> dict[str, str]:
    """CSRs that cryptography raises for rather than refuses: those of :data:`UNREADABLE`, and
    one of version 2 (the field 1), whose loading raises InvalidVersion, which is no ValueError."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    odd = {what: _csr(value, key) for what, value in UNREADABLE.items()}
    good = x509.load_pem_x509_csr(_good_csr(cn, key).encode()).public_bytes(serialization.Encoding.DER)
    at = good.index(b"\x02\x01\x00")
    assert at < 8  # INTEGER 0, the version: the first field of the request info
    versioned = base64.encodebytes(good[:at] + b"\x02\x01\x01" + good[at + 3:]).decode()
    odd["version 2"] = f"-----BEGIN CERTIFICATE REQUEST-----\n{versioned}-----END CERTIFICATE REQUEST-----\n"
    return odd


def _good_csr(cn: str, key=None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _post(relay, url: str, csr: str) -> tuple[int, dict | bytes]:
    request = urllib.request.Request(url, data=json.dumps({"csr": csr}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, context=link_tls(relay), timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, body


def _info(relay, url: str) -> dict:
    with urllib.request.urlopen(url, context=link_tls(relay), timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("uses", [1, 3])
def test_a_csr_whose_subject_does_not_read_is_refused_and_keeps_the_ticket(relay, uses):
    """A signed CSR whose CN is no text made ``POST /p/TOKEN`` a 500 (cryptography decodes a
    subject only when it is read, after the signature checked out), and so did any CSR of
    another version than 1 (InvalidVersion, before anything was checked)."""
    url = relay.ticket("--uses", str(uses)) if uses > 1 else relay.ticket()
    connector = _info(relay, url)["connector"]
    for what, csr in _odd_csrs(connector).items():
        status, body = _post(relay, url, csr)
        assert status == 400, (what, status, body)
        assert body["error"] == ("csr_malformed" if uses == 1 else "csr_wrong_name"), (what, body)
    status, body = _post(relay, url, _good_csr(connector))
    assert (status, body["connector"]) == (200, connector), body
    _no_server_errors(relay)


def test_a_renewal_with_such_a_csr_is_refused_and_the_link_lives_on(relay, tmp_path):
    """The same CSRs sent as ``renew`` over a live link: one raised TypeError out of the link's
    handler (the link dropped, a traceback), as did one of version 2, the others were taken for an
    expired relay CA (``internal``, an ERROR "cannot renew"). Refused as malformed; the link
    serves on."""
    identity = Connector(tmp_path / "renewer", NoDirectory()).enroll(relay.ticket(), relay.ca_file)
    key = serialization.load_pem_private_key((identity.state / "link" / "key.pem").read_bytes(), None)

    def request(type_: str, body: dict) -> str:
        return proto.request(type_, body, now=time.time(), timeout=5)[1]

    async def renewals() -> tuple[list, dict]:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"wss://127.0.0.1:{relay.port}/link", ssl=link_tls(relay, identity)) as ws:
                await ws.send_str(request("hello", {"version": "test"}))
                assert json.loads((await ws.receive(timeout=10)).data)["type"] == "answer"
                refused = []
                for csr in _odd_csrs(identity.connector_id, key).values():
                    await ws.send_str(request("renew", {"csr": csr}))
                    msg = await ws.receive(timeout=10)
                    assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data, ws.close_code)
                    refused.append(json.loads(msg.data))
                await ws.send_str(request("renew", {"csr": _good_csr(identity.connector_id, key)}))
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data, ws.close_code)
                return refused, json.loads(msg.data)

    refused, renewed = asyncio.run(asyncio.wait_for(renewals(), 60))
    assert [(m["type"], m["body"]["code"]) for m in refused] == [("error", "bad_request")] * 4, refused
    assert all(m["body"]["detail"].startswith("csr_malformed") for m in refused), refused
    assert renewed["type"] == "answer" and "BEGIN CERTIFICATE" in renewed["body"]["certificate"], renewed
    assert "cannot renew" not in relay.process.output()
    _no_server_errors(relay)


@pytest.mark.parametrize("groups", [[1], ["staff", None], ["\ud800"]], ids=["number", "null", "lone surrogate"])
def test_a_connector_answering_groups_that_are_no_text_is_unavailable_to_the_hook(relay, tmp_path, groups):
    """``gateway_list_groups`` at the relay raised TypeError for a group that is no text, not
    the hookspec's BackendUnavailable: a relay-side plugin calling it answered 500."""
    identity = Connector(tmp_path / "answerer", NoDirectory()).enroll(relay.ticket(), relay.ca_file)

    async def answer_groups():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"wss://127.0.0.1:{relay.port}/link", ssl=link_tls(relay, identity)) as ws:
                await ws.send_str(proto.request("hello", {"version": "test"}, now=time.time(), timeout=5)[1])
                assert json.loads((await ws.receive(timeout=10)).data)["type"] == "answer"
                asked = asyncio.get_running_loop().run_in_executor(None, relay.process.get, "/probe/groups/alice")
                while True:
                    msg = await ws.receive(timeout=15)
                    assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data)
                    frame = json.loads(msg.data)
                    if frame.get("type") == "list_groups":
                        break
                await ws.send_str(json.dumps({"v": proto.VERSION, "id": frame["id"], "type": "answer",
                                              "body": {"found": True, "groups": groups}}))
                return await asyncio.wait_for(asked, 20)

    response = asyncio.run(asyncio.wait_for(answer_groups(), 60))
    assert response.status == 503, (response.status, response.body[:300])
    assert "relay.bad_answer" in response.json()["unavailable"]
    _no_server_errors(relay)


def test_answers_to_requests_never_sent_close_the_link_and_one_late_answer_does_not(relay, tmp_path):
    """An enrolled connector streaming answers to ids the relay never sent: each was parsed and
    dropped, without end (7,626 answers of 48 KB in 8 s took the relay's median latency from 1.6
    to 38 ms). They count as refused frames now, and 20 close the link (1008). A late answer, to
    a request the relay gave up on, is legitimate: once; a second answer to it counts."""
    identity = Connector(tmp_path / "flooder", NoDirectory()).enroll(relay.ticket(), relay.ca_file)

    def answer(request_id: str) -> str:
        return json.dumps({"v": proto.VERSION, "id": request_id, "type": "answer",
                           "body": {"found": True, "groups": ["x" * 1000]}})

    async def link():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"wss://127.0.0.1:{relay.port}/link", ssl=link_tls(relay, identity)) as ws:
                await ws.send_str(proto.request("hello", {"version": "test"}, now=time.time(), timeout=5)[1])
                assert json.loads((await ws.receive(timeout=10)).data)["type"] == "answer"
                frames: asyncio.Queue = asyncio.Queue()

                async def read():  # reading all along answers the relay's heartbeat pings
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data).get("type") == "list_groups":
                            await frames.put(json.loads(msg.data))
                    await frames.put(None)

                reader = asyncio.ensure_future(read())

                async def asked_for_groups():
                    asked = asyncio.get_running_loop().run_in_executor(None, relay.process.get, "/probe/groups/alice")
                    frame = await asyncio.wait_for(frames.get(), 15)
                    assert frame is not None, ws.close_code
                    return frame, asked

                frame, asked = await asked_for_groups()  # a request the relay gives up on (503) ...
                gave_up = (await asyncio.wait_for(asked, 30)).status
                for _ in range(18):  # ... answered late: once taken, then 17 refused frames
                    await ws.send_str(answer(frame["id"]))
                for _ in range(2):  # 2 answers to ids never sent: 19 refused frames, the link lives
                    await ws.send_str(answer(proto.new_id()))
                frame, asked = await asked_for_groups()
                await ws.send_str(answer(frame["id"]))
                answered = (await asyncio.wait_for(asked, 30)).status
                await ws.send_str(answer(proto.new_id()))  # the 20th
                await asyncio.wait_for(reader, 10)
                return gave_up, answered, ws.close_code

    gave_up, answered, code = asyncio.run(asyncio.wait_for(link(), 120))
    assert (gave_up, answered) == (503, 200), (gave_up, answered)
    assert code == 1008, code
    _no_server_errors(relay)
