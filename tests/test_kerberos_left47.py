"""Kerberos plugin, items left by earlier stops: a real ``authgw serve`` and a real MIT KDC
(tests/support/kdc.py).

* The replay cache across workers, tokens arriving at the same instant. The plugin's look at the
  cache's lock (``F_OFD_GETLK``) only keeps MIT's own lock wait (``F_OFD_SETLKW``, without end)
  off the event loop and the chain threads; the replay check itself is MIT's ``file2`` store,
  which reads and writes the table under that lock in one step. So a lock taken between the two
  looks makes a login wait, never a token count twice (pinned here: behaviour already right).
* Principals that are not UTF-8. MIT's principals are bytes: its KDC creates ``alice\\xff`` and
  ``alice\\xfe`` and, with ``disable_pac`` (MIT before 1.20, Heimdal, and a trusted realm's KDC,
  which names whom it likes), issues their tickets. The plugin decoded names with replacement
  characters, so both logged in as ``alice\\ufffd``, the same username and subject: two accounts,
  one identity. Now a name that is not UTF-8 is refused (``kerberos.principal_not_utf8``).
"""

from __future__ import annotations

import base64
import os
import subprocess
import threading
from pathlib import Path

import pytest

from support.gateway import GatewayProcess, write_conf
from support.kdc import KDC, _tool
from support.krbenv import INSIDE, SPN, kerberos_yaml, outcome, realm_fixture, start, tokens
from support.net import wait_for_port

realm = realm_fixture("krbleft47", "alice")


def negotiate(gateway: GatewayProcess, token: bytes, timeout: float = 30.0):
    return gateway.get("/auth", {"Authorization": "Negotiate " + base64.b64encode(token).decode()},
                       source_address=INSIDE, timeout=timeout)


# -- one token sent to two workers at the same instant logs in once ---------------------------------------


