"""What a review of the supervisor and reloads found, through real ``authgw`` processes: files a
setting names that are not regular files (a FIFO hung ``config check``, start-up and reloads),
a descriptor left open by each refused reload, a changed ``state_dir:`` taken at a reload (the
throttle's counts started afresh), errors that named neither line nor file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from support.gateway import GatewayProcess, authgw, static_users, write_conf
from support.net import free_port, wait_for

PASSWORD = "Corr3ct-Horse-Battery"


def _hash(password: str = PASSWORD) -> str:
    from gateway.passwords import hash_password

    return hash_password(password)


def _errors(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_a_fifo_or_a_device_as_a_secret_file_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for secret, shown in ((tmp_path / "fifo", "not read: a FIFO, not a regular file"),
                          ("/dev/zero", "not read: a character device, not a regular file"),
                          (tmp_path, "not read: a directory, not a regular file")):
        conf = write_conf(tmp_path / f"conf-{len(str(secret))}", {
            "gateway.yaml": "chain: [static]\nthrottle:\n  store: redis\n  redis:\n    url: redis://127.0.0.1:1\n"
                            f"    password: {{file: {secret}}}\n",
            **static_users({"alice": _hash()})})
        found = _errors(authgw("config", "check", "--config", str(conf), timeout=30))
        assert f"throttle.redis.password: cannot read secret file {secret}: {shown}" in found, found
    (tmp_path / "big").write_bytes(b"x" * (65 * 1024))
    conf = write_conf(tmp_path / "conf-big", {
        "gateway.yaml": "chain: [static]\nthrottle:\n  store: redis\n  redis:\n    url: redis://127.0.0.1:1\n"
                        f"    password: {{file: {tmp_path / 'big'}}}\n", **static_users({"alice": _hash()})})
    assert "more than the 65,536 bytes a file may have here" in _errors(
        authgw("config", "check", "--config", str(conf), timeout=30))


def test_a_fifo_as_the_audit_file_stops_the_start_with_its_reason(tmp_path):
    os.mkfifo(tmp_path / "audit.fifo")
    conf = write_conf(tmp_path / "conf.d", {
        "gateway.yaml": f"chain: [static]\naudit:\n  file: {tmp_path / 'audit.fifo'}\n",
        **static_users({"alice": _hash()})})
    started = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(conf), "--state-dir",
                              str(tmp_path / "state"), "--listen", f"127.0.0.1:{free_port()}"],
                             capture_output=True, text=True, timeout=60)
    assert started.returncode != 0
    assert "the audit log is a FIFO, not a regular file" in started.stderr, started.stderr[-2000:]


def _audit_descriptors(pid: int, audit: str) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == audit
        except OSError:
            pass
    return count


def test_refused_reloads_leave_no_audit_file_open(tmp_path, start_gateway):
    audit = tmp_path / "audit.log"
    conf = write_conf(tmp_path / "conf.d", {"gateway.yaml": f"chain: [static]\naudit:\n  file: {audit}\n",
                                            **static_users({"alice": _hash()})})
    gw = start_gateway(conf)
    assert gw.auth("alice", PASSWORD).status == 200
    before = _audit_descriptors(gw.proc.pid, str(audit))
    # refused while the plugins are built, after the audit file was opened for the new runtime
    (conf / "users" / "users.yaml").write_text("users: [\n")
    for n in range(1, 6):
        os.kill(gw.proc.pid, signal.SIGHUP)
        wait_for(lambda: gw.output().count("reload refused") >= n, timeout=30, what="a refusal", log=gw.output)
    assert _audit_descriptors(gw.proc.pid, str(audit)) == before == 1
    assert gw.auth("alice", PASSWORD).status == 200


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    conf = write_conf(tmp_path / "conf.d", {"gateway.yaml": "chain: [static]\n", **static_users({"alice": _hash()})})
    (conf / "zz.yaml").write_bytes(b"# fine\nrealm: caf\xe9\n")
    found = _errors(authgw("config", "check", "--config", str(conf), timeout=30))
    assert "zz.yaml:2: not UTF-8 (column 11); save the file as UTF-8" in found, found
    assert "\\xe9" not in found and "0xe9" not in found


def test_a_users_file_that_is_a_directory_is_named(tmp_path):
    conf = write_conf(tmp_path / "conf.d", {"gateway.yaml": "chain: [static]\n", **static_users({"alice": _hash()})})
    (conf / "users" / "users.yaml").unlink()
    (conf / "users" / "users.yaml").mkdir()
    found = _errors(authgw("config", "check", "--config", str(conf), timeout=30))
    assert "users.yaml: not read: a directory, not a regular file" in found, found


def test_a_changed_state_dir_waits_for_the_restart(tmp_path):
    """``state_dir:`` in conf.d (no --state-dir): a reload took a new one at once, though the log
    said it waits for a restart, and the throttle's counts of guesses started afresh there."""
    first, second = tmp_path / "state1", tmp_path / "state2"
    core = "chain: [static]\nthrottle:\n  user_failures: 3\n  user_client_failures: 3\nstate_dir: {}\n"
    conf = write_conf(tmp_path / "conf.d", {"gateway.yaml": core.format(first), **static_users({"alice": _hash()})})
    gw = GatewayProcess(conf, first, state_flag=False, workers=2).start()  # (the sqlite store: files)
    try:
        assert (first / "throttle.sqlite3").exists()
        answers = [gw.auth("alice", "a-guess").status for _ in range(4)]
        assert answers[-1] == 429, answers
        (conf / "gateway.yaml").write_text(core.format(second))
        os.kill(gw.proc.pid, signal.SIGHUP)
        wait_for(lambda: "`state_dir` changed; it takes effect at the next restart" in gw.output(), timeout=30,
                 log=gw.output)
        wait_for(lambda: gw.output().count(" reloaded ") >= 2, timeout=30, log=gw.output)  # both workers
        assert gw.auth("alice", "another-guess").status == 429  # the same counts, not a fresh budget
        assert not (second / "throttle.sqlite3").exists()
    finally:
        gw.stop()


def test_a_realm_that_cannot_be_quoted_is_refused_with_its_key(tmp_path):
    """Written between quotes in every challenge: `my "realm` made a malformed header, and a
    control character had every challenge dropped with an ERROR (review of the endpoints)."""
    for realm in ('my "realm', "a\\\\b", "x\\u0085y"):
        conf = write_conf(tmp_path / f"conf-{len(realm)}-{ord(realm[-2])}", {
            "gateway.yaml": f"chain: [static]\nrealm: {json.dumps(realm)}\n", **static_users({"alice": _hash()})})
        found = _errors(authgw("config", "check", "--config", str(conf), timeout=30))
        assert "gateway.yaml:2: realm:" in found and "printable characters" in found, found
