"""Issue 13, step 2-3: one relay and two connectors (all ``authgw serve``) in front of a real
slapd. Logins through the relay's ``/auth`` and ``/v1/authenticate`` travel the link."""

from __future__ import annotations

import signal
import threading
import time

import ldap3
import pytest

from support.linkenv import Connector, Relay, linked_site
from support.slapd import Slapd


#: A relay-side plugin that asks gateway_lookup_user, as a Kerberos or certificate login would.
WHOIS = {"whois_probe.py": '''
    import asyncio
    from aiohttp import web
    from gateway import BackendUnavailable, Route, hookimpl

    class Whois:
        def __init__(self, settings, context):
            self.hook = context.hook

        @hookimpl
        def gateway_http_routes(self, door):
            async def whois(request):
                name = request.match_info["name"]
                loop = asyncio.get_running_loop()
                try:
                    found = await loop.run_in_executor(None, lambda: self.hook.gateway_lookup_user(username=name))
                except BackendUnavailable as exc:
                    return web.json_response({"unavailable": str(exc)}, status=503)
                if found is None:
                    return web.json_response(None)
                return web.json_response({**found.to_json(), "account_state": found.account_state})
            return [Route("GET", "/whois/{name}", whois)]
'''}


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap"), ppolicy=True).start()
    locked = server.add_user("locked", "Locked-Passw0rd", cn="Locked L")
    server.modify(locked, {"pwdAccountLockedTime": [(ldap3.MODIFY_REPLACE, ["000001010000Z"])]})
    server.add_user("alice", "Alice-Passw0rd", cn="Alice A", mail="alice@example.com", groups=["staff"])
    server.add_user("bob", "Bob-Passw0rd", cn="Bob B", mail="bob@example.com", groups=["ops"])
    server.add_user("carol", "Carol-Passw0rd", cn="Carol C", mail="carol@example.com")  # never cached
    yield server
    server.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory, slapd):
    """A relay with two enrolled, linked connectors (shared: a test that stops one restarts it)."""
    yield from linked_site(tmp_path_factory.mktemp("site"), slapd, ("whois-probe", {"whois": "whois_probe:Whois"}, WHOIS))


def test_password_logins_through_the_relay(site, slapd):
    relay, connectors = site
    before = sum(len(c.process.audit()) for c in connectors)
    ok = relay.process.auth("alice", "Alice-Passw0rd")
    assert ok.status == 200
    assert ok.header("Remote-User") == "alice" and ok.header("Remote-Groups") == "staff"
    assert ok.header("Remote-Email") == "alice@example.com"
    api = relay.login("bob", "Bob-Passw0rd")
    assert api.status == 200
    body = api.json()
    assert (body["outcome"], body["step"], body["identity"]["display_name"]) == ("success", "relay", "Bob B")
    wrong = relay.login("alice", "wrong-password")
    assert (wrong.json()["outcome"], wrong.json()["reason"]) == ("invalid_credentials", "ldap.invalid_password")
    assert relay.process.auth("alice", "wrong-password").status == 401
    unknown = relay.login("nobody", "whatever-1")
    assert (unknown.json()["outcome"], unknown.json()["reason"]) == ("user_not_found", "ldap.user_not_found")
    # each connector decided some of them with its own chain, audited as arriving over the link
    decided = [line for c in connectors for line in c.process.audit()]
    assert {line["front_door"] for line in decided} == {"link"}
    assert len(decided) - before == 5
    relay_audit = relay.process.audit()
    assert [a["outcome"] for a in relay_audit][-5:] == ["success", "success", "invalid_credentials",
                                                        "invalid_credentials", "user_not_found"]


def test_the_relays_audit_line_names_the_connector_that_answered(site):
    """The relay's audit line said ``step: relay`` and not which connector answered: one that
    vouched falsely (compromised) could not be told from the others of its connection. It names
    it now by the id the relay enrolled it under (``answered_by``): a success, a wrong password,
    and a user not found (a note of the connector's answer that became the decision)."""
    relay, connectors = site
    enrolled = relay.cli("relay", "connectors").stdout
    for username, password, outcome in (("alice", "Alice-Passw0rd", "success"),
                                        ("alice", "wrong-password", "invalid_credentials"),
                                        ("nobody", "whatever-1", "user_not_found")):
        before = [len(c.process.audit()) for c in connectors]
        response = relay.login(username, password)
        assert response.json()["outcome"] == outcome
        # the connector that decided wrote its own line before it answered
        (answering,) = [c for c, b in zip(connectors, before) if len(c.process.audit()) > b]
        line = relay.process.audit_for(response.json()["request_id"])
        assert (line["outcome"], line["step"], line["answered_by"]) == (outcome, "relay", answering.connector_id)
        assert answering.connector_id in enrolled and answering.connector_id in relay.ready_links()
        # a line of another step (the connector's own ldap step) names no one
        assert "answered_by" not in answering.process.audit()[-1]


