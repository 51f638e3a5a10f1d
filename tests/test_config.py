"""conf.d loading: strict YAML, merge rules, errors with file, line and key path, secrets."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway.registry import discover

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.settings import PluginSettings, Secret
from gateway.yamlfiles import load_directory
from support.chainhelp import build
from support.gateway import authgw, write_conf


def problems(conf: Path) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        load_config(conf, installed=set())
    return excinfo.value.problems


def test_yaml_1_1_traps_stay_strings(conf_dir):
    write_conf(conf_dir, {"x.yaml": "a: yes\nb: 0636\nc: 12:30\nd: on\ne: true\nf: 017\ng: 10\nh: 1.5\ni: ~\n"})
    data, _, _ = load_directory(conf_dir)
    assert data == {"a": "yes", "b": "0636", "c": "12:30", "d": "on", "e": True, "f": "017", "g": 10,
                    "h": 1.5, "i": None}


def test_a_duplicate_key_names_file_and_both_lines(conf_dir):
    write_conf(conf_dir, {"gateway.yaml": "chain: [static]\ndeadline: 3\n\ndeadline: 4\n"})
    (problem,) = problems(conf_dir)
    assert problem.endswith("gateway.yaml:4: deadline: duplicate key (first set at line 2)")


def test_files_merge_in_lexical_order_and_a_key_set_twice_names_both_places(conf_dir):
    write_conf(conf_dir, {
        "10-core.yaml": "chain: [a]\naudit:\n  file: '-'\n",
        "20-more.yaml": "deadline: 2\n",
        ".hidden.yaml": "chain: [ignored]\n",
        "README.txt": "not yaml: [",
    })
    config = load_config(conf_dir)
    assert config.core.chain == ["a"] and config.core.deadline == 2
    assert [f.name for f in config.files] == ["10-core.yaml", "20-more.yaml"]

    write_conf(conf_dir, {"30-clash.yaml": "audit:\n  file: /tmp/x\n"})
    (problem,) = problems(conf_dir)
    assert "30-clash.yaml:2: audit.file: already set at " in problem
    assert "10-core.yaml:3" in problem


def test_unknown_and_mistyped_keys_name_file_line_and_path(conf_dir):
    write_conf(conf_dir, {"gateway.yaml": "chain: [static]\n\ndeadlin: 3\nthrottle:\n  window: soon\n"})
    found = problems(conf_dir)
    assert any("gateway.yaml:3: deadlin: unknown key" in p for p in found), found
    assert any("gateway.yaml:5: throttle.window:" in p for p in found), found


def test_list_items_are_located(conf_dir):
    write_conf(conf_dir, {"gateway.yaml": "chain: [static]\nlisten:\n  - 127.0.0.1:9000\n  - nonsense\n"})
    (problem,) = problems(conf_dir)
    assert "gateway.yaml:" in problem and "listen" in problem and "HOST:PORT" in problem


def test_plugin_settings_errors_carry_the_plugin_prefix(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        build(tmp_path, {"chain": ["a"]}, {"a": {"action": "explode", "colour": "red"}})
    text = "\n".join(excinfo.value.problems)
    assert "a.yaml:2: a.action: Input should be 'abstain'" in text
    assert "a.yaml:3: a.colour: unknown key" in text


def test_a_missing_chain_is_explained(conf_dir):
    write_conf(conf_dir, {"gateway.yaml": "deadline: 3\n"})
    (problem,) = problems(conf_dir)
    assert "no file sets `chain:`" in problem


def test_malformed_yaml_names_file_and_line(conf_dir):
    write_conf(conf_dir, {"gateway.yaml": "chain: [static\ndeadline: 3\n"})
    (problem,) = problems(conf_dir)
    assert "gateway.yaml:1: chain: a `[` list is not closed" in problem


def test_a_lone_surrogate_escape_is_no_text(conf_dir, tmp_path, demo_hash):
    """``"\\ud800"`` in a double-quoted YAML string is no character: a user's name holding one
    reset every answer of their logins (review of the front door). Refused where it is, in
    conf.d and in a file a plugin reads (the static users file)."""
    write_conf(conf_dir, {"gateway.yaml": 'chain: [static]\nstatic:\n  users_file: "a\\ud800b"\n'})
    (problem,) = problems(conf_dir)
    assert "gateway.yaml:3: static.users_file: not text: a lone surrogate escape" in problem
    # the two halves of one character, as JSON-style writers escape an emoji: that character
    data, _, _ = load_directory(write_conf(tmp_path / "pair", {"a.yaml": 'x: "\\ud83d\\ude00 ok"\n'}))
    assert data["x"] == "\U0001f600 ok"
    users = tmp_path / "users.yaml"
    users.write_text(f'users:\n  sur:\n    password_hash: "{demo_hash}"\n    display_name: "bad \\ud800 name"\n')
    users.chmod(0o600)
    write_conf(conf_dir, {"gateway.yaml": f"chain: [static]\nstatic:\n  users_file: {users}\n"})
    result = authgw("config", "check", "--config", str(conf_dir))
    assert result.returncode != 0 and "users.yaml:4: users.sur.display_name: not text" in result.stdout + result.stderr


class _WithSecret(PluginSettings):
    password: Secret


def test_secrets_are_references_resolved_once_and_never_rendered(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTHGW_TEST_SECRET", "hunter2-secret")
    settings = _WithSecret.model_validate({"password": {"env": "AUTHGW_TEST_SECRET"}})
    assert settings.password.reveal() == "hunter2-secret"
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())

    secret_file = tmp_path / "pw"
    secret_file.write_text("from-a-file\n")
    secret_file.chmod(0o600)
    assert _WithSecret.model_validate({"password": {"file": str(secret_file)}}).password.reveal() == "from-a-file"

    with pytest.raises(Exception, match="may not be written inline"):
        _WithSecret.model_validate({"password": "inline-password"})
    with pytest.raises(Exception, match="AUTHGW_TEST_UNSET is not set"):
        _WithSecret.model_validate({"password": {"env": "AUTHGW_TEST_UNSET"}})


def test_config_show_and_errors_never_print_a_secret(conf_dir, tmp_path):
    secret = "Sup3r-Secret-Value"
    (tmp_path / "token").write_text(secret)
    (tmp_path / "token").chmod(0o600)
    write_conf(conf_dir, {
        "gateway.yaml": "chain: [static]\n",
        "static.yaml": "static:\n  users_file: users/users.yaml\n",
        "users/users.yaml": "users: {}\n",
    })
    env = {"AUTHGW_SHOW_SECRET": secret}
    shown = authgw("config", "show", "--config", str(conf_dir), "--state-dir", str(tmp_path / "s"), env=env)
    assert shown.returncode == 0, shown.stderr
    assert "static:" in shown.stdout and secret not in shown.stdout + shown.stderr

    # A mistyped key next to an inline secret: the error names the key, never the value.
    write_conf(conf_dir, {"static.yaml": f"static:\n  users_file: users/users.yaml\n  password: {secret}\n"})
    result = authgw("config", "check", "--config", str(conf_dir), "--state-dir", str(tmp_path / "s"))
    assert result.returncode == 2
    assert "static.yaml:3: static.password: unknown key" in result.stderr
    assert secret not in result.stdout + result.stderr


def test_config_check_exit_codes(conf_dir, tmp_path):
    write_conf(conf_dir, {"gateway.yaml": "chain: [static]\n", "static.yaml": "static:\n  users_file: users/u.yaml\n",
                          "users/u.yaml": "users: {}\n"})
    ok = authgw("config", "check", "--config", str(conf_dir), "--state-dir", str(tmp_path / "s"))
    assert ok.returncode == 0 and "configuration OK" in ok.stdout
    write_conf(conf_dir, {"gateway.yaml": "chain: [static, nosuchplugin]\n"})
    bad = authgw("config", "check", "--config", str(conf_dir), "--state-dir", str(tmp_path / "s"))
    assert bad.returncode == 2 and "plugin 'nosuchplugin' is enabled in conf.d but not installed" in bad.stderr


def test_unknown_top_level_key_is_an_error_but_a_disabled_plugins_section_is_not(conf_dir, tmp_path):
    write_conf(conf_dir, {"gateway.yaml": "chain: [static]\n", "static.yaml": "static:\n  users_file: users/u.yaml\n",
                          "users/u.yaml": "users: {}\n", "ldap.yaml": "ldap:\n  anything: 1\n"})
    ok = authgw("config", "check", "--config", str(conf_dir), "--state-dir", str(tmp_path / "s"))
    assert ok.returncode == 0, ok.stderr
    assert "settings for plugin 'ldap', which is not enabled" in ok.stderr
    write_conf(conf_dir, {"zzz.yaml": "ldapp:\n  anything: 1\n"})
    bad = authgw("config", "check", "--config", str(conf_dir), "--state-dir", str(tmp_path / "s"))
    assert bad.returncode == 2 and "zzz.yaml:1: ldapp: unknown key" in bad.stderr


def test_every_plugins_settings_problems_are_reported_together(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        build(tmp_path, {"chain": ["a", "b"]}, {"a": {"colour": "red"}, "b": {"action": 3}})
    text = "\n".join(excinfo.value.problems)
    assert "a.colour: unknown key" in text and "b.action:" in text


@pytest.mark.parametrize("text", ["chain: [{a: 1}]\n", "chain: static\nplugins: cache\n", "chain: [[x]]\n",
                                  "chain: [static]\nplugins: [{}]\n", "chain: 3\n", "- a\n- b\n", "chain:\n"])
def test_malformed_chain_lists_are_errors_not_crashes(conf_dir, text):
    write_conf(conf_dir, {"gateway.yaml": text})
    found = problems(conf_dir)
    assert found and all("gateway.yaml" in p for p in found)


# -- snapshots: every problem of a run, each at its key's own file:line ---------------------------


def check(conf: Path, env: dict[str, str] | None = None, *args: str) -> subprocess.CompletedProcess:
    """``authgw config check`` run from the directory above *conf*, so files read ``conf.d/x.yaml``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AUTHGW_")}
    return subprocess.run([sys.executable, "-m", "gateway", "config", *(args or ("check",)), "--config", "conf.d",
                           "--state-dir", str(conf.parent / "state")],
                          capture_output=True, text=True, cwd=conf.parent, env={**clean, **(env or {})}, timeout=60)


