"""The ldap plugin against a real slapd, through a real ``authgw serve`` and ``/auth``.

One directory (LDAPS + StartTLS, test CA) and one LDAPS gateway serve most tests of this module;
TLS variants and ``authgw check`` start gateways of their own. Directory failures (kill,
restart, failover, timeouts) and AD sub-codes are in test_ldap_failover.py.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from gateway import Attempt, BackendUnavailable, Outcome, PasswordCredential
from gateway.plugins.ldap import LdapPlugin
from gateway.registry import PluginContext
from gateway.settings import GatewaySettings
from support.gateway import GatewayProcess, authgw, write_conf
from support.net import free_port, wait_for
from support.pki import CA
from support.slapd import Slapd

PASSWORDS = {
    "alice": "alice-pw",
    "bob": "bob-pw",
    "star*user": "star-pw",
    "paren(x)": "paren-pw",
    "back\\slash": "back-pw",
    "jösé": "jose-pw",
    "用户": "yonghu-pw",
    "dup": "dup-pw",
}


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA.create()


@pytest.fixture(scope="module")
def directory(tmp_path_factory, ca) -> Slapd:
    slapd = Slapd(tmp_path_factory.mktemp("ldap") / "slapd", tls=ca).start()
    slapd.add_user("alice", PASSWORDS["alice"], cn="Alice Liddell", mail="alice@example.com",
                   groups=["staff", "cycle-a"])
    slapd.add_user("bob", PASSWORDS["bob"], cn="Bob Builder", mail="bob@example.com", groups=["builders"])
    for uid in ("star*user", "paren(x)", "back\\slash", "jösé", "用户"):
        slapd.add_user(uid, PASSWORDS[uid], cn=f"Special {uid}")
    # Nested: alice -> staff -> employees -> everyone; a cycle cycle-a <-> cycle-b must end.
    slapd.add_group("employees", [slapd.group_dn("staff")])
    slapd.add_group("everyone", [slapd.group_dn("employees"), slapd.group_dn("builders")])
    slapd.add_group("cycle-b", [slapd.group_dn("cycle-a")])
    slapd.add_group("cycle-a", [slapd.group_dn("cycle-b")])
    # Two entries answer to uid=dup: the plugin must refuse rather than pick one.
    slapd.add_entry(f"ou=contractors,{slapd.base_dn}", {"objectClass": ["top", "organizationalUnit"], "ou": "contractors"})
    slapd.add_user("dup", PASSWORDS["dup"])
    slapd.add_entry(f"uid=dup,ou=contractors,{slapd.base_dn}", {
        "objectClass": ["top", "person", "organizationalPerson", "inetOrgPerson"],
        "uid": "dup", "cn": "dup two", "sn": "two", "userPassword": PASSWORDS["dup"]})
    yield slapd
    slapd.stop()


def conf_files(ldap: dict, **gateway) -> dict[str, str]:
    # No periodic probe: each is a service bind slapd counts, and these tests count binds exactly.
    core = {"chain": ["ldap"], "throttle": {"enabled": False}, "health": {"probe_interval": 3600}, **gateway}
    return {"gateway.yaml": json.dumps(core), "ldap.yaml": "ldap: " + json.dumps(ldap)}


class Gateways:
    """Gateways started by one module, stopped at its end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.started: list[GatewayProcess] = []

    def start(self, ldap: dict, **gateway) -> GatewayProcess:
        n = len(self.started)
        conf = write_conf(self.base / f"conf{n}", conf_files(ldap, **gateway))
        process = GatewayProcess(conf, self.base / f"state{n}")
        self.started.append(process)
        return process.start()

    def stop(self) -> None:
        for process in self.started:
            process.stop()


