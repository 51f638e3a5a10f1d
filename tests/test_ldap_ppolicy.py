"""OpenLDAP password policy (draft-behera-ldap-password-policy) on the password path (issue 9
item 2): every user bind asks for the Password Policy control, and its error refines slapd's
bare invalidCredentials (49) into the account state the other paths report.

Unit tests of the control's codec (every shape slapd sends, and garbage that must count as
"no control"), then a real slapd with the ppolicy overlay behind real ``authgw serve``
processes, judged by ``/v1/authenticate`` reason codes and the audit log.
"""

from __future__ import annotations


import ldap3
import pytest

from gateway.plugins.ldap import wire
from gateway.plugins.ldap.wire import PPOLICY_OID, PasswordPolicy, password_policy
from support.gateway import GatewayProcess
from support.ldapgw import api_login, ldap_gateways
from support.slapd import Slapd

TOKEN = "ppolicy-test-api-token"
RELAX = "1.3.6.1.4.1.4203.666.5.12"  # lets the rootdn set pwdChangedTime (NO-USER-MODIFICATION)


def tlv(tag: int, content: bytes) -> bytes:
    assert len(content) < 0x80
    return bytes((tag, len(content))) + content


def control(value: bytes | None, oid: bytes = PPOLICY_OID, critical: bool = False) -> bytes:
    return tlv(0x30, tlv(0x04, oid) + (b"\x01\x01\xff" if critical else b"")
               + (tlv(0x04, value) if value is not None else b""))


# -- the codec -------------------------------------------------------------------------------------


def test_bind_request_carries_the_non_critical_request_control() -> None:
    ber = wire.bind_request(7, "uid=a,dc=x", "pw")
    # ... [0] Controls { SEQUENCE { controlType } }: no criticality (FALSE), no value
    assert ber.endswith(tlv(0xA0, tlv(0x30, tlv(0x04, b"1.3.6.1.4.1.42.2.27.8.5.1"))))
    bare = wire.bind_request(7, "uid=a,dc=x", "pw", ppolicy=False)
    assert b"\xa0" not in bare[-31:] and len(ber) - len(bare) == 2 + 2 + 2 + len(PPOLICY_OID)


@pytest.mark.parametrize("value, expected", [
    (b"0\x03\x81\x01\x00", PasswordPolicy(error=0)),                     # slapd: passwordExpired
    (b"0\x03\x81\x01\x01", PasswordPolicy(error=1)),                     # accountLocked
    (b"0\x03\x81\x01\x02", PasswordPolicy(error=2)),                     # changeAfterReset
    (b"0\x00", PasswordPolicy()),                                        # no warning, no error
    (b"0\x06\xa0\x04\x80\x02\x0e\x10", PasswordPolicy(time_before_expiration=3600)),
    (b"0\x05\xa0\x03\x81\x01\x02", PasswordPolicy(grace_authns_remaining=2)),
    (b"0\x08\xa0\x03\x81\x01\x01\x81\x01\x00", PasswordPolicy(0, None, 1)),  # grace, then expired
])
def test_response_control_values(value, expected) -> None:
    assert password_policy(control(value)) == expected
    # among other controls, and with an explicit criticality
    other = control(b"\x30\x00", oid=b"1.2.840.113556.1.4.319")
    assert password_policy(other + control(value, critical=True)) == expected


