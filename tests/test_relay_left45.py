"""Relay side of the link, what was left open: a connector's flood of WebSocket pings, a relay CA
Redis lost, and the sign-in method a connector's answer claims. Real relays (``authgw serve``),
a real redis-server, slapd, a login door and a SAML SP (pysaml2); the hostile connectors are
played by the tests with certificates the relay issued."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
import threading
import time

import aiohttp
import pytest

from gateway.plugins import linkproto as proto
from support.gateway import authgw
from support.linkdir import slapd  # noqa: F401 - fixture
from support.linkenv import Connector, NoDirectory, Relay, link_tls, relays_sharing_redis
from support.net import free_port, wait_for


def _hello() -> str:
    return proto.request("hello", {"version": "test"}, now=time.time(), timeout=5)[1]


def _ping_frames(count: int) -> bytes:
    """*count* masked WebSocket pings (RFC 6455 5.5.2) of 125 bytes, written at once."""
    return (bytes([0x89, 0x80 | 125]) + b"\0\0\0\0" + b"p" * 125) * count


# -- pings ---------------------------------------------------------------------------------------


def test_a_flood_of_pings_closes_the_link_and_a_ping_is_still_answered(tmp_path, slapd):
    """Pings were answered inside aiohttp (``autoping``), counted nowhere: one connector flooding
    pings on one link made the relay answer 130,000 a second, and a third of the logins of other
    connectors ran past their deadline (503). Now a connector's pings and pongs are budgeted
    (a burst of 100, then 50 a second): beyond it the link is closed (1008) without the relay
    reading on, and said once. A ping within the budget is still answered with its payload, and
    a real connector's link stays up and serves logins."""
    relay = Relay(tmp_path / "relay", cache=False).setup().start()
    connector = Connector(tmp_path / "c1", slapd).enroll(relay.ticket(), relay.ca_file).start()
    hostile = Connector(tmp_path / "evil", NoDirectory()).enroll(relay.ticket(), relay.ca_file)
    try:
        connector.wait_linked(relay)

        async def scenario():
            url = f"wss://127.0.0.1:{relay.port}/link"
            async with aiohttp.ClientSession() as http:
                ws = await http.ws_connect(url, ssl=link_tls(relay, hostile), autoping=False)
                await ws.send_str(_hello())
                answer = await ws.receive(timeout=10)
                assert answer.type == aiohttp.WSMsgType.TEXT and json.loads(answer.data)["type"] == "answer"
                await ws.ping(b"keep-alive")  # within the budget: answered, the same payload
                pong = await ws.receive(timeout=10)
                assert (pong.type, pong.data) == (aiohttp.WSMsgType.PONG, b"keep-alive")
                transport = ws._writer.transport  # raw frames: as fast as a hostile peer writes them
                for _ in range(50):
                    if ws.closed or transport.is_closing():
                        break
                    transport.write(_ping_frames(2000))
                    await asyncio.sleep(0.05)
                for _ in range(100_000):  # pongs first, then the close
                    msg = await ws.receive(timeout=10)
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        return msg
                return None

        closed = asyncio.run(scenario())
        # the relay's close frame says why (it closes the connection after it, not waiting for ours)
        assert closed is not None and (closed.type, closed.data, closed.extra) == \
            (aiohttp.WSMsgType.CLOSE, 1008, "too many pings"), closed
        output = relay.process.output
        wait_for(lambda: "WebSocket pings and pongs beyond 100" in output(), 10, what="the warning", log=output)
        said = [line for line in output().splitlines() if "pings and pongs beyond" in line]
        assert len(said) == 1 and "WARNING" in said[0] and hostile.connector_id in said[0], said
        assert "Traceback" not in output()
        # the real connector kept its link (its pings and the relay's, every second) and serves
        assert connector.connector_id in relay.ready_links()
        answer = relay.login("alice", "Alice-Passw0rd")
        assert answer.status == 200, answer.text
        assert connector.process.output().count("link up:") == 1
    finally:
        connector.stop()
        relay.stop()


# -- the relay CA in Redis -----------------------------------------------------------------------

CA_KEY = "authgw:relay:ca"


def _hello_answered(relay, identity) -> bool:
    """Whether *relay*'s listener takes *identity*'s link certificate and answers its hello."""

    async def dial():
        async with aiohttp.ClientSession() as http:
            try:
                ws = await http.ws_connect(f"wss://127.0.0.1:{relay.port}/link", ssl=link_tls(relay, identity))
            except (aiohttp.ClientError, ssl.SSLError, OSError):
                return False
            await ws.send_str(_hello())
            msg = await ws.receive(timeout=10)
            await ws.close()
            return msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["type"] == "answer"

    return asyncio.run(dial())