def test_connectors_never_listen_for_the_link(site):
    _, connectors = site
    for connector in connectors:
        assert connector.listening_ports() == {connector.process.port}


def test_least_in_flight_spreads_logins_over_both_connectors(site):
    relay, connectors = site
    before = [len(c.process.audit()) for c in connectors]
    for _ in range(20):  # ties go at random: one connector gets none with odds of 2 in a million
        assert relay.login("alice", "Alice-Passw0rd").status == 200
    counts = [len(c.process.audit()) - b for c, b in zip(connectors, before)]
    assert sum(counts) == 20 and min(counts) >= 1


def test_a_link_opened_just_now_does_not_capture_the_logins_of_an_idle_site():
    # Ties went to the link that had served least: a connector opening a link (or re-dialling
    # to reset its count) drew every login until it had served as many as the others.
    from gateway.plugins.relay.hub import Hub, LinkSession

    class Open:
        closed = False

    hub = Hub(max_in_flight=64)
    for n in range(3):
        session = LinkSession(Open(), f"acme-0000000{n}", "acme", None, 0.0)
        session.ready, session.served = True, 1000
        hub.add(session)
    fresh = LinkSession(Open(), "acme-0000000f", "acme", None, 0.0)
    hub.add(fresh)
    hub.make_ready(fresh)
    picks = [hub._pick("acme", set()).connector for _ in range(400)]
    assert 40 < picks.count("acme-0000000f") < 160  # about a quarter, as each of the others'
    busy = [s for s in hub.all() if s is not fresh]
    for session in busy:
        session.in_flight = 1
    assert hub._pick("acme", set()) is fresh  # the fewest in flight still comes first


def test_no_connector_online_cached_users_from_the_cache_others_503(site):
    relay, connectors = site
    assert relay.login("alice", "Alice-Passw0rd").json()["from_cache"] is False
    # the connector whose answer the cache stored first (alice logged in before, through either)
    vouched = relay.cli("cache", "show", "alice").stdout.split("vouched for by ", 1)[1].split()[0]
    assert vouched in {c.connector_id for c in connectors}, vouched
    for connector in connectors:
        connector.stop()
    cached = relay.login("alice", "Alice-Passw0rd")
    assert cached.status == 200 and cached.json()["from_cache"] is True
    assert relay.login("alice", "wrong-password").json()["outcome"] == "invalid_credentials"
    other = relay.login("carol", "Carol-Passw0rd")
    assert other.status == 503 and other.json()["reason"] == "relay.no_connector"
    # the cache's line names the connector whose answer it repeats; the relay's 503, no one
    assert relay.process.audit_for(cached.json()["request_id"])["answered_by"] == vouched
    assert "answered_by" not in relay.process.audit_for(other.json()["request_id"])
    assert relay.process.auth("carol", "Carol-Passw0rd").status == 503
    connectors[0].start().wait_linked(relay)
    live = relay.login("carol", "Carol-Passw0rd")
    assert live.status == 200 and live.json()["from_cache"] is False
    connectors[1].start().wait_linked(relay)


