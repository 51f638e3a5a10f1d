"""Active Directory account states through ``/auth``, played by a real slapd.

slapd's retcode overlay answers binds as chosen entries with a fixed result code and
diagnosticMessage, so the gateway receives byte for byte what a domain controller sends:
resultCode 49 and ``80090308: LdapErr: DSID-..., comment: AcceptSecurityContext error, data
XXX, vNNNN``. The formats are documented in test_ldap_units.py (AD_MESSAGES).
"""

from __future__ import annotations


import pytest

from support.gateway import GatewayProcess
from support.ldapgw import api_login, ldap_gateways
from support.slapd import Slapd

TEMPLATE = "80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data {}, v4563"
STATES = {  # uid -> (AD data code, outcome, reason)
    "ghost": ("525", "user_not_found", "ldap.user_not_found"),
    "typo": ("52e", "invalid_credentials", "ldap.invalid_password"),
    "night": ("530", "account_state", "ldap.logon_hours"),
    "kiosk": ("531", "account_state", "ldap.workstation"),
    "expired": ("532", "account_state", "ldap.password_expired"),
    "disabled": ("533", "account_state", "ldap.disabled"),
    "gone": ("701", "account_state", "ldap.account_expired"),
    "newbie": ("773", "account_state", "ldap.must_change_password"),
    "locked": ("775", "account_state", "ldap.locked"),
}
TOKEN = "ldap-test-api-token"


@pytest.fixture(scope="module")
def directory(tmp_path_factory) -> Slapd:
    slapd = Slapd(tmp_path_factory.mktemp("ad") / "slapd", retcode=True).start()
    for uid, (code, _, _) in STATES.items():
        slapd.add_user(uid, "pw", cn=uid, mail=f"{uid}@example.com", groups=["users"],
                       bind_error=(49, TEMPLATE.format(code)))
    slapd.add_user("slow", "pw", bind_delay=3)
    slapd.add_user("fine", "pw")
    yield slapd
    slapd.stop()


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    yield from ldap_gateways(tmp_path_factory.mktemp("gw"), TOKEN)


@pytest.fixture(scope="module")
def strict(start, directory) -> GatewayProcess:
    return start(directory.plugin_settings("plain"))


def api(gateway: GatewayProcess, username: str, password: str) -> tuple[int, dict]:
    return api_login(gateway, TOKEN, username, password)


@pytest.mark.parametrize("uid", sorted(STATES))
def test_ad_sub_codes_become_reasons(strict, uid) -> None:
    code, outcome, reason = STATES[uid]
    response = strict.auth(uid, "pw")
    assert response.status == 401  # uniform: the client never learns the account state
    line = strict.audit_for(response.header("X-Request-Id"))
    assert (line["outcome"], line["reason"], line["step"]) == (outcome, reason, "ldap")


def test_account_states_are_visible_to_api_clients_and_logged_without_the_password(strict) -> None:
    status, body = api(strict, "locked", "pw-locked-secret")
    assert status == 200
    assert (body["outcome"], body["reason"], body["identity"]) == ("account_state", "ldap.locked", None)
    assert "pw-locked-secret" not in strict.output()


def test_expired_and_must_change_pass_only_when_the_operator_allows_it(start, directory) -> None:
    lenient = start(directory.plugin_settings("plain", allow_expired_password=True, allow_must_change_password=True))
    status, body = api(lenient, "expired", "pw")
    assert (status, body["outcome"]) == (200, "success")
    assert body["identity"]["claims"]["password_expired"] is True
    assert body["identity"]["groups"] == ["users"]
    status, body = api(lenient, "newbie", "pw")
    assert body["outcome"] == "success" and body["identity"]["claims"]["must_change_password"] is True
    # the flags are per state: locked and disabled accounts stay out
    for uid in ("locked", "disabled", "gone", "typo"):
        status, body = api(lenient, uid, "pw")
        assert body["outcome"] != "success", uid
    only_expired = start(directory.plugin_settings("plain", allow_expired_password=True))
    assert api(only_expired, "expired", "pw")[1]["outcome"] == "success"
    assert api(only_expired, "newbie", "pw")[1]["reason"] == "ldap.must_change_password"


def test_a_bind_that_hangs_is_unavailable_never_a_wrong_password(start, directory) -> None:
    gw = start(directory.plugin_settings("plain", receive_timeout=0.5, backoff=60))
    response = gw.auth("slow", "pw")
    assert response.status == 503
    line = gw.audit_for(response.header("X-Request-Id"))
    assert (line["outcome"], line["reason"]) == ("unavailable", "ldap.unavailable")
    # The only server is retried at once for the next attempt (nothing else could answer).
    assert gw.auth("fine", "pw").status == 200
