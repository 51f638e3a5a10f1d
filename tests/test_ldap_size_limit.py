"""Exactly one directory match, under a server's own size limit, against a real slapd.

The user search asks for at most 2 entries: one is the user, two are enough to know the name is
ambiguous. A server whose own limit is lower (slapd's ``sizelimit 1``, an AD ``MaxPageSize`` or
an administrative limit of 1) sends one entry and sizeLimitExceeded (4) although two entries
match; that entry is not the user, and the login is refused as ambiguous.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from gateway import Attempt, Outcome, PasswordCredential
from gateway.plugins.ldap import LdapPlugin
from gateway.plugins.ldap.link import Entry, Result
from gateway.registry import PluginContext
from gateway.settings import GatewaySettings
from support.gateway import GatewayProcess
from support.ldapgw import api_login, ldap_gateways
from support.slapd import Slapd

TOKEN = "size-limit-token"
PASSWORD = "dup-pw"


class LimitedSlapd(Slapd):
    """slapd whose searches return at most one entry (``sizelimit 1``) to everyone but the
    rootdn, whatever the client asks for."""

    def _write_conf(self) -> None:
        super()._write_conf()
        conf = self.directory / "slapd.conf"
        text = conf.read_text()
        assert "sizelimit unlimited\n" in text
        conf.write_text(text.replace("sizelimit unlimited\n", "sizelimit 1\n"))


@pytest.fixture(scope="module")
def directory(tmp_path_factory) -> Slapd:
    slapd = LimitedSlapd(tmp_path_factory.mktemp("ldap") / "slapd").start()
    slapd.add_user("alice", "alice-pw", cn="Alice", mail="alice@example.com")
    # Two entries answer to uid=dup, with the same password: whichever comes back alone would log in.
    slapd.add_entry(f"ou=contractors,{slapd.base_dn}", {"objectClass": ["top", "organizationalUnit"],
                                                         "ou": "contractors"})
    slapd.add_user("dup", PASSWORD, cn="Dup One")
    slapd.add_entry(f"uid=dup,ou=contractors,{slapd.base_dn}", {
        "objectClass": ["top", "person", "organizationalPerson", "inetOrgPerson"],
        "uid": "dup", "cn": "Dup Two", "sn": "Two", "userPassword": PASSWORD})
    yield slapd
    slapd.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, directory) -> GatewayProcess:
    starts = ldap_gateways(tmp_path_factory.mktemp("gw"), TOKEN)
    start = next(starts)
    yield start(directory.plugin_settings("plain", groups={"source": "none"}))
    starts.close()


def _plugin(tmp_path: Path, settings: dict) -> LdapPlugin:
    context = PluginContext(name="ldap", config_dir=tmp_path, state_dir=tmp_path,
                            gateway=GatewaySettings(chain=["ldap"]), hook=None,  # type: ignore[arg-type]
                            log=logging.getLogger("test.ldap"))
    return LdapPlugin(LdapPlugin.Settings.model_validate(settings), context)


def test_the_server_really_sends_one_entry_and_size_limit_exceeded(directory) -> None:
    """The premise: slapd answers the search the plugin makes with one entry and code 4."""
    import ldap3

    conn = ldap3.Connection(ldap3.Server(directory.url, get_info=ldap3.NONE), directory.service_dn,
                            directory.service_password, client_strategy=ldap3.SAFE_SYNC, auto_bind=True)
    try:
        _, result, entries, _ = conn.search(directory.base_dn, "(uid=dup)", size_limit=2)
    finally:
        conn.unbind()
    assert (result["result"], len(entries)) == (4, 1)


def test_one_entry_with_size_limit_exceeded_is_ambiguous_not_the_user(gateway) -> None:
    status, body = api_login(gateway, TOKEN, "dup", PASSWORD)
    assert status == 200
    assert (body["outcome"], body["reason"], body["identity"]) == ("invalid_credentials", "ldap.ambiguous_user", None)
    response = gateway.auth("dup", PASSWORD)
    assert response.status == 401
    assert gateway.audit_for(response.header("X-Request-Id"))["reason"] == "ldap.ambiguous_user"
    # A name that matches one entry is not refused by the server's limit.
    assert gateway.auth("alice", "alice-pw").status == 200


def test_lookups_and_group_lists_answer_nobody_for_an_ambiguous_name(tmp_path, directory) -> None:
    plugin = _plugin(tmp_path, directory.plugin_settings("plain", groups={"source": "none"}))
    try:
        assert plugin.gateway_lookup_user("dup") is None
        assert plugin.gateway_list_groups("dup") is None
        assert plugin.gateway_lookup_user("alice").username == "alice"
        attempt = Attempt(request_id="t", client=__import__("ipaddress").ip_address("127.0.0.1"), front_door="test",
                          deadline=time.monotonic() + 5, password=PasswordCredential("dup", PASSWORD))
        decision = plugin.gateway_authenticate(attempt)
        assert decision is not None and (decision.outcome, decision.reason) == (Outcome.INVALID_CREDENTIALS,
                                                                               "ldap.ambiguous_user")
    finally:
        plugin.gateway_shutdown()


class _Answers:
    """A link whose user search answers *result* with *entries*."""

    def __init__(self, code: int, entries: list[Entry]) -> None:
        self.answer = (Result(code, ""), entries, None)

    def search(self, *args, **kwargs):
        return self.answer


@pytest.mark.parametrize("code, count, ambiguous, unique", [
    (0, 0, False, False),
    (0, 1, False, True),
    (0, 2, True, False),
    (4, 0, True, False),   # the server's limit is 0: something matches, and it shows nothing
    (4, 1, True, False),   # the server's limit is 1: the entry sent is not the only match
    (4, 2, True, False),
    (32, 1, False, False),  # an errored search never makes a match
])
def test_size_limit_exceeded_is_ambiguous_whatever_came_back(tmp_path, code, count, ambiguous, unique) -> None:
    secret = tmp_path / "service-password"
    secret.write_text("unused")
    secret.chmod(0o600)
    plugin = _plugin(tmp_path, {"servers": ["ldap://127.0.0.1:9"], "insecure": True, "base_dn": "dc=example,dc=com",
                                "bind_dn": "cn=service,dc=example,dc=com", "bind_password": {"file": str(secret)}})
    entries = [Entry(f"uid=u{i},dc=example,dc=com", {}) for i in range(count)]
    matches = plugin.directory.find(_Answers(code, entries), "u")  # type: ignore[arg-type]
    assert matches.ambiguous is ambiguous
    assert (matches.one is not None) is unique