def test_killing_a_connector_mid_load_fails_only_logins_in_flight_on_it(site, slapd):
    relay, connectors = site
    threads, total = 4, 160
    users = [(f"ha{i}", f"Ha-Passw0rd-{i}") for i in range(threads)]
    for name, password in users:
        slapd.add_user(name, password, cn=name)
    def warm(name: str, password: str) -> None:
        for _ in range(6):
            relay.login(name, password)

    # warm, concurrently: the connectors' directory pools grow to the load's size before counting
    warmers = [threading.Thread(target=warm, args=user) for user in users]
    for thread in warmers:
        thread.start()
    for thread in warmers:
        thread.join(60)
    binds, opened = slapd.bind_count(), slapd.connection_count()
    for name, password in users:
        assert relay.login(name, password).status == 200
    per_login = (slapd.bind_count() - binds - (slapd.connection_count() - opened)) / len(users)
    assert per_login >= 1

    results: list[int] = []
    lock = threading.Lock()
    killed = threading.Event()

    def work(name: str, password: str) -> None:
        while True:
            with lock:
                if len(results) >= total:
                    return
                if len(results) >= total // 4 and not killed.is_set():
                    killed.set()
                    connectors[0].stop(sig=signal.SIGKILL)
            status = relay.login(name, password).status
            with lock:
                results.append(status)

    binds, opened = slapd.bind_count(), slapd.connection_count()
    pool = [threading.Thread(target=work, args=user) for user in users]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(60)
    checked = slapd.bind_count() - binds - (slapd.connection_count() - opened)
    failed = [s for s in results if s != 200]
    seen = {"failed": failed, "checked": checked, "per_login": per_login, "logins": len(results),
            "new_connections": slapd.connection_count() - opened}
    try:
        assert killed.is_set() and len(results) >= total, seen
        # only what was in flight on the killed connector may fail: at most one per client thread
        assert len(failed) <= threads and set(failed) <= {503}, seen
        # and no password was checked twice: never more user binds than logins
        assert checked <= per_login * len(results), seen
    finally:
        connectors[0].start().wait_linked(relay)



def test_directory_lookups_at_the_relay_go_over_the_link(site):
    relay, _ = site
    alice = relay.process.get("/whois/alice").json()
    assert (alice["username"], alice["email"], alice["groups"]) == ("alice", "alice@example.com", ["staff"])
    assert alice["account_state"] == ""
    # the account's state crosses the link: Kerberos and certificate logins at the relay refuse it
    assert relay.process.get("/whois/locked").json()["account_state"] == "ldap.locked"
    assert relay.process.get("/whois/nobody").json() is None
    assert relay.process.get("/whois/" + "a*)(uid=*").json() is None  # escaped by the connector's ldap plugin


def test_a_restarted_relay_gets_its_connectors_back(site):
    relay, connectors = site
    relay.stop()
    relay.start()
    for connector in connectors:
        connector.wait_linked(relay, timeout=15)
    assert relay.login("alice", "Alice-Passw0rd").status == 200


def test_check_runs_the_cloud_connection_test(site):
    relay, connectors = site
    check = connectors[0].cli("check")
    assert check.returncode == 0, check.stdout
    for name in ("link.enrolment", "link.dns[127.0.0.1]", "link.tcp", "link.tls[127.0.0.1:", "link.link"):
        assert f"PASS  {name}" in check.stdout, check.stdout
    assert "clock skew" in check.stdout and "verified with the pinned relay CA" in check.stdout


def test_operators_see_live_links_and_a_connector_selftest(site):
    relay, connectors = site
    auth = {"Authorization": f"Bearer {relay.token}"}
    assert relay.process.get("/v1/relay/connectors").status == 401
    links = relay.process.get("/v1/relay/connectors", auth).json()["links"]
    assert {link["connector"] for link in links} == {c.connector_id for c in connectors}
    assert relay.process.post("/v1/relay/selftest", b"", {"Authorization": "Bearer wrong"}).status == 401
    answer = relay.process.post("/v1/relay/selftest", b"", auth).json()
    results = answer["results"]
    assert abs(answer["ran_at"] - time.time()) < 300  # when the connector's (reused) run began
    names = {r["name"].split("[")[0]: r["status"] for r in results}
    assert names.get("ldap.tcp") == "pass" and not any(n.startswith("link.") for n in names)
    listing = relay.cli("relay", "connectors").stdout.splitlines()
    for connector in connectors:
        row = next(line for line in listing if line.startswith(connector.connector_id))
        assert " online " in row and " 0.1.0 " in row


