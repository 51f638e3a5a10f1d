"""Third review of the LDAP plugin's link and pool, against a real ``authgw serve`` and slapd.

* A StartTLS answer that ldap3 cannot decode (it is plaintext: the server, or anyone on the path
  to it, writes it) raised ldap3's KeyError or IndexError out of the pool: the next server was
  never tried and every login was a plugin crash, a 401 (``internal_error``) that the throttle
  counts as a guess, while ``/readyz`` said ready. It is now that server's failure: the next
  one answers, and the first is shown down.
* The user's name was the first value of the login attribute: an entry whose ``uid`` was
  ``[admin, eve]`` (``uid`` is multi-valued: anyone who may write that user's ``uid`` can add a
  value) logged in as ``eve`` and was signed in as ``admin``, with the groups naming ``admin``
  in ``memberUid``, while ``admin`` itself matched two entries and was refused. The name is
  now the value the login named.
* A pooled link was checked for readability with select(2), which refuses a descriptor from
  1024 on: in a worker holding a thousand client connections (``max_connections`` is 4096,
  the shipped unit's ``LimitNOFILE`` 65536) every pooled link looked dead, and each login opened
  new directory connections (TCP, TLS, a service bind) instead of reusing one.

The broken server here is a few lines of Python on 127.0.0.1; the directory is slapd.
"""

from __future__ import annotations

import json
import logging
import resource
import socket
import threading

import ldap3
import pytest

from gateway.plugins.ldap import LdapPlugin
from gateway.registry import PluginContext
from gateway.settings import GatewaySettings
from support.gateway import GatewayProcess, write_conf
from support.pki import CA
from support.slapd import Slapd

PASSWORD = "alice-pw"
#: Client connections held open on the gateway, enough to put its next descriptors past 1024.
HELD = 1100


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    slapd = Slapd(tmp_path_factory.mktemp("review3") / "slapd", tls=CA.create()).start()
    slapd.add_user("alice", PASSWORD, cn="Alice Liddell", groups=["staff"])
    slapd.add_user("admin", "admin-pw", cn="The Administrator")
    slapd.add_user("eve", "eve-pw", cn="Eve", groups=["staff"])
    slapd.modify(slapd.user_dn("eve"), {"uid": [(ldap3.MODIFY_REPLACE, ["admin", "eve"])]})
    slapd.add_entry(f"cn=wheel,{slapd.groups_dn}", {"objectClass": ["top", "posixGroup"], "cn": "wheel",
                                                     "gidNumber": "10", "memberUid": ["admin"]})
    yield slapd
    slapd.stop()


@pytest.fixture
def start(tmp_path):
    started: list[GatewayProcess] = []

    def run(ldap: dict, **core) -> GatewayProcess:
        settings = {"chain": ["ldap"], "throttle": {"enabled": False}, "health": {"probe_interval": 3600}, **core}
        conf = write_conf(tmp_path / f"conf{len(started)}", {"gateway.yaml": json.dumps(settings),
                                                             "ldap.yaml": "ldap: " + json.dumps(ldap)})
        gateway = GatewayProcess(conf, tmp_path / f"state{len(started)}")
        started.append(gateway)
        return gateway.start()

    yield run
    for gateway in started:
        gateway.stop()