@pytest.mark.parametrize("controls", [
    b"",
    control(b"0\x03\x81\x01\x01", oid=b"1.3.6.1.4.1.42.2.27.8.5.2"),   # another OID
    control(None),                                                     # no value
    control(b"0\x03\x81\x01\x01") + control(b"0\x03\x81\x01\x00"),     # two answers
    control(b"0\x03\x81\x01\x01")[:-1],                                # truncated control
    control(b"0\x04\x81\x01\x01"),                                     # SEQUENCE longer than its value
    control(b"0\x03\x81\x05\x01"),                                     # error longer than the SEQUENCE
    control(b"1\x03\x81\x01\x01"),                                     # not a SEQUENCE
    control(b"0\x03\x82\x01\x01"),                                     # unknown element
    control(b"0\x03\x81\x00"),                                         # empty ENUMERATED
    control(b"0\x03\x81\x01\xff"),                                     # negative
    control(b"0\x08\x81\x06\x01\x00\x00\x00\x00\x00"),                 # over maxInt
    control(b"0\x06\x81\x01\x01\x81\x01\x00"),                         # two errors
    control(b"0\x08\x81\x01\x00\xa0\x03\x80\x01\x05"),                 # warning after the error
    control(b"0\x05\xa0\x03\x82\x01\x05"),                             # unknown warning
    control(b"0\x03\x81\x01\x01" + b"\x00"),                           # trailing octet in the value
    tlv(0x30, tlv(0x04, PPOLICY_OID) + b"\x02\x01\x00" + tlv(0x04, b"0\x03\x81\x01\x01")),  # odd part
    control(b"0\x03\x81\x01\x01")[:-6] + b"\x84\xff\xff\xff\xff",      # absurd length
    b"\x30\x80\x00\x00",                                               # indefinite length
    b"\x30", b"\x04\x01", b"\xff" * 40, bytes(range(256)),
])
def test_garbage_counts_as_no_control(controls) -> None:
    assert password_policy(controls) is None


def test_random_garbage_never_raises() -> None:
    import random

    rng = random.Random(9)
    good = control(b"0\x08\xa0\x03\x81\x01\x01\x81\x01\x00")
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        result = password_policy(bytes(data[:rng.randint(0, len(data))]))
        assert result is None or isinstance(result, PasswordPolicy)


# -- a real slapd ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    # ppolicy_use_lockout: slapd names accountLocked in the control (by default it hides it).
    slapd = Slapd(tmp_path_factory.mktemp("ppolicy") / "slapd", ppolicy=True, ppolicy_use_lockout=True).start()
    policies = f"ou=policies,{slapd.base_dn}"

    def policy(cn: str, **attrs: str) -> str:
        return slapd.add_entry(f"cn={cn},{policies}", {"objectClass": ["top", "organizationalRole", "pwdPolicy"],
                                                        "cn": cn, "pwdAttribute": "userPassword", **attrs})

    expired = policy("expired", pwdMaxAge="3600", pwdGraceAuthNLimit="0")
    grace = policy("grace", pwdMaxAge="3600", pwdGraceAuthNLimit="1000")
    warn = policy("warn", pwdMaxAge="864000", pwdExpireWarning="8640000")
    reset = policy("reset", pwdMustChange="TRUE")
    slapd.add_user("okuser", "ok-pw", groups=["staff"])
    slapd.add_user("pplocked", "locked-pw")
    slapd.add_user("ppexpired", "expired-pw", extra={"pwdPolicySubentry": expired})
    slapd.add_user("ppgrace", "grace-pw", extra={"pwdPolicySubentry": grace})
    slapd.add_user("ppwarn", "warn-pw", extra={"pwdPolicySubentry": warn})
    slapd.add_user("ppreset", "reset-pw", groups=["staff"], extra={"pwdPolicySubentry": reset})
    slapd.modify(slapd.user_dn("pplocked"), {"pwdAccountLockedTime": [(ldap3.MODIFY_REPLACE, ["000001010000Z"])]})
    slapd.modify(slapd.user_dn("ppreset"), {"pwdReset": [(ldap3.MODIFY_REPLACE, ["TRUE"])]})
    admin = slapd._admin()
    try:
        for uid in ("ppexpired", "ppgrace"):  # changed in 2020: past any pwdMaxAge
            admin.modify(slapd.user_dn(uid), {"pwdChangedTime": [(ldap3.MODIFY_REPLACE, ["20200101000000Z"])]},
                         controls=[(RELAX, True, None)])
    finally:
        admin.unbind()
    yield slapd
    slapd.stop()


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    yield from ldap_gateways(tmp_path_factory.mktemp("gw"), TOKEN)


@pytest.fixture(scope="module")
def gateway(start, directory) -> GatewayProcess:
    return start(directory.plugin_settings("plain"))


def api(gateway: GatewayProcess, username: str, password: str) -> tuple[int, dict]:
    return api_login(gateway, TOKEN, username, password)


