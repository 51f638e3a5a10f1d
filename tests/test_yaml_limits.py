"""YAML the loader refuses, each as a configuration error at its file and line (finding 5 of the
operations review): control characters, nesting deeper than Python recurses, aliases (a "billion
laughs" file grew `authgw config check` past 900 MB), numbers too long to convert."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.yamlfiles import load_file
from support.gateway import write_conf

MAX_DEPTH = 32  # gateway.yamlfiles.MAX_DEPTH, checked below
USERS = {"static/users.yaml": "users: {}\n", "static.yaml": "static:\n  users_file: static/users.yaml\n"}

BOMB = ('chain: [static]\na: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
        + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)))


def _limit_memory() -> None:  # so that a loader that expands aliases fails instead of eating the machine
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def check(conf: Path) -> subprocess.CompletedProcess:
    """``authgw config check`` run from the directory above *conf*, so files read ``conf.d/x.yaml``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AUTHGW_")}
    return subprocess.run([sys.executable, "-m", "gateway", "config", "check", "--config", "conf.d",
                           "--state-dir", str(conf.parent / "state")], capture_output=True, text=True,
                          cwd=conf.parent, env=clean, timeout=120, preexec_fn=_limit_memory)


@pytest.mark.parametrize("file, text, expected", [
    ("gateway.yaml", "chain: [static]\nlog_level: INFO\x00\n",
     "conf.d/gateway.yaml:2: log_level: a character YAML does not allow (U+0000"),
    ("gateway.yaml", "chain: [static]\nrealm: a\x1bb\n", "conf.d/gateway.yaml:2: realm: a character YAML does not allow"),
    ("gateway.yaml", "chain: [static]\nx: " + "[" * 5000 + "]" * 5000 + "\n",
     f"conf.d/gateway.yaml:2: x: nested more than {MAX_DEPTH} levels deep"),
    ("gateway.yaml", "chain: [static]\nx:\n" + "".join(" " * (2 * i + 2) + f"k{i}:\n" for i in range(1200)),
     "conf.d/gateway.yaml:34: x.k0.k1.k2.k3.k4"),
    ("gateway.yaml", BOMB, "conf.d/gateway.yaml:3: b: a YAML alias (a value that starts with `*`), and aliases are not expanded"),
    ("gateway.yaml", "chain: [static]\nrealm: *home\n", "conf.d/gateway.yaml:2: realm: a YAML alias (a value that starts with `*`)"),
    ("gateway.yaml", "chain: [static]\ndeadline: " + "9" * 5000 + "\n",
     "conf.d/gateway.yaml:2: deadline: not a usable value"),
    ("gateway.yaml", "chain: [static]\n? [a, b]\n: 1\n", "conf.d/gateway.yaml:2: (top level): keys must be strings"),
    ("static/users.yaml", "users:\n  demo:\n    password_hash: \"x\x1b\"\n",
     "conf.d/static/users.yaml:3: users.demo.password_hash: a character YAML does not allow (U+001B"),
    ("static/users.yaml", "u: &u {}\nusers: *u\n", "conf.d/static/users.yaml:2: users: a YAML alias (a value that starts with `*`)"),
], ids=["nul", "escape", "deep flow", "deep block", "billion laughs", "alias", "long number", "list key",
        "users file control character", "users file alias"])
def test_yaml_the_loader_refuses_is_a_config_error_at_its_line(conf_dir, file, text, expected):
    write_conf(conf_dir, {**USERS, "gateway.yaml": "chain: [static]\n"})
    (conf_dir / file).write_text(text)
    if "users" in file:
        (conf_dir / file).chmod(0o600)
    result = check(conf_dir)
    assert result.returncode == 2, result.stdout + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: " + expected), result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_nesting_up_to_the_limit_and_anchors_without_aliases_are_read(tmp_path):
    from gateway import yamlfiles

    assert yamlfiles.MAX_DEPTH == MAX_DEPTH
    path = tmp_path / "x.yaml"
    path.write_text("x: " + "[" * (MAX_DEPTH - 1) + "1" + "]" * (MAX_DEPTH - 1) + "\ny: &anchor 2\n")
    data = load_file(path, {})
    value = data["x"]
    for _ in range(MAX_DEPTH - 2):
        value = value[0]
    assert value == [1] and data["y"] == 2
    path.write_text("x: " + "[" * MAX_DEPTH + "1" + "]" * MAX_DEPTH + "\n")
    with pytest.raises(ConfigError, match=f"x.yaml:1: x: nested more than {MAX_DEPTH} levels deep"):
        load_file(path, {})


@pytest.mark.parametrize("value", ["!Summer-PLANT-70", "!!PLANTpw2", "!<PLANTpw3> x", "!PLANT!pw24 x", "|PLANT",
                                   "&X!PLANT", "!!str PLANT", '"pass\\qPLANT"'],
                         ids=["tag", "secondary tag", "verbatim tag", "tag handle", "block indicator", "anchor",
                              "str tag", "bad escape"])
def test_a_password_written_unquoted_is_never_quoted_by_the_error(conf_dir, value):
    """A password that starts with `!` is a YAML tag: PyYAML's message quoted it in full ("could
    not determine a constructor for the tag '!Summer-PLANT-70'"), into `config check`, `config
    show` and the reload's log line (review of secret leakage). Tags are refused by name now, and
    whatever else PyYAML says is shown without what it quotes of the file."""
    write_conf(conf_dir, {**USERS, "gateway.yaml": "chain: [static]\n",
                          "static.yaml": f"static:\n  users_file: static/users.yaml\n  realm_note: {value}\n"})
    result = check(conf_dir)
    assert result.returncode == 2, result.stdout + result.stderr[-3000:]
    assert "PLANT" not in result.stdout + result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: conf.d/static.yaml:3: static.realm_note: "), errors
    if value.startswith("!"):
        assert "a YAML tag (a value that starts with `!`)" in errors[0] or "invalid YAML" in errors[0], errors