class GarbledStartTLS:
    """Answers the StartTLS request (the first thing a client sends) with a message ldap3's
    decoder cannot read, then hangs up: an ExtendedResponse whose content is three 0xFF octets,
    a tag of the multi-byte form, inside a well-formed LDAPMessage."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    request = conn.recv(65536)
                    # LDAPMessage { messageID (the request's, short form), [APPLICATION 23] ... }
                    if len(request) > 4 and request[0] == 0x30 and request[2] == 0x02 and request[3] == 1:
                        conn.sendall(b"\x30\x08\x02\x01" + request[4:5] + b"\x78\x03\xff\xff\xff")
                        self.answered += 1
                        conn.recv(65536)  # until the client hangs up
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()


def test_a_starttls_answer_ldap3_cannot_read_is_that_servers_failure_and_the_next_one_answers(start, directory):
    garbled = GarbledStartTLS()
    try:
        settings = directory.plugin_settings("starttls", connect_timeout=2.0, receive_timeout=2.0)
        settings["servers"] = [f"ldap://localhost:{garbled.port}", directory.starttls_url]
        gateway = start(settings)
        for _ in range(3):
            response = gateway.auth("alice", PASSWORD)
            line = gateway.audit_for(response.header("X-Request-Id"))
            assert (response.status, line["outcome"], line["reason"]) == (200, "success", ""), line
            assert response.header("Remote-User") == "alice"
        assert garbled.answered >= 1  # the broken answer was read, and not taken for a crash
        ready = json.loads(gateway.get("/readyz").body)
        states = {c["name"]: c for c in ready["components"]}
        first = states[f"ldap.server[ldap://localhost:{garbled.port}]"]
        assert not first["ready"] and "could not read" in first["detail"], first
        assert states[f"ldap.server[{directory.starttls_url}]"]["ready"]
        assert "Traceback" not in gateway.output()
    finally:
        garbled.stop()


def test_a_lone_server_whose_starttls_answer_cannot_be_read_is_unavailable_not_a_crash(start, directory):
    garbled = GarbledStartTLS()
    try:
        settings = directory.plugin_settings("starttls", connect_timeout=2.0, receive_timeout=2.0)
        settings["servers"] = [f"ldap://localhost:{garbled.port}"]
        gateway = start(settings)
        response = gateway.auth("alice", PASSWORD)
        line = gateway.audit_for(response.header("X-Request-Id"))
        assert (response.status, line["outcome"], line["reason"]) == (503, "unavailable", "ldap.unavailable"), line
        assert gateway.get("/readyz").status == 503
        assert "Traceback" not in gateway.output()
    finally:
        garbled.stop()


def _hold_connections(gateway: GatewayProcess, count: int) -> list[socket.socket]:
    """*count* keep-alive connections to the gateway, each idle after one answered request."""
    held = []
    request = f"GET /healthz HTTP/1.1\r\nHost: {gateway.host}\r\n\r\n".encode()
    try:
        for _ in range(count):
            sock = socket.create_connection((gateway.host, gateway.port), timeout=10)
            held.append(sock)
            sock.sendall(request)
        for sock in held:
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(4096)
                assert chunk, "the gateway closed a held connection"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return held


@pytest.fixture
def descriptors():
    """Room for the held connections in this process and the gateway (which inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * HELD
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"the descriptor limit ({hard}) leaves no room for {HELD} held connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("mode", ["plain", "ldaps"])
def test_pooled_links_are_reused_when_the_worker_holds_a_thousand_client_connections(start, directory, descriptors,
                                                                                      mode):
    gateway = start(directory.plugin_settings(mode), limits={"max_connections_per_client": 4 * HELD})
    held = _hold_connections(gateway, HELD)
    try:
        before = directory.connection_count()
        for _ in range(6):
            response = gateway.auth("alice", PASSWORD)
            assert response.status == 200, response.body
        opened = directory.connection_count() - before
        # One service link and one bind link, opened by the first login and pooled; the old
        # check took every link of a descriptor past 1024 for dead: a new one or more each login.
        assert opened <= 2, f"{opened} directory connections for 6 logins"
    finally:
        for sock in held:
            sock.close()


def test_a_second_login_name_in_an_entry_does_not_sign_its_user_in_as_another(start, directory, tmp_path):
    gateway = start(directory.plugin_settings("plain"))
    for typed in ("eve", "EVE"):
        response = gateway.auth(typed, "eve-pw")
        assert response.status == 200, response.body
        assert response.header("Remote-User") == "eve"
        assert response.header("Remote-Groups") == "staff"  # not wheel, which names admin
    # "admin" is two entries' name: nobody logs in with it, the administrator included.
    line = gateway.audit_for(gateway.auth("admin", "admin-pw").header("X-Request-Id"))
    assert (line["outcome"], line["reason"]) == ("invalid_credentials", "ldap.ambiguous_user")
    # A lookup (Kerberos, certificates) names the user as the lookup did.
    context = PluginContext(name="ldap", config_dir=tmp_path, state_dir=tmp_path,
                            gateway=GatewaySettings(chain=["ldap"]), hook=None,  # type: ignore[arg-type]
                            log=logging.getLogger("test.ldap"))
    plugin = LdapPlugin(LdapPlugin.Settings.model_validate(directory.plugin_settings("plain")), context)
    try:
        identity = plugin.gateway_lookup_user("eve")
        assert identity is not None and (identity.username, identity.groups) == ("eve", ("staff",))
    finally:
        plugin.gateway_shutdown()