def test_a_relay_ca_redis_lost_is_written_back_and_a_new_instance_adopts_it(tmp_path, slapd):
    """The relay CA the instances share lives in Redis. Lost there (data lost, an eviction, a
    failover), it stayed lost: the next instance to start made a CA of its own and wrote it,
    connectors enrolled there were refused by the others' TLS handshake and theirs by it, and
    an instance restarted then adopted the new CA over the one its connectors pin, without a
    word. Now an instance holding the CA writes it back (SET NX) within a maintenance round."""
    with relays_sharing_redis(tmp_path) as ((a, b), redis):
        connector = Connector(tmp_path / "c1", slapd).enroll(a.ticket(), a.ca_file).start()
        try:
            connector.wait_linked(a)
            shared = a.ca_file.read_text()
            assert b.ca_file.read_text() == shared
            redis.client().delete(CA_KEY)
            wait_for(lambda: redis.client().exists(CA_KEY), 15, what="the CA written back", log=a.process.output)
            assert json.loads(redis.client().get(CA_KEY))["cert"] == shared
            said = [line for relay in (a, b) for line in relay.process.output().splitlines()
                    if "relay CA was missing in Redis" in line]
            assert said and all("WARNING" in line for line in said), said
            c = Relay(tmp_path / "relay-c", cache=False, redis_url=redis.url).setup().start()
            try:
                assert c.ca_file.read_text() == shared  # the new instance adopted it
                late = Connector(tmp_path / "c2", NoDirectory()).enroll(c.ticket(), c.ca_file)
                assert _hello_answered(a, late)  # enrolled at c, trusted at a
            finally:
                c.stop()
            answer = b.login("alice", "Alice-Passw0rd")  # through a's link, as before
            assert answer.status == 200, answer.text
            assert connector.process.output().count("link up:") == 1
        finally:
            connector.stop()


def test_a_relay_ca_conflict_is_said_and_overwrites_nothing(tmp_path, slapd):
    """Redis holding another relay CA than the one an instance's connectors were enrolled with
    (an instance that found it missing wrote its own) is not resolved silently: the instance
    keeps its CA, overwrites neither Redis nor its state directory (before, a restart adopted
    the other CA over it: every connector enrolled with it was refused), says it once at ERROR
    and in ``/readyz`` (``relay.ca``, its links still serving), and says so again when Redis
    holds its CA again."""
    from gateway.plugins.relay.ca import RelayCA

    other = RelayCA.load_or_create(tmp_path / "other", "other")
    with relays_sharing_redis(tmp_path, names=("a",)) as ((a,), redis):
        connector = Connector(tmp_path / "c1", slapd).enroll(a.ticket(), a.ca_file).start()
        try:
            connector.wait_linked(a)
            ours = a.ca_file.read_text()
            intruder = json.dumps({"key": other.key_pem.decode(), "cert": other.pem})
            redis.client().set(CA_KEY, intruder)
            output = a.process.output
            wait_for(lambda: "Redis holds another relay CA" in output(), 15, what="the conflict said", log=output)

            def ca_state():
                states = {c["name"]: c for c in a.process.get("/readyz").json()["components"]}
                return states.get("relay.ca")

            wait_for(ca_state, 10, what="relay.ca in /readyz")
            assert ca_state()["ready"] is False and other.fingerprint in ca_state()["detail"]
            assert a.login("alice", "Alice-Passw0rd").status == 200  # the links held here serve
            said = [line for line in output().splitlines() if "plugin.relay: relay: Redis holds another relay CA" in line]
            assert len(said) == 1 and "ERROR" in said[0], said
            assert redis.client().get(CA_KEY).decode() == intruder  # nothing overwritten
            a.stop()
            a.start()
            said = [line for line in a.process.output().splitlines() if "plugin.relay: relay: Redis holds another relay CA" in line]
            assert len(said) == 1 and "ERROR" in said[0], said  # at start-up, once
            assert a.ca_file.read_text() == ours  # kept: the connectors pin it
            assert redis.client().get(CA_KEY).decode() == intruder
            connector.wait_linked(a, timeout=30)  # its certificate still passes a's handshake
            assert a.login("alice", "Alice-Passw0rd").status == 200
            redis.client().delete(CA_KEY)  # the operator keeps the connectors' CA
            wait_for(lambda: "holds this instance's relay CA again" in a.process.output(), 15,
                     what="the conflict over", log=a.process.output)
            assert ca_state() is None
            assert json.loads(redis.client().get(CA_KEY))["cert"] == ours
        finally:
            connector.stop()


# -- the sign-in method a connector claims ---------------------------------------------------------

ACS, SP_ID = "https://sp.example.test/acs", "https://sp.example.test/"
AC = "urn:oasis:names:tc:SAML:2.0:ac:classes:"