@pytest.fixture(scope="module")
def gateways(tmp_path_factory):
    started = Gateways(tmp_path_factory.mktemp("gateways"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def gw(gateways, directory) -> GatewayProcess:
    return gateways.start(directory.plugin_settings("ldaps"))


def last_audit(gateway: GatewayProcess, count: int = 1) -> list[dict]:
    lines = wait_for(lambda: len(lines := gateway.audit()) >= count and lines, 10, interval=0.05,
                     what=f"{count} audit lines", log=gateway.output)  # written right after the answer
    return lines[-count:]


# ---------------------------------------------------------------------------------------------
# Passwords
# ---------------------------------------------------------------------------------------------


def test_right_password_gives_the_directory_profile_and_nested_groups(gw) -> None:
    response = gw.auth("alice", PASSWORDS["alice"])
    assert response.status == 200
    assert response.header("Remote-User") == "alice"
    assert response.header("Remote-Name") == "Alice Liddell"
    assert response.header("Remote-Email") == "alice@example.com"
    groups = response.header("Remote-Groups").split(",")
    # direct, two levels of nesting, and both members of a membership cycle
    assert sorted(groups) == ["cycle-a", "cycle-b", "employees", "everyone", "staff"]
    line = gw.audit_for(response.header("X-Request-Id"))
    assert (line["outcome"], line["step"]) == ("success", "ldap")
    assert line["subject"] and not line["subject"].startswith("dn:")  # entryUUID, stable over renames


def test_wrong_password_is_a_uniform_401_with_a_basic_challenge(gw) -> None:
    response = gw.auth("alice", "not-her-password")
    assert response.status == 401
    assert response.header("WWW-Authenticate") == 'Basic realm="authgw", charset="UTF-8"'
    assert response.header("Remote-User") is None
    line = gw.audit_for(response.header("X-Request-Id"))
    assert (line["outcome"], line["reason"], line["step"]) == ("invalid_credentials", "ldap.invalid_password", "ldap")
    assert "not-her-password" not in gw.output()


def test_unknown_user_is_the_same_401_but_audited_as_not_found(gw) -> None:
    known = gw.auth("alice", "wrong")
    unknown = gw.auth("nobody-here", "wrong")
    assert (unknown.status, unknown.body, unknown.header("WWW-Authenticate")) == \
        (known.status, known.body, known.header("WWW-Authenticate"))
    line = gw.audit_for(unknown.header("X-Request-Id"))
    assert (line["outcome"], line["reason"]) == ("user_not_found", "ldap.user_not_found")


def test_unknown_user_costs_the_directory_the_same_bind_as_a_wrong_password(gw, directory) -> None:
    # Uniform failures include timing: an unknown user must not answer a round trip sooner.
    gw.auth("alice", "warm-up-the-pools")
    before = directory.bind_count()
    assert gw.auth("alice", "wrong-again").status == 401
    wrong = directory.bind_count() - before
    before = directory.bind_count()
    assert gw.auth("nobody-at-all", "wrong-again").status == 401
    assert directory.bind_count() - before == wrong == 1


def test_several_matching_entries_are_refused(gw) -> None:
    response = gw.auth("dup", PASSWORDS["dup"])
    assert response.status == 401
    line = gw.audit_for(response.header("X-Request-Id"))
    assert line["reason"] == "ldap.ambiguous_user"


def test_connections_are_pooled_and_rebound(gw, directory) -> None:
    gw.auth("bob", PASSWORDS["bob"])  # warm: one service and one bind connection exist
    connections, binds = directory.connection_count(), directory.bind_count()
    for i in range(20):
        user = ("alice", "bob")[i % 2]
        assert gw.auth(user, PASSWORDS[user]).status == 200
    assert directory.connection_count() - connections <= 1  # not one socket per login
    assert directory.bind_count() - binds == 20             # exactly the users' binds: rebinds


# ---------------------------------------------------------------------------------------------
# Empty passwords never reach the directory
# ---------------------------------------------------------------------------------------------


def test_empty_password_through_auth_makes_no_bind(gw, directory) -> None:
    before = directory.bind_count()
    for username in ("alice", "", "nobody"):
        assert gw.auth(username, "").status == 401
    assert directory.bind_count() == before


NUL_PASSWORDS = ["\x00", "\x00" + PASSWORDS["alice"], PASSWORDS["alice"] + "\x00", PASSWORDS["alice"] + "\x00junk"]


def test_a_password_holding_nul_makes_no_bind(gw, directory) -> None:
    # A server in C may read the password up to its NUL: "\0" would be an unauthenticated bind
    # (success), "right\0junk" the right password. Refused by the plugin before any bind.
    before = directory.bind_count()
    for password in NUL_PASSWORDS:
        response = gw.auth("alice", password)
        assert response.status == 401, repr(password)
        line = gw.audit_for(response.header("X-Request-Id"))
        assert (line["outcome"], line["reason"], line["step"]) == \
            ("invalid_credentials", "ldap.nul_in_password", "ldap"), repr(password)
    assert directory.bind_count() == before


def _context(tmp_path: Path, directory_hook=None) -> PluginContext:
    return PluginContext(name="ldap", config_dir=tmp_path, state_dir=tmp_path,
                         gateway=GatewaySettings(chain=["ldap"]), hook=directory_hook,  # type: ignore[arg-type]
                         log=logging.getLogger("test.ldap"))


def _plugin(tmp_path: Path, settings: dict) -> LdapPlugin:
    return LdapPlugin(LdapPlugin.Settings.model_validate(settings), _context(tmp_path))


def _attempt(username: str, password: str) -> Attempt:
    return Attempt(request_id="t", client=__import__("ipaddress").ip_address("127.0.0.1"), front_door="test",
                   deadline=time.monotonic() + 5, password=PasswordCredential(username, password))


def test_the_plugin_itself_refuses_an_empty_password_before_any_network_call(tmp_path, directory) -> None:
    """The core refuses empty passwords too; the plugin must not rely on it (DESIGN.md section 7)."""
    plugin = _plugin(tmp_path, directory.plugin_settings("ldaps"))
    binds, connections = directory.bind_count(), directory.connection_count()
    decision = plugin.gateway_authenticate(_attempt("alice", ""))
    assert decision is not None and decision.outcome is Outcome.INVALID_CREDENTIALS
    assert decision.reason == "ldap.empty_password"
    assert (directory.bind_count(), directory.connection_count()) == (binds, connections)
    for password in NUL_PASSWORDS:  # and one a server in C could read as empty, or as the right one
        decision = plugin.gateway_authenticate(_attempt("alice", password))
        assert decision is not None and decision.outcome is Outcome.INVALID_CREDENTIALS
        assert decision.reason == "ldap.nul_in_password"
    assert (directory.bind_count(), directory.connection_count()) == (binds, connections)
    plugin.gateway_shutdown()


def test_a_username_too_long_to_look_up_is_noted_under_a_code_of_its_own(tmp_path, directory) -> None:
    """Refused at once, it has its own reason: under ``ldap.user_not_found`` (a search's, and an
    equalizing bind's, time) such refusals sent by the dozen pulled that kind's failure floor down
    (gateway/failtiming.py keeps samples per reason)."""
    plugin = _plugin(tmp_path, {**directory.plugin_settings("ldaps"), "max_username_length": 8})
    searches = directory.connection_count()
    attempt = _attempt("a" * 9, "a-password")
    assert plugin.gateway_authenticate(attempt) is None
    assert [(n.outcome, n.reason) for n in attempt.notes] == [(Outcome.USER_NOT_FOUND, "ldap.username_too_long")]
    assert directory.connection_count() == searches  # not looked up
    plugin.gateway_shutdown()


# ---------------------------------------------------------------------------------------------
# Input safety
# ---------------------------------------------------------------------------------------------

INJECTIONS = [
    "*",                        # wildcard: would match everyone
    "a*",                       # prefix wildcard: would match alice
    "alic*",
    "*)(uid=*",                 # closes the assertion, opens another
    "alice)(|(uid=*",
    "alice)(uid=alice",
    "*)(objectClass=*))(&(uid=x",
    "\\",                       # a lone escape character
    "(uid=alice)",
    "alice\\2a",                # looks escaped already; must be taken literally
    "star*",                    # would match the real user 'star*user'
]


def test_injection_attempts_match_nobody(gw) -> None:
    for username in INJECTIONS:
        for password in (PASSWORDS["alice"], PASSWORDS["star*user"]):
            response = gw.auth(username, password)
            assert response.status == 401, username
            line = gw.audit_for(response.header("X-Request-Id"))
            assert line["reason"] == "ldap.user_not_found", (username, line)


def test_the_plugin_takes_nul_and_wildcards_literally(tmp_path, directory) -> None:
    """The core already refuses NUL in a Basic username; the plugin must be safe without it."""
    plugin = _plugin(tmp_path, directory.plugin_settings("ldaps"))
    for username in ("alice\x00", "alice\x00*", "*", "al\x00ice"):
        attempt = _attempt(username, PASSWORDS["alice"])
        assert plugin.gateway_authenticate(attempt) is None, username
        assert [(n.outcome, n.reason) for n in attempt.notes] == [(Outcome.USER_NOT_FOUND, "ldap.user_not_found")]
    decision = plugin.gateway_authenticate(_attempt("alice", PASSWORDS["alice"]))
    assert decision is not None and decision.success
    plugin.gateway_shutdown()


@pytest.mark.parametrize("username", ["star*user", "paren(x)", "back\\slash", "jösé", "用户"])
def test_usernames_with_filter_characters_and_non_ascii_log_in_as_themselves(gw, username) -> None:
    response = gw.auth(username, PASSWORDS[username])
    assert response.status == 200
    line = gw.audit_for(response.header("X-Request-Id"))
    assert line["username"] == username and line["outcome"] == "success"
    assert gw.auth(username, "wrong").status == 401


# ---------------------------------------------------------------------------------------------
# Profile lookup for other methods (Kerberos, certificates)
# ---------------------------------------------------------------------------------------------


def test_lookup_user_answers_profiles_and_none_for_strangers(tmp_path, directory) -> None:
    plugin = _plugin(tmp_path, directory.plugin_settings("ldaps"))
    binds = directory.bind_count()
    identity = plugin.gateway_lookup_user(username="alice")
    assert identity is not None
    assert (identity.username, identity.email, identity.method) == ("alice", "alice@example.com", "ldap")
    assert {"staff", "employees", "everyone"} <= set(identity.groups)
    assert plugin.gateway_lookup_user(username="nobody") is None
    assert plugin.gateway_lookup_user(username="*") is None
    assert directory.bind_count() - binds == 1  # the service account only; no user bind
    plugin.gateway_shutdown()


def test_lookup_user_raises_backend_unavailable_when_the_directory_is_unreachable(tmp_path, directory) -> None:
    closed = f"ldaps://localhost:{free_port()}"
    plugin = _plugin(tmp_path, directory.plugin_settings("ldaps", servers=[closed], connect_timeout=0.5))
    with pytest.raises(BackendUnavailable) as info:
        plugin.gateway_lookup_user(username="alice")
    assert info.value.reason == "ldap.unavailable"


# ---------------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------------


def test_starttls_with_the_right_ca_logs_in(gateways, directory) -> None:
    gateway = gateways.start(directory.plugin_settings("starttls"))
    assert gateway.auth("alice", PASSWORDS["alice"]).status == 200
    assert gateway.auth("alice", "wrong").status == 401


@pytest.mark.parametrize("mode, how", [
    ("ldaps", "wrong_ca"),
    ("starttls", "wrong_ca"),
    ("ldaps", "ip_address"),      # the certificate names localhost, not 127.0.0.1
])
def test_unverifiable_certificates_fail_closed(gateways, directory, tmp_path, mode, how) -> None:
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(CA.create("some other CA").pem)
    overrides: dict = {"connect_timeout": 1.0}
    if how == "wrong_ca":
        overrides["ca_file"] = str(other_ca)
    else:
        overrides["servers"] = [directory.ldaps_url.replace("localhost", "127.0.0.1")]
    gateway = gateways.start(directory.plugin_settings(mode, **overrides))
    binds = directory.bind_count()
    response = gateway.auth("alice", PASSWORDS["alice"])
    assert response.status == 503
    assert response.header("Retry-After")
    line = gateway.audit_for(response.header("X-Request-Id"))
    assert (line["outcome"], line["reason"]) == ("unavailable", "ldap.unavailable")
    assert directory.bind_count() == binds  # the password never left over an unverified channel
    ready = gateway.get("/readyz")
    assert ready.status == 503
    assert "certificate verify failed" in ready.body.decode() or "certificate" in ready.body.decode().lower()


def test_plaintext_needs_insecure_and_warns_at_start_up(gateways, directory, tmp_path) -> None:
    settings = directory.plugin_settings("plain")
    del settings["insecure"]
    conf = write_conf(tmp_path / "conf.d", conf_files(settings))
    result = authgw("config", "check", "--config", str(conf))
    assert result.returncode != 0
    assert "insecure: true" in result.stdout + result.stderr
    gateway = gateways.start(directory.plugin_settings("plain"))
    assert gateway.auth("alice", PASSWORDS["alice"]).status == 200
    assert "plaintext LDAP" in gateway.output()


# ---------------------------------------------------------------------------------------------
# Readiness and self-tests
# ---------------------------------------------------------------------------------------------


def test_readyz_shows_the_active_server(gw, directory) -> None:
    assert gw.auth("alice", PASSWORDS["alice"]).status == 200
    body = gw.get("/readyz").json()
    assert body["ready"] is True
    (component,) = [c for c in body["components"] if c["name"].startswith("ldap.")]
    assert component == {"name": f"ldap.server[{directory.ldaps_url}]", "ready": True, "detail": "active"}


def test_check_runs_the_four_self_tests_and_the_test_login(directory, tmp_path) -> None:
    password_file = tmp_path / "alice-pw"
    password_file.write_text(PASSWORDS["alice"])
    password_file.chmod(0o600)
    settings = directory.plugin_settings("ldaps", test_login={"username": "alice",
                                                             "password": {"file": str(password_file)}})
    conf = write_conf(tmp_path / "conf.d", conf_files(settings))
    result = authgw("check", "--config", str(conf), "--state-dir", str(tmp_path / "state"))
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    name = directory.ldaps_url.split("//")[1]
    assert f"PASS  ldap.tcp[{name}]" in out
    # the test CA issues 7-day certificates: the expiry warning must show, with a hint
    assert f"WARN  ldap.tls[{name}]" in out and "TLSv1" in out and "renew" in out
    assert "PASS  ldap.bind: bound as cn=service" in out
    assert "PASS  ldap.search:" in out and "mapped attributes readable" in out
    assert "PASS  ldap.login[alice]: alice logged in" in out and "5 groups" in out
    assert PASSWORDS["alice"] not in out + result.stderr


def test_check_failures_say_what_to_look_at(directory, tmp_path) -> None:
    bad_password = tmp_path / "bad"
    bad_password.write_text("not-the-service-password")
    bad_password.chmod(0o600)
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(CA.create("some other CA").pem)
    closed = f"ldaps://localhost:{free_port()}"
    settings = directory.plugin_settings("ldaps", servers=[closed, directory.ldaps_url],
                                         bind_password={"file": str(bad_password)}, connect_timeout=0.5)
    conf = write_conf(tmp_path / "bad.d", conf_files(settings))
    out = authgw("check", "--config", str(conf), "--state-dir", str(tmp_path / "state")).stdout
    assert f"FAIL  ldap.tcp[{closed.split('//')[1]}]" in out and "firewall" in out
    assert "FAIL  ldap.bind" in out and "bind_password" in out
    assert "SKIP  ldap.search" in out

    settings = directory.plugin_settings("ldaps", ca_file=str(other_ca))
    conf = write_conf(tmp_path / "ca.d", conf_files(settings))
    result = authgw("check", "--config", str(conf), "--state-dir", str(tmp_path / "state"))
    assert result.returncode != 0
    assert "FAIL  ldap.tls" in result.stdout and "ldap.ca_file" in result.stdout


# ---------------------------------------------------------------------------------------------
# Group strategies and direct bind (in-process plugin, same directory)
# ---------------------------------------------------------------------------------------------

ALICE_GROUPS = ["cycle-a", "cycle-b", "employees", "everyone", "staff"]


@pytest.mark.parametrize("groups, expected", [
    ({"source": "search", "page_size": 2}, ALICE_GROUPS),              # RFC 2696 pages of two
    ({"source": "memberof"}, ALICE_GROUPS),                             # memberOf, then expanded
    ({"source": "memberof", "nested": False}, ["cycle-a", "staff"]),    # memberOf as it is
    ({"source": "search", "nested": False}, ["cycle-a", "staff"]),
    ({"source": "search", "max_depth": 2}, ["cycle-a", "cycle-b", "employees", "staff"]),
    ({"source": "none"}, []),
])
def test_group_strategies(tmp_path, directory, groups, expected) -> None:
    plugin = _plugin(tmp_path, directory.plugin_settings("ldaps", groups=groups))
    decision = plugin.gateway_authenticate(_attempt("alice", PASSWORDS["alice"]))
    assert decision is not None and decision.success
    assert list(decision.identity.groups) == expected
    again = plugin.gateway_lookup_user(username="alice")
    assert list(again.groups) == expected
    plugin.gateway_shutdown()


def test_direct_bind_without_a_service_account(tmp_path, directory) -> None:
    settings = directory.plugin_settings("ldaps", direct_bind=f"uid={{username}},ou=people,{directory.base_dn}")
    del settings["bind_dn"], settings["bind_password"]
    plugin = _plugin(tmp_path, settings)
    decision = plugin.gateway_authenticate(_attempt("alice", PASSWORDS["alice"]))
    assert decision is not None and decision.success
    identity = decision.identity
    assert (identity.username, identity.email, identity.display_name) == ("alice", "alice@example.com", "Alice Liddell")
    assert list(identity.groups) == ALICE_GROUPS  # read as alice herself
    for username in ("star*user", "paren(x)", "back\\slash", "jösé"):  # DN-escaped, RFC 4514
        decision = plugin.gateway_authenticate(_attempt(username, PASSWORDS[username]))
        assert decision is not None and decision.success, username
    # a DN built from raw input would let "alice,ou=people" name another entry; escaped, it names none
    for username in ("alice,ou=people", "alice+cn=x", "*"):
        decision = plugin.gateway_authenticate(_attempt(username, PASSWORDS["alice"]))
        assert decision is not None and decision.outcome is Outcome.INVALID_CREDENTIALS, username
    decision = plugin.gateway_authenticate(_attempt("alice", "wrong"))
    assert decision.reason == "ldap.invalid_password"
    assert plugin.gateway_lookup_user(username="alice") is None  # nobody to search as
    plugin.gateway_shutdown()
