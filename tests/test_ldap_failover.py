"""Directory trouble, through a real ``authgw serve`` and ``/auth``: a killed slapd gives 503
(UNAVAILABLE, never "wrong password"), a restarted one is used again without restarting the
gateway, idle pooled connections the server dropped are replaced, a dead or hung first server
is skipped for the next one, and the readiness report says which server is active.
"""

from __future__ import annotations

import json
import socket

import pytest

from support.gateway import GatewayProcess, write_conf
from support.net import free_port
from support.pki import CA
from support.slapd import Slapd

PASSWORD = "carol-pw"


@pytest.fixture(scope="module")
def directory(tmp_path_factory) -> Slapd:
    slapd = Slapd(tmp_path_factory.mktemp("ldap") / "slapd", tls=CA.create()).start()
    slapd.add_user("carol", PASSWORD, cn="Carol", mail="carol@example.com", groups=["ops"])
    yield slapd
    slapd.stop()


@pytest.fixture
def running(directory) -> Slapd:
    """The directory, running at the start and at the end of the test whatever it did."""
    directory.start()
    yield directory
    directory.start()


@pytest.fixture
def gateway(tmp_path):
    started: list[GatewayProcess] = []

    def start(ldap: dict) -> GatewayProcess:
        conf = write_conf(tmp_path / f"conf{len(started)}", {
            "gateway.yaml": json.dumps({"chain": ["ldap"], "throttle": {"enabled": False}}),
            "ldap.yaml": "ldap: " + json.dumps(ldap)})
        process = GatewayProcess(conf, tmp_path / f"state{len(started)}")
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


def ldap_components(gateway: GatewayProcess) -> tuple[int, dict[str, dict]]:
    response = gateway.get("/readyz")
    return response.status, {c["name"]: c for c in response.json()["components"] if c["name"].startswith("ldap.")}


def test_killed_directory_gives_503_and_its_restart_is_used_without_restarting_the_gateway(running, gateway) -> None:
    # backoff 300 s: the restarted directory must be used at once, not after its back-off,
    # because it is the only server there is.
    gw = gateway(running.plugin_settings("ldaps", backoff=300, connect_timeout=1.0))
    assert gw.auth("carol", PASSWORD).status == 200

    running.kill()
    for _ in range(3):
        response = gw.auth("carol", PASSWORD)
        assert response.status == 503
        assert response.header("Retry-After")
        line = gw.audit_for(response.header("X-Request-Id"))
        assert (line["outcome"], line["reason"], line["step"]) == ("unavailable", "ldap.unavailable", "ldap")
    status, components = ldap_components(gw)
    assert status == 503
    (state,) = components.values()
    assert not state["ready"] and "backing off" in state["detail"]

    running.restart()
    response = gw.auth("carol", PASSWORD)
    assert response.status == 200
    assert response.header("Remote-Groups") == "ops"
    status, components = ldap_components(gw)
    assert status == 200 and [c["detail"] for c in components.values()] == ["active"]
    assert "carol-pw" not in gw.output()


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_pooled_connections_the_server_dropped_are_replaced(running, gateway, how) -> None:
    gw = gateway(running.plugin_settings("ldaps"))
    assert gw.auth("carol", PASSWORD).status == 200  # the pool now holds idle links
    getattr(running, how)()
    running.start()
    # No request saw the directory down: the very next login must work on the first try.
    response = gw.auth("carol", PASSWORD)
    assert response.status == 200, gw.output()
    assert running.connection_count() >= 2  # new service and bind connections were opened


def test_first_server_down_the_second_answers(running, gateway) -> None:
    closed = f"ldaps://localhost:{free_port()}"
    gw = gateway(running.plugin_settings("ldaps", servers=[closed, running.ldaps_url], connect_timeout=1.0))
    for _ in range(3):
        assert gw.auth("carol", PASSWORD).status == 200
        assert gw.auth("carol", "wrong").status == 401
    status, components = ldap_components(gw)
    assert status == 200
    first, second = components[f"ldap.server[{closed}]"], components[f"ldap.server[{running.ldaps_url}]"]
    assert not first["ready"] and "backing off" in first["detail"]
    assert second == {"name": f"ldap.server[{running.ldaps_url}]", "ready": True, "detail": "active"}


def test_a_hung_first_server_times_out_and_the_next_one_answers(running, gateway) -> None:
    """A server that accepts TCP but never answers: ldap3's ServerPool would wait on it forever
    (or fail); the plugin's receive timeout moves on to the next server."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)  # the kernel completes handshakes; nobody ever reads
    try:
        url = f"ldap://127.0.0.1:{hung.getsockname()[1]}"
        gw = gateway(running.plugin_settings("plain", servers=[url, running.url], receive_timeout=0.5,
                                             connect_timeout=0.5))
        response = gw.auth("carol", PASSWORD)
        assert response.status == 200
        status, components = ldap_components(gw)
        assert not components[f"ldap.server[{url}]"]["ready"]
        assert "timed out" in components[f"ldap.server[{url}]"]["detail"]
        assert components[f"ldap.server[{running.url}]"]["detail"] == "active"
        # Back-off: the next logins go straight to the live server.
        assert gw.auth("carol", PASSWORD).status == 200
    finally:
        hung.close()