@pytest.mark.parametrize("uid, password, reason", [
    ("pplocked", "locked-pw", "ldap.locked"),                 # right password, locked
    ("pplocked", "not-the-password", "ldap.locked"),          # slapd checks the lock first
    ("ppexpired", "expired-pw", "ldap.password_expired"),     # pwdMaxAge passed, no grace
    ("ppreset", "reset-pw", "ldap.must_change_password"),     # bind succeeds, restricted: refused
])
def test_ppolicy_refusals_become_account_states(gateway, uid, password, reason) -> None:
    status, body = api(gateway, uid, password)
    assert (status, body["outcome"], body["reason"], body["identity"]) == (200, "account_state", reason, None), body
    response = gateway.auth(uid, password)
    assert response.status == 401 and response.header("Remote-User") is None
    line = gateway.audit_for(response.header("X-Request-Id"))
    assert (line["outcome"], line["reason"], line["step"]) == ("account_state", reason, "ldap")
    assert password not in gateway.output()


def test_wrong_passwords_of_policy_users_stay_wrong_passwords(gateway) -> None:
    """Only the lock is told whatever the password (as AD's 775); an expired or reset password
    is only told to who knows it."""
    for uid in ("ppexpired", "ppreset", "okuser"):
        status, body = api(gateway, uid, "not-the-password")
        assert (body["outcome"], body["reason"]) == ("invalid_credentials", "ldap.invalid_password"), (uid, body)


def test_warnings_never_change_the_decision(gateway) -> None:
    status, body = api(gateway, "ppgrace", "grace-pw")   # expired, grace logins left: slapd lets it in
    assert body["outcome"] == "success", body
    assert body["identity"]["claims"]["grace_logins_remaining"] >= 0
    status, body = api(gateway, "ppwarn", "warn-pw")
    assert body["outcome"] == "success", body
    assert 0 < body["identity"]["claims"]["password_expires_in"] <= 864000
    status, body = api(gateway, "okuser", "ok-pw")
    assert body["outcome"] == "success" and "password_expires_in" not in body["identity"]["claims"], body


def test_must_change_passes_only_when_the_operator_allows_it(start, directory) -> None:
    lenient = start(directory.plugin_settings("plain", allow_must_change_password=True,
                                              allow_expired_password=True))
    status, body = api(lenient, "ppreset", "reset-pw")
    assert body["outcome"] == "success", body
    assert body["identity"]["claims"]["must_change_password"] is True
    assert body["identity"]["groups"] == ["staff"]  # groups come from the service account
    # allow_expired_password is AD's 532 (a refusal AD makes after checking the password); slapd's
    # refusal with passwordExpired stays a refusal: a control never turns one into a success.
    assert api(lenient, "ppexpired", "expired-pw")[1]["reason"] == "ldap.password_expired"
    assert api(lenient, "pplocked", "locked-pw")[1]["reason"] == "ldap.locked"
    assert api(lenient, "ppreset", "wrong")[1]["reason"] == "ldap.invalid_password"


def test_unknown_user_and_wrong_password_look_the_same_and_cost_one_bind(gateway, directory) -> None:
    assert api(gateway, "okuser", "ok-pw")[1]["outcome"] == "success"  # warm the pools
    answers, binds = {}, {}
    for uid, password in (("nosuchuser", "whatever"), ("okuser", "wrong"), ("pplocked", "wrong"),
                          ("okuser", "ok-pw")):
        before = directory.bind_count()
        response = gateway.auth(uid, password)
        binds[uid, password] = directory.bind_count() - before
        answers[uid, password] = response.status
    assert answers[("nosuchuser", "whatever")] == answers[("okuser", "wrong")] == 401
    # One bind per login, the policy control inside it: no extra round trip.
    assert set(binds.values()) == {1}, binds
    unknown, wrong = api(gateway, "nosuchuser", "whatever"), api(gateway, "okuser", "wrong")
    assert unknown[0] == wrong[0] == 200
    assert unknown[1]["outcome"] in ("user_not_found", "invalid_credentials")
    assert unknown[1]["reason"].split(".")[0] == wrong[1]["reason"].split(".")[0] == "ldap"


def test_direct_bind_reads_the_control_too(start, directory) -> None:
    settings = directory.plugin_settings("plain", direct_bind=f"uid={{username}},{directory.users_dn}")
    for key in ("bind_dn", "bind_password"):
        settings.pop(key)
    direct = start(settings)
    for uid, password, reason in (("pplocked", "locked-pw", "ldap.locked"),
                                  ("ppexpired", "expired-pw", "ldap.password_expired"),
                                  ("ppreset", "reset-pw", "ldap.must_change_password"),
                                  ("okuser", "wrong", "ldap.invalid_password")):
        assert api(direct, uid, password)[1]["reason"] == reason, uid
    assert api(direct, "okuser", "ok-pw")[1]["outcome"] == "success"


