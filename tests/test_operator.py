"""The operator surface: the command line, the service log, the systemd unit, health and
challenges, each through a real ``authgw`` process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from support.fakedist import make_dist
from support.gateway import authgw, write_conf
from support.net import wait_for
from support.pki import CA, write_bundle

ROOT = Path(__file__).resolve().parent.parent
USERS = {"gateway.yaml": "chain: [static]\n", "static.yaml": "static:\n  users_file: users/u.yaml\n",
         "users/u.yaml": "users: {}\n"}


def installed_version() -> str:
    import importlib.metadata as md

    return md.version("authgw")


def test_version_on_the_command_line_in_the_start_up_log_and_healthz(conf_dir, start_gateway):
    result = authgw("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"authgw {installed_version()}"
    gw = start_gateway(write_conf(conf_dir, USERS))
    assert gw.get("/healthz").text == f"ok authgw {installed_version()}\n"
    assert f"authgw {installed_version()} starting" in gw.output()
    gw.proc.send_signal(signal.SIGHUP)  # what `systemctl reload` (ExecReload) sends: a reload
    wait_for(lambda: " reloaded " in gw.output(), 30, interval=0.05, what="the reload", log=gw.output)
    assert gw.proc.poll() is None and gw.get("/healthz").status == 200


def test_help_lists_plugin_commands_even_when_not_enabled_and_the_defaults(conf_dir, tmp_path):
    write_conf(conf_dir, USERS)
    env = {"AUTHGW_CONFIG": str(conf_dir), "XDG_DATA_HOME": str(tmp_path / "xdg")}  # --help builds the runtime
    top = authgw("--help", env=env)
    assert top.returncode == 0
    assert "not enabled: add `cache` to `plugins:`" in " ".join(top.stdout.split())
    refused = authgw("cache", "list", "--state-dir", str(tmp_path / "s"), env=env)
    assert refused.returncode == 2 and "needs the cache plugin enabled: add `cache` to `plugins:`" in refused.stderr
    serve = authgw("serve", "--help").stdout.replace("\n", " ")
    assert "default: `workers:` in conf.d, which defaults to 1" in " ".join(serve.split())
    assert "$XDG_DATA_HOME/authgw" in serve

    write_conf(conf_dir, {"gateway.yaml": "chain: [static]\nplugins: [cache]\n"})
    enabled = authgw("--help", env=env)
    # (other installed plugins with commands, such as login, are still listed as not enabled)
    assert "add `cache` to" not in " ".join(enabled.stdout.split()) and "cache" in enabled.stdout


def test_plugins_exits_non_zero_when_an_enabled_plugin_cannot_load(conf_dir, tmp_path):
    site = tmp_path / "site"
    make_dist(site, "acme-broken", {"broken": "acme_broken:Plugin"}, {"acme_broken.py": "import no_such_module_x\n"})
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    write_conf(conf_dir, USERS)
    ok = authgw("plugins", "--config", str(conf_dir), env=env)
    assert ok.returncode == 0 and "broken" in ok.stdout  # installed, not enabled: not imported
    write_conf(conf_dir, {"gateway.yaml": "chain: [static]\nplugins: [broken]\n"})
    bad = authgw("plugins", "--config", str(conf_dir), env=env)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "CANNOT LOAD" in bad.stdout and "no_such_module_x" in bad.stderr
    write_conf(conf_dir, {"gateway.yaml": "chain: [static]\nplugins: [absent]\n"})
    missing = authgw("plugins", "--config", str(conf_dir), env=env)
    assert missing.returncode == 1 and "MISSING" in missing.stdout


def test_a_fresh_clone_warns_once_and_the_demo_account_is_announced(tmp_path, start_gateway):
    conf = tmp_path / "conf.d"
    shutil.copytree(ROOT / "conf.d", conf)
    users = conf / "static" / "users.yaml"
    users.chmod(0o644)  # what git checks out
    first = authgw("config", "check", "--config", str(conf), "--state-dir", str(tmp_path / "s"))
    assert first.returncode == 0, first.stderr
    assert "was readable by others (mode 644" in first.stderr and "changed it to 600" in first.stderr
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    again = authgw("config", "check", "--config", str(conf), "--state-dir", str(tmp_path / "s"))
    assert again.returncode == 0 and "WARNING" not in again.stderr and "readable" not in again.stderr
    gw = start_gateway(conf)
    warned = [line for line in gw.output().splitlines() if "demo/demo is enabled" in line]
    assert warned and " WARNING " in warned[0]


def test_a_group_readable_secret_file_is_left_alone_and_warned(conf_dir, tmp_path):
    write_conf(conf_dir, USERS)
    users = conf_dir / "users" / "u.yaml"
    users.chmod(0o640)
    result = authgw("config", "check", "--config", str(conf_dir), "--state-dir", str(tmp_path / "s"))
    assert result.returncode == 0 and "readable by group or others (mode 640)" in result.stderr
    assert stat.S_IMODE(users.stat().st_mode) == 0o640


LOGGING_PLUGIN = '''
import gateway
from gateway import hookimpl

class Plugin:
    def __init__(self, settings, context):
        self.log = context.log

    @hookimpl
    def gateway_precheck(self, attempt):  # on the event loop, not a chain thread
        self.log.warning("prechecked an attempt")
        return None

    @hookimpl
    def gateway_authenticate(self, attempt):
        self.log.warning("looked at an attempt")
        return None
'''


def test_json_service_log_lines_carry_the_request_id(conf_dir, tmp_path, start_gateway):
    site = tmp_path / "site"
    make_dist(site, "acme-logger", {"logger": "acme_logger:Plugin"}, {"acme_logger.py": LOGGING_PLUGIN})
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    write_conf(conf_dir, {**USERS, "gateway.yaml": "chain: [logger, static]\nlog_format: json\n"})
    gw = start_gateway(conf_dir, env=env)
    response = gw.auth("nobody", "wrong")
    assert response.status == 401
    gw.stop()
    service = [json.loads(line) for line in gw.output().splitlines()
               if line.startswith("{") and "authgw.attempt" not in line]
    assert service and all({"time", "level", "logger", "pid", "message"} <= set(e) for e in service)
    (looked,) = [e for e in service if e["message"] == "looked at an attempt"]
    assert looked["request_id"] == response.header("X-Request-Id") and looked["level"] == "WARNING"
    (prechecked,) = [e for e in service if e["message"] == "prechecked an attempt"]
    assert prechecked["request_id"] == response.header("X-Request-Id")
    assert all("request_id" not in e for e in service if "starting" in e["message"])
    assert any(e["message"].startswith(f"authgw {installed_version()} starting") for e in service)
    assert all(not line.strip() or line.startswith("{") for line in gw.output().splitlines()), gw.output()


def test_a_certificate_only_chain_offers_no_basic_challenge(conf_dir, tmp_path, start_gateway):
    root = CA.create("authgw operator test root")
    write_bundle(tmp_path / "root.pem", root)
    write_conf(conf_dir, {
        "gateway.yaml": "chain: [client_cert]\ntrusted_proxies: [127.0.0.1/32]\n",
        "client_cert.yaml": f"client_cert:\n  ca_bundle: {tmp_path / 'root.pem'}\n"
                            "  headers:\n    - {name: X-SSL-Client-Cert, format: pem}\n"
                            "  revocation: {policy: \"off\"}\n  mapping: {lookup: false, rules: [cn]}\n",
    })
    gw = start_gateway(conf_dir)
    response = gw.get("/auth")
    assert response.status == 401
    assert response.all("WWW-Authenticate") == []
    with_password = gw.auth("alice", "secret")
    assert with_password.status == 401 and with_password.all("WWW-Authenticate") == []


def test_the_audit_log_goes_to_its_own_file_under_systemd(conf_dir, tmp_path, start_gateway):
    logs = tmp_path / "logs"
    logs.mkdir()
    gw = start_gateway(write_conf(conf_dir, USERS), env={"LOGS_DIRECTORY": str(logs)})
    response = gw.auth("nobody", "wrong")
    gw.stop()
    lines = [json.loads(line) for line in (logs / "audit.log").read_text().splitlines()]
    assert [line["request_id"] for line in lines] == [response.header("X-Request-Id")]
    assert '"authgw.attempt"' not in gw.output()


UNIT = ROOT / "tools" / "authgw.service"


def test_the_systemd_unit_has_the_promised_shape():
    text = UNIT.read_text()
    for line in ["Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID", "User=authgw",
                 "StateDirectory=authgw", "LogsDirectory=authgw", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "PrivateTmp=yes", "ProtectHome=yes"]:
        assert f"\n{line}\n" in text, line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    # verify resolves ExecStart: point it at this venv's authgw, as the install docs would.
    unit = tmp_path / "authgw.service"
    exe = Path(sys.executable).parent / "authgw"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/authgw", str(exe)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if str(unit) in line or "authgw.service" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_a_certificate_name_mismatch_to_an_ip_address_gets_the_hint_not_a_dump(tmp_path, start_gateway, conf_dir):
    from support.slapd import Slapd

    ca = CA.create("authgw operator LDAP CA")
    write_bundle(tmp_path / "ca.pem", ca)
    slapd = Slapd(tmp_path / "slapd", tls=ca).start()
    try:
        slapd.add_user("alice", "Alice-Pw-1")
        settings = slapd.plugin_settings("ldaps", servers=[slapd.ldaps_url.replace("localhost", "127.0.0.1")],
                                         connect_timeout=1.0)
        write_conf(conf_dir, {"gateway.yaml": "chain: [ldap]\n", "ldap.yaml": "ldap: " + json.dumps(settings)})
        gw = start_gateway(conf_dir)
        assert gw.auth("alice", "Alice-Pw-1").status == 503
        log = gw.output()
        assert "use the DNS name in the certificate (its subjectAltName) in ldap.servers, not an IP address" in log
        assert "'subject'" not in log and "notAfter" not in log
    finally:
        slapd.stop()


def test_ldap_certificate_names_subject_alt_name_first_and_the_cn_only_without_one(tmp_path, conf_dir, start_gateway):
    """What docs/plugins/ldap.md promises: with a subjectAltName only its DNS names count; a
    certificate without one is matched on its subject CN (the legacy RFC 2818 fallback)."""
    from support.slapd import Slapd

    ca = CA.create("authgw operator LDAP CA")
    slapd = Slapd(tmp_path / "slapd", tls=ca).start()
    try:
        slapd.add_user("alice", "Alice-Pw-1")
        write_conf(conf_dir, {"gateway.yaml": "chain: [ldap]\nthrottle: {enabled: false}\n",
                              "ldap.yaml": "ldap: " + json.dumps(slapd.plugin_settings("ldaps", connect_timeout=1.0))})
        results = {}
        for case, cert in [("cn only", ca.issue("localhost", server=True)),
                           ("san elsewhere, cn matches", ca.issue("localhost", dns=["ldap.example.net"], server=True)),
                           ("san matches", ca.issue("other", dns=["localhost"], server=True))]:
            cert.write(tmp_path / "slapd", "server")
            slapd.restart()
            gw = start_gateway(conf_dir)
            results[case] = gw.auth("alice", "Alice-Pw-1").status
            gw.stop()
        assert results == {"cn only": 200, "san elsewhere, cn matches": 503, "san matches": 200}
    finally:
        slapd.stop()
