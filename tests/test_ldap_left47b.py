"""LDAP plugin and credential cache follow-ups of the last review, each through a real ``authgw
serve``:

1. ``allow_expired_password`` / ``allow_must_change_password`` let a bind Active Directory refused
   (49, ``data 532`` / ``data 773``) through on the search-then-bind path, after which the
   entry's state was judged from what the service account read. An entry read without
   ``userAccountControl`` (an ACL hides it) passed for enabled, so a disabled account that AD
   answered 532 or 773 for (its order of checks is not documented) signed in. Played by
   tests/support/fakead.py with a service account that cannot read ``userAccountControl``.
2. With ``direct_bind`` and no service account, the LDAP plugin answers every lookup ``None``: it
   cannot search. The credential cache took that for "no directory knows the user" and forgot
   the offline row (and hot entries) of the user on each Kerberos login (with
   ``require_directory_user: false``), certificate lookup or login session recheck. Real slapd
   and MIT KDC.
3. A grace login (slapd's ppolicy ``pwdGraceAuthNLimit``: an expired password bound once more,
   the control saying ``graceAuthNsRemaining``) was remembered like any success: the hot cache
   repeated it without a bind, past the limit, and the offline cache answered the expired
   password for ``max_age``. Real slapd with ppolicy.

Waits are bounded and wait for events, never for a time to pass.
"""

from __future__ import annotations

import itertools
import json
import sqlite3

import ldap3
import pytest

from support.cacheenv import GATEWAY_YAML, cache_conf, slapd_fixture, source
from support.fakead import FakeAD
from support.gateway import GatewayProcess, write_conf
from support.threedoors import SPN, by_kerberos, by_password, start_three_door_gateway, three_door_world
from test_cache_left45b import reason

BASE = "DC=corp,DC=example,DC=com"
PERSON = {"objectClass": ["top", "person", "user"], "objectCategory": ["person"]}
SERVICE = f"CN=svc-authgw,OU=Service,{BASE}"
SERVICE_PASSWORD = "svc-Passw0rd"
#: Dana's account is disabled (514); AD answers her right password with the test's code.
DANA = f"CN=Dana Jones,OU=Staff,{BASE}"
#: Erin's account is enabled (512); her password expired (532) or must change (773).
ERIN = f"CN=Erin Smith,OU=Staff,{BASE}"
PASSWORD = "right-Passw0rd"
RELAX = "1.3.6.1.4.1.4203.666.5.12"  # lets the rootdn set pwdChangedTime (NO-USER-MODIFICATION)


def rows(gateway: GatewayProcess) -> int:
    with sqlite3.connect(gateway.state_dir / "cache.sqlite3") as db:
        return db.execute("SELECT count(*) FROM entries").fetchone()[0]


# -- 1. an account state the service account cannot read, on a bind let through ------------------


class HidingAD(FakeAD):
    """A FakeAD whose service account reads user entries without ``userAccountControl`` (an ACL
    on the attribute, as a hardened domain may have); a user reads their own entry whole."""

    def __init__(self, *args, hide: bool = True, **kwargs) -> None:
        self.hide = hide
        super().__init__(*args, **kwargs)

    def _search(self, bound, request):
        found, code = super()._search(bound, request)
        if self.hide and bound is not None and bound.lower() == SERVICE.lower():
            found = [(dn, {k: v for k, v in attrs.items() if k != "useraccountcontrol"}) for dn, attrs in found]
        return found, code


@pytest.fixture(params=["532", "773"])
def hiding_ad(request):
    code = request.param
    directory = HidingAD({
        SERVICE: {"objectClass": ["top", "user"], "sAMAccountName": ["svc-authgw"], "password": [SERVICE_PASSWORD]},
        DANA: {**PERSON, "sAMAccountName": ["dana"], "userAccountControl": ["514"], "password": [PASSWORD]},
        ERIN: {**PERSON, "sAMAccountName": ["erin"], "userAccountControl": ["512"], "password": [PASSWORD]},
    }, refuse={DANA: code, ERIN: code})
    directory.code = code
    yield directory
    directory.stop()