def test_without_use_lockout_a_lock_stays_a_wrong_password(start, tmp_path_factory) -> None:
    """slapd's default hides the lock in the control: the gateway does not tell it either, and
    the right and the wrong password look the same."""
    slapd = Slapd(tmp_path_factory.mktemp("hidden") / "slapd", ppolicy=True).start()
    try:
        slapd.add_user("pplocked", "locked-pw")
        slapd.modify(slapd.user_dn("pplocked"), {"pwdAccountLockedTime": [(ldap3.MODIFY_REPLACE, ["000001010000Z"])]})
        gateway = start(slapd.plugin_settings("plain"))
        for password in ("locked-pw", "wrong"):
            status, body = api(gateway, "pplocked", password)
            assert (body["outcome"], body["reason"]) == ("invalid_credentials", "ldap.invalid_password"), body
        gateway.stop()
    finally:
        slapd.stop()


# -- password age on lookups (Kerberos, certificates) ------------------------------------------------
#
# A password bind is judged by slapd (passwordExpired above). A lookup binds no password: the
# plugin reads pwdChangedTime with the user and the pwdMaxAge of the user's policy (cached), and
# judges the age as slapd does (docs/plugins/ldap.md, "Password age (ppolicy)").

import calendar
import logging
import time
from pathlib import Path

from gateway import BackendUnavailable
from gateway.plugins.ldap import LdapPlugin
from gateway.plugins.ldap.accountstate import password_age_state, policy_dn, policy_max_age
from gateway.plugins.ldap.link import Entry
from gateway.registry import PluginContext
from gateway.settings import GatewaySettings
from support.threedoors import by_certificate, by_kerberos, by_password, start_three_door_gateway, three_door_world

NOW = calendar.timegm((2026, 6, 1, 12, 0, 0))


def aged(**attributes: list[str]) -> Entry:
    return Entry("uid=u,dc=example,dc=com", {k: [v.encode() for v in vs] for k, vs in attributes.items()})


@pytest.mark.parametrize("changed, max_age, expected", [
    (["20260601110000Z"], 3600, ""),                          # exactly pwdMaxAge old: slapd wants "older than"
    (["20260601105959Z"], 3600, "ldap.password_expired"),     # one second more
    (["20260601115959Z"], 3600, ""),
    (["20200101000000Z"], 0, ""),                             # pwdMaxAge 0 (or absent): never expires
    ([], 3600, ""),                                           # no pwdChangedTime: never expires (slapd)
    (["20260601123000+0100"], 3600, ""),                      # 11:30Z
    (["20260601103000-0100"], 3600, ""),                      # 11:30Z
    (["20260601103000+0100"], 3600, "ldap.password_expired"),  # 09:30Z
    (["yesterday"], 3600, "ldap.password_expired"),           # does not parse: fail closed
    (["20260601115959Z"], None, "ldap.password_expired"),     # pwdMaxAge that did not parse: fail closed
    ([], None, ""),
    (["20260601115959Z", "20200101000000Z"], 3600, "ldap.password_expired"),  # every value counts
])
def test_password_age_is_judged_as_slapd_judges_it(changed, max_age, expected) -> None:
    entry = aged(pwdChangedTime=changed) if changed else aged(cn=["u"])
    assert password_age_state(entry, max_age, now=NOW) == expected


def test_policy_attributes_parse() -> None:
    assert policy_max_age(aged(pwdMaxAge=["3600"])) == 3600
    assert policy_max_age(aged(pwdAttribute=["userPassword"])) == 0
    assert policy_max_age(aged(pwdMaxAge=["soon"])) is None
    assert policy_dn(aged(pwdPolicySubentry=["cn=p,dc=x"])) == "cn=p,dc=x"
    assert policy_dn(aged(PWDPOLICYSUBENTRY=["cn=p,dc=x"])) == "cn=p,dc=x"
    assert policy_dn(aged(cn=["u"])) is None and policy_dn(aged(pwdPolicySubentry=[" "])) is None