def errors(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 2, result.stdout + result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


LDAP_OK = """\
    ldap:
      servers:
        - ldaps://127.0.0.1:1636
      base_dn: dc=example,dc=com
      bind_dn: cn=svc,dc=example,dc=com
      bind_password: {env: OPS_TEST_BIND}
    """
USERS = {"static/users.yaml": "users: {}\n", "static.yaml": "static:\n  users_file: static/users.yaml\n"}


def test_snapshot_core_and_every_plugin_problem_in_one_run(conf_dir):
    write_conf(conf_dir, {**USERS,
        "gateway.yaml": """\
            chain:
              - static
              - ldap
              - kerbros
            strict: yes
            throttle:
              enabled: off
            deadlin: 4
            """,
        "ldap.yaml": """\
            ldap:
              servers:
                - ldaps://127.0.0.1:1636
              insecure: on
              base_dn: dc=example,dc=com
              direct_bind: "uid={username},dc=example,dc=com"
              recieve_timeout: 2
            """,
        "static.yaml": "static:\n  users_file: static/users.yaml\n  case_insensitive: 'true'\n",
    })
    assert errors(check(conf_dir)) == [
        "error: conf.d/gateway.yaml:8: deadlin: unknown key (neither a gateway setting nor an installed plugin; "
        "see `authgw plugins`); did you mean `deadline`?",
        "error: conf.d/gateway.yaml:5: strict: expected true or false (yes, no, on, off, 1 and 0 are not booleans here)",
        "error: conf.d/gateway.yaml:7: throttle.enabled: expected true or false (yes, no, on, off, 1 and 0 are not "
        "booleans here)",
        "error: conf.d/gateway.yaml:4: chain[2]: plugin 'kerbros' is enabled in conf.d but not installed; installed "
        f"plugins: {', '.join(sorted(discover()))}; did you mean `kerberos`?",
        "error: conf.d/static.yaml:3: static.case_insensitive: expected true or false (yes, no, on, off, 1 and 0 are "
        "not booleans here)",
        "error: conf.d/ldap.yaml:4: ldap.insecure: expected true or false (yes, no, on, off, 1 and 0 are not booleans "
        "here)",
        "error: conf.d/ldap.yaml:7: ldap.recieve_timeout: unknown key; did you mean `receive_timeout`?",
    ]


@pytest.mark.parametrize("case, ldap_extra, gateway_extra, expected", [
    ("start_tls with ldaps", "  start_tls: true\n", "",
     "conf.d/ldap.yaml:7: ldap.start_tls: start_tls applies to ldap:// servers; ldaps:// is TLS already"),
    ("missing ca_file", "  ca_file: missing/ca.pem\n", "",
     "conf.d/ldap.yaml:7: ldap.ca_file: {conf}/missing/ca.pem is not a readable PEM bundle"),
    ("receive_timeout above deadline", "  receive_timeout: 9\n", "deadline: 3\n",
     "conf.d/ldap.yaml:7: ldap.receive_timeout: 9.0s is not below the gateway's deadline (3.0s)"),
    ("bad filter", "  user_filter: (uid={username}\n", "",
     "conf.d/ldap.yaml:7: ldap.user_filter: '(uid={username}' is not a valid RFC 4515 filter"),
    ("bad group filter", "  groups:\n    cache_ttl: 0\n    filter: (member={dn}\n", "",
     "conf.d/ldap.yaml:9: ldap.groups.filter: "),
    ("a list of one", "", "listen: nonsense\n",
     "conf.d/gateway.yaml:2: listen: Value error, 'nonsense' is not HOST:PORT"),
])
def test_snapshot_checks_beyond_types_point_at_the_keys_own_line(conf_dir, case, ldap_extra, gateway_extra, expected):
    write_conf(conf_dir, {**USERS, "gateway.yaml": "chain: [static, ldap]\n" + gateway_extra,
                          "ldap.yaml": textwrap.dedent(LDAP_OK) + ldap_extra})
    found = errors(check(conf_dir, {"OPS_TEST_BIND": "x"}))
    assert len(found) == 1, found
    assert found[0].startswith("error: " + expected.replace("{conf}", "conf.d").replace("Value error, ", "")), found


def test_snapshot_every_ldap_problem_and_a_core_error_in_one_run(conf_dir):
    write_conf(conf_dir, {**USERS,
        "gateway.yaml": "chain: [static, ldap]\nlisten: nonsense\n",
        "ldap.yaml": """\
            ldap:
              servers:
                - ldaps://127.0.0.1:1636
              start_tls: true
              base_dn: dc=example,dc=com
              ca_file: missing/ca.pem
              direct_bind: "uid=alice,dc=example,dc=com"
              user_filter: (uid={username}
              groups:
                filter: (member={dn}
            """,
    })
    found = errors(check(conf_dir))
    assert found[0] == "error: conf.d/gateway.yaml:2: listen: 'nonsense' is not HOST:PORT (IPv6 as [::1]:PORT)"
    assert [line.split(": ", 3)[1:3] for line in found[1:]] == [
        ["conf.d/ldap.yaml:4", "ldap.start_tls"], ["conf.d/ldap.yaml:7", "ldap.direct_bind"],
        ["conf.d/ldap.yaml:6", "ldap.ca_file"], ["conf.d/ldap.yaml:8", "ldap.user_filter"],
        ["conf.d/ldap.yaml:10", "ldap.groups.filter"]]
    assert found[1:3] == [
        "error: conf.d/ldap.yaml:4: ldap.start_tls: start_tls applies to ldap:// servers; ldaps:// is TLS already",
        "error: conf.d/ldap.yaml:7: ldap.direct_bind: direct_bind must contain {username}"]
    assert found[3].startswith("error: conf.d/ldap.yaml:6: ldap.ca_file: conf.d/missing/ca.pem is not a readable "
                               "PEM bundle")
    assert found[4].startswith("error: conf.d/ldap.yaml:8: ldap.user_filter: '(uid={username}' is not a valid RFC "
                               "4515 filter")


def test_ldap_timeouts_above_the_deadline_are_reported_together(conf_dir):
    write_conf(conf_dir, {**USERS, "gateway.yaml": "chain: [static, ldap]\ndeadline: 1\n",
                          "ldap.yaml": textwrap.dedent(LDAP_OK) + "  connect_timeout: 2\n  receive_timeout: 3\n"})
    found = errors(check(conf_dir, {"OPS_TEST_BIND": "x"}))
    assert [line.split(": ", 3)[1:3] for line in found] == [
        ["conf.d/ldap.yaml:7", "ldap.connect_timeout"], ["conf.d/ldap.yaml:8", "ldap.receive_timeout"]]


def test_the_default_listen_and_a_single_address_string(conf_dir):
    write_conf(conf_dir, {"gateway.yaml": "chain: [a]\nlisten: 127.0.0.1:9100\n"})
    assert load_config(conf_dir).core.listen == ["127.0.0.1:9100"]


@pytest.mark.parametrize("value", ["yes", "on", "off", "no", "'true'", "1", "0", "'false'", "y"])
def test_every_boolean_of_every_model_accepts_only_true_and_false(value):
    import importlib.metadata as md
    import typing

    from pydantic import BaseModel, ValidationError

    from gateway.settings import GatewaySettings

    models = [GatewaySettings] + [getattr(ep.load(), "Settings") for ep in md.entry_points(group="authgw.plugins")
                                  if ep.dist and ep.dist.name == "authgw" and hasattr(ep.load(), "Settings")]
    seen: set[type] = set()
    checked = 0
    while models:
        model = models.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            for arg in (info.annotation, *typing.get_args(info.annotation)):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    models.append(arg)
            if info.annotation is bool or bool in typing.get_args(info.annotation):
                checked += 1
                adapter_input = {name: __import__("yaml").safe_load(value) if value.startswith("'") else
                                 (int(value) if value.isdigit() else value)}
                with pytest.raises(ValidationError) as excinfo:
                    model.model_validate(adapter_input)
                assert any(e["loc"] == (name,) and e["type"] == "bool_type" for e in excinfo.value.errors()), \
                    (model.__name__, name)
    assert checked >= 20


def test_strict_yes_no_longer_looks_on_and_true_is_on(conf_dir, tmp_path):
    users = conf_dir / "static" / "users.yaml"
    write_conf(conf_dir, {**USERS, "gateway.yaml": "chain: [static]\nstrict: true\n"})
    users.chmod(0o644)
    strict = check(conf_dir)
    assert strict.returncode == 2 and "readable by group or others" in strict.stderr
    write_conf(conf_dir, {"gateway.yaml": "chain: [static]\nstrict: yes\n"})
    users.chmod(0o644)
    assert errors(check(conf_dir))[0].startswith("error: conf.d/gateway.yaml:2: strict: expected true or false")


@pytest.mark.parametrize("text, expected", [
    ("chain: [static\ndeadline: 3\n", "conf.d/gateway.yaml:1: chain: a `[` list is not closed with `]`"),
    ("chain: [static]\nrealm: a: b\n", "conf.d/gateway.yaml:2: realm: a value holds an unquoted `: `"),
    ("chain: [static]\naudit:\n\tfile: x\n", "conf.d/gateway.yaml:3: audit: a tab character"),
    ("chain: [static]\nrealm: \"abc\ndeadline: 3\n", "conf.d/gateway.yaml:2: realm: a quoted value is not closed"),
    ("chain: [static]\nrealm: 'it's'\n", "conf.d/gateway.yaml:2: realm: the indentation does not match"),
    ("chain: [static]\nrealm: @home\n", "conf.d/gateway.yaml:2: realm: a value starts with a character YAML "
                                          "reserves"),
])
def test_snapshot_yaml_mistakes_are_rewritten_at_their_line(conf_dir, text, expected):
    write_conf(conf_dir, {"gateway.yaml": text})
    (found,) = errors(check(conf_dir))
    assert found.startswith("error: " + expected), found


def test_files_that_are_not_read_are_reported(conf_dir):
    write_conf(conf_dir, {**USERS, "gateway.yaml": "chain: [static]\n", "ldap.yaml.bak": "x: 1\n",
                          "notes.txt": "hello\n"})
    ok = check(conf_dir)
    assert ok.returncode == 0, ok.stderr
    assert "conf.d/ldap.yaml.bak: not read (a backup)" in ok.stderr
    assert "conf.d/notes.txt: not read (not `*.yaml`)" in ok.stderr
    write_conf(conf_dir, {"ldap.yml": "ldap: {}\n"})
    assert errors(check(conf_dir)) == [
        "error: conf.d/ldap.yml: not read: configuration files end in `.yaml`; rename it to ldap.yaml"]
    # A file a setting names is a plugin's file, whatever its name: not reported.
    (conf_dir / "ldap.yml").unlink()
    (conf_dir / "static" / "users.yaml").rename(conf_dir / "users.yml")
    write_conf(conf_dir, {"static.yaml": "static:\n  users_file: users.yml\n"})
    quiet = check(conf_dir)
    assert quiet.returncode == 0 and "users.yml" not in quiet.stderr, quiet.stderr


def test_environment_variables_override_scalar_keys_and_show_their_source(conf_dir):
    write_conf(conf_dir, {**USERS, "gateway.yaml": "chain: [static]\ndeadline: 5\nthrottle:\n  window: 60\n"})
    env = {"AUTHGW_DEADLINE": "2.5", "AUTHGW_THROTTLE__ENABLED": "false", "AUTHGW_STATIC__CASE_INSENSITIVE": "true",
           "AUTHGW_LDAP_PASSWORD": "not-a-key-but-a-secret-reference"}
    shown = check(conf_dir, env, "show")
    assert shown.returncode == 0, shown.stderr
    assert "deadline: 2.5" in shown.stdout and "case_insensitive: true" in shown.stdout
    assert "# deadline: from $AUTHGW_DEADLINE" in shown.stdout
    assert "# throttle.enabled: from $AUTHGW_THROTTLE__ENABLED" in shown.stdout
    assert "not-a-key-but-a-secret-reference" not in shown.stdout
    bad = errors(check(conf_dir, {"AUTHGW_THROTTLE__ENABLED": "on", "AUTHGW_DEADLINE": "soon"}))
    assert bad == ["error: $AUTHGW_DEADLINE: deadline: expected a number, written as one (`2.5` or `3`; true, false "
                   "and '2.5' are not numbers here)",
                   "error: $AUTHGW_THROTTLE__ENABLED: throttle.enabled: expected true or false (yes, no, on, off, 1 "
                   "and 0 are not booleans here)"]


def test_config_show_redacts_inline_secrets_of_every_section_enabled_or_not(conf_dir):
    secrets = ["Pepper-Inline-Secret-0123456789abcdef", "Encryption-Inline-Secret-0123456789abc", "RedisPw-Inline-9",
               "LdapBindInline-7", "-----BEGIN PRIVATE KEY-----"]
    write_conf(conf_dir, {**USERS, "gateway.yaml": "chain: [static]\n", "cache.yaml": f"""\
        cache:
          store: redis
          pepper: {secrets[0]}
          encryption_key: {secrets[1]}
          redis:
            url: redis://:{secrets[2]}@127.0.0.1:6379/0
            key_prefix: keep-this-prefix
        """, "ldap.yaml": f"""\
        ldap:
          servers: ["ldaps://admin:{secrets[3]}@127.0.0.1"]
          bind_password: {secrets[3]}
          tls_key: "{secrets[4]}\\nMIIB"
        """})
    shown = check(conf_dir, None, "show")
    assert shown.returncode == 0, shown.stderr
    for secret in secrets:
        assert secret not in shown.stdout + shown.stderr
    assert "key_prefix: keep-this-prefix" in shown.stdout
    assert "redis://:<redacted>@127.0.0.1:6379/0" in shown.stdout


def test_config_show_redacts_a_password_with_an_at_sign_a_query_password_and_pw_keys(conf_dir):
    write_conf(conf_dir, {**USERS, "gateway.yaml": "chain: [static]\n", "ldap.yaml": """\
        ldap:
          servers: ["ldap://admin:P@ssInline-5@dc1.example:389"]
          bind_pw: Hunter2-Inline
        """, "relay.yaml": """\
        relay:
          redis: {url: "redis://127.0.0.1:6379/0?password=QueryPw-Inline-3"}
        """})
    shown = check(conf_dir, None, "show")
    assert shown.returncode == 0, shown.stderr
    for secret in ("ssInline-5", "Hunter2-Inline", "QueryPw-Inline-3"):
        assert secret not in shown.stdout + shown.stderr, secret
    assert "ldap://admin:<redacted>@dc1.example:389" in shown.stdout


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0?password=x", "rediss://127.0.0.1/0?PWD=x",
                                 "redis://u:pw@127.0.0.1/0", "redis:///0",
                                 # redis-py takes any query parameter: this is the TLS client key's
                                 "rediss://127.0.0.1:6380/0?ssl_keyfile=/k.pem&ssl_password=SslPw-Plant",
                                 "redis://127.0.0.1/0?client_secret=x", "redis://127.0.0.1/0?user=x"])