def lenient_gateway(tmp_path, directory: FakeAD, start_gateway) -> GatewayProcess:
    """``chain: [ldap]``, search then bind as the service account, both ``allow_*`` flags on."""
    secret = tmp_path / "svc.secret"
    secret.write_text(SERVICE_PASSWORD)
    secret.chmod(0o600)
    ldap = {"preset": "active_directory", "servers": [directory.url], "insecure": True, "base_dn": BASE,
            "bind_dn": SERVICE, "bind_password": {"file": str(secret)},
            "groups": {"source": "memberof", "nested": False}, "allow_expired_password": True,
            "allow_must_change_password": True, "connect_timeout": 0.5, "receive_timeout": 1.0, "backoff": 0}
    return start_gateway(write_conf(tmp_path / "conf.d", {
        "gateway.yaml": GATEWAY_YAML, "ldap.yaml": "ldap: " + json.dumps(ldap), "cache.yaml": "cache: {}\n"}))


def test_a_bind_let_through_by_allow_flags_is_refused_when_the_account_state_cannot_be_read(
        tmp_path, hiding_ad, start_gateway):
    """AD answered Dana's right password 49 ``data 532`` (or ``773``), which the operator lets
    in; the service account's search returns her entry without ``userAccountControl``, so
    whether her account is disabled cannot be told. Before: 200 as dana. Now refused, as a
    lookup and the direct bind refuse such an entry (``ldap.account_state_unreadable``)."""
    gateway = lenient_gateway(tmp_path, hiding_ad, start_gateway)
    for name in ("dana", "erin"):  # disabled or not, neither state can be read
        refused = gateway.auth(name, PASSWORD)
        assert refused.status == 401 and refused.header("Remote-User") is None, (name, refused.status)
        assert reason(gateway, refused) == ("account_state", "ldap.account_state_unreadable")
    assert rows(gateway) == 0  # nothing learned for the offline cache
    assert PASSWORD not in gateway.output()


def test_a_bind_let_through_by_allow_flags_still_signs_in_an_enabled_account_read_whole(
        tmp_path, hiding_ad, start_gateway):
    """The reference: the service account reads ``userAccountControl``; Erin (enabled) signs in
    with her flagged password, Dana (disabled) is refused for it."""
    hiding_ad.hide = False
    gateway = lenient_gateway(tmp_path, hiding_ad, start_gateway)
    erin = gateway.auth("erin", PASSWORD)
    assert (erin.status, erin.header("Remote-User")) == (200, "erin")
    dana = gateway.auth("dana", PASSWORD)
    assert dana.status == 401 and reason(gateway, dana) == ("account_state", "ldap.disabled")


# -- 2. lookups of an LDAP plugin without a service account -------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with three_door_world(tmp_path_factory.mktemp("nolookup"), ["krbuser"], "no lookup CA") as world:
        yield world


def test_a_kerberos_login_does_not_forget_the_password_of_a_directory_that_cannot_look_up(world, tmp_path):
    """``direct_bind`` without a service account: the LDAP plugin cannot look anyone up, and says
    ``None``. Kerberos with ``require_directory_user: false`` signs krbuser in with a bare
    identity. Before, the cache read that ``None`` as "no directory knows krbuser" and forgot
    the offline row the ldap step had proved, so with the directory down krbuser's password got
    503. The row now stays, and answers offline."""
    slapd = world["slapd"]
    if not slapd.running:
        slapd.start()
    ldap = slapd.plugin_settings("plain", backoff=0, direct_bind=f"uid={{username}},{slapd.users_dn}")
    for key in ("bind_dn", "bind_password"):
        ldap.pop(key)
    kerberos = {"allowed_networks": ["127.0.0.3/32"], "keytab": str(world["keytab"]), "service_principal": SPN,
                "realms": ["EXAMPLE.TEST"], "require_directory_user": False}
    gateway = start_three_door_gateway(world, tmp_path, core={"plugins": ["cache"], "workers": 1}, ldap=ldap,
                                       files={"kerberos.yaml": json.dumps({"kerberos": kerberos}),
                                              "cache.yaml": "cache: {}\n"})
    try:
        live = by_password(gateway, "krbuser")
        assert (live.status, source(live)) == (200, "live"), live.body
        assert rows(gateway) == 1
        ticket = by_kerberos(world, gateway, "krbuser")
        assert (ticket.status, ticket.header("Remote-User")) == (200, "krbuser")
        assert rows(gateway) == 1, "a lookup the directory cannot make forgot the cached password"
        slapd.stop()
        offline = by_password(gateway, "krbuser")
        assert (offline.status, source(offline)) == (200, "cache"), (offline.status, gateway.output()[-2000:])
        assert reason(gateway, offline) == ("success", "cache.offline")
    finally:
        gateway.stop()
        if not slapd.running:
            slapd.start()


