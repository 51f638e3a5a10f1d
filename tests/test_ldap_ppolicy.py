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