def test_no_redis_url_carries_a_credential(conf_dir, url):
    write_conf(conf_dir, {**USERS, "gateway.yaml": f"chain: [static]\nthrottle:\n  store: redis\n  redis:\n"
                                                   f"    url: '{url}'\n"})
    result = check(conf_dir)
    (found,) = errors(result)
    assert "gateway.yaml:5: throttle.redis.url" in found and ("credential" in found or "password" in found
                                                              or "no host" in found), found
    assert "SslPw-Plant" not in result.stdout + result.stderr


def test_config_show_redacts_any_credential_named_in_a_url_query():
    from gateway.config import _redact

    shown = _redact({"urls": ["https://h.example/x?ssl_password=SslPw-Plant-1&a=1",
                              "https://h.example/?api_token=Tok-Plant-2", "https://h.example/?keyfile=/etc/k.pem"]})
    assert shown == {"urls": ["https://h.example/x?ssl_password=<redacted>&a=1",
                              "https://h.example/?api_token=<redacted>", "https://h.example/?keyfile=/etc/k.pem"]}


def test_snapshot_a_check_across_list_entries_points_at_the_entry_at_fault(conf_dir):
    write_conf(conf_dir, {"gateway.yaml": "chain: [client_cert]\n", "client_cert.yaml": """\
        client_cert:
          ca_bundle: root.pem
          revocation: "off"
          headers:
            - name: X-SSL-Client-Cert
              format: pem
            - name: X-Forwarded-Client-Cert
              format: xfcc
        """})
    (found,) = errors(check(conf_dir))
    assert found.startswith("error: conf.d/client_cert.yaml:7: client_cert.headers[1]: x-ssl-client-cert and "
                            "x-forwarded-client-cert both apply to every trusted proxy"), found