def test_policy_cache_is_bounded_in_time_and_size() -> None:
    from gateway.plugins.ldap.directory import PolicyCache

    clock = [100.0]
    cache = PolicyCache(ttl=300, size=2, clock=lambda: clock[0])
    cache.put("cn=A,dc=x", 3600)
    assert cache.get("CN=a,dc=x ") == (True, 3600)
    clock[0] += 299
    assert cache.get("cn=a,dc=x") == (True, 3600)
    clock[0] += 1
    assert cache.get("cn=a,dc=x") == (False, None)  # read again after ttl
    cache.put("cn=a,dc=x", 1)
    cache.put("cn=b,dc=x", 2)
    cache.put("cn=c,dc=x", 3)  # over size: the oldest goes
    assert [cache.get(f"cn={n},dc=x")[0] for n in "abc"] == [False, True, True]


class AclSlapd(Slapd):
    """The fixture's slapd with ``ou=hidden,BASE`` invisible to everyone but the rootdn (a
    policy the service account may not read)."""

    def _write_conf(self) -> None:
        super()._write_conf()
        conf = self.directory / "slapd.conf"
        text = conf.read_text()
        rule = "access to *\n    by dn.exact="
        assert text.count(rule) == 1
        conf.write_text(text.replace(rule, f'access to dn.subtree="ou=hidden,{self.base_dn}"\n    by * none\n' + rule))


#: uid -> (policy cn or None for the default, pwdChangedTime or None for "as added" (now),
#: password state a lookup answers with ppolicy_default set)
AGED = {
    "fresh": (None, None, ""),
    "olddefault": (None, "20200101000000Z", "ldap.password_expired"),
    "oldshort": ("short", "20200101000000Z", "ldap.password_expired"),
    "recentshort": ("short", None, ""),
    "oldnomax": ("nomax", "20200101000000Z", ""),
    "oldzero": ("zero", "20200101000000Z", ""),
    "nochange": ("short", "", ""),                              # no password, so no pwdChangedTime
    "oldgrace": ("grace", "20200101000000Z", "ldap.password_expired"),  # grace logins are binds
    "oldhidden": ("hidden", "20200101000000Z", ""),             # unreadable: not judged (logged)
    "olddangling": ("nosuch", "20200101000000Z", ""),           # no such policy: slapd applies none
    "oldreset": ("short", "20200101000000Z", "ldap.must_change_password"),  # pwdReset speaks first
}


@pytest.fixture(scope="module")
def aging(tmp_path_factory):
    slapd = AclSlapd(tmp_path_factory.mktemp("aging") / "slapd", ppolicy=True, retcode=True).start()
    policies = f"ou=policies,{slapd.base_dn}"
    slapd.add_entry(f"ou=hidden,{slapd.base_dn}", {"objectClass": ["top", "organizationalUnit"], "ou": "hidden"})
    dns = {"nosuch": f"cn=nosuch,{policies}", "hidden": f"cn=hidden,ou=hidden,{slapd.base_dn}"}
    for cn, attrs in (("short", {"pwdMaxAge": "3600"}), ("nomax", {}), ("zero", {"pwdMaxAge": "0"}),
                      ("grace", {"pwdMaxAge": "3600", "pwdGraceAuthNLimit": "1000"}),
                      ("hidden", {"pwdMaxAge": "3600"})):
        dn = dns.get(cn, f"cn={cn},{policies}")
        dns[cn] = slapd.add_entry(dn, {"objectClass": ["top", "organizationalRole", "pwdPolicy"], "cn": cn,
                                       "pwdAttribute": "userPassword", **attrs})
    # The overlay's default policy (cn=default, made by the fixture) gets an age limit too.
    slapd.modify(f"cn=default,{policies}", {"pwdMaxAge": [(ldap3.MODIFY_REPLACE, ["86400"])]})
    admin = slapd._admin()
    try:
        for uid, (policy, changed, _) in AGED.items():
            extra = {"pwdPolicySubentry": dns[policy]} if policy else {}
            slapd.add_user(uid, None if changed == "" else f"{uid}-pw", extra=extra)
            if changed:
                admin.modify(slapd.user_dn(uid), {"pwdChangedTime": [(ldap3.MODIFY_REPLACE, [changed])]},
                             controls=[(RELAX, True, None)])
        admin.modify(slapd.user_dn("oldreset"), {"pwdReset": [(ldap3.MODIFY_REPLACE, ["TRUE"])]})
    finally:
        admin.unbind()
    slapd.dns = dns
    yield slapd
    slapd.stop()


