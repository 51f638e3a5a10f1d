"""The audit log file (issue 9 item 7): created 0600, and never a password in it."""

from __future__ import annotations

import json
import stat

from support.gateway import static_users, write_conf
from support.net import wait_for


def test_audit_file_is_created_private_and_holds_no_password(conf_dir, demo_hash, start_gateway, tmp_path):
    audit = tmp_path / "audit" / "authgw-audit.jsonl"
    audit.parent.mkdir()
    conf = write_conf(conf_dir, {
        "gateway.yaml": f"chain: [static]\naudit:\n  file: {audit}\n",
        **static_users({"alice": demo_hash}),
    })
    gw = start_gateway(conf)
    assert gw.auth("alice", "demo-password").status == 200
    assert gw.auth("alice", "Wrong-Secret-42").status == 401
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    wait_for(lambda: audit.read_text().count("\n") >= 2, 10, interval=0.05,  # written just after the answer
             what="two audit lines")
    text = audit.read_text()
    records = [json.loads(line) for line in text.splitlines()]  # one JSON object a line
    assert [(r["username"], r["outcome"]) for r in records] == [("alice", "success"), ("alice", "invalid_credentials")]
    assert "demo-password" not in text and "Wrong-Secret-42" not in text


def test_a_reload_reopens_the_audit_file_so_it_can_be_rotated(conf_dir, demo_hash, start_gateway, tmp_path):
    """logrotate moves the file away and reloads the service (docs/operations.md): the lines
    after the reload go to a new file of the same name, none lost, none into the moved one."""
    import os
    import signal

    audit = tmp_path / "audit.jsonl"
    conf = write_conf(conf_dir, {"gateway.yaml": f"chain: [static]\naudit:\n  file: {audit}\n",
                                 **static_users({"alice": demo_hash})})
    gw = start_gateway(conf)
    assert gw.auth("alice", "demo-password").status == 200
    wait_for(lambda: audit.exists() and audit.read_text().count("\n") == 1, 10, interval=0.05, what="the first line")
    rotated = audit.rename(tmp_path / "audit.jsonl.1")
    os.kill(gw.proc.pid, signal.SIGHUP)
    wait_for(lambda: "reload" in gw.output().lower() and audit.exists(), 30, interval=0.1,
             what="the reload and a new audit file")
    assert gw.auth("alice", "demo-password").status == 200
    wait_for(lambda: audit.read_text().count("\n") == 1, 10, interval=0.05, what="a line in the new file")
    assert rotated.read_text().count("\n") == 1
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600


def test_commands_that_do_not_serve_leave_the_audit_file_alone(conf_dir, demo_hash, start_gateway, tmp_path):
    """`authgw config check` (or `config show`, `check`, `--help`) created the audit file: run
    with sudo before the service's first start, it was root's, and the service could not write
    it (review of what the gateway writes). Only `serve` creates it, at start."""
    from support.gateway import authgw

    audit = tmp_path / "audit" / "audit.jsonl"
    audit.parent.mkdir()
    conf = write_conf(conf_dir, {"gateway.yaml": f"chain: [static]\naudit:\n  file: {audit}\n",
                                 **static_users({"alice": demo_hash})})
    for command in (["config", "check"], ["config", "show"], ["--help"]):
        result = authgw(*command, "--config", str(conf), "--state-dir", str(tmp_path / "state"))
        assert result.returncode == 0, (command, result.stderr[-2000:])
        assert not audit.exists(), command
    gw = start_gateway(conf)
    assert audit.exists() and audit.read_text() == ""  # at start, before any attempt
    assert gw.auth("alice", "demo-password").status == 200
    assert json.loads(audit.read_text())["username"] == "alice"


