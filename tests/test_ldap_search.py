"""``gateway_search_users`` and ``gateway_list_groups`` of the ldap plugin against a real slapd.

The plugin runs in this process (its hooks are what the link's connector calls); the directory
is a real slapd over LDAPS. The relay -> connector round trip is in test_relay_search.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gateway import BackendUnavailable, UserPage
from gateway.plugins.ldap import LdapPlugin
from gateway.plugins.ldap.search import MAX_LIMIT
from gateway.registry import PluginContext
from gateway.settings import GatewaySettings
from support.pki import CA
from support.slapd import Slapd

#: More users than one page holds, so limit + cursor are exercised over several pages.
MANY = [f"member{i:02d}" for i in range(23)]


@pytest.fixture(scope="module")
def directory(tmp_path_factory) -> Slapd:
    slapd = Slapd(tmp_path_factory.mktemp("ldap") / "slapd", tls=CA.create()).start()
    slapd.add_users((uid, "pw-" + uid) for uid in MANY)
    slapd.add_user("alice", "alice-pw", cn="Alice Liddell", mail="alice@example.com", groups=["staff"])
    slapd.add_user("bob", "bob-pw", cn="Bob Builder", groups=["builders"])
    slapd.add_user("nogroups", "ng-pw", cn="No Groups")
    slapd.add_group("employees", [slapd.group_dn("staff")])
    slapd.add_group("everyone", [slapd.group_dn("employees"), slapd.group_dn("builders")])
    # Literal special characters: only an escaped query may find them, and only them.
    for uid in ("star*user", "paren(x)", "back\\slash"):
        slapd.add_user(uid, "special-pw", cn=f"Special {uid}")
    slapd.add_user("disabled1", "dis-pw", cn="Disabled One",
                   extra={"objectClass": "authgwAccountState", "nsAccountLock": "TRUE"})
    yield slapd
    slapd.stop()


@pytest.fixture
def plugin(tmp_path: Path, directory):
    # page_size 4: the server answers in several RFC 2696 pages within one search.
    settings = directory.plugin_settings("ldaps", groups={"nested": True, "page_size": 4},
                                         attributes={"secret": "userPassword"})
    context = PluginContext(name="ldap", config_dir=tmp_path, state_dir=tmp_path,
                            gateway=GatewaySettings(chain=["ldap"]), hook=None,  # type: ignore[arg-type]
                            log=logging.getLogger("test.ldap.search"))
    plugin = LdapPlugin(LdapPlugin.Settings.model_validate(settings), context)
    yield plugin
    plugin.gateway_shutdown()


def names(page: UserPage) -> list[str]:
    return [u.username for u in page.users]


def test_pages_with_limit_and_cursor_cover_every_match_once(plugin) -> None:
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = plugin.gateway_search_users(query="member", limit=5, cursor=cursor)
        assert isinstance(page, UserPage) and len(page.users) <= 5
        seen += names(page)
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
        assert pages < 10
    assert seen == sorted(MANY) and pages == 5  # 23 users: 5+5+5+5+3
    # A bad cursor is the caller's error, not the directory's.
    with pytest.raises(ValueError):
        plugin.gateway_search_users(query="member", limit=5, cursor="!!not-base64!!")


def _searches(directory: Slapd) -> int:
    """SEARCH operations slapd started (its monitor backend), this read's own included: started,
    not completed, since slapd counts an operation completed only after sending its result."""
    conn = directory._admin()
    try:
        _, _, entries, _ = conn.search("cn=Search,cn=Operations,cn=Monitor", "(objectClass=*)",
                                       search_scope="BASE", attributes=["monitorOpInitiated"])
        return int(entries[0]["attributes"]["monitorOpInitiated"][0])
    finally:
        conn.unbind()


def test_one_call_reads_the_server_in_rfc2696_pages(plugin, directory) -> None:
    plugin.gateway_search_users(query="nobody-matches", limit=5, cursor=None)  # the pool's link is open
    before = _searches(directory)
    page = plugin.gateway_search_users(query="member", limit=50, cursor=None)
    assert names(page) == sorted(MANY)
    # 23 entries in pages of 4: six search requests on the wire for one hook call (+1: the second read).
    assert _searches(directory) - before == 6 + 1


def test_limit_is_capped_and_display_names_match_by_substring(plugin) -> None:
    everyone = plugin.gateway_search_users(query="", limit=10_000, cursor=None)
    assert len(everyone.users) == min(MAX_LIMIT, 30)  # 23 + alice, bob, nogroups, 3 special, disabled1
    page = plugin.gateway_search_users(query="liddell", limit=10, cursor=None)
    assert names(page) == ["alice"]
    alice = page.users[0]
    assert alice.display_name == "Alice Liddell" and alice.email == "alice@example.com"
    assert alice.account_state == "" and page.next_cursor is None


def test_no_password_or_hash_in_answers(plugin) -> None:
    page = plugin.gateway_search_users(query="", limit=50, cursor=None)
    for user in page.users:
        assert "secret" not in user.claims
        assert "{SSHA}" not in repr(user) and "pw" not in repr(user.claims).lower()


def test_account_state_is_carried_like_a_lookup(plugin) -> None:
    page = plugin.gateway_search_users(query="disabled", limit=5, cursor=None)
    assert names(page) == ["disabled1"]
    assert page.users[0].account_state == plugin.gateway_lookup_user(username="disabled1").account_state != ""


@pytest.mark.parametrize("query, expected", [
    ("*)(uid=*", []),
    ("*", ["star*user"]),
    ("star*", ["star*user"]),
    ("paren(", ["paren(x)"]),
    (")", ["paren(x)"]),
    ("back\\", ["back\\slash"]),
    ("\\2a", []),
    ("a\x00", []),
    ("alice)(|(uid=*", []),
])
def test_injection_attempts_match_only_literally(plugin, query, expected) -> None:
    page = plugin.gateway_search_users(query=query, limit=50, cursor=None)
    assert sorted(names(page)) == expected


def test_list_groups_plain_nested_none_and_unknown(plugin) -> None:
    assert plugin.gateway_list_groups(username="alice") == ["employees", "everyone", "staff"]
    assert plugin.gateway_list_groups(username="bob") == ["builders", "everyone"]
    assert plugin.gateway_list_groups(username="nogroups") == []
    assert plugin.gateway_list_groups(username="nobody") is None
    assert plugin.gateway_list_groups(username="*") is None


def test_directory_down_is_backend_unavailable(tmp_path, directory) -> None:
    from support.net import free_port

    settings = directory.plugin_settings("plain", servers=[f"ldap://127.0.0.1:{free_port()}"], connect_timeout=0.5)
    context = PluginContext(name="ldap", config_dir=tmp_path, state_dir=tmp_path,
                            gateway=GatewaySettings(chain=["ldap"]), hook=None,  # type: ignore[arg-type]
                            log=logging.getLogger("test.ldap.search"))
    plugin = LdapPlugin(LdapPlugin.Settings.model_validate(settings), context)
    try:
        with pytest.raises(BackendUnavailable):
            plugin.gateway_search_users(query="a", limit=5, cursor=None)
        with pytest.raises(BackendUnavailable):
            plugin.gateway_list_groups(username="alice")
    finally:
        plugin.gateway_shutdown()