@pytest.fixture
def make_plugin(tmp_path: Path, aging):
    made: list[LdapPlugin] = []

    def make(**overrides) -> LdapPlugin:
        settings = aging.plugin_settings("plain", groups={"source": "none"}, **overrides)
        context = PluginContext(name="ldap", config_dir=tmp_path, state_dir=tmp_path,
                                gateway=GatewaySettings(chain=["ldap"]), hook=None,  # type: ignore[arg-type]
                                log=logging.getLogger("test.ldap.ppolicy"))
        made.append(LdapPlugin(LdapPlugin.Settings.model_validate(settings), context))
        return made[-1]

    yield make
    for plugin in made:
        plugin.gateway_shutdown()


def default_dn(slapd: Slapd) -> str:
    return f"cn=default,ou=policies,{slapd.base_dn}"


def test_lookups_judge_the_password_age(aging, make_plugin, caplog) -> None:
    plugin = make_plugin(ppolicy_default=default_dn(aging))
    with caplog.at_level(logging.WARNING, logger="test.ldap.ppolicy"):
        for _ in range(2):
            answered = {uid: plugin.gateway_lookup_user(username=uid) for uid in AGED}
            assert {uid: (i.account_state, i.password_state) for uid, i in answered.items()} == \
                   {uid: ("", expected) for uid, (_, _, expected) in AGED.items()}
    # The policies the service account cannot read are said, once each, by DN.
    warnings = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert any(aging.dns["hidden"] in w for w in warnings) and any(aging.dns["nosuch"] in w for w in warnings)
    # The same answer for every user a directory search returns.
    page = plugin.gateway_search_users(query="", limit=200, cursor=None)
    states = {u.username: u.password_state for u in page.users if u.username in AGED}
    assert states == {uid: expected for uid, (_, _, expected) in AGED.items()}


def test_without_ppolicy_default_the_default_policy_is_not_judged_and_that_is_said(aging, make_plugin,
                                                                                   caplog) -> None:
    plugin = make_plugin()
    with caplog.at_level(logging.WARNING, logger="test.ldap.ppolicy"):
        assert plugin.gateway_lookup_user(username="olddefault").password_state == ""
        assert plugin.gateway_lookup_user(username="olddefault").password_state == ""
        assert plugin.gateway_lookup_user(username="oldshort").password_state == "ldap.password_expired"
    told = [r.getMessage() for r in caplog.records if "ppolicy_default" in r.getMessage()]
    assert len(told) == 1 and "not judged" in told[0], told


def searches(slapd: Slapd) -> int:
    conn = slapd._admin()
    try:
        _, _, entries, _ = conn.search("cn=Search,cn=Operations,cn=Monitor", "(objectClass=*)",
                                       search_scope="BASE", attributes=["monitorOpInitiated"])
        value = entries[0]["attributes"]["monitorOpInitiated"]
        return int(value[0] if isinstance(value, list) else value)
    finally:
        conn.unbind()


def test_the_policy_is_read_once_and_cached_for_a_bounded_time(aging, make_plugin) -> None:
    plugin = make_plugin(ppolicy_default=default_dn(aging))
    short = aging.dns["short"]
    counts = [searches(aging)]
    for _ in range(3):
        assert plugin.gateway_lookup_user(username="oldshort").password_state == "ldap.password_expired"
        counts.append(searches(aging))
    costs = [b - a for a, b in zip(counts, counts[1:])]
    assert costs[0] == costs[1] + 1 and costs[1] == costs[2], costs  # the policy read, once
    # A policy change is seen once the cached copy is older than its time to live.
    clock = [time.monotonic()]
    plugin.directory.policies.clock = lambda: clock[0]
    plugin.directory.policies.put(short, 3600)
    aging.modify(short, {"pwdMaxAge": [(ldap3.MODIFY_REPLACE, ["0"])]})
    try:
        assert plugin.gateway_lookup_user(username="oldshort").password_state == "ldap.password_expired"
        clock[0] += plugin.directory.policies.ttl
        assert plugin.gateway_lookup_user(username="oldshort").password_state == ""
    finally:
        aging.modify(short, {"pwdMaxAge": [(ldap3.MODIFY_REPLACE, ["3600"])]})


