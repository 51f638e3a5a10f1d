"""Second review of the kerberos plugin: what MIT does with its files while a worker waits, and
what a client can make it write. Real MIT KDC (tests/support/kdc.py), real ``authgw serve``.

* ``live``: ``chain: [kerberos]`` and nothing answering ``gateway_lookup_user``, so every login
  runs on the worker's event loop (gateway/aio.py, ``loop_capable``). MIT's ``file2`` replay
  cache waits without end for its lock (``F_OFD_SETLKW``) and reads a FIFO for ever; there, a
  lock another process kept, or a FIFO at the replay cache's or the keytab's path, froze the
  whole worker, ``/healthz`` too. Now the login waits parked until its deadline, then 503.
* ``directory``: ``chain: [kerberos, static]``, two workers: account state, replays across
  workers and across a restart (behaviour already right, pinned here).
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from support.der import der
from support.gateway import GatewayProcess, write_conf
from support.krbenv import (INSIDE, KRB5_OID, SPNEGO_OID, kerberos_yaml, outcome, plugin_lines, realm_fixture, start,
                            tokens)

MS_KRB5_OID = bytes.fromhex("06092a864882f712010202")

# Holds a POSIX (fcntl) write lock on argv[1], as another process of the host might, until
# killed (at most a minute: the test stays bounded even if it is never killed).
LOCKER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(60)
""")

realm = realm_fixture("krbreview2", "alice", "bob", "alice/admin")


@pytest.fixture
def live(realm, tmp_path):
    """A worker deciding Negotiate logins on its event loop, with a keytab of its own (a test
    replaces it) and its replay cache at a known path."""
    keytab = tmp_path / "http.keytab"
    keytab.write_bytes(realm["keytab"].read_bytes())
    keytab.chmod(0o600)
    rcache = tmp_path / "rcache" / "replay.rcache2"
    gateway = start(tmp_path, realm, {
        "gateway.yaml": "chain: [kerberos]\nthrottle: {enabled: false}\n",
        "kerberos.yaml": kerberos_yaml(keytab, f"  replay_cache: {rcache}\n"),
    })
    yield gateway, keytab, rcache
    gateway.stop()


def negotiate(gateway: GatewayProcess, token: bytes, timeout: float = 15.0):
    return gateway.get("/auth", {"Authorization": "Negotiate " + base64.b64encode(token).decode()},
                       source_address=INSIDE, timeout=timeout)


def healthz(gateway: GatewayProcess) -> int:
    """``/healthz``, given 15 s: a worker whose loop is blocked does not answer at all."""
    try:
        return gateway.get("/healthz", timeout=15).status
    except TimeoutError:
        return 0


class Login(threading.Thread):
    """One Negotiate login sent from a thread, so the test can ask ``/healthz`` meanwhile."""

    def __init__(self, gateway: GatewayProcess, token: bytes) -> None:
        super().__init__(daemon=True)
        self.gateway, self.token = gateway, token
        self.response = self.error = None
        self.start()

    def run(self) -> None:
        try:
            self.response = negotiate(self.gateway, self.token, timeout=40)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def answered_while_waiting(gateway: GatewayProcess, login: Login) -> None:
    """``/healthz`` answers, again and again, for as long as *login* waits (a worker whose loop
    is blocked does not answer at all; asking until the login ends needs no guess of when it
    reached the worker)."""
    while login.is_alive():
        assert healthz(gateway) == 200
    login.join()


# -- the event loop never waits on MIT's files ----------------------------------------------------------


def test_a_replay_cache_locked_by_another_process_does_not_freeze_the_worker(realm, live):
    """Before: ``/healthz`` got no answer until the other process let go of its lock (observed:
    24 s for a 25 s lock), and the login waited as long. Now the worker answers meanwhile, the
    login is ``replay_cache_unavailable`` (503) at its deadline, and logins work again after."""
    gateway, _keytab, rcache = live
    first, waiting, after = tokens(realm, count=3)
    assert negotiate(gateway, first).status == 200  # MIT creates the cache
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(rcache)], stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        login = Login(gateway, waiting)
        answered_while_waiting(gateway, login)
        assert login.error is None and login.response is not None, login.error
        assert outcome(gateway, login.response) == (503, "unavailable", "kerberos.replay_cache_unavailable")
        assert "locked by another process" in gateway.output()
    finally:
        locker.kill()
        locker.wait(10)
    response = negotiate(gateway, after)
    assert (response.status, response.header("Remote-User")) == (200, "alice")


def test_a_fifo_at_the_replay_caches_path_is_unavailable_not_a_hang(realm, live, tmp_path):
    """MIT opens the cache and reads it: a FIFO there is read for ever. Before: the login and
    ``/healthz`` got no answer. Now: 503 ``replay_cache_unavailable``; repaired, logins work;
    and a gateway does not start with a FIFO there."""
    gateway, keytab, rcache = live
    first, blocked, after = tokens(realm, count=3)
    assert negotiate(gateway, first).status == 200
    rcache.rename(rcache.with_suffix(".kept"))
    os.mkfifo(rcache)
    login = Login(gateway, blocked)
    answered_while_waiting(gateway, login)
    assert login.error is None and login.response is not None, login.error
    assert outcome(gateway, login.response) == (503, "unavailable", "kerberos.replay_cache_unavailable")
    other = GatewayProcess(gateway.conf_dir, tmp_path / "state-other", env=realm["kdc"].env)
    with pytest.raises((RuntimeError, TimeoutError)):
        other.start(timeout=20)
    other.stop()
    assert "is not a regular file" in other.output()
    rcache.unlink()
    rcache.with_suffix(".kept").rename(rcache)
    assert negotiate(gateway, after).status == 200