class ClaimingConnector:
    """A connector (a certificate the relay issued) that answers every ``authenticate`` with a
    success for the user asked, claiming *method* as the way it was proved."""

    def __init__(self, relay_port: int, ca_file, identity: Connector, method: str) -> None:
        self.url = f"wss://127.0.0.1:{relay_port}/link"
        self.context = ssl.create_default_context(cafile=str(ca_file))
        link = identity.state / "link"
        self.context.load_cert_chain(str(link / "cert.pem"), str(link / "key.pem"))
        self.method = method
        self.linked = threading.Event()
        self.asked = 0
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> ClaimingConnector:
        self._thread.start()
        assert self.linked.wait(20), "the claiming connector did not link"
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    async def _run(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(self.url, ssl=self.context)
            await ws.send_str(_hello())
            stopping = asyncio.ensure_future(self._stop.wait())
            while not ws.closed:
                reading = asyncio.ensure_future(ws.receive())
                done, _ = await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if stopping in done:
                    reading.cancel()
                    break
                msg = reading.result()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                frame = json.loads(msg.data)
                if frame["type"] == "answer":
                    self.linked.set()
                elif frame["type"] in ("authenticate", "lookup_user"):  # the account is looked up too
                    username = frame["body"]["username"]
                    identity = {"subject": f"sub-{username}", "username": username, "groups": [], "claims": {},
                                "email": f"{username}@example.com", "method": self.method}
                    if frame["type"] == "authenticate":
                        self.asked += 1
                        body = {"outcome": "success", "reason": "", "identity": identity}
                    else:
                        body = {"found": True, "identity": identity}
                    await ws.send_str(proto.answer(frame["id"], body))
            await ws.close()


def test_a_connector_cannot_claim_a_stronger_sign_in_than_the_password_it_was_asked_to_check(tmp_path, slapd):
    """The relay asks a connector to check a password; the identity's ``method`` in the answer
    was taken as the connector gave it. A connector answering ``kerberos`` (or ``client_cert``)
    made the login door state a password sign-in to SAML SPs as ``Kerberos`` (``X509``), meeting
    a RequestedAuthnContext that the gateway refuses to a password session
    (test_login_saml_authn_context.py). The method is now the relay step's own."""
    from saml2.response import StatusNoAuthnContext
    from saml2.saml import AuthnContextClassRef
    from saml2.samlp import RequestedAuthnContext

    from support.login import LoginSite, hidden
    from support.pki import CA
    from support.saml_sp import SamlSP

    relay_port = free_port()
    relay = {"connection": "acme", "listen": f"127.0.0.1:{relay_port}", "public_url": f"https://127.0.0.1:{relay_port}",
             "ping_interval": 30.0}
    site = LoginSite(tmp_path / "idp", slapd, CA.create(), gateway={"chain": ["relay"], "plugins": ["login"]},
                     login={"saml": {"service_providers": [{"entity_id": SP_ID, "acs_urls": [ACS],
                                                             "name_id_format": "emailAddress",
                                                             "name_id_source": "email"}]}},
                     extra={"relay.yaml": "relay: " + json.dumps(relay)})
    state = tmp_path / "idp" / "state0"

    def relay_cli(*args):
        result = authgw("relay", *args, "--config", str(site.conf), "--state-dir", str(state))
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    relay_cli("connection", "add", "acme")
    gw = site.start(state)
    try:
        identity = Connector(tmp_path / "claimer", NoDirectory()).enroll(relay_cli("ticket", "acme"),
                                                                         state / "relay" / "ca" / "ca.crt")
        metadata = site.client().get(f"{site.url}/saml/metadata", timeout=15).text
        sp = SamlSP(tmp_path / "sp", metadata, acs=ACS, entity_id=SP_ID)
        with ClaimingConnector(relay_port, state / "relay" / "ca" / "ca.crt", identity, "kerberos") as claimer:
            browser = site.client()
            request_id, location = sp.redirect_request()
            page = site.sign_in(browser, "alice", "any password", url=browser.get(location, timeout=15).url)
            response = hidden(page.text, "SAMLResponse")
            assert response, page.text[:2000]
            assert sp.accept(response, request_id).name_id == "alice@example.com"
            stated = re.search(r"<saml:AuthnContextClassRef>([^<]+)<", base64.b64decode(response).decode()).group(1)
            assert stated == AC + "PasswordProtectedTransport"  # was ...:Kerberos
            # and a request for Kerberos is not met by that password session
            kerberos = RequestedAuthnContext(authn_context_class_ref=[AuthnContextClassRef(text=AC + "Kerberos")],
                                             comparison="exact")
            request_id, location = sp.redirect_request(requested_authn_context=kerberos)
            page = browser.get(location, timeout=15)
            assert page.headers.get("X-Refused-Reason") == "saml.authn_context_unmet", page.text[:1000]
            with pytest.raises(StatusNoAuthnContext):
                sp.accept(hidden(page.text, "SAMLResponse"), request_id)
            assert claimer.asked == 1
    finally:
        site.stop()