def test_a_directory_that_cannot_answer_for_the_policy_fails_the_lookup(aging, make_plugin) -> None:
    """busy/unavailable reading the policy: the lookup raises (fail closed), nothing is cached."""
    broken = f"cn=broken,ou=policies,{aging.base_dn}"
    aging.add_entry(broken, {"objectClass": ["top", "organizationalRole", "pwdPolicy", "errAuxObject"], "cn": "broken",
                             "pwdAttribute": "userPassword", "pwdMaxAge": "3600", "errCode": "52", "errOp": "search"})
    aging.add_user("oldbroken", "oldbroken-pw", extra={"pwdPolicySubentry": broken})
    plugin = make_plugin(ppolicy_default=default_dn(aging), backoff=0)
    try:
        with pytest.raises(BackendUnavailable):
            plugin.gateway_lookup_user(username="oldbroken")
        assert plugin.directory.policies.get(broken) == (False, None)
        assert plugin.gateway_lookup_user(username="fresh").password_state == ""  # the rest still answers
    finally:
        aging.delete(aging.user_dn("oldbroken"))  # the policy stays: retcode answers its delete with 52 too


# -- the three doors ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def doors(tmp_path_factory):
    """A user whose password expired under its own policy and one under the overlay's default
    policy, with Kerberos principals and certificates (support/threedoors.py)."""
    base = tmp_path_factory.mktemp("doors")
    with three_door_world(base, ["okuser", "olduser", "olddefault"], "ppolicy age CA") as world:
        slapd = world["slapd"]
        short = slapd.add_entry(f"cn=short,ou=policies,{slapd.base_dn}",
                                {"objectClass": ["top", "organizationalRole", "pwdPolicy"], "cn": "short",
                                 "pwdAttribute": "userPassword", "pwdMaxAge": "3600", "pwdGraceAuthNLimit": "0"})
        slapd.modify(default_dn(slapd), {"pwdMaxAge": [(ldap3.MODIFY_REPLACE, ["86400"])]})
        slapd.modify(world["dns"]["olduser"], {"pwdPolicySubentry": [(ldap3.MODIFY_REPLACE, [short])]})
        admin = slapd._admin()
        try:
            for uid in ("olduser", "olddefault"):
                admin.modify(world["dns"][uid], {"pwdChangedTime": [(ldap3.MODIFY_REPLACE, ["20200101000000Z"])]},
                             controls=[(RELAX, True, None)])
        finally:
            admin.unbind()
        ldap = slapd.plugin_settings("plain", ppolicy_default=default_dn(slapd))
        gateways = {refuses: start_three_door_gateway(world, base / f"gw-{refuses}", refuses=refuses, ldap=ldap)
                    for refuses in (True, False)}
        try:
            yield world, gateways
        finally:
            for gateway in gateways.values():
                gateway.stop()


@pytest.mark.parametrize("user", ["olduser", "olddefault", "okuser"])
def test_an_expired_password_refuses_every_door_when_configured(doors, user) -> None:
    world, gateways = doors
    expired = user != "okuser"
    strict, lenient = gateways[True], gateways[False]
    answers = {"password": by_password(strict, user), "kerberos": by_kerberos(world, strict, user),
               "client_cert": by_certificate(world, strict, user)}
    for step, response in answers.items():
        record = strict.audit_for(response.header("X-Request-Id"))
        if expired:   # slapd refuses the bind; the lookup judges the same age
            assert response.status == 401 and response.header("Remote-User") is None, (step, record)
            assert (record["outcome"], record["reason"], record["step"]) == \
                   ("account_state", "ldap.password_expired", "ldap" if step == "password" else step), record
        else:
            assert (response.status, response.header("Remote-User")) == (200, user), (step, record)
    # Without password_state_refuses an expired password does not block the doors that use none.
    for response in (by_kerberos(world, lenient, user), by_certificate(world, lenient, user)):
        assert (response.status, response.header("Remote-User")) == (200, user)
