"""Honest health through a real ``authgw serve`` and a real slapd (issue 10 item 4): backends
are probed at start-up and periodically, state changes are logged at WARNING, ``/readyz`` is
false (with a reason) when the chain cannot serve password logins, and its details (URLs,
paths) and ``/metrics`` are shown only to ``health.details_from``."""

from __future__ import annotations

import json

import pytest

from support.gateway import GatewayProcess, write_conf
from support.net import wait_for
from support.pki import CA
from support.slapd import Slapd


@pytest.fixture(scope="module")
def directory(tmp_path_factory) -> Slapd:
    slapd = Slapd(tmp_path_factory.mktemp("ldap") / "slapd", tls=CA.create()).start()
    slapd.add_user("alice", "alice-pw", cn="Alice Liddell")
    yield slapd
    slapd.stop()


@pytest.fixture
def start(tmp_path, start_gateway):
    def start(ldap: dict, **core) -> GatewayProcess:
        conf = write_conf(tmp_path / f"conf{len(list(tmp_path.iterdir()))}", {
            "gateway.yaml": json.dumps({"chain": ["ldap"], "throttle": {"enabled": False}, **core}),
            "ldap.yaml": "ldap: " + json.dumps(ldap)})
        return start_gateway(conf)
    return start


def test_a_refused_service_account_makes_readyz_false_before_any_login(directory, start, tmp_path):
    wrong = tmp_path / "wrong-pw"
    wrong.write_text("not-the-service-password")
    wrong.chmod(0o600)
    gw = start(directory.plugin_settings("ldaps", bind_password={"file": str(wrong)}))
    ready = wait_for(lambda: (r := gw.get("/readyz")).status == 503 and r)
    body = ready.json()
    assert body["ready"] is False and body["reason"] == "no ready backend: ldap"
    (component,) = body["components"]
    assert component["ready"] is False and "service account bind refused" in component["detail"]
    assert wait_for(lambda: "WARNING" in gw.output() and "is NOT ready: service account bind refused" in gw.output())
    assert gw.auth("alice", "alice-pw").status == 503  # what /readyz announced
    assert "not-the-service-password" not in gw.output()


def test_a_directory_that_goes_away_and_comes_back_is_noticed_without_logins(directory, start):
    gw = start(directory.plugin_settings("ldaps", connect_timeout=1.0, backoff=1.0), health={"probe_interval": 1})
    assert wait_for(lambda: gw.get("/readyz").status == 200)
    directory.stop()
    try:
        ready = wait_for(lambda: (r := gw.get("/readyz")).status == 503 and r)
        assert ready.json()["reason"] == "no ready backend: ldap"
        assert wait_for(lambda: "is NOT ready" in gw.output())
    finally:
        directory.start()
    wait_for(lambda: gw.get("/readyz").status == 200, timeout=30)
    assert "is ready" in gw.output()
    assert gw.auth("alice", "alice-pw").status == 200


def test_details_and_metrics_only_for_the_allowed_addresses(directory, start):
    gw = start(directory.plugin_settings("ldaps"), health={"details_from": ["192.0.2.0/24"]})
    body = gw.get("/readyz").json()
    assert body == {"ready": True}
    assert gw.get("/metrics").status == 404
    text = json.dumps(body)
    assert directory.ldaps_url not in text and "ldap.server" not in text


def test_a_proxy_on_the_same_host_does_not_lend_its_clients_the_details(directory, start):
    # nginx on loopback (details_from's default) in front: its clients reached /readyz's details
    # and /metrics through it, since only the socket peer was checked (review of what the
    # gateway writes). The client it forwards for must be allowed too.
    gw = start(directory.plugin_settings("ldaps"), trusted_proxies=["127.0.0.0/8"])
    outsider = {"X-Forwarded-For": "203.0.113.9"}
    assert gw.get("/readyz", outsider).json() == {"ready": True}
    assert gw.get("/metrics", outsider).status == 404
    local = {"X-Forwarded-For": "127.0.0.1"}  # a client on the proxy's host, as the proxy says
    assert "components" in gw.get("/readyz", local).json() and gw.get("/metrics", local).status == 200
    assert "components" in gw.get("/readyz").json()  # the proxy's own request (no X-Forwarded-For)


def test_a_certificate_step_does_not_hide_that_no_password_login_can_be_served(directory, tmp_path, start_gateway):
    # chain [client_cert, ldap] with the service account refused: certificates could still log
    # in, but every password login would get 503, so a load balancer must be told.
    from support.pki import write_bundle

    wrong = tmp_path / "wrong-pw"
    wrong.write_text("not-the-service-password")
    wrong.chmod(0o600)
    write_bundle(tmp_path / "roots.pem", CA.create("health roots"))
    ldap = directory.plugin_settings("ldaps", bind_password={"file": str(wrong)})
    conf = write_conf(tmp_path / "conf", {
        "gateway.yaml": json.dumps({"chain": ["client_cert", "ldap"], "throttle": {"enabled": False}}),
        "client_cert.yaml": json.dumps({"client_cert": {"ca_bundle": str(tmp_path / "roots.pem"),
                                                        "revocation": "off"}}),
        "ldap.yaml": "ldap: " + json.dumps(ldap)})
    gw = start_gateway(conf)
    ready = wait_for(lambda: (r := gw.get("/readyz")).status == 503 and r)
    assert ready.json()["reason"] == "no ready backend for password logins: ldap"
    assert gw.auth("alice", "alice-pw").status == 503