def test_a_link_planted_where_the_audit_log_goes_is_not_followed(conf_dir, demo_hash, tmp_path):
    """The audit file was opened following links: one planted at its name (in a log directory a
    log group can write to) had the gateway append attempt lines to whatever file of its user the
    link named, its keys or its stores. Not followed: ``authgw serve`` stops at start naming the
    file and the fix, and the file the link names is left as it was."""
    import signal
    import subprocess
    import sys

    from support.net import free_port

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    audit = tmp_path / "logs" / "audit.jsonl"
    audit.parent.mkdir()
    audit.symlink_to(victim)
    conf = write_conf(conf_dir, {"gateway.yaml": f"chain: [static]\naudit:\n  file: {audit}\n",
                                 **static_users({"alice": demo_hash})})
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(conf), "--state-dir",
                             str(tmp_path / "state"), "--listen", f"127.0.0.1:{free_port()}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0, output[-2000:]
    assert f"the audit log is a symbolic link, which is not followed: set audit.file to the file it names: " \
           f"'{audit}'" in output, output[-2000:]
    assert "Traceback" not in output
    assert victim.read_bytes() == b"precious\n"


def test_a_reload_onto_a_planted_audit_link_is_refused_and_lines_go_on(conf_dir, demo_hash, start_gateway, tmp_path):
    """logrotate moved the file away and a link was planted at its name before the reload: the
    reload is refused (its reason logged), and the lines go on to the file open before."""
    import os
    import signal

    audit = tmp_path / "audit.jsonl"
    conf = write_conf(conf_dir, {"gateway.yaml": f"chain: [static]\naudit:\n  file: {audit}\n",
                                 **static_users({"alice": demo_hash})})
    gw = start_gateway(conf)
    assert gw.auth("alice", "demo-password").status == 200
    rotated = audit.rename(tmp_path / "audit.jsonl.1")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    audit.symlink_to(victim)
    os.kill(gw.proc.pid, signal.SIGHUP)
    wait_for(lambda: "the audit log is a symbolic link" in gw.output(), 30, interval=0.1,
             what="the reload's refusal", log=gw.output)
    assert gw.auth("alice", "demo-password").status == 200
    wait_for(lambda: rotated.read_text().count("\n") == 2, 10, interval=0.05, what="the line in the open file")
    assert victim.read_bytes() == b"precious\n"


def test_answered_by_is_in_the_line_only_when_a_step_names_who_answered(tmp_path):
    """A relay's connectors all vouch for users; its audit line said ``step: relay`` and not
    which connector answered, so one vouching falsely could not be told from the others. The
    name is the relay's own (its enrolment, never a connector's answer), and whatever it holds
    it stays one field of one line; a line of a step that names no one has no such field. A
    connector's USER_NOT_FOUND note that becomes the decision (the core's fold) keeps it."""
    import ipaddress
    import time

    from gateway.audit import AuditLog
    from gateway.chain import fold
    from gateway.model import Attempt, Decision, Identity, Outcome, PasswordCredential

    def attempt(request_id: str) -> Attempt:
        return Attempt(request_id, ipaddress.ip_address("192.0.2.7"), "api", time.monotonic() + 5,
                       password=PasswordCredential("alice", "Wrong-Secret-42"))

    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    hostile = 'acme-1\n{"event": "authgw.attempt", "outcome": "success"}\u2028\u0085"x'
    log.gateway_auth_finished(attempt("r1"), Decision.deny(Outcome.INVALID_CREDENTIALS, step="relay",
                                                           reason="ldap.invalid_password", answered_by=hostile))
    log.gateway_auth_finished(attempt("r2"), Decision.allow(Identity("uid=alice", "alice", "relay"), step="relay",
                                                            answered_by="acme-0a1b2c3d"))
    noted = attempt("r3")
    noted.note(Outcome.USER_NOT_FOUND, step="relay", reason="ldap.user_not_found", answered_by="acme-4e5f6a7b")
    log.gateway_auth_finished(noted, fold(noted))
    log.gateway_auth_finished(attempt("r4"), Decision.allow(Identity("alice", "alice", "static"), step="static"))
    log.close()
    lines = path.read_text().splitlines()  # splits on U+2028 and U+0085 too: they must be escaped
    records = [json.loads(line) for line in lines]
    assert [r["request_id"] for r in records] == ["r1", "r2", "r3", "r4"]
    assert records[0]["answered_by"] == hostile and records[0]["outcome"] == "invalid_credentials"
    assert (records[1]["outcome"], records[1]["answered_by"]) == ("success", "acme-0a1b2c3d")
    assert (records[2]["outcome"], records[2]["step"], records[2]["answered_by"]) == \
        ("user_not_found", "relay", "acme-4e5f6a7b")
    assert "answered_by" not in records[3]