def test_a_fifo_at_the_keytabs_path_is_unavailable_not_a_hang(realm, live):
    """The keytab is re-read when it changes: a FIFO put there blocked that read's open, on the
    loop the whole worker. Now: 503 ``keytab_unavailable``, and logins work once it is back."""
    gateway, keytab, _rcache = live
    blocked, after = tokens(realm, count=2)
    keytab.rename(keytab.with_suffix(".kept"))
    os.mkfifo(keytab)
    login = Login(gateway, blocked)
    answered_while_waiting(gateway, login)
    assert login.error is None and login.response is not None, login.error
    assert outcome(gateway, login.response) == (503, "unavailable", "kerberos.keytab_unavailable")
    keytab.unlink()
    keytab.with_suffix(".kept").rename(keytab)
    assert negotiate(gateway, after).status == 200


# -- what a client can make the plugin write ---------------------------------------------------------------


@pytest.mark.parametrize("shape", ["long-oid", "many-mechanisms"])
def test_a_clients_mechanism_oids_do_not_fill_the_log(live, shape):
    """A 5.5 KB token naming one OID of 5,500 one-octet arcs, or SPNEGO listing 500 mechanisms:
    before, the refusal's info line quoted them all (24 KB per request for the first). Now the
    line stays short, and the refusal is the same kind."""
    gateway, _keytab, _rcache = live
    if shape == "long-oid":
        token = der(0x60, der(0x06, b"\x2a" + b"\x7f" * 5500) + b"\x01\x00")
        reasons = {"kerberos.malformed_token", "kerberos.unsupported_mechanism"}
    else:
        token = der(0x60, SPNEGO_OID + der(0xA0, der(0x30, der(0xA0, der(0x30, bytes.fromhex("0603550403") * 500))
                                                           + der(0xA2, der(0x04, b"x")))))
        reasons = {"kerberos.unsupported_mechanism"}
    response = negotiate(gateway, token)
    status, result, reason = outcome(gateway, response)
    assert (status, result) == (401, "invalid_credentials") and reason in reasons
    (line,) = plugin_lines(gateway, response)
    assert len(line) < 1000, f"{len(line)} characters: {line[:300]}..."


# -- already right, pinned ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def directory(realm, tmp_path_factory, demo_hash):
    base = tmp_path_factory.mktemp("directory")
    files = {
        "gateway.yaml": "chain: [kerberos, static]\nthrottle: {enabled: false}\n",
        "kerberos.yaml": kerberos_yaml(realm["keytab"]),
        "static.yaml": "static: {users_file: ../users.yaml}\n",
    }
    write_conf(base, {"users.yaml": f"""
        users:
          alice: {{password_hash: "{demo_hash}"}}
          bob: {{password_hash: "{demo_hash}", disabled: true}}
        """})
    gateway = start(base, realm, files, workers=2)
    yield gateway
    gateway.stop()


def test_a_valid_ticket_of_a_disabled_account_is_refused(realm, directory):
    response = negotiate(directory, tokens(realm, "bob")[0])
    assert outcome(directory, response) == (401, "account_state", "static.disabled")
    assert response.header("Remote-User") is None and response.header("WWW-Authenticate") is not None
    assert "Negotiate oY" not in " ".join(response.all("WWW-Authenticate")), "no mutual-auth answer on a refusal"


def test_an_instance_principal_is_not_its_user(realm, directory):
    response = negotiate(directory, tokens(realm, "alice/admin")[0])
    assert outcome(directory, response) == (401, "invalid_credentials", "kerberos.principal_not_mapped")


def kerberos_token_in(spnego: bytes) -> bytes:
    """The RFC 4121 token that ends a NegTokenInit (its mechToken, the last field)."""
    body = spnego.rindex(KRB5_OID + b"\x01\x00")
    start = next(i for i in range(body - 2, body - 6, -1) if spnego[i] == 0x60 and der(0x60, spnego[body:]) == spnego[i:])
    return spnego[start:]


def test_one_ap_req_in_any_wrapping_on_any_worker_logs_in_once(realm, directory):
    """SPNEGO, then the same AP-REQ bare, under Microsoft's OID, and in SPNEGO again, each on a
    new connection (two workers share one replay cache): one login in all."""
    token = tokens(realm)[0]
    assert negotiate(directory, token).status == 200
    inner = kerberos_token_in(token)
    ms = inner.replace(KRB5_OID, MS_KRB5_OID, 1)
    rewrapped = der(0x60, SPNEGO_OID + der(0xA0, der(0x30, der(0xA0, der(0x30, MS_KRB5_OID + KRB5_OID))
                                                    + der(0xA2, der(0x04, ms)))))
    for again in [token, inner, ms, rewrapped] * 2:
        response = negotiate(directory, again)
        assert response.status == 401 and response.header("Remote-User") is None
        assert outcome(directory, response)[1] == "invalid_credentials"


def test_a_token_spent_before_a_restart_is_a_replay_after_it(realm, directory):
    spent, fresh = tokens(realm, count=2)
    assert negotiate(directory, spent).status == 200
    directory.stop()
    directory.start()
    assert outcome(directory, negotiate(directory, spent)) == (401, "invalid_credentials", "kerberos.replay")
    assert negotiate(directory, fresh).status == 200