def test_a_timeout_above_the_deadline_is_reported_with_the_other_ldap_problems(conf_dir):
    # The deadline check used to run only when the plugin was built, i.e. after every other
    # problem of the section had been fixed: one run now reports them together.
    write_conf(conf_dir, {**USERS, "gateway.yaml": "chain: [static, ldap]\ndeadline: 2\n",
                          "ldap.yaml": textwrap.dedent(LDAP_OK) + "  ca_file: missing/ca.pem\n  receive_timeout: 3\n"})
    found = errors(check(conf_dir, {"OPS_TEST_BIND": "x"}))
    assert [line.split(": ", 3)[1:3] for line in found] == [
        ["conf.d/ldap.yaml:8", "ldap.receive_timeout"], ["conf.d/ldap.yaml:7", "ldap.ca_file"]]
    assert found[0].endswith("ldap.receive_timeout: 3.0s is not below the gateway's deadline (2.0s); an attempt "
                             "would end before the server could answer")


@pytest.mark.parametrize("url, problem", [
    ("http://localhost.evil.example/cb", "plain http only on the loopback"),
    ("http://127.0.0.1.nip.io/cb", "plain http only on the loopback"),
    ("http://[::1].evil.example/cb", "plain http only on the loopback"),
    ("http://127.0.0.1@evil.example/", "no user name or password"),
    ("https://rp.example.test@evil.example/cb", "no user name or password"),
    ("https://rp.example.test/cb#frag", "no fragment"),
])
def test_login_urls_are_read_by_their_host_not_their_prefix(url, problem):
    from pydantic import ValidationError

    from gateway.plugins.login.settings import LoginSettings

    for where in ({"oidc": {"clients": [{"client_id": "rp", "redirect_uris": [url], "client_secret": {"env": "X"}}]}},
                  {"saml": {"service_providers": [{"entity_id": "sp", "acs_urls": [url]}]}},
                  {"wsfed": {"relying_parties": [{"realm": "r", "reply_urls": [url]}]}}):
        with pytest.raises(ValidationError, match=re.escape(problem)):
            LoginSettings.model_validate({"base_url": "https://login.example.test", **where})
    if "#" not in url:
        with pytest.raises(ValidationError, match=re.escape(problem)):
            LoginSettings.model_validate({"base_url": url})
    for good in ("http://127.0.0.1:8080/cb", "http://localhost/cb", "http://[::1]:9000/cb", "https://rp.example.test/cb"):
        settings = LoginSettings.model_validate({"base_url": "https://login.example.test", "saml": {
            "service_providers": [{"entity_id": "sp", "acs_urls": [good]}]}})
        assert settings.saml.service_providers[0].acs_urls == [good]


