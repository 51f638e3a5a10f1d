"""What a review of configuration loading and the command line found, through real ``authgw``
processes: a plugin listed in ``chain:`` and ``plugins:`` (a traceback at ``config check`` and
start, a reload refused with pluggy's words), YAML escapes and numbers PyYAML cannot convert (a
traceback, a reload refused without file or line), ``hash-password`` given bytes that are not
UTF-8 (a traceback quoting a byte of the password) or a password longer than a login may carry
(a hash nobody can log in with), and ``api-token`` writing the token on standard error too."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys

from support.gateway import GatewayProcess, authgw, static_users, write_conf
from support.net import wait_for
from test_reload_review import PASSWORD, _errors, _hash


def test_a_plugin_in_chain_and_in_plugins_is_an_error_at_its_line_and_a_reload_keeps_running(tmp_path):
    users = static_users({"alice": _hash()})
    conf = write_conf(tmp_path / "conf.d", {"gateway.yaml": "chain:\n  - static\nplugins:\n  - static\n", **users})
    found = _errors(authgw("config", "check", "--config", str(conf), timeout=60))
    assert "gateway.yaml:4: plugins[0]: 'static' is a chain step already (chain[0])" in found, found
    assert "already registered" not in found

    twice = write_conf(tmp_path / "twice", {"gateway.yaml": "chain:\n  - static\n  - static\n", **users})
    assert "gateway.yaml:3: chain[1]: 'static' is listed twice (also at [0])" in _errors(
        authgw("config", "check", "--config", str(twice), timeout=60))

    write_conf(conf, {"gateway.yaml": "chain: [static]\n"})
    gw = GatewayProcess(conf, tmp_path / "state").start()
    try:
        assert gw.auth("alice", PASSWORD).status == 200
        write_conf(conf, {"gateway.yaml": "chain: [static]\nplugins: [static]\n"})
        os.kill(gw.proc.pid, signal.SIGHUP)
        wait_for(lambda: "reload refused" in gw.output(), timeout=30, what="a refusal", log=gw.output)
        refusal = gw.output().split("reload refused", 1)[1]
        assert "gateway.yaml:2: plugins[0]: 'static' is a chain step already" in refusal, refusal
        assert gw.auth("alice", PASSWORD).status == 200  # the running configuration stays
        assert gw.get("/readyz").status == 200
    finally:
        gw.stop()


def test_escapes_and_numbers_yaml_cannot_convert_are_errors_at_their_line(tmp_path):
    users = static_users({"alice": _hash()})
    for number, (text, where) in enumerate([
            ('chain: [static]\nrealm: "\\U0011FFFF"\n', "gateway.yaml:2: realm: not a usable value"),
            ('chain: [static]\nlimits:\n  queue: "\\UFFFFFFFF"\n', "gateway.yaml:3: limits.queue: not a usable value"),
            ("%YAML 1." + "1" * 5000 + "\n---\nchain: [static]\n", "gateway.yaml:1: not a usable value")]):
        conf = write_conf(tmp_path / f"conf-{number}", {"gateway.yaml": text, **users})
        assert where in _errors(authgw("config", "check", "--config", str(conf), timeout=60))

    # The users file is read by the same loader (and again while serving).
    conf = write_conf(tmp_path / "users-escape", {"gateway.yaml": "chain: [static]\n", **users})
    (conf / "users" / "users.yaml").write_text(f'users:\n  alice:\n    password_hash: "{_hash()}"\n'
                                               '    display_name: "\\U0011FFFF"\n')
    assert "users.yaml:4: users.alice.display_name: not a usable value" in _errors(
        authgw("config", "check", "--config", str(conf), timeout=60))

    # An AUTHGW_ variable is typed by the same loader: a number too long is refused, named.
    conf = write_conf(tmp_path / "environment", {"gateway.yaml": "chain: [static]\n", **users})
    for variable in ("AUTHGW_THREADS", "AUTHGW_STRICT"):
        found = _errors(authgw("config", "check", "--config", str(conf), env={variable: "9" * 5000}, timeout=60))
        assert f"${variable}: {variable[7:].lower()}: " in found, found


def test_hash_password_refuses_what_no_login_can_carry_without_quoting_it(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "gateway", "hash-password", "--stdin"], input=b"p\xffw0rd\n",
                         capture_output=True, timeout=60)
    assert bad.returncode == 1 and not bad.stdout
    assert b"Traceback" not in bad.stderr and b"\\udcff" not in bad.stderr and b"position" not in bad.stderr
    assert b"not UTF-8" in bad.stderr, bad.stderr

    longest, too_long = "\u00e9" * 512, "\u00e9" * 512 + "x"  # 1,024 and 1,025 bytes
    refused = authgw("hash-password", "--stdin", input=too_long + "\n")
    assert refused.returncode == 1 and not refused.stdout.strip()
    assert "longer than the 1024 bytes a login may carry" in refused.stderr, refused.stderr
    made = authgw("hash-password", "--stdin", input=longest)  # no newline at the end: read all the same
    assert made.returncode == 0 and made.stdout.startswith("$argon2id$"), made.stderr

    # Why: the gateway never takes a longer password, so a hash of one would lock its user out.
    conf = write_conf(tmp_path / "conf.d", {"gateway.yaml": "chain: [static]\n",
                                           **static_users({"alice": _hash(too_long),
                                                           "bob": made.stdout.strip()})})
    gw = GatewayProcess(conf, tmp_path / "state").start()
    try:
        assert gw.auth("bob", longest).status == 200
        assert gw.auth("alice", too_long).status != 200
    finally:
        gw.stop()


def test_api_token_prints_the_token_once_on_standard_output():
    made = authgw("api-token", "ci")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("agw_") and len(base64.urlsafe_b64decode(token[4:] + "=")) == 32
    assert token not in made.stderr and token[4:20] not in made.stderr  # captured output: nowhere else
    entry = json.loads(made.stderr.strip().splitlines()[-1])
    assert entry == {"name": "ci", "sha256": hashlib.sha256(token.encode()).hexdigest()}

    nameless = authgw("api-token", " ")
    assert nameless.returncode == 1 and not nameless.stdout


def test_an_infinite_or_nan_number_is_an_error_at_its_line(tmp_path):
    """`.inf` passed every float without an upper bound: `ldap.backoff: .inf` would put a
    server aside until restart after one failure, `static.reload_interval: .inf` never read the
    users file again. Settings take finite numbers only, as `.nan` was already refused."""
    from support.gateway import authgw, write_conf

    users = tmp_path / "users.yaml"
    users.write_text("users: {}\n")
    users.chmod(0o600)
    for value in (".inf", "-.inf", ".nan"):
        conf = write_conf(tmp_path / f"conf{value}", {
            "gateway.yaml": f"chain: [static]\nstatic:\n  users_file: {users}\n  reload_interval: {value}\n"})
        result = authgw("config", "check", "--config", str(conf))
        output = result.stdout + result.stderr
        assert result.returncode == 2 and "gateway.yaml:4: static.reload_interval: Input should be a finite number" \
            in output, (value, output)


def test_a_redis_url_with_a_port_out_of_range_is_an_error_at_its_line(tmp_path):
    """`redis://h:99999/0` passed validation; reading its port (readiness, error messages) then
    raised ValueError wherever the URL was named."""
    from support.gateway import authgw, write_conf

    conf = write_conf(tmp_path / "conf", {"gateway.yaml": "chain: [static]\nstatic:\n  users_file: /nonexistent\n"
                                          "throttle:\n  store: redis\n  redis:\n    url: redis://127.0.0.1:99999/0\n"})
    result = authgw("config", "check", "--config", str(conf))
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "gateway.yaml:7: throttle.redis.url: the URL's port is not a number from 0 " \
        "to 65535" in output, output
