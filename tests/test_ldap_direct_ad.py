"""Direct bind with a UPN template against an AD-like directory, and servers that page wrongly.

slapd binds only DNs, so these run against tests/support/fakead.py, which binds UPNs as AD does
and answers "Who am I?" (RFC 4532) as AD does; the gateway is the real ``authgw serve``.
"""

from __future__ import annotations

import time

import pytest

from support.fakead import FakeAD
from support.ldapgw import api_login, ldap_gateways

TOKEN = "direct-ad-token"
BASE = "DC=corp,DC=example,DC=com"
PERSON = {"objectClass": ["top", "person", "user"], "objectCategory": ["person"], "userAccountControl": ["512"]}


def user(sam: str, upn: str, password: str, **attrs) -> dict[str, list[str]]:
    return {**PERSON, "sAMAccountName": [sam], "userPrincipalName": [upn], "password": [password], **attrs}


USERS = {
    # Jane was renamed: her sAMAccountName is jsmith, her UPN kept the old jdoe@...
    f"CN=Jane Smith,OU=Staff,{BASE}": user("jsmith", "jdoe@corp.example.com", "jane-pw", displayName=["Jane Smith"]),
    # John got the free sAMAccountName jdoe later; he is a domain admin.
    f"CN=John Doe,OU=Admins,{BASE}": user("jdoe", "john.doe@corp.example.com", "john-pw", displayName=["John Doe"],
                                           memberOf=[f"CN=Domain Admins,CN=Users,{BASE}"]),
    # A directory that does not enforce its own flags on binds (the bind succeeds).
    f"CN=Dan Disabled,OU=Staff,{BASE}": user("dan", "dan@corp.example.com", "dan-pw", userAccountControl=["514"]),
    f"CN=Hank Hidden,OU=Staff,{BASE}": user("hank", "hank@corp.example.com", "hank-pw"),
    f"CN=Nora NoFlags,OU=Staff,{BASE}": {k: v for k, v in user("nora", "nora@corp.example.com", "nora-pw").items()
                                         if k != "userAccountControl"},
}


def settings(directory: FakeAD, **overrides) -> dict:
    return {"preset": "active_directory", "servers": [directory.url], "insecure": True, "base_dn": BASE,
            "direct_bind": "{username}@corp.example.com", "groups": {"source": "memberof", "nested": False},
            "connect_timeout": 0.5, "receive_timeout": 1.0, "backoff": 0, **overrides}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    yield from ldap_gateways(tmp_path_factory.mktemp("gw"), TOKEN)


@pytest.fixture(scope="module")
def ad():
    directory = FakeAD(USERS, hidden={f"CN=Hank Hidden,OU=Staff,{BASE}"})
    yield directory
    directory.stop()


@pytest.fixture(scope="module")
def gateway(start, ad):
    return start(settings(ad))


def api(gateway, username: str, password: str) -> dict:
    status, body = api_login(gateway, TOKEN, username, password)
    assert status in (200, 503), body
    return body


def test_the_profile_is_the_bound_accounts_not_the_one_the_typed_name_finds(gateway) -> None:
    # jdoe@corp.example.com is Jane's UPN: AD binds Jane. A search for "jdoe" with the preset's
    # filter (sAMAccountName or UPN) finds John, the domain admin: his profile must not be hers.
    body = api(gateway, "jdoe", "jane-pw")
    assert body["outcome"] == "success", body
    identity = body["identity"]
    assert identity["username"] == "jsmith"
    assert identity["claims"]["dn"] == f"CN=Jane Smith,OU=Staff,{BASE}"
    assert "Domain Admins" not in identity["groups"]
    # AD's implicit UPN: jsmith@corp.example.com binds the account whose sAMAccountName is jsmith.
    assert api(gateway, "jsmith", "jane-pw")["identity"]["claims"]["dn"] == f"CN=Jane Smith,OU=Staff,{BASE}"
    john = api(gateway, "john.doe", "john-pw")["identity"]
    assert (john["username"], john["groups"]) == ("jdoe", ["Domain Admins"])
    assert api(gateway, "jdoe", "john-pw")["reason"] == "ldap.invalid_password"  # jdoe@ is Jane's


@pytest.mark.parametrize("username, password, reason", [
    ("dan", "dan-pw", "ldap.disabled"),                        # the entry's flags, read as the user
    ("hank", "hank-pw", "ldap.account_state_unreadable"),      # the user may not read their entry
    ("nora", "nora-pw", "ldap.account_state_unreadable"),      # AD's entry without userAccountControl
])
def test_a_right_password_on_an_entry_whose_state_is_not_readable_is_refused(gateway, username, password,
                                                                             reason) -> None:
    body = api(gateway, username, password)
    assert (body["outcome"], body["reason"]) == ("account_state", reason), body


@pytest.mark.parametrize("who_am_i, outcome", [("dn", "success"), ("anonymous", "account_state"),
                                                ("unsupported", "account_state")])
def test_who_am_i_names_the_entry_or_nobody_gets_in(start, who_am_i, outcome) -> None:
    directory = FakeAD(USERS, who_am_i=who_am_i)
    try:
        body = api(start(settings(directory)), "jdoe", "jane-pw")
        assert body["outcome"] == outcome, body
        if outcome == "success":
            assert body["identity"]["claims"]["dn"] == f"CN=Jane Smith,OU=Staff,{BASE}"
        else:
            assert body["reason"] == "ldap.account_state_unreadable"
        assert directory.requests["extendedReq"] >= 1
    finally:
        directory.stop()


def test_a_server_paging_without_progress_is_not_followed_forever(start) -> None:
    directory = FakeAD(USERS, group_pages="empty")
    try:
        gateway = start(settings(directory, groups={"source": "search", "nested": False}), deadline=3.0)
        body = api(gateway, "jdoe", "jane-pw")
        # the server's trouble, not the attempt's deadline (3 s), ended it
        assert (body["outcome"], body["reason"]) == ("unavailable", "ldap.unavailable"), body
        # a few empty pages, then the server is in trouble: not thousands of requests until the deadline
        assert directory.requests["searchRequest"] < 10, directory.requests
    finally:
        directory.stop()


def test_the_deadline_holds_inside_a_paged_search(start) -> None:
    # Each page comes within receive_timeout and brings a new group: only the deadline stops it.
    # receive_timeout is 3 s, fifteen times a page's 0.2 s: with 1 s, a page that a loaded
    # machine (two suites on two cores; the fake server is a thread of the test process) held
    # past 1 s was the server's trouble (ldap.unavailable), not the deadline's (seen once).
    directory = FakeAD(USERS, group_pages="slow", page_delay=0.2)
    try:
        gateway = start(settings(directory, groups={"source": "search", "nested": False}, receive_timeout=3.0),
                        deadline=4.0)
        body = api(gateway, "jdoe", "jane-pw")
        # The deadline's answer: without it the pages go on for as long as the server sends them.
        assert (body["outcome"], body["reason"]) == ("unavailable", "ldap.timeout"), body
        pages = directory.requests["searchRequest"]
        assert pages <= 4.0 / 0.2 + 1, pages  # no more pages than the deadline leaves time for
        time.sleep(0.5)
        assert directory.requests["searchRequest"] <= pages + 1  # nothing goes on asking after the answer
    finally:
        directory.stop()