def at_once(gateway: GatewayProcess, token: bytes, copies: int) -> list:
    """*token* sent on *copies* new connections released together; the responses."""
    barrier = threading.Barrier(copies)
    responses: list = [None] * copies

    def send(i: int) -> None:
        barrier.wait(10)
        responses[i] = negotiate(gateway, token)

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(copies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return responses


@pytest.mark.parametrize("chain", ["[kerberos]", "[kerberos, static]"], ids=["event-loop", "chain-threads"])
def test_one_token_sent_to_two_workers_at_the_same_instant_logs_in_once(realm, tmp_path, demo_hash, chain):
    """Two workers (two processes, each with its own descriptor of the shared ``file2`` cache),
    the same token on four connections at once, 60 times: exactly one 200 per token, the others
    ``kerberos.replay``, and both workers took part (the request id's first 16 characters are the
    worker's). ``[kerberos]`` accepts on the event loop, ``[kerberos, static]`` on chain threads,
    several per worker at a time."""
    write_conf(tmp_path, {"users.yaml": f'users:\n  alice: {{password_hash: "{demo_hash}"}}\n'})
    gateway = start(tmp_path, realm, {
        "gateway.yaml": f"chain: {chain}\nthrottle: {{enabled: false}}\n",
        "kerberos.yaml": kerberos_yaml(realm["keytab"]),
        "static.yaml": "static: {users_file: ../users.yaml}\n",
    }, workers=2)
    try:
        workers, successes = set(), []
        for token in tokens(realm, count=60):
            responses = at_once(gateway, token, 4)
            assert all(r is not None for r in responses)
            successes.append(sum(r.status == 200 for r in responses))
            for r in responses:
                workers.add(r.header("X-Request-Id")[:16])
                if r.status != 200:
                    assert outcome(gateway, r) == (401, "invalid_credentials", "kerberos.replay")
        assert successes == [1] * 60
        assert len(workers) == 2
    finally:
        gateway.stop()


# -- principals that are not UTF-8 ---------------------------------------------------------------------------


class NoPacKDC(KDC):
    """A KDC that issues tickets without a PAC (``disable_pac``), as MIT's did before 1.20 and
    Heimdal's do. MIT 1.20 puts a PAC in every ticket and cannot write a name that is not UTF-8
    into it (``HANDLE_AUTHDATA: ... Invalid argument``), though ``addprinc`` creates one."""

    def start(self, timeout: float = 20.0) -> NoPacKDC:
        super().start(timeout)
        self.stop()
        conf = self.kdc_conf.read_text()
        self.kdc_conf.write_text(conf.replace("max_life = 10h", "max_life = 10h\n    disable_pac = true", 1))
        self._log = open(self.dir / "krb5kdc.out", "ab")
        self.proc = subprocess.Popen([_tool("krb5kdc"), "-n", "-r", self.realm], stdout=self._log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        wait_for_port("127.0.0.1", self.port, timeout=timeout, proc=self.proc)
        return self

    def add_raw_principal(self, name: bytes, password: str) -> None:
        """``addprinc`` of a name given as bytes (kadmin.local echoes it: no text decoding)."""
        query = b"addprinc -pw " + password.encode() + b" " + name + b"@" + self.realm.encode()
        proc = subprocess.run([_tool("kadmin.local"), "-r", self.realm, "-q", query], capture_output=True,
                              timeout=30, env={**os.environ, **self.env})
        assert proc.returncode == 0 and b"created" in proc.stdout, proc.stderr

    def kinit_raw(self, name: bytes, password: str, ccache: Path) -> Path:
        proc = subprocess.run([b"kinit", b"-c", b"FILE:" + os.fsencode(ccache), name + b"@" + self.realm.encode()],
                              input=password.encode() + b"\n", capture_output=True, timeout=30,
                              env={**os.environ, **self.env})
        assert proc.returncode == 0, proc.stderr
        return ccache


@pytest.fixture(scope="module")
def nopac(tmp_path_factory):
    """A realm whose KDC issues tickets to ``alice\\xff``, ``alice\\xfe`` and ``alice``, and a
    gateway with no directory (``chain: [kerberos]``): a bare identity per principal."""
    d = tmp_path_factory.mktemp("nopac")
    kdc = NoPacKDC(d / "kdc", "EXAMPLE.TEST").start()
    gateway = None
    try:
        caches = {}
        for name in (b"alice\xff", b"alice\xfe", b"alice"):
            kdc.add_raw_principal(name, "pw-raw")
            caches[name] = kdc.kinit_raw(name, "pw-raw", d / f"{name.hex()}.cc")
        keytab = kdc.add_service("HTTP/localhost", d / "http.keytab")
        gateway = start(d, {"kdc": kdc}, {"gateway.yaml": "chain: [kerberos]\nthrottle: {enabled: false}\n",
                                          "kerberos.yaml": kerberos_yaml(keytab)})
        yield kdc, caches, gateway
    finally:
        if gateway is not None:
            gateway.stop()
        kdc.stop()


@pytest.mark.parametrize("name", [b"alice\xff", b"alice\xfe"], ids=["xff", "xfe"])
def test_a_principal_that_is_not_utf8_is_refused_not_read_with_replacement_characters(nopac, name):
    """Before: both principals logged in (200) as ``alice\\ufffd``, subject
    ``kerberos:alice\\ufffd@EXAMPLE.TEST``: two accounts of the KDC, one identity. Now each is
    refused with its own reason, and the log shows its bytes."""
    kdc, caches, gateway = nopac
    token = kdc.mint(caches[name], [(SPN, 1)])[0][0]
    response = negotiate(gateway, token)
    assert outcome(gateway, response) == (401, "invalid_credentials", "kerberos.principal_not_utf8")
    assert response.header("Remote-User") is None
    escaped = name.decode("utf-8", "backslashreplace")
    assert f"the client principal {escaped}@EXAMPLE.TEST is not UTF-8" in gateway.output()


def test_a_utf8_principal_of_that_realm_still_logs_in(nopac):
    kdc, caches, gateway = nopac
    response = negotiate(gateway, kdc.mint(caches[b"alice"], [(SPN, 1)])[0][0])
    assert (response.status, response.header("Remote-User")) == (200, "alice")
