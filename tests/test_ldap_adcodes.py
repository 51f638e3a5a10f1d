"""Active Directory account states through ``/auth``, played by a real slapd.

slapd's retcode overlay answers binds as chosen entries with a fixed result code and
diagnosticMessage, so the gateway receives byte for byte what a domain controller sends:
resultCode 49 and ``80090308: LdapErr: DSID-..., comment: AcceptSecurityContext error, data
XXX, vNNNN``. The formats are documented in test_ldap_units.py (AD_MESSAGES).
"""

from __future__ import annotations


import json

import pytest

from support.gateway import GatewayProcess, authgw, write_conf
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
    # A server that quotes the bind DN in its message, and a DN that holds "data 532": a wrong
    # password, whatever the text says.
    slapd.add_user("echo", "pw", bind_error=(49, f"invalid credentials for {slapd.user_dn('echo')} (data 532)"))
    slapd.add_user("echo-ad", "pw", bind_error=(49, "CN=data 773,OU=Staff " + TEMPLATE.format("52e")))
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


def test_a_quoted_data_code_is_not_ads_word_and_lets_no_one_in(start, directory) -> None:
    # allow_expired_password / allow_must_change_password admit AD's 532 / 773; a message that
    # merely holds "data 532" or "data 773" (a quoted DN) must stay a wrong password.
    lenient = start(directory.plugin_settings("plain", allow_expired_password=True, allow_must_change_password=True))
    for uid in ("echo", "echo-ad"):
        status, body = api(lenient, uid, "pw")
        assert (status, body["outcome"], body["reason"]) == (200, "invalid_credentials", "ldap.invalid_password"), uid


def test_a_bind_that_hangs_is_unavailable_never_a_wrong_password(start, directory) -> None:
    gw = start(directory.plugin_settings("plain", receive_timeout=0.5, backoff=60))
    response = gw.auth("slow", "pw")
    assert response.status == 503
    line = gw.audit_for(response.header("X-Request-Id"))
    assert (line["outcome"], line["reason"]) == ("unavailable", "ldap.unavailable")
    # The only server is retried at once for the next attempt (nothing else could answer).
    assert gw.auth("fine", "pw").status == 200


def test_check_names_the_ad_sub_code_of_a_refused_service_account(directory, tmp_path) -> None:
    # The sub-code is read from the server's own message, not from the text wrapped around it.
    secret = tmp_path / "service-password"
    secret.write_text("pw")
    secret.chmod(0o600)
    settings = directory.plugin_settings("plain", bind_dn=directory.user_dn("locked"),
                                         bind_password={"file": str(secret)})
    conf = write_conf(tmp_path / "conf.d", {"gateway.yaml": json.dumps({"chain": ["ldap"]}),
                                            "ldap.yaml": "ldap: " + json.dumps(settings)})
    out = authgw("check", "--config", str(conf), "--state-dir", str(tmp_path / "state")).stdout
    assert "FAIL  ldap.bind" in out and "(AD: account locked out)" in out, out
