"""Every backend probed, not only LDAP (issue 10 item 4), through a real ``authgw serve``: the
core's health thread pings a Redis throttle store, re-reads a Kerberos keytab and fetches CRLs
on ``health.probe_interval``; ``/readyz`` follows with a reason, each change is one WARNING
line, and the recovery is noticed without any login."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from support.gateway import GatewayProcess, static_users, write_conf
from support.net import wait_for
from support.redis import RedisServer

PASSWORD = "Corr3ct-Horse-Battery"


def health_lines(gw: GatewayProcess) -> list[str]:
    return [line for line in gw.output().splitlines() if "health: " in line]


@pytest.fixture(scope="module")
def alice_hash() -> str:
    from gateway.passwords import hash_password

    return hash_password(PASSWORD)


# -- Redis throttle store ---------------------------------------------------------------------------


def test_a_stopped_redis_throttle_store_makes_readyz_false_and_its_return_is_noticed(tmp_path, start_gateway,
                                                                                    alice_hash):
    redis = RedisServer(tmp_path / "redis").start()
    try:
        core = {"chain": ["static"], "health": {"probe_interval": 1},
                "throttle": {"store": "redis", "redis": {"url": redis.url, "timeout": 0.5}}}
        gw = start_gateway(write_conf(tmp_path / "conf.d", {"gateway.yaml": json.dumps(core),
                                                            **static_users({"alice": alice_hash})}))
        body = gw.get("/readyz").json()
        assert body["ready"] is True
        assert {"name": "gateway.throttle_store", "ready": True,
                "detail": f"redis://127.0.0.1:{redis.port}: answers"} in body["components"]
        assert gw.auth("alice", PASSWORD).status == 200

        redis.stop()
        down = wait_for(lambda: (r := gw.get("/readyz")).status == 503 and r)
        assert down.json()["reason"] == "gateway.throttle_store unavailable"
        assert gw.auth("alice", PASSWORD).status == 503  # fail closed, as /readyz announced
        wait_for(lambda: health_lines(gw))
        (line,) = health_lines(gw)  # one line for the outage, however many rounds saw it
        assert "WARNING" in line and "gateway.throttle_store is NOT ready" in line
        assert "/readyz: NOT ready (gateway.throttle_store unavailable)" in line

        redis.start()  # same port
        wait_for(lambda: gw.get("/readyz").status == 200)
        lines = wait_for(lambda: len(health_lines(gw)) == 2 and health_lines(gw))
        assert "gateway.throttle_store is ready again" in lines[1] and "/readyz: ready" in lines[1]
        assert gw.auth("alice", PASSWORD).status == 200
    finally:
        redis.stop()


def test_a_sqlite_throttle_store_that_cannot_be_read_makes_readyz_false(tmp_path, start_gateway, alice_hash):
    # Garbage in throttle.sqlite3 (a full or damaged disk): every password login was 503 while
    # /readyz said ready, and a load balancer kept sending them (review of the state directory).
    core = {"chain": ["static"], "health": {"probe_interval": 1}, "throttle": {"store": "sqlite"}}
    gw = start_gateway(write_conf(tmp_path / "conf.d", {"gateway.yaml": json.dumps(core),
                                                        **static_users({"alice": alice_hash})}))
    store = gw.state_dir / "throttle.sqlite3"
    assert gw.auth("alice", PASSWORD).status == 200
    assert {"name": "gateway.throttle_store", "ready": True, "detail": f"{store}: answers"} \
        in gw.get("/readyz").json()["components"]
    gw.stop()
    for extra in store.parent.glob("throttle.sqlite3-*"):
        extra.unlink()
    store.write_bytes(b"not a database, " * 512)
    gw.start()
    body = gw.get("/readyz")
    assert body.status == 503 and body.json()["reason"] == "gateway.throttle_store unavailable"
    assert gw.auth("alice", PASSWORD).status == 503  # fail closed, as /readyz says
    store.unlink()  # the operator removes it: a new one is made, and the probe notices
    wait_for(lambda: gw.get("/readyz").status == 200, 15)
    assert gw.auth("alice", PASSWORD).status == 200


# -- Kerberos keytab --------------------------------------------------------------------------------

SPN = "HTTP/localhost@EXAMPLE.TEST"


@pytest.fixture(scope="module")
def kdc(tmp_path_factory):
    from support.kdc import KDC

    realm = KDC(tmp_path_factory.mktemp("krbhealth"), "EXAMPLE.TEST")
    realm.start()
    try:
        realm.add_service("HTTP/localhost", realm.dir / "http.keytab")
        realm.add_service("HTTP/other.test", realm.dir / "other.keytab")
        yield realm
    finally:
        realm.stop()


def replace(source: Path, target: Path) -> None:
    """Write *target* as a copy of *source* in one step (a probe never reads half a file)."""
    temporary = target.with_suffix(".new")
    shutil.copy(source, temporary)
    temporary.chmod(0o600)
    temporary.replace(target)


def keytab_state(gw: GatewayProcess) -> tuple[int, str | None, dict]:
    r = gw.get("/readyz")
    body = r.json()
    (component,) = [c for c in body["components"] if c["name"] == "kerberos.keytab"]
    return r.status, body.get("reason"), component


def test_a_removed_or_replaced_keytab_flips_readyz_and_recovers_without_a_login(kdc, tmp_path, start_gateway):
    keytab = Path(shutil.copy(kdc.dir / "http.keytab", tmp_path / "http.keytab"))
    keytab.chmod(0o600)
    conf = write_conf(tmp_path / "conf.d", {
        "gateway.yaml": "chain: [kerberos]\nthrottle: {enabled: false}\nhealth: {probe_interval: 1}\n",
        "kerberos.yaml": f"kerberos:\n  allowed_networks: [127.0.0.0/8]\n  keytab: {keytab}\n"
                         f"  service_principal: {SPN}\n  realms: [EXAMPLE.TEST]\n"})
    gw = start_gateway(conf, env=kdc.env)
    assert keytab_state(gw)[0] == 200

    keytab.rename(tmp_path / "moved.keytab")  # no login from here on: the probe must notice
    status, reason, component = wait_for(lambda: (s := keytab_state(gw))[0] == 503 and s)
    assert reason == "no ready backend: kerberos" and "No such file" in component["detail"]

    # Replaced (atomically, as an operator should) by a keytab for another service: readable,
    # but no key for ours.
    replace(kdc.dir / "other.keytab", keytab)
    status, _, component = wait_for(lambda: (s := keytab_state(gw))[2]["detail"] != component["detail"] and s)
    assert status == 503 and not component["ready"]
    assert "HTTP/localhost@EXAMPLE.TEST" in component["detail"]

    replace(tmp_path / "moved.keytab", keytab)
    wait_for(lambda: keytab_state(gw)[0] == 200)
    lines = health_lines(gw)
    assert len(lines) == 2, lines  # down (whatever the reason became meanwhile), back up
    assert all("WARNING" in line for line in lines)
    assert "kerberos.keytab is NOT ready" in lines[0] and "/readyz: NOT ready" in lines[0]
    assert "kerberos.keytab is ready again" in lines[1] and "/readyz: ready" in lines[1]


# -- client certificates: CRL sources and the OCSP responder -----------------------------------------


@pytest.fixture
def pki_server():
    from support.ocsp import PkiServer

    server = PkiServer().start()
    yield server
    server.stop()


def cert_gateway(tmp_path: Path, start_gateway, revocation: dict) -> tuple[GatewayProcess, object]:
    from support.pki import CA, write_bundle

    ca = CA.create("health CA", days=30)
    write_bundle(tmp_path / "conf.d" / "root.pem", ca)
    settings = {"ca_bundle": "root.pem", "headers": [{"name": "X-SSL-Client-Cert", "format": "pem"}],
                "revocation": {"retry_after_failure": 0, "timeout": 2, **revocation}}
    core = {"chain": ["client_cert"], "throttle": {"enabled": False}, "trusted_proxies": ["127.0.0.1/32"],
            "health": {"probe_interval": 1}}
    conf = write_conf(tmp_path / "conf.d", {"gateway.yaml": json.dumps(core),
                                            "client_cert.yaml": json.dumps({"client_cert": settings})})
    return start_gateway(conf), ca


def components(gw: GatewayProcess) -> dict[str, dict]:
    return {c["name"]: c for c in gw.get("/readyz").json()["components"]}


def test_an_unreachable_crl_url_under_hard_fail_makes_readyz_false_with_the_reason(tmp_path, start_gateway):
    from support.net import free_port

    dead = f"http://127.0.0.1:{free_port()}/ca.crl"
    gw, _ca = cert_gateway(tmp_path, start_gateway, {"policy": "hard-fail", "crl_urls": [dead]})
    # Not ready from the first request on (the first round ran before serving); the error text
    # comes from whichever fetch ran first, the round's or the plugin's own refresher's.
    wait_for(lambda: components(gw)[f"client_cert.crl[{dead}]"]["detail"].startswith("fetch failed:"))
    response = gw.get("/readyz")
    body = response.json()
    assert response.status == 503 and body["reason"] == "no ready backend: client_cert"
    found = {c["name"]: c for c in body["components"]}
    assert found["client_cert.trust"]["ready"] is True
    crl = found[f"client_cert.crl[{dead}]"]
    assert crl["ready"] is False and crl["detail"].startswith("fetch failed:") and dead in crl["detail"]
    assert found["client_cert.revocation"]["ready"] is False
    assert "every certificate login is refused" in found["client_cert.revocation"]["detail"]
    (line,) = health_lines(gw)
    assert "WARNING" in line and f"client_cert.crl[{dead}] is NOT ready" in line


def test_a_failing_crl_under_soft_fail_is_degraded_and_its_repair_is_noticed(tmp_path, start_gateway, pki_server):
    url = pki_server.url("/crl/ca.crl")  # 404 until the CRL is published
    gw, ca = cert_gateway(tmp_path, start_gateway, {"policy": "soft-fail", "crl_urls": [url],
                                                    "ocsp_responder": pki_server.url("/ocsp")})
    wait_for(lambda: "404" in components(gw)[f"client_cert.crl[{url}]"]["detail"])
    body = gw.get("/readyz").json()
    assert body["ready"] is True and body["degraded"] == ["client_cert"]  # soft-fail: logins go on
    found = {c["name"]: c for c in body["components"]}
    assert found[f"client_cert.crl[{url}]"]["ready"] is False and "404" in found[f"client_cert.crl[{url}]"]["detail"]
    assert found[f"client_cert.ocsp[{pki_server.url('/ocsp')}]"] == {
        "name": f"client_cert.ocsp[{pki_server.url('/ocsp')}]", "ready": True, "detail": "answers (unauthorized)"}
    assert "client_cert.revocation" not in found  # only hard-fail needs a working source

    pki_server.put_crl("ca.crl", ca.crl([]))
    crl = wait_for(lambda: (c := components(gw)[f"client_cert.crl[{url}]"])["ready"] and c)
    assert crl["detail"] == "0 revoked serials"
    assert "degraded" not in gw.get("/readyz").json()
    lines = wait_for(lambda: len(health_lines(gw)) == 2 and health_lines(gw))
    assert f"client_cert.crl[{url}] is ready again" in lines[1]


# -- the credential cache on Redis: probed, and a fallback for a directory that is down ---------------


def test_the_cache_redis_store_is_probed_and_covers_a_directory_that_goes_down(tmp_path, start_gateway):
    from support.slapd import Slapd

    slapd = Slapd(tmp_path / "slapd").start()
    redis = RedisServer(tmp_path / "redis").start()
    try:
        slapd.add_user("alice", PASSWORD, cn="Alice")
        core = {"chain": ["ldap"], "plugins": ["cache"], "throttle": {"enabled": False},
                "health": {"probe_interval": 1}}
        gw = start_gateway(write_conf(tmp_path / "conf.d", {
            "gateway.yaml": json.dumps(core),
            "ldap.yaml": "ldap: " + json.dumps(slapd.plugin_settings("plain", backoff=1, connect_timeout=1.0)),
            "cache.yaml": "cache: " + json.dumps({"store": "redis", "redis": {"url": redis.url, "timeout": 0.5}})}))
        assert gw.auth("alice", PASSWORD).status == 200  # the cache learns alice
        wait_for(lambda: "; 1 offline entries" in components(gw)["cache.store"]["detail"])

        redis.stop()  # live logins go on: the cache is degraded, /readyz stays true
        store = wait_for(lambda: (c := components(gw)["cache.store"])["ready"] is False and c)
        assert f"redis://127.0.0.1:{redis.port}" in store["detail"]
        body = gw.get("/readyz").json()
        assert body["ready"] is True and body["degraded"] == ["cache"]
        assert "cache.store is NOT ready" in wait_for(lambda: health_lines(gw))[0]
        redis.start()  # empty (no persistence): the entries are counted again, not assumed
        wait_for(lambda: "; 0 offline entries" in components(gw)["cache.store"]["detail"])
        assert components(gw)["cache.store"]["ready"] is True
        assert "cache.store is ready again" in health_lines(gw)[-1]
        assert gw.auth("alice", PASSWORD).status == 200  # learnt again
        wait_for(lambda: "; 1 offline entries" in components(gw)["cache.store"]["detail"])

        slapd.stop()  # the directory is gone, but the cache can answer for alice: still ready
        wait_for(lambda: not any(c["ready"] for n, c in components(gw).items() if n.startswith("ldap.")))
        body = gw.get("/readyz").json()
        assert body["ready"] is True and body["degraded"] == ["ldap"]
        response = gw.auth("alice", PASSWORD)
        assert response.status == 200 and response.header("Remote-Auth-Source") == "cache"

        redis.stop()  # and now nothing can answer a password: not ready, with the reason
        down = wait_for(lambda: (r := gw.get("/readyz")).status == 503 and r)
        assert down.json()["reason"] == "no ready backend: ldap"
    finally:
        redis.stop()
        slapd.stop()


# -- the login front door's Redis session store --------------------------------------------------------


def test_the_login_session_store_on_redis_is_probed_and_shows_as_degraded(tmp_path, start_gateway, alice_hash):
    redis = RedisServer(tmp_path / "redis").start()
    try:
        core = {"chain": ["static"], "plugins": ["login"], "throttle": {"enabled": False},
                "health": {"probe_interval": 1}}
        login = {"base_url": "https://login.example.test", "sessions": {"store": "redis", "redis_url": redis.url}}
        gw = start_gateway(write_conf(tmp_path / "conf.d", {"gateway.yaml": json.dumps(core),
                                                            "login.yaml": "login: " + json.dumps(login),
                                                            **static_users({"alice": alice_hash})}))
        assert components(gw)["login.sessions"] == {"name": "login.sessions", "ready": True,
                                                    "detail": f"redis://127.0.0.1:{redis.port}: answers"}
        redis.stop()
        sessions = wait_for(lambda: (c := components(gw)["login.sessions"])["ready"] is False and c)
        assert sessions["detail"].startswith(f"redis://127.0.0.1:{redis.port}: ")
        # Not a chain step: /auth still answers, so the gateway stays ready and says what is degraded.
        response = gw.get("/readyz")
        assert response.status == 200 and response.json()["degraded"] == ["login"]
        assert gw.auth("alice", PASSWORD).status == 200
        assert "login.sessions is NOT ready" in wait_for(lambda: health_lines(gw))[0]
        redis.start()
        wait_for(lambda: components(gw)["login.sessions"]["ready"])
        assert "degraded" not in gw.get("/readyz").json()
    finally:
        redis.stop()


# -- the rule itself --------------------------------------------------------------------------------


def test_the_readiness_rule():
    from gateway.checks import ComponentState as C
    from gateway.health import decide

    up, down = C("a.x", True), C("a.y", False)
    chain = ["ldap", "static"]
    # One server of two down: ready, the step degraded.
    r = decide([], [("ldap", [C("ldap.s1", True), C("ldap.s2", False)])], chain)
    assert (r.ready, r.reason, r.degraded) == (True, None, ("ldap",))
    # Every step down: not ready, naming them; a step reporting nothing does not count.
    r = decide([], [("ldap", [C("ldap.s1", False)]), ("static", []), ("login", [up])], chain)
    assert (r.ready, r.reason) == (False, "no ready backend: ldap")
    # Another step covers: ready, degraded.
    r = decide([], [("ldap", [C("ldap.s1", False)]), ("static", [C("static.users", True)])], chain)
    assert (r.ready, r.degraded) == (True, ("ldap",))
    # A required component down takes its step down, whatever its others say.
    r = decide([], [("client_cert", [C("t", True), C("r", False, required=True)])], ["client_cert"])
    assert (r.ready, r.reason) == (False, "no ready backend: client_cert")
    # A ready fallback (not a step) covers the steps; a fallback that is down does not.
    cache = [C("cache.store", True, fallback=True)]
    assert decide([], [("ldap", [down]), ("cache", cache)], chain).ready is True
    assert decide([], [("ldap", [down]), ("cache", [C("cache.store", False)])], chain).ready is False
    # A core store down: not ready whatever the steps say, and every reason is given.
    core = [C("gateway.throttle_store", False, "redis://127.0.0.1:1: ConnectionError")]
    r = decide(core, [("ldap", [down])], chain)
    assert (r.ready, r.reason) == (False, "no ready backend: ldap; gateway.throttle_store unavailable")
    assert r.components[0] is core[0]
    # A chain that takes passwords whose password steps are all down is not ready, though a
    # certificate step still is; with no password step at all, the certificate step suffices.
    both = ["client_cert", "ldap"]
    r = decide([], [("client_cert", [up]), ("ldap", [down])], both, frozenset({"ldap"}))
    assert (r.ready, r.reason) == (False, "no ready backend for password logins: ldap")
    assert decide([], [("client_cert", [up]), ("ldap", [up])], both, frozenset({"ldap"})).ready is True
    assert decide([], [("client_cert", [up]), ("ldap", [down]), ("cache", cache)], both,
                  frozenset({"ldap"})).ready is True  # the offline cache answers passwords
    assert decide([], [("client_cert", [up])], ["client_cert"], frozenset()).ready is True
    # A plugin outside the chain that is down: degraded only.
    r = decide([], [("static", [up]), ("login", [C("login.sessions", False)])], chain)
    assert (r.ready, r.degraded) == (True, ("login",))


def test_a_probe_that_raises_does_not_stop_the_round_and_changes_are_logged_once(tmp_path, caplog):
    """In-process: the core's health round with two plugins, one whose probe raises."""
    from gateway import ComponentState, hookimpl
    from support.chainhelp import build

    class Broken:
        @hookimpl
        def gateway_probe(self) -> None:
            raise RuntimeError("probe bug")

    class Flaky:
        up = True
        probes = 0

        @hookimpl
        def gateway_probe(self) -> None:
            self.probes += 1

        @hookimpl
        def gateway_readiness(self) -> list[ComponentState]:
            return [ComponentState("flaky.backend", self.up, "ok" if self.up else "refused")]

    runtime = build(tmp_path, {"chain": ["one"]})
    gateway = runtime.gateway
    broken, flaky = Broken(), Flaky()
    gateway.pm.register(broken, name="broken")  # registered last: called first
    gateway.pm.register(flaky, name="one.health")
    try:
        caplog.set_level("INFO", logger="authgw")
        watch = gateway.health_watch
        watch.round()
        assert flaky.probes == 1 and "the gateway_probe of plugin 'broken' raised" in caplog.text
        changes = lambda: [r.getMessage() for r in caplog.records if r.name == "authgw.health"]  # noqa: E731
        assert changes() == []  # all ready at the first round: nothing to say
        flaky.up = False
        watch.round()
        watch.round()
        assert changes() == ["health: flaky.backend is NOT ready: refused"]  # a plugin outside the chain
        flaky.up = True
        watch.round()
        assert changes()[1:] == ["health: flaky.backend is ready again: ok"]
        assert all(r.levelname == "WARNING" for r in caplog.records if r.name == "authgw.health")
    finally:
        runtime.discard()