def test_a_connector_stopped_cleanly_under_load_fails_no_login(site):
    relay, connectors = site
    results: list[tuple[int, bool]] = []
    lock = threading.Lock()
    stopped = threading.Event()

    def work() -> None:
        while True:
            with lock:
                if len(results) >= 120:
                    return
                if len(results) >= 30 and not stopped.is_set():
                    stopped.set()
                    threading.Thread(target=connectors[1].stop).start()  # SIGTERM: drain, then exit
            response = relay.login("bob", "Bob-Passw0rd")
            with lock:
                results.append((response.status, response.status == 200 and response.json()["from_cache"]))

    pool = [threading.Thread(target=work) for _ in range(4)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(60)
    try:
        assert stopped.is_set() and len(results) >= 120
        assert set(results) == {(200, False)}  # every login live: none failed, none fell back to the cache
        assert "is stopping: no new requests" in relay.process.output()
    finally:
        connectors[1].process.proc.wait(30)
        connectors[1].start().wait_linked(relay)


def test_a_connectors_cache_answer_stays_a_cache_answer_at_the_relay(tmp_path, slapd):
    # The connector answered from its hot cache; the relay made it a live success (from_cache
    # false): its throttle then cleared the user's count as after a real directory answer.
    relay = Relay(tmp_path / "relay").setup().start()
    connector = None
    try:
        connector = Connector(tmp_path / "connector", slapd,
                              cache={"methods": ["ldap"], "hot": {"enabled": True, "ttl": 60}})
        connector.enroll(relay.ticket(), relay.ca_file).start().wait_linked(relay)
        first = relay.login("alice", "Alice-Passw0rd").json()
        second = relay.login("alice", "Alice-Passw0rd").json()
        assert (first["outcome"], first["from_cache"]) == ("success", False)
        assert (second["outcome"], second["from_cache"]) == ("success", True)
        assert connector.process.audit()[-1]["reason"] == "cache.hot"  # the connector's own hit
        assert relay.process.audit()[-1]["from_cache"] is True
    finally:
        if connector is not None and connector.process is not None:
            connector.stop()
        relay.stop()


def test_logins_the_relay_received_at_its_api_get_no_per_client_limit_at_the_connector(tmp_path, slapd):
    # The relay's API callers are portals acting for many users; the relay forwards the portal's
    # address as `client`. The connector throttled per client on it: 30 wrong passwords for 30
    # different users through one portal locked every other user of that portal out.
    relay = Relay(tmp_path / "relay", cache=False).setup().start()
    connector = None
    try:
        connector = Connector(tmp_path / "connector", slapd, throttle=True)
        connector.enroll(relay.ticket(), relay.ca_file).start().wait_linked(relay)
        for n in range(35):  # client_failures is 30
            assert relay.login(f"ghost{n}", "wrong-password-1").json()["outcome"] == "user_not_found"
        carol = relay.login("carol", "Carol-Passw0rd").json()
        assert (carol["outcome"], carol["reason"]) == ("success", ""), carol
        # forward-auth at the relay still carries the user's own address: per-client limits stay
        for n in range(3):
            relay.process.auth("bob", f"wrong-{n}")
        assert relay.process.auth("bob", "Bob-Passw0rd").status == 429
    finally:
        if connector is not None and connector.process is not None:
            connector.stop()
        relay.stop()


def test_the_relays_cache_answers_only_while_no_connector_does(tmp_path):
    """A linked connector whose directory is down answers UNAVAILABLE: its own cache had its say,
    and only it knows what that directory refused since (an account locked there and forgotten
    by its cache). The relay's cache answered anyway, from its own copy: a refused password got
    in (review of account state). It now answers only while no connector answers."""
    own = Slapd(tmp_path / "ldap").start()
    relay = Relay(tmp_path / "relay").setup().start()
    connector = None
    try:
        own.add_user("dana", "Dana-Passw0rd", cn="Dana D")
        connector = Connector(tmp_path / "connector", own)
        connector.enroll(relay.ticket(), relay.ca_file).start().wait_linked(relay)
        live = relay.login("dana", "Dana-Passw0rd")
        assert (live.status, live.json()["from_cache"]) == (200, False)  # the relay's cache learns dana

        own.stop()  # the connector's directory is down; the connector stays linked
        down = relay.login("dana", "Dana-Passw0rd")
        assert down.status == 503, down.json()
        assert relay.process.audit()[-1]["from_cache"] is False
        # the connector answered UNAVAILABLE (a note that became the decision): it is named
        assert relay.process.audit_for(down.json()["request_id"])["answered_by"] == connector.connector_id

        connector.stop()  # no connector: the relay's cache is all there is
        cached = relay.login("dana", "Dana-Passw0rd")
        assert (cached.status, cached.json()["from_cache"]) == (200, True)
        # the cache's line names the connector whose earlier answer it repeats
        assert relay.process.audit_for(cached.json()["request_id"])["answered_by"] == connector.connector_id
    finally:
        if connector is not None and connector.process is not None:
            connector.stop()
        relay.stop()
        own.stop()
