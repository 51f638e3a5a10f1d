"""Items left by earlier reviews of the LDAP plugin, against a real slapd and a real ``authgw serve``.

* An entry found by another attribute (its mail) whose login attribute has several values was
  signed in as the first of them: ``uid: [boss, eve]`` logged in by mail as ``boss``. Now refused
  (``ldap.ambiguous_user``): the directory's order of values is no rule, and nothing tells which
  of its names the user is.
* A uid with white space at an end (``admin ``, never signed in: no header can carry it) matches
  ``(uid=admin)`` too, and the administrator was refused as ambiguous. Several matches are now
  narrowed to the entries one of whose login names is the typed one in its one spelling
  (``gateway.model``: canonical, case folded); exactly one left is the user, else refused.
* A server answering a search with continuation references without end was read until the
  answer's time ran out; now it is dropped after a bounded number (and bytes) of them.
* A connect (StartTLS) timeout that only the attempt's deadline cut short took a healthy server
  out of rotation for ``backoff`` seconds; only a connect given its full time does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time

import ldap3
import pytest

from gateway.plugins.ldap import LdapPlugin
from gateway.plugins.ldap.pool import SERVICE, DirectoryUnavailable, Pool
from gateway.registry import PluginContext
from gateway.settings import GatewaySettings
from support.der import der
from support.gateway import GatewayProcess, write_conf
from support.hostile_ldap import LdapMessageServer, message, result
from support.ldapgw import api_login, ldap_gateways
from support.pki import CA
from support.slapd import Slapd

TOKEN = "left45-token"
BY_UID_OR_MAIL = "(&(objectClass=inetOrgPerson)(|(uid={username})(mail={username})))"
PERSON = ["top", "person", "organizationalPerson", "inetOrgPerson"]


@pytest.fixture(scope="module")
def directory(tmp_path_factory) -> Slapd:
    slapd = Slapd(tmp_path_factory.mktemp("ldap") / "slapd", tls=CA.create()).start()
    slapd.add_user("admin", "admin-pw", cn="Admin", mail="admin@example.com", groups=["wheel"])
    slapd.add_user("alice", "alice-pw", cn="Alice", mail="alice@example.com", groups=["staff"])
    # Two login names in one entry, found by its mail.
    slapd.add_entry(f"uid=eve,{slapd.users_dn}", {"objectClass": PERSON, "uid": ["boss", "eve"], "cn": "Eve",
                                                 "sn": "Eve", "mail": "eve@example.com", "userPassword": "eve-pw"})
    # Entries anyone allowed to create entries could add: each matches (uid=admin).
    for cn, uid in (("mallory", "admin "), ("trudy", " admin")):
        slapd.add_entry(f"cn={cn},{slapd.users_dn}", {"objectClass": PERSON, "uid": uid, "cn": cn, "sn": cn,
                                                     "mail": f"{cn}@example.com", "userPassword": f"{cn}-pw"})
    yield slapd
    slapd.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, directory) -> GatewayProcess:
    starts = ldap_gateways(tmp_path_factory.mktemp("gw"), TOKEN)
    start = next(starts)
    yield start(directory.plugin_settings("plain", user_filter=BY_UID_OR_MAIL))
    starts.close()


@pytest.fixture
def plugin(tmp_path, directory):
    context = PluginContext(name="ldap", config_dir=tmp_path, state_dir=tmp_path,
                            gateway=GatewaySettings(chain=["ldap"]), hook=None,  # type: ignore[arg-type]
                            log=logging.getLogger("test.ldap"))
    settings = directory.plugin_settings("plain", user_filter=BY_UID_OR_MAIL)
    made = LdapPlugin(LdapPlugin.Settings.model_validate(settings), context)
    yield made
    made.gateway_shutdown()


def _reason(gateway: GatewayProcess, username: str, password: str) -> tuple[str, str]:
    status, body = api_login(gateway, TOKEN, username, password)
    assert status == 200, body
    return body["outcome"], body["reason"]


# -- several login names, the entry found by another attribute -------------------------------------


def test_an_entry_found_by_its_mail_with_several_login_names_is_not_signed_in_as_the_first(gateway, plugin):
    response = gateway.auth("eve@example.com", "eve-pw")
    assert response.status == 401, (response.status, response.header("Remote-User"))
    assert response.header("Remote-User") is None
    assert _reason(gateway, "eve@example.com", "eve-pw") == ("invalid_credentials", "ldap.ambiguous_user")
    assert plugin.gateway_lookup_user("eve@example.com") is None
    assert plugin.gateway_list_groups("eve@example.com") is None
    # Typed, each of its names is the one signed in (as before).
    for typed, name in (("eve", "eve"), ("EVE", "eve"), ("boss", "boss")):
        response = gateway.auth(typed, "eve-pw")
        assert (response.status, response.header("Remote-User")) == (200, name)
    # One login name: the entry found by its mail signs in under it.
    response = gateway.auth("alice@example.com", "alice-pw")
    assert (response.status, response.header("Remote-User"), response.header("Remote-Groups")) == (200, "alice", "staff")


# -- an entry whose login name has white space at an end -------------------------------------------


def test_entries_whose_uid_has_white_space_at_an_end_do_not_lock_the_user_out(gateway, directory, plugin):
    response = gateway.auth("admin", "admin-pw")
    assert response.status == 200, gateway.audit_for(response.header("X-Request-Id"))
    assert (response.header("Remote-User"), response.header("Remote-Groups")) == ("admin", "wheel")
    identity = plugin.gateway_lookup_user("admin")
    assert identity is not None and (identity.username, identity.claims["dn"]) == ("admin", directory.user_dn("admin"))
    assert plugin.gateway_list_groups("admin") == ["wheel"]
    # Never a false accept: the other entries' passwords do not open the administrator's.
    for password in ("mallory-pw", "trudy-pw"):
        assert _reason(gateway, "admin", password) == ("invalid_credentials", "ldap.invalid_password")
    # A spelling another entry really has (case) is still two users: refused, whoever types it.
    other = directory.add_entry(f"cn=oscar,{directory.users_dn}", {
        "objectClass": PERSON, "uid": "ADMIN", "cn": "oscar", "sn": "oscar", "userPassword": "oscar-pw"})
    try:
        for typed, password in (("admin", "admin-pw"), ("ADMIN", "oscar-pw")):
            assert _reason(gateway, typed, password) == ("invalid_credentials", "ldap.ambiguous_user")
        assert plugin.gateway_lookup_user("admin") is None
    finally:
        directory.delete(other)
    assert gateway.auth("admin", "admin-pw").status == 200


# -- continuation references without end ------------------------------------------------------------


class ReferringDirectory(LdapMessageServer):
    """Answers binds with success and every search with SearchResultReference messages (RFC 4511
    section 4.5.3) and nothing else: *size* bytes of URI each, at most *cap* bytes in all, then
    silence with the connection open."""

    def __init__(self, size: int, cap: int = 24 * 1024 * 1024) -> None:
        super().__init__()
        self.size, self.cap = size, cap
        self.searched = threading.Event()

    async def answer(self, writer, message_id: bytes, op: int) -> bool:
        if op == 0x60:  # bind
            writer.write(message(message_id, result(0x61)))
        elif op == 0x63:  # search
            uri = b"ldap://elsewhere.example/dc=example,dc=com??sub?" + b"x" * self.size
            reference = message(message_id, der(0x73, der(0x04, uri)))
            self.searched.set()
            chunk = reference * max(1, 65536 // len(reference))
            for _ in range(self.cap // len(chunk) + 1):
                writer.write(chunk)
                await writer.drain()
            await asyncio.sleep(120)
        elif op == 0x42:  # unbind
            return False
        return True


@pytest.mark.parametrize("size", [0, 60_000], ids=["many-small", "few-large"])
def test_a_flood_of_continuation_references_fails_that_server_and_the_next_one_answers(tmp_path, directory, size):
    hostile = ReferringDirectory(size).start()
    core = {"chain": ["ldap"], "throttle": {"enabled": False}, "health": {"probe_interval": 3600}, "deadline": 20.0}
    ldap = directory.plugin_settings("plain", servers=[f"ldap://127.0.0.1:{hostile.port}", directory.url],
                                     receive_timeout=10.0)
    conf = write_conf(tmp_path / "conf.d", {"gateway.yaml": json.dumps(core), "ldap.yaml": "ldap: " + json.dumps(ldap)})
    gw = GatewayProcess(conf, tmp_path / "state")
    try:
        gw.start()
        response = gw.auth("alice", "alice-pw", timeout=60)
        assert hostile.searched.is_set()
        assert (response.status, response.header("Remote-User")) == (200, "alice"), gw.output()[-3000:]
        output = gw.output()
        assert "continuation references" in output, output[-3000:]
        assert "timed out" not in output, output[-3000:]
        assert "Traceback" not in output
        assert gw.get("/healthz", timeout=30).status == 200
    finally:
        gw.stop()
        hostile.stop()


# -- a connect cut short by the attempt's deadline ----------------------------------------------------


class HoldingProxy:
    """A TCP relay to *target* that holds the next connection's bytes for ``hold`` seconds
    before relaying them (a server slow to answer once), the others at once."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.hold = 0.0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                hold, self.hold = self.hold, 0.0
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, hold), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, 0.0), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, hold: float) -> None:
        time.sleep(hold)
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets:
                sock.close()


