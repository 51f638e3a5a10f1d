"""The credential cache and the LDAP plugin, items left by the review of the cache's refusal
paths: real ``authgw serve`` processes in front of a real slapd (ppolicy overlay) or, for direct
bind with a userPrincipalName, tests/support/fakead.py (slapd binds DNs only).

1. A refused login under a name with no cache row (a mail, a UPN) reached the account's rows only
   through a second directory search (the refusing step's ``gateway_lookup_user``). Now the LDAP
   plugin names the entry whose bind (or whose state) the directory refused in the attempt's stash
   (:data:`gateway.REFUSED_ACCOUNT_KEY`), and the cache uses that name: the
   refusal costs the directory no second search, and
2. with ``direct_bind`` and no service account (no lookup to ask), an account disabled and
   refused under its UPN was still answered 200 from the hot cache under its sAMAccountName.
3. A link whose connection the server broke was left open (its socket, to the garbage collector):
   ldap3's ``unbind`` raises before closing when the unbind request cannot be sent.
4. An offline answer under the uid did not wait for the comparison of a password refused under
   the mail still queued (behind other refused passwords): the old password logged in offline.

Waits are bounded and wait for events, never for a time to pass.
"""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from support.cacheenv import GATEWAY_YAML, cache_conf
from support.fakead import FakeAD
from support.gateway import GatewayProcess, write_conf
from support.net import wait_for
from support.slapd import Slapd
from test_cache_left45b import OLD, TWO_NAMES, reason
from test_cache_slapd import new_user, source

HANG = 60
BASE = "DC=corp,DC=example,DC=com"
PERSON = {"objectClass": ["top", "person", "user"], "objectCategory": ["person"], "userAccountControl": ["512"]}
#: Dana's sAMAccountName is dana; her UPN is dana.jones@...: she signs in under either.
DANA = f"CN=Dana Jones,OU=Staff,{BASE}"
DANA_PASSWORD = "dana-Passw0rd"


def rows(gateway: GatewayProcess) -> int:
    with sqlite3.connect(gateway.state_dir / "cache.sqlite3") as db:
        return db.execute("SELECT count(*) FROM entries").fetchone()[0]


# -- direct bind without a service account (items 1 and 3) --------------------------------------------


@pytest.fixture
def ad():
    directory = FakeAD({DANA: {**PERSON, "sAMAccountName": ["dana"], "userPrincipalName": ["dana.jones@corp.example.com"],
                               "password": [DANA_PASSWORD], "displayName": ["Dana Jones"]}})
    yield directory
    directory.stop()


def direct_gateway(tmp_path, directory: FakeAD, start_gateway) -> GatewayProcess:
    ldap = {"preset": "active_directory", "servers": [directory.url], "insecure": True, "base_dn": BASE,
            "direct_bind": "{username}@corp.example.com", "groups": {"source": "memberof", "nested": False},
            "connect_timeout": 0.5, "receive_timeout": 1.0, "backoff": 0}
    return start_gateway(write_conf(tmp_path / "conf.d", {
        "gateway.yaml": GATEWAY_YAML,
        "ldap.yaml": "ldap: " + json.dumps(ldap),
        "cache.yaml": json.dumps({"cache": {"hot": {"enabled": True, "ttl": 600}}}),
    }))


def test_a_direct_bind_account_disabled_and_refused_under_its_upn_loses_its_rows_under_its_account_name(
        tmp_path, ad, start_gateway):
    """No service account: the plugin has no lookup, so only the refusing bind can say whose
    account the UPN is. Before, Dana (disabled, refused under ``dana.jones``) still got 200 from
    the hot cache under ``dana``, and offline once the directory was down."""
    gateway = direct_gateway(tmp_path, ad, start_gateway)
    first = gateway.auth("dana", DANA_PASSWORD)
    assert (first.status, source(first), first.header("Remote-User")) == (200, "live", "dana")
    assert source(gateway.auth("dana", DANA_PASSWORD)) == "cache"  # a hot hit
    assert rows(gateway) == 1
    ad.users[DANA]["useraccountcontrol"] = ["514"]  # disabled (this directory lets the bind through)
    refused = gateway.auth("dana.jones", DANA_PASSWORD)
    assert refused.status == 401 and reason(gateway, refused) == ("account_state", "ldap.disabled")
    again = gateway.auth("dana", DANA_PASSWORD)  # asked live again, and refused
    assert again.status == 401 and again.header("Remote-User") is None, (again.status, source(again))
    assert reason(gateway, again) == ("account_state", "ldap.disabled")
    assert rows(gateway) == 0
    ad.stop()
    offline = gateway.auth("dana", DANA_PASSWORD)
    assert offline.status == 503 and offline.header("Remote-User") is None, (offline.status, source(offline))


# -- search then bind: the refused entry is named, no second search (item 1) ---------------------------


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap"), ppolicy=True).start()
    yield server
    if server.running:
        server.stop()


