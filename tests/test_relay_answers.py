"""What the relay takes from a connector's answer (review of the relay's trust in connectors).

A real relay (``authgw serve``) and a connector enrolled with ``authgw link enroll``, whose link is
then spoken by a hand-written client: it opens each sealed password with its own key and answers
as a connector whose directory, or whose code, says what the test wants. A connector that
answered the login of one user with another's identity signed that user in as the other, while
the relay's audit line and cache named the one asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import ssl
import threading
import time

import aiohttp
import pytest
import requests
from cryptography.hazmat.primitives import serialization

from gateway.plugins import linkproto as proto
from gateway.plugins.relay import same_user
from support.linkenv import Connector, NoDirectory, Relay
from support.net import wait_for


class ScriptedConnector:
    """An enrolled connector's link, answering ``authenticate`` with ``answers[username]``
    (a decision's body) or ``errors[username]`` (an error frame), ``lookup_user`` with
    ``lookups[username]`` (an identity; else not found), and recording what it was asked."""

    def __init__(self, relay: Relay, enrolled: Connector, *, version: str = "1.0") -> None:
        self.relay, self.enrolled, self.version = relay, enrolled, version
        self.answers: dict[str, dict] = {}
        self.lookups: dict[str, dict] = {}
        #: ``authenticate`` of these users is answered with an error frame: (code, detail).
        self.errors: dict[str, tuple[str, str]] = {}
        self.asked: list[tuple[str, str]] = []
        self.status: int | None = None  # the link's HTTP status when it was refused
        #: set: ``authenticate`` answers wait for it (a connector slow to answer)
        self.hold: threading.Event | None = None
        self.greeted = threading.Event()  # the relay answered this link's hello
        self._later: set[asyncio.Future] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def _context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.relay.ca_file))
        link = self.enrolled.state / "link"
        context.load_cert_chain(str(link / "cert.pem"), str(link / "key.pem"))
        return context

    async def _run(self) -> None:
        key = serialization.load_pem_private_key((self.enrolled.state / "link" / "key.pem").read_bytes(), None)
        async with aiohttp.ClientSession() as http:
            try:
                ws = await http.ws_connect(f"wss://127.0.0.1:{self.relay.port}/link", ssl=self._context())
            except aiohttp.WSServerHandshakeError as exc:
                self.status = exc.status
                return
            async with ws:
                await ws.send_str(proto.request("hello", {"version": self.version}, now=time.time(), timeout=5)[1])
                while not self._stop.is_set():
                    try:
                        frame = await ws.receive(timeout=0.2)
                    except asyncio.TimeoutError:
                        continue
                    if frame.type != aiohttp.WSMsgType.TEXT:
                        return
                    data = json.loads(frame.data)
                    if data["type"] in ("answer", "error"):
                        self.greeted.set()
                        continue
                    message = proto.Message(data["id"], data["type"], data["body"], data.get("deadline"),
                                            data.get("nonce"))
                    if message.type == "lookup_user":
                        found = self.lookups.get(message.body["username"])
                        await ws.send_str(proto.answer(message.id, {"found": found is not None, "identity": found}))
                        continue
                    if message.type != "authenticate":
                        await ws.send_str(proto.error(message.id, "unknown_type", "not scripted"))
                        continue
                    username = message.body["username"]
                    password = proto.open_password(key, message.body["password"], message,
                                                   connector=self.enrolled.connector_id)
                    self.asked.append((username, password))
                    if self.hold is not None:  # answered later; pings are answered meanwhile
                        self._later.add(asyncio.ensure_future(self._answer_when_let(ws, message.id, username)))
                        continue
                    if username in self.errors:
                        await ws.send_str(proto.error(message.id, *self.errors[username]))
                        continue
                    await ws.send_str(proto.answer(message.id, self.answers[username]))

    async def _answer_when_let(self, ws, request_id: str, username: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.hold.wait, 30)
        with contextlib.suppress(ConnectionError):  # the relay closed the link meanwhile
            await ws.send_str(proto.answer(request_id, self.answers[username]))

    def start(self) -> ScriptedConnector:
        self._thread.start()
        return self

    def wait_linked(self) -> ScriptedConnector:
        wait_for(lambda: self.enrolled.connector_id in self.relay.ready_links(), 15, what="the scripted link")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def success(username: str, **identity) -> dict:
    return {"outcome": "success", "reason": "", "step": "ldap", "from_cache": False,
            "identity": {"subject": f"uid={username},ou=people,dc=example,dc=com", "username": username,
                         "method": "ldap", "groups": ["staff"], **identity}}


@pytest.fixture(scope="module")
def relays(tmp_path_factory):
    """Two relays of one connection, without caches: ``same`` (the default) and ``any``, each
    with its scripted connector linked."""
    base = tmp_path_factory.mktemp("relay-answers")
    started, pairs = [], {}
    try:
        for names in ("same", "any"):
            settings = {"answered_names": names} if names == "any" else {}
            relay = Relay(base / names, cache=False, settings=settings).setup().start()
            started.append(relay)
            enrolled = Connector(base / f"{names}-connector", NoDirectory()).enroll(relay.ticket(), relay.ca_file)
            scripted = ScriptedConnector(relay, enrolled, version="1.0\x1b[2J\x1b]0;owned\x07").start()
            started.append(scripted)
            pairs[names] = (relay, scripted.wait_linked())
        yield pairs
    finally:
        for thing in reversed(started):
            thing.stop()


def test_a_connector_answering_for_another_user_signs_no_one_in(relays):
    relay, connector = relays["same"]
    connector.answers["mallory"] = success("admin", groups=["domain admins"])
    answer = relay.login("mallory", "mallory-pw").json()
    assert connector.asked[-1] == ("mallory", "mallory-pw")
    assert (answer["outcome"], answer["reason"], answer["identity"]) == ("error", "relay.identity_mismatch", None)
    assert relay.process.auth("mallory", "mallory-pw").status == 401
    assert all(line["outcome"] != "success" for line in relay.process.audit() if line["username"] == "mallory")
    assert "answered for mallory as admin; refused" in relay.process.output()


@pytest.mark.parametrize("asked, answered", [("Alice", "alice"), ("alice@corp.example", "alice"),
                                             ("CORP\\alice", "alice"), ("bob ", "Bob"),
                                             ("erin", "erin@corp.example")])
def test_a_connector_may_answer_with_the_account_name_of_what_was_typed(relays, asked, answered):
    relay, connector = relays["same"]
    connector.answers[asked.strip()] = success(answered)
    answer = relay.login(asked, "pw").json()
    assert (answer["outcome"], answer["identity"]["username"]) == ("success", answered), answer
    line = [x for x in relay.process.audit() if x["username"] == asked.strip()][-1]
    assert line["signed_in_as"] == answered and line["username"] == asked.strip()


def test_with_answered_names_any_the_connectors_name_is_taken_and_audited(relays):
    relay, connector = relays["any"]
    connector.answers["john.smith@corp.example"] = success("jsmith")
    answer = relay.login("john.smith@corp.example", "pw").json()
    assert (answer["outcome"], answer["identity"]["username"]) == ("success", "jsmith")
    line = [x for x in relay.process.audit() if x["username"] == "john.smith@corp.example"][-1]
    assert line["signed_in_as"] == "jsmith"


def test_an_audit_line_names_no_second_user_when_the_names_agree(relays):
    relay, connector = relays["same"]
    connector.answers["carol"] = success("carol")
    assert relay.login("carol", "pw").json()["outcome"] == "success"
    line = [x for x in relay.process.audit() if x["username"] == "carol"][-1]
    assert "signed_in_as" not in line


@pytest.mark.parametrize("answer", [
    success("dave\n"),
    success("dave", subject=""),
    success("d" * 257),
], ids=["username-newline", "subject-empty", "username-long"])
def test_a_connectors_identity_out_of_shape_is_refused_not_trimmed(relays, answer):
    relay, connector = relays["same"]
    connector.answers["dave"] = answer
    result = relay.login("dave", "pw").json()
    assert (result["outcome"], result["reason"], result["identity"]) == ("error", "relay.bad_answer", None)


@pytest.mark.parametrize("reason", ["ok\r\nforged log line", "x" * 101, "The password is wrong."])
def test_a_connectors_reason_that_is_no_code_is_replaced_and_its_outcome_stands(relays, reason):
    """A reason is logged and audited: free text (a third-party step's) or a forged log line
    becomes `relay.bad_reason`, and the connector's outcome is kept (not turned into ERROR)."""
    relay, connector = relays["same"]
    connector.answers["frank"] = {"outcome": "invalid_credentials", "reason": reason, "step": "ldap",
                                  "from_cache": False}
    result = relay.login("frank", "pw").json()
    assert (result["outcome"], result["reason"]) == ("invalid_credentials", "relay.bad_reason")
    assert "forged log line" not in relay.process.output()


def test_the_audit_names_the_connector_by_the_relays_record_not_by_its_answer(relays):
    """The relay's audit line names the connector that answered (``answered_by``): the id the
    relay enrolled it under and took from its link's certificate. An answer that names another
    connector (or forges the audit's field) changes nothing: a connector that vouches falsely
    cannot put another's name on it. A refused answer (another user's identity) names it too."""
    relay, connector = relays["same"]
    me = connector.enrolled.connector_id
    assert me in relay.cli("relay", "connectors").stdout and me in relay.ready_links()
    forged = {"answered_by": "acme-00000000", "connector": "acme-00000000"}
    connector.answers["gina"] = {**success("gina"), **forged}
    connector.answers["hank"] = {"outcome": "invalid_credentials", "reason": "ldap.invalid_password",
                                 "step": "ldap", "from_cache": False, **forged}
    connector.answers["ivan"] = {"outcome": "user_not_found", "reason": "ldap.user_not_found", "step": "ldap",
                                 "from_cache": False, **forged}
    connector.answers["mallory"] = success("admin")
    for username, outcome in (("gina", "success"), ("hank", "invalid_credentials"), ("ivan", "user_not_found"),
                              ("mallory", "error")):
        answer = relay.login(username, "pw").json()
        assert answer["outcome"] == outcome, answer
        line = relay.process.audit_for(answer["request_id"])
        assert (line["outcome"], line["step"], line["answered_by"]) == (outcome, "relay", me)


def test_a_connectors_version_reaches_the_operators_terminal_as_text(relays):
    relay, _connector = relays["same"]
    listing = relay.cli("relay", "connectors")
    assert listing.returncode == 0, listing.stderr
    assert "\x1b" not in listing.stdout and "\x07" not in listing.stdout
    assert " ? " in listing.stdout


def test_a_connector_of_another_connection_gets_no_link_and_no_readiness(relays, tmp_path):
    relay, _connector = relays["same"]
    assert relay.cli("relay", "connection", "add", "other").returncode == 0
    ticket = relay.cli("relay", "ticket", "other")
    assert ticket.returncode == 0, ticket.stderr
    enrolled = Connector(tmp_path / "other", NoDirectory()).enroll(ticket.stdout.strip(), relay.ca_file)
    stranger = ScriptedConnector(relay, enrolled).start()
    try:
        wait_for(lambda: stranger.status is not None, 15, what="the stranger's link refused")
        assert stranger.status == 403
        assert enrolled.connector_id not in relay.process.get("/readyz").text
        assert "this relay serves acme" in relay.process.output()
    finally:
        stranger.stop()


def test_what_counts_as_the_user_asked_for():
    assert same_user("alice", "ALICE") and same_user("ａｌｉｃｅ", "alice") and same_user("alice ", "alice")
    assert same_user("alice@corp.example", "alice") and same_user("CORP\\alice", "Alice")
    assert not same_user("mallory", "admin")
    assert not same_user("alice", "")
    assert not same_user("alice@corp.example", "corp.example")
    assert not same_user("admin@corp.example", "alice")
    assert not same_user("CORP\\alice", "CORP")
    assert same_user("alice", "alice@corp.example")  # a connector answering with the UPN
    assert not same_user("alice", "bob@corp.example") and not same_user("alice@corp.example", "bob")
    assert not same_user("@corp.example", "") and not same_user("alice@", "alice@x")
    assert not same_user("john.smith@corp.example", "jsmith")  # needs answered_names: any


# -- a connector revoked for vouching falsely -------------------------------------------------------


def _evil(relay: Relay, base, answers: dict) -> ScriptedConnector:
    """A connector that vouches for whatever password it is sent (a compromised one), linked."""
    enrolled = Connector(base, NoDirectory()).enroll(relay.ticket(), relay.ca_file)
    scripted = ScriptedConnector(relay, enrolled).start().wait_linked()
    scripted.answers.update(answers)
    return scripted


def _revoke(relay: Relay, connector: ScriptedConnector) -> None:
    result = relay.cli("relay", "revoke", connector.enrolled.connector_id)
    assert result.returncode == 0, result.stderr


def test_a_revoked_connector_vouches_no_more_through_the_relays_offline_cache(tmp_path):
    """The revocation closed the connector's link, but the passwords it had vouched for stayed
    in the relay's cache: with no connector online, they were answered offline until max_age."""
    relay = Relay(tmp_path / "relay").setup().start()
    evil = None
    try:
        evil = _evil(relay, tmp_path / "evil", {"alice": success("alice")})
        me = evil.enrolled.connector_id
        assert relay.login("alice", "evil-pw").json()["outcome"] == "success"
        assert f"vouched for by {me}" in relay.cli("cache", "show", "alice").stdout
        evil.stop()
        wait_for(lambda: me not in relay.ready_links(), 15, what="the link to close")
        offline = relay.login("alice", "evil-pw").json()
        assert (offline["outcome"], offline["reason"], offline["from_cache"]) == ("success", "cache.offline", True)
        # the cache's line names the connector whose word it repeats: a search for it finds this login too
        assert relay.process.audit_for(offline["request_id"])["answered_by"] == me

        _revoke(relay, evil)
        refused = wait_for(lambda: (lambda a: a if a.status == 503 else None)(relay.login("alice", "evil-pw")),
                           10, interval=0.2, what="the offline answer to stop")
        assert refused.json()["reason"] == "relay.no_connector"
        assert "revoked since; deleted" in relay.process.output()
        assert relay.cli("cache", "show", "alice").stdout.startswith("no entry for alice")
        assert relay.login("alice", "evil-pw").status == 503
    finally:
        if evil is not None:
            evil.stop()
        relay.stop()


def test_a_link_replaced_then_revoked_has_its_answers_in_flight_refused(tmp_path):
    """A link replaced by a newer one of its connector is out of the hub's routing, and has
    5 s to answer what it carries. A revocation closed the newer link only: the replaced one's
    late "success" was still taken, a revoked connector signing a user in (review of stop 42,
    left then). The revocation now fails what the replaced link carries too."""
    relay = Relay(tmp_path / "relay", cache=False, extra="deadline: 30\n").setup().start()
    old = new = login = None
    try:
        enrolled = Connector(tmp_path / "connector", NoDirectory()).enroll(relay.ticket(), relay.ca_file)
        old = ScriptedConnector(relay, enrolled).start().wait_linked()
        old.answers["alice"] = success("alice")
        old.hold = threading.Event()
        answers = []
        login = threading.Thread(target=lambda: answers.append(relay.login("alice", "pw")))
        login.start()
        wait_for(lambda: old.asked, 10, what="the login to reach the link")
        new = ScriptedConnector(relay, enrolled).start()
        assert new.greeted.wait(10), "the newer link's hello was answered: the older one is replaced"
        _revoke(relay, new)
        wait_for(lambda: enrolled.connector_id not in relay.ready_links(), 10, what="the revocation to close the link")
        old.hold.set()  # the replaced link answers "success" now
        login.join(40)
        (answer,) = answers
        assert answer.status == 503 and answer.json()["outcome"] != "success", answer.json()
        assert answer.json()["reason"] == "relay.link_lost"
    finally:
        for thing in (old, new):
            if thing is not None:
                if thing.hold is not None:
                    thing.hold.set()
                thing.stop()
        if login is not None:
            login.join(40)
        relay.stop()


def test_a_linked_connectors_error_frame_is_not_answered_from_the_relays_cache(tmp_path):
    """A connector answering an error frame (busy at its max_concurrent under a flood, past the
    deadline, failing) had the relay's offline cache answer instead: a flood on a linked
    connector turned logins into cache answers, for a user the directory may have disabled
    since (review of the relay). A connector answered: its error is the answer, 503."""
    relay = Relay(tmp_path / "relay").setup().start()
    connector = None
    try:
        connector = _evil(relay, tmp_path / "connector", {"alice": success("alice")})
        assert relay.login("alice", "pw").json()["outcome"] == "success"  # cached
        for code, reason in (("unavailable", "relay.connector_unavailable"), ("internal", "relay.connector_error")):
            connector.errors["alice"] = (code, "the connector is busy: 8 requests held")
            answer = relay.login("alice", "pw")
            assert answer.status == 503, answer.text
            assert (answer.json()["reason"], answer.json()["from_cache"]) == (reason, False)
        connector.stop()  # no connector linked: now the cache answers, as it should
        wait_for(lambda: connector.enrolled.connector_id not in relay.ready_links(), 15, what="the link to close")
        offline = relay.login("alice", "pw").json()
        assert (offline["outcome"], offline["reason"]) == ("success", "cache.offline")
    finally:
        if connector is not None:
            connector.stop()
        relay.stop()


def test_a_revoked_connectors_hot_cache_answers_are_asked_again_live(tmp_path):
    """Within hot.ttl a repeat of the same credentials is answered from memory: after the
    revocation, the false vouch was repeated to every forward-auth request for the ttl."""
    relay = Relay(tmp_path / "relay", cache_settings={"hot": {"enabled": True, "ttl": 600}}).setup().start()
    started = []
    try:
        evil = _evil(relay, tmp_path / "evil", {"alice": success("alice")})
        started.append(evil)
        me = evil.enrolled.connector_id
        assert relay.login("alice", "evil-pw").json()["outcome"] == "success"
        hit = relay.login("alice", "evil-pw").json()
        assert (hit["outcome"], hit["reason"]) == ("success", "cache.hot")
        assert relay.process.audit_for(hit["request_id"])["answered_by"] == me
        honest = _evil(relay, tmp_path / "honest", {"alice": {"outcome": "invalid_credentials",
                                                              "reason": "ldap.invalid_password", "step": "ldap",
                                                              "from_cache": False}})
        started.append(honest)

        _revoke(relay, evil)
        wait_for(lambda: me not in relay.ready_links(), 15, what="the revoked link to close")
        asked = len(honest.asked)
        answer = relay.login("alice", "evil-pw").json()
        assert (answer["outcome"], answer["reason"]) == ("invalid_credentials", "ldap.invalid_password"), answer
        assert honest.asked[asked:] == [("alice", "evil-pw")]
        assert relay.process.audit_for(answer["request_id"])["answered_by"] == honest.enrolled.connector_id
    finally:
        for scripted in started:
            scripted.stop()
        relay.stop()


def test_a_revoked_connectors_login_sessions_end_at_their_next_use(tmp_path):
    """A relay's login door (OpenID Connect here) signed a browser in on a connector's word; the
    session went on answering services, for hours, after the connector was revoked for vouching
    falsely. It now ends at its next use, as a session whose account is gone does."""
    from authlib.integrations.requests_client import OAuth2Session

    from support.gateway import write_conf
    from support.login import hidden
    from support.net import free_port
    from support.pki import CA

    ca, port, callback = CA.create(), free_port(), "https://rp.example.test/callback"
    cert, key = ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1"], server=True).write(tmp_path, "login")
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    (tmp_path / "secret").write_text("rp-secret-value-0123456789")
    (tmp_path / "secret").chmod(0o600)
    door = f"https://localhost:{port}"
    relay = Relay(tmp_path / "relay", cache=False, plugins=("login",))
    write_conf(relay.conf, {"login.yaml": "login: " + json.dumps({
        "base_url": door, "listener": {"address": f"127.0.0.1:{port}", "certificate": str(cert), "key": str(key)},
        "oidc": {"clients": [{"client_id": "rp", "redirect_uris": [callback],
                              "client_secret": {"file": str(tmp_path / "secret")}}]}})})
    relay.setup().start()
    evil = None
    try:
        evil = _evil(relay, tmp_path / "evil", {"alice": success("alice")})
        evil.lookups["alice"] = success("alice")["identity"]
        me = evil.enrolled.connector_id
        browser = requests.Session()
        browser.trust_env, browser.verify = False, str(tmp_path / "ca.pem")
        client = OAuth2Session("rp", "rp-secret-value-0123456789", scope="openid", redirect_uri=callback,
                               code_challenge_method="S256")
        authorize = f"{door}/oidc/authorize"

        def sso() -> requests.Response:
            uri, _ = client.create_authorization_url(authorize, code_verifier=secrets.token_urlsafe(48),
                                                     nonce=secrets.token_urlsafe(16))
            return browser.get(uri, allow_redirects=False, timeout=15)

        page = browser.get(f"{door}/login", timeout=15)
        signed_in = browser.post(f"{door}/login", data={"csrf": hidden(page.text, "csrf"), "username": "alice",
                                                        "password": "evil-pw"}, timeout=15)
        assert signed_in.status_code == 200 and "signed in as" in signed_in.text, signed_in.text[:300]
        first = sso()  # the session answers a service, on the connector's word
        assert first.status_code == 303 and first.headers["Location"].startswith(callback + "?"), first.text[:300]

        _revoke(relay, evil)
        wait_for(lambda: me not in relay.ready_links(), 15, what="the revoked link to close")
        ended = sso()
        assert ended.status_code in (302, 303) and not ended.headers["Location"].startswith(callback), ended.headers
        assert "/login" in ended.headers["Location"]
        assert f"rests on the word of {me}, revoked since; it ends" in relay.process.output()
        again = sso()  # the session is gone, not refused once: the sign-in form
        assert again.status_code in (302, 303) and not again.headers["Location"].startswith(callback)
    finally:
        if evil is not None:
            evil.stop()
        relay.stop()


def test_a_relay_answers_for_its_own_connections_connector_ids_only():
    # Two relay steps of two connections in one gateway (acme, acme-eu): the first asked must
    # not answer "not revoked" for the other's connector, or firstresult would stop there.
    from types import SimpleNamespace

    from gateway import BackendUnavailable
    from gateway.plugins.relay import RelayPlugin

    relay = SimpleNamespace(settings=SimpleNamespace(connection="acme"), _revoked=frozenset({"acme-0a1b2c3d"}),
                            _enrolled=frozenset({"acme-0a1b2c3d", "acme-ffffffff"}), _admitted={},
                            _known={"acme-0a1b2c3d", "acme-ffffffff", "acme-12345678"})
    relay._standing = lambda connector: RelayPlugin._standing(relay, connector)

    def ask(answered_by: str):
        return RelayPlugin.gateway_answerer_revoked(relay, answered_by)

    assert (ask("acme-0a1b2c3d"), ask("acme-ffffffff")) == (True, False)
    # one of ours the registry listed before and no longer lists (a Redis lost it) counts as
    # revoked, unless a link from it was let in since that read; one never listed cannot be told
    # (enrolled since the last read, at another worker)
    assert ask("acme-12345678") is True
    relay._admitted["acme-12345678"] = 1.0
    assert ask("acme-12345678") is False
    with pytest.raises(BackendUnavailable):
        ask("acme-99999999")
    assert [ask(other) for other in ("acme-eu-0a1b2c3d", "other-0a1b2c3d", "acme", "")] == [None] * 4
    # An id the registry lists as revoked is revoked whatever its name: one a reusable ticket let
    # a connector choose before ids were checked whole escaped revocation by its name.
    relay._revoked = frozenset({"acme-0a1b2c3d", "acme-x-0a1b2c3d"})
    assert ask("acme-x-0a1b2c3d") is True
    relay._revoked = None  # not read yet: cannot tell for its own, still silent for others
    with pytest.raises(BackendUnavailable):
        ask("acme-ffffffff")
    assert ask("acme-eu-0a1b2c3d") is None