def test_a_starttls_cut_short_by_the_attempts_deadline_leaves_the_server_in_rotation(directory):
    proxy = HoldingProxy(("127.0.0.1", directory.port))
    tls = ldap3.Tls(validate=__import__("ssl").CERT_REQUIRED, ca_certs_file=str(directory.ca_file))
    pool = Pool([f"ldap://{directory.hostname}:{proxy.port}"], tls=tls, start_tls=True, connect_timeout=1.5,
                receive_timeout=2.5, backoff=30.0, pool_size=2, idle_timeout=60.0,
                service=(directory.service_dn, directory.service_password), log=logging.getLogger("test.ldap.pool"))
    try:
        def search(link):
            result, entries, _ = link.search(directory.base_dn, "(uid=alice)", ["uid"], size_limit=2)
            return result.code, [entry.dn for entry in entries]

        # The StartTLS answer is held 1 s; the attempt has 0.4 s left: its deadline ends the wait.
        proxy.hold = 1.0
        with pytest.raises(DirectoryUnavailable) as raised:
            pool.call(SERVICE, search, time.monotonic() + 0.4)
        assert raised.value.reason == "ldap.timeout"
        [(server, state, ready)] = pool.snapshot()
        assert ready, state
        assert server.failures == 0 and server.down_until == 0.0
        assert pool.call(SERVICE, search, time.monotonic() + 5) == (0, [directory.user_dn("alice")])
        # Given its full time, a server that does not answer StartTLS is out of rotation.
        pool.close()
        proxy.hold = 4.0
        with pytest.raises(DirectoryUnavailable):
            pool.call(SERVICE, search, time.monotonic() + 10)
        [(server, state, ready)] = pool.snapshot()
        assert not ready and "backing off" in state, state
    finally:
        pool.close()
        proxy.close()