def searches(directory: Slapd) -> int:
    """SEARCH operations slapd started since it started (its own monitor's, this read included)."""
    conn = directory._admin()
    try:
        _, _, entries, _ = conn.search("cn=Search,cn=Operations,cn=Monitor", "(objectClass=*)", search_scope="BASE",
                                       attributes=["monitorOpInitiated"])
        value = entries[0]["attributes"]["monitorOpInitiated"]
        return int(value[0] if isinstance(value, list) else value)
    finally:
        conn.unbind()


def slapd_gateway(tmp_path, directory: Slapd, start_gateway) -> GatewayProcess:
    # groups from memberOf: a login's only search is the user search
    return start_gateway(cache_conf(tmp_path, directory, json.dumps({"cache": {}}), user_filter=TWO_NAMES,
                                    groups={"source": "memberof"}))


def test_a_password_refused_under_the_mail_costs_the_directory_one_search_and_still_forgets(
        tmp_path, slapd, start_gateway):
    gateway = slapd_gateway(tmp_path, slapd, start_gateway)
    uid, _ = new_user(slapd, OLD)
    mail = f"{uid}@example.com"
    assert source(gateway.auth(uid, OLD)) == "live"
    assert rows(gateway) == 1
    slapd.set_password(uid, "second-Passw0rd")  # changed at the directory: the old one is refused
    before = searches(slapd)
    refused = gateway.auth(mail, OLD)
    assert refused.status == 401 and reason(gateway, refused) == ("invalid_credentials", "ldap.invalid_password")
    wait_for(lambda: rows(gateway) == 0, HANG, what="the account's offline entry forgotten",
             log=lambda: gateway.output()[-3000:])
    # The login's user search, this read's own; no lookup of the mail after the refusal.
    assert searches(slapd) - before == 2
    slapd.stop()
    try:
        offline = gateway.auth(uid, OLD)
        assert offline.status == 503 and offline.header("Remote-User") is None, (offline.status, source(offline))
    finally:
        slapd.start()


# -- a broken link is closed, not left to the garbage collector (item 5) --------------------------------


def test_a_link_whose_server_broke_the_connection_is_closed_at_once(tmp_path):
    """slapd restarted under a pooled link: the next request on it goes out, the server answers
    with a reset, and closing the link must close its socket (ldap3's unbind raised on the send
    and skipped its close, so the descriptor stayed until a garbage collection)."""
    import gc

    from gateway.plugins.ldap.link import LinkBroken
    from gateway.plugins.ldap.pool import BIND, Pool

    directory = Slapd(tmp_path / "ldap").start()
    pool = Pool([directory.url], tls=None, start_tls=False, connect_timeout=2.0, receive_timeout=2.0, backoff=0,
                pool_size=2, idle_timeout=60, service=None, log=__import__("logging").getLogger("test"))
    gc.disable()  # the socket must be closed by the link, not by a collection
    try:
        link = pool.open(pool.servers[0], BIND, time.monotonic() + 5)
        sock = link.conn.socket
        directory.stop()
        directory.start()
        with pytest.raises(LinkBroken):
            for _ in range(3):  # the first request may still go out before the reset comes back
                link.bind(directory.user_dn("nobody"), "a-password")
        link.close()
        assert link.conn.closed and sock.fileno() == -1, "the link's socket is still open"
    finally:
        gc.enable()
        pool.close()
        directory.stop()


# -- an offline answer waits for the comparison of its account's refused password --------------------


def test_an_offline_answer_waits_for_a_refusal_of_the_account_under_another_name_still_queued(
        tmp_path, slapd, start_gateway):
    """A password refused under the mail is compared with the account's entry after the answer,
    one comparison at a time. An offline answer under the uid waited only for comparisons queued
    under the uid: behind a queue of other refused passwords (anyone's wrong guesses for cached
    users), the old password, refused under the mail after a change, logged in offline under the
    uid once the directory was down (200 from the cache)."""
    from concurrent.futures import ThreadPoolExecutor

    gateway = slapd_gateway(tmp_path, slapd, start_gateway)
    uid, _ = new_user(slapd, OLD)
    others = [new_user(slapd, OLD)[0] for _ in range(12)]
    for name in [uid, *others]:
        assert source(gateway.auth(name, OLD)) == "live"
    slapd.set_password(uid, "second-Passw0rd")
    with ThreadPoolExecutor(8) as pool:  # wrong guesses for cached users: each one an argon2 comparison
        answers = list(pool.map(lambda n: gateway.auth(others[n % len(others)], f"wrong-{n}").status, range(160)))
    assert set(answers) == {401}
    refused = gateway.auth(f"{uid}@example.com", OLD)  # queued behind them
    assert refused.status == 401 and reason(gateway, refused) == ("invalid_credentials", "ldap.invalid_password")
    slapd.stop()
    try:
        offline = gateway.auth(uid, OLD)
        assert offline.status == 503 and offline.header("Remote-User") is None, (offline.status, source(offline))
    finally:
        slapd.start()