# -- 3. grace logins ------------------------------------------------------------------------------


ppolicy = slapd_fixture(ppolicy=True)
_MADE = itertools.count()


@pytest.fixture
def graceful(ppolicy):
    """A function making a user whose password expired in 2020 under a policy of two grace
    logins (or, with ``expired=False``, a fresh password under it, to be expired by :func:`age`)."""
    if not ppolicy.running:
        ppolicy.start()
    policy = f"cn=grace2,ou=policies,{ppolicy.base_dn}"
    try:
        ppolicy.add_entry(policy, {"objectClass": ["top", "organizationalRole", "pwdPolicy"], "cn": "grace2",
                                   "pwdAttribute": "userPassword", "pwdMaxAge": "3600", "pwdGraceAuthNLimit": "2"})
    except Exception:  # noqa: BLE001 - made by an earlier test of the module
        pass
    def make(expired: bool = True) -> str:
        uid = f"grace{next(_MADE)}"
        ppolicy.add_user(uid, f"{uid}-pw", extra={"pwdPolicySubentry": policy})
        if expired:
            age(ppolicy, uid)
        return uid

    return make


def age(slapd, uid: str) -> None:
    admin = slapd._admin()
    try:
        admin.modify(slapd.user_dn(uid), {"pwdChangedTime": [(ldap3.MODIFY_REPLACE, ["20200101000000Z"])]},
                     controls=[(RELAX, True, None)])
    finally:
        admin.unbind()


def test_grace_logins_are_not_repeated_by_the_hot_cache_past_the_limit(tmp_path, ppolicy, graceful, start_gateway):
    """Two grace logins are allowed. Before, the first grace login went into the hot cache and
    every repeat within ``hot.ttl`` was answered 200 without a bind: an expired password kept
    signing in past the limit. Now each grace login is a bind, and the third is refused."""
    uid = graceful()
    hot = json.dumps({"cache": {"hot": {"enabled": True, "ttl": 600}}})
    gateway = start_gateway(cache_conf(tmp_path, ppolicy, hot))
    before = ppolicy.bind_count()
    for remaining in (1, 0):
        graced = gateway.auth(uid, f"{uid}-pw")
        assert (graced.status, source(graced)) == (200, "live"), (remaining, graced.status, source(graced))
    refused = gateway.auth(uid, f"{uid}-pw")
    assert refused.status == 401 and refused.header("Remote-User") is None, (refused.status, source(refused))
    assert reason(gateway, refused) == ("account_state", "ldap.password_expired")
    assert ppolicy.bind_count() - before == 3  # every answer was the directory's
    assert rows(gateway) == 0


@pytest.mark.parametrize("cached_before", [False, True], ids=["first-login-by-grace", "cached-before-it-expired"])
def test_a_grace_login_is_not_answered_offline(tmp_path, ppolicy, graceful, start_gateway, cached_before):
    """A grace login, then the directory goes down: the expired password must not sign in from
    the offline cache (before: 200 ``cache.offline`` until ``max_age``). A row learned while the
    password was still valid goes too: the directory has said that this password expired."""
    uid = graceful(expired=not cached_before)
    gateway = start_gateway(cache_conf(tmp_path, ppolicy))
    if cached_before:
        fresh = gateway.auth(uid, f"{uid}-pw")
        assert fresh.status == 200 and rows(gateway) == 1
        age(ppolicy, uid)
    graced = gateway.auth(uid, f"{uid}-pw")
    assert (graced.status, source(graced)) == (200, "live")
    assert rows(gateway) == 0
    ppolicy.stop()
    try:
        offline = gateway.auth(uid, f"{uid}-pw")
        assert offline.status == 503 and offline.header("Remote-User") is None, (offline.status, source(offline))
    finally:
        ppolicy.start()