def test_a_login_url_refused_names_its_file_line_and_key(conf_dir):
    write_conf(conf_dir, {**USERS, "gateway.yaml": "chain: [static]\nplugins: [login]\n", "login.yaml": """\
        login:
          base_url: https://login.example.test
          saml:
            service_providers:
              - entity_id: sp
                acs_urls: ["http://localhost.evil.example/acs"]
          oidc:
            clients:
              - client_id: rp
                client_secret: {env: OPS_TEST_SECRET}
                redirect_uris: ["https://rp.example.test/cb#x"]
        """})
    found = errors(check(conf_dir, {"OPS_TEST_SECRET": "x" * 32}))
    assert any(line.startswith("error: conf.d/login.yaml:6: login.saml.service_providers[0].acs_urls: ")
               and "localhost.evil.example" in line for line in found), found
    assert any(line.startswith("error: conf.d/login.yaml:11: login.oidc.clients[0].redirect_uris: ")
               and "no fragment" in line for line in found), found


def test_a_page_string_placeholder_the_page_does_not_replace_names_its_file_line_and_key(conf_dir):
    """`signed_in: "Angemeldet als {benutzer}"` passed the check and showed `{benutzer}` on every
    "signed in" page (review of the login door, left then). Only the default's own `{name}` is
    replaced: another is a configuration error; a lone brace is text."""
    write_conf(conf_dir, {**USERS, "gateway.yaml": "chain: [static]\nplugins: [login]\n", "login.yaml": """\
        login:
          base_url: https://login.example.test
          messages:
            username: "Benutzer {"
            signed_in: "Angemeldet als {benutzer} }"
        """})
    found = errors(check(conf_dir))
    assert any(line.startswith("error: conf.d/login.yaml:3: login.messages: ")
               and "messages.signed_in: {benutzer} is not replaced (use {name})" in line for line in found), found
    assert len(found) == 1, found
    write_conf(conf_dir, {"login.yaml": """\
        login:
          base_url: https://login.example.test
          messages:
            signed_in: "Angemeldet als {name} }"
        """})
    result = check(conf_dir)
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_errors_never_print_the_password_of_a_url(conf_dir):
    """A URL refused for its form is named without what comes before its host, its query or its
    fragment: the error that refuses a password in a URL used to print the password (review of
    secret leakage)."""
    secret = "S3cretInUrl-9"
    write_conf(conf_dir, {**USERS, "gateway.yaml": "chain: [static, ldap]\nplugins: [login]\n", "ldap.yaml": f"""\
        ldap:
          servers: ["ldap://svc:{secret}@127.0.0.1:389", "ldaps://svc:{secret}@dc2.example/dc=x", "ldap://h?pw={secret}"]
          base_dn: dc=example,dc=com
          bind_dn: cn=svc,dc=example,dc=com
          bind_password: {{env: OPS_TEST_BIND}}
        """, "login.yaml": f"""\
        login:
          base_url: "https://u:{secret}@login.example.test"
        """})
    result = check(conf_dir, {"OPS_TEST_BIND": "x"})
    found = errors(result)
    assert secret not in result.stdout + result.stderr
    assert any("conf.d/ldap.yaml:2: ldap.servers: ldap://***@127.0.0.1:389: no user name or password in the URL"
               in line for line in found), found
    assert any("conf.d/login.yaml:2: login.base_url: https://***@login.example.test: no user name or password"
               in line for line in found), found


