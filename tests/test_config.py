"""conf.d loading: strict YAML, merge rules, errors with file, line and key path, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

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
        "notes.yml": "chain: [ignored]\n",
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
    assert "gateway.yaml:" in problem and "invalid YAML" in problem


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
