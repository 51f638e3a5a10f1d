"""Account state on every path (issue 9 item 2), through real ``authgw serve`` processes against
a real slapd (ppolicy overlay, AD and 389-DS attributes from the fixture's schema) and a real
MIT KDC.

A disabled, locked or expired account used to be refused with its password only: Kerberos SSO
(a ticket obtained before the account was disabled) and client certificates (which outlive the
account) looked the user up with ``gateway_lookup_user``, which read no state. Every path now
refuses with ``ACCOUNT_STATE`` and the password path's reason codes.

Two gateways, chain ``[kerberos, client_cert, ldap]``: ``default`` (an expired or must-change
password does not block Kerberos or certificates) and ``strict`` (``password_state_refuses``).
"""

from __future__ import annotations

import json
import time

import ldap3
import pytest

from support.gateway import GatewayProcess, write_conf
from support.threedoors import by_certificate, by_kerberos, by_password, start_three_door_gateway, three_door_world


def filetime(offset_seconds: float) -> str:
    """AD FILETIME (100 ns since 1601) *offset_seconds* from now."""
    return str(int((time.time() + offset_seconds + 11644473600) * 10_000_000))


#: user -> (state attributes, refusal on every path, refusal with password_state_refuses)
USERS: dict[str, tuple[dict, str, str]] = {
    "okuser": ({}, "", ""),
    "addisabled": ({"userAccountControl": "514"}, "ldap.disabled", "ldap.disabled"),
    "adlocked": ({"userAccountControl": "512", "msDS-User-Account-Control-Computed": "16"}, "ldap.locked",
                 "ldap.locked"),
    "adexpired": ({"accountExpires": filetime(-86400)}, "ldap.account_expired", "ldap.account_expired"),
    "adexpiresnext": ({"accountExpires": filetime(86400)}, "", ""),
    "adneverzero": ({"accountExpires": "0"}, "", ""),
    "adnevermax": ({"accountExpires": "9223372036854775807"}, "", ""),
    "adpwexpired": ({"userAccountControl": "512", "msDS-User-Account-Control-Computed": str(0x800000)}, "",
                    "ldap.password_expired"),
    "admustchange": ({"pwdLastSet": "0"}, "", "ldap.must_change_password"),
    "ipadisabled": ({"nsAccountLock": "TRUE"}, "ldap.disabled", "ldap.disabled"),
    # OpenLDAP ppolicy: set after the entry exists (operational attribute, rootdn only).
    "pplockedforever": ({}, "ldap.locked", "ldap.locked"),
    "pplocked": ({}, "ldap.locked", "ldap.locked"),
    # OpenLDAP 2.5 ppolicy validity window: slapd refuses every bind outside it (review of 9.2).
    "ppended": ({}, "ldap.account_expired", "ldap.account_expired"),
    "ppnotstarted": ({}, "ldap.account_expired", "ldap.account_expired"),
    "ppendsnext": ({}, "", ""),
}
PPOLICY_LOCKS = {"pplockedforever": "000001010000Z", "pplocked": "20260101000000Z"}
#: user -> ppolicy validity attributes (generalized time with fractions and offsets, as slapd takes them)
PPOLICY_WINDOWS = {"ppended": {"pwdEndTime": "20200101000000.25Z"},
                   "ppnotstarted": {"pwdStartTime": "20990101000000+0130"},
                   "ppendsnext": {"pwdStartTime": "20200101000000Z", "pwdEndTime": "209901010000.5-0200"}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("state")
    extra = {user: {"objectClass": ["top", "person", "organizationalPerson", "inetOrgPerson", "authgwAccountState"],
                    **attrs} for user, (attrs, _, _) in USERS.items() if attrs}
    with three_door_world(base, USERS, "account state CA", extra) as world:
        for user, dn in world["dns"].items():
            if user in PPOLICY_LOCKS:
                world["slapd"].modify(dn, {"pwdAccountLockedTime": [(ldap3.MODIFY_REPLACE, [PPOLICY_LOCKS[user]])]})
            for attr, value in PPOLICY_WINDOWS.get(user, {}).items():
                world["slapd"].modify(dn, {attr: [(ldap3.MODIFY_REPLACE, [value])]})
        yield world


def _gateway(world, name: str, refuses: bool) -> GatewayProcess:
    return start_three_door_gateway(world, world["base"] / name, refuses=refuses)


@pytest.fixture(scope="module")
def default(world):
    gateway = _gateway(world, "default", refuses=False)
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def strict(world):
    gateway = _gateway(world, "strict", refuses=True)
    yield gateway
    gateway.stop()


def check(gateway: GatewayProcess, response, user: str, refusal: str, step: str) -> None:
    record = gateway.audit_for(response.header("X-Request-Id"))
    if not refusal:
        assert (response.status, response.header("Remote-User")) == (200, user), (record, response.body)
        return
    assert response.status == 401 and response.header("Remote-User") is None, response.body
    assert (record["outcome"], record["reason"], record["step"]) == ("account_state", refusal, step), record


@pytest.mark.parametrize("user", list(USERS))
def test_kerberos_refuses_by_account_state(world, default, user):
    check(default, by_kerberos(world, default, user), user, USERS[user][1], "kerberos")


@pytest.mark.parametrize("user", list(USERS))
def test_certificate_refuses_by_account_state(world, default, user):
    check(default, by_certificate(world, default, user), user, USERS[user][1], "client_cert")


@pytest.mark.parametrize("user", ["adpwexpired", "admustchange", "okuser", "addisabled"])
def test_password_state_refuses_when_configured(world, strict, user):
    check(strict, by_kerberos(world, strict, user), user, USERS[user][2], "kerberos")
    check(strict, by_certificate(world, strict, user), user, USERS[user][2], "client_cert")


@pytest.mark.parametrize("user", ["okuser", "ipadisabled", "adexpired", "addisabled"])
def test_password_path_reads_the_same_state(world, default, user):
    """slapd binds these users (it enforces none of AD's or 389-DS's flags): the entry still says
    no, with the same reason code as the other paths."""
    check(default, by_password(default, user), user, USERS[user][1], "ldap")


def test_ppolicy_lock_refuses_the_password_too(world, default):
    response = by_password(default, "pplockedforever")
    record = default.audit_for(response.header("X-Request-Id"))
    assert response.status == 401 and record["outcome"] == "invalid_credentials", record  # slapd's 49


@pytest.mark.parametrize("user", ["ppended", "ppnotstarted", "ppendsnext"])
def test_ppolicy_validity_window_is_the_password_paths_answer_too(world, default, user):
    """slapd itself refuses binds outside pwdStartTime..pwdEndTime (bare 49), and allows them
    inside: the lookup path must agree with it, or a Kerberos ticket or a certificate logs in an
    account whose end date passed."""
    response = by_password(default, user)
    record = default.audit_for(response.header("X-Request-Id"))
    if USERS[user][1]:
        assert response.status == 401 and record["outcome"] == "invalid_credentials", record
    else:
        assert (response.status, response.header("Remote-User")) == (200, user), record


def test_direct_bind_reads_the_same_state(world, start_gateway):
    settings = world["slapd"].plugin_settings(mode="plain")
    for key in ("bind_dn", "bind_password"):
        settings.pop(key)
    settings["direct_bind"] = f"uid={{username}},{world['slapd'].users_dn}"
    conf = write_conf(world["base"] / "direct" / "conf.d", {
        "gateway.yaml": json.dumps({"chain": ["ldap"], "throttle": {"enabled": False}}),
        "ldap.yaml": json.dumps({"ldap": settings}),
    })
    gateway = start_gateway(conf)
    for user in ("okuser", "ipadisabled", "addisabled", "adexpired"):
        check(gateway, gateway.auth(user, f"{user}-pw"), user, USERS[user][1], "ldap")


@pytest.fixture(scope="module")
def active_directory(world):
    """The ``active_directory`` preset against slapd (filter, names and groups overridden for its
    schema): every AD user entry carries ``userAccountControl``, so an entry without it is one
    whose state the service account may not read."""
    ldap = world["slapd"].plugin_settings(
        mode="plain", preset="active_directory", user_filter="(&(objectClass=inetOrgPerson)(uid={username}))",
        attributes={"username": "uid", "subject": "entryUUID"}, groups={"source": "memberof"})
    gateway = start_three_door_gateway(world, world["base"] / "ad", ldap=ldap)
    yield gateway
    gateway.stop()


@pytest.mark.parametrize("user, refusal", [
    ("okuser", "ldap.account_state_unreadable"),  # no userAccountControl at all
    ("adexpiresnext", "ldap.account_state_unreadable"),
    ("addisabled", "ldap.disabled"),
    ("adpwexpired", ""),  # userAccountControl 512: readable and enabled
])
def test_active_directory_state_the_service_account_cannot_read_refuses(world, active_directory, user, refusal):
    """Review of issue 9.2: a lookup read "no userAccountControl" as "not disabled", so a service
    account without read access to it let every disabled AD account in by Kerberos and certificate."""
    check(active_directory, by_kerberos(world, active_directory, user), user, refusal, "kerberos")
    check(active_directory, by_certificate(world, active_directory, user), user, refusal, "client_cert")
    if refusal == "ldap.account_state_unreadable":
        assert f"lookup of {user!r}: the entry has no userAccountControl; the service account may not read it" \
            in active_directory.output()