@pytest.mark.parametrize("url, shown", [
    ("ldap://svc:pw@dc1:389", "ldap://***@dc1:389"),
    ("ldap://svc@corp:pw@dc2/x?y=1#f", "ldap://***@dc2/x?…"),
    ("ldap://svc:p/ss@dc1", "ldap://***@dc1"),
    ("https://h.example/path#frag", "https://h.example/path"),
    ("ldaps://[::1]:636", "ldaps://[::1]:636"),
    ("svc:pw@proxy:3128", "(not a URL)"),
    ("plain-name", "plain-name"),
])
def test_shown_url_keeps_only_scheme_host_and_path(url, shown):
    from gateway.settings import shown_url

    assert shown_url(url) == shown


def test_config_show_masks_secrets_under_other_spellings_and_in_odd_urls(conf_dir):
    """Key names the masking did not know (camelCase, one word, plurals, headers) and URLs it
    did not match (a user name with an @, no scheme, a space in the password) were printed in
    clear by ``config show`` (review of secret leakage)."""
    secrets = [f"Leak{n}-Marker" for n in range(25)]
    write_conf(conf_dir, {**USERS, "gateway.yaml": "chain: [static]\n", "ldap.yaml": f"""\
        ldap:
          bindPassword: {secrets[0]}
          clientSecret: {secrets[1]}
          bindpw: {secrets[2]}
          apikey: {secrets[3]}
          passwords: [{secrets[4]}]
          secrets: {{db: {secrets[5]}}}
          Authorization: Basic {secrets[6]}
          cookie: session={secrets[7]}
          servers: ["ldap://svc@corp.example:{secrets[8]}@dc2", "svc:{secrets[9]}@proxy:3128",
                    "postgresql://u:pass {secrets[10]}@db"]
          tokens: [{secrets[11]}]
          ldap_pass: {secrets[12]}
          proxy: "svc:{secrets[13]}@proxy.example:3128/"
          session_hmac: {secrets[14]}
          otp_seed: {secrets[15]}
          signing: {{jwk: {{d: {secrets[16]}}}}}
          keys: [{{kty: RSA, n: keep-this-modulus, d: {secrets[17]}, p: {secrets[18]}}}]
          signing_jwks: {secrets[19]}
          hmacs: [{secrets[20]}]
          privkey: {secrets[21]}
          awsAccessKey: {secrets[22]}
          signingkeys: [{secrets[23]}]
          MasterKey: {secrets[24]}
          bind_password: {{env: KEEP_THIS_REFERENCE}}
          base_dn: dc=keep,dc=this
        """})
    shown = check(conf_dir, None, "show")
    assert shown.returncode == 0, shown.stderr
    for secret in secrets:
        assert secret not in shown.stdout + shown.stderr, secret
    assert "KEEP_THIS_REFERENCE" in shown.stdout and "dc=keep,dc=this" in shown.stdout
    assert "keep-this-modulus" in shown.stdout  # a JWK's public members are shown
    assert "ldap://svc@corp.example:<redacted>@dc2" in shown.stdout


@pytest.mark.parametrize("value, ok", [(0, True), (1, True), (30, True), (0.05, False), (0.9, False)])
def test_worker_timeout_is_off_or_at_least_one_second(conf_dir, value, ok):
    write_conf(conf_dir, {**USERS, "gateway.yaml": f"chain: [static]\nworker_timeout: {value}\n"})
    result = check(conf_dir)
    if ok:
        assert result.returncode == 0, result.stderr
    else:
        (found,) = errors(result)
        assert "gateway.yaml:2: worker_timeout" in found and "at least 1 second" in found, found
