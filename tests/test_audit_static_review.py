"""Review of the audit log, the service log, metrics and the static users plugin, against a real
``authgw serve``: password hashes a users file may hold that argon2 cannot, or should not, verify,
the users file's reload while logins go on, and an audit line the full disk took in part while
another worker writes to the same file."""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from pathlib import Path

from support.gateway import authgw, replace_file, users_yaml, write_conf
from support.net import wait_for

SALT = base64.b64encode(b"s" * 16).decode().rstrip("=")
TAG = base64.b64encode(b"t" * 32).decode().rstrip("=")


def _hash(params: str) -> str:
    """An argon2id PHC string with *params* (``m=...,t=...,p=...``) that no password matches,
    made without hashing (some of these parameters would take minutes)."""
    return f"$argon2id$v=19${params}${SALT}${TAG}"


def _serve(conf_dir, start_gateway, users: dict[str, str], gateway_extra: str = ""):
    write_conf(conf_dir, {
        "gateway.yaml": f"chain: [static]\nthrottle: {{enabled: false}}\n{gateway_extra}",
        "static.yaml": "static:\n  users_file: users/u.yaml\n  reload_interval: 0.05\n",
        "users/u.yaml": users_yaml(users),
    })
    return start_gateway(conf_dir), conf_dir / "users" / "u.yaml"



def test_a_hash_with_a_digit_of_another_script_is_a_wrong_password_not_an_internal_error(
        conf_dir, start_gateway, demo_hash):
    """``m=1\u0669456`` (an Arabic-Indic nine) reads as 19456 to ``int()``, so the hash passed as
    readable; argon2-cffi encodes a hash as ASCII and raised UnicodeEncodeError out of the step:
    the user's every login was ``internal_error`` with a traceback in the log, answered at once
    where a wrong password costs a hashing. It is an unreadable hash now: warned at start, and a
    login for it is a wrong password."""
    odd = _hash("m=1\u0669456,t=2,p=1")
    gateway, _ = _serve(conf_dir, start_gateway, {"alice": demo_hash, "carol": odd})
    response = gateway.auth("carol", "anything-at-all")
    assert response.status == 401
    line = gateway.audit_for(response.header("X-Request-Id"))  # the audit goes to standard error here
    output = gateway.output()
    assert "Traceback" not in output and "UnicodeEncodeError" not in output, output[-3000:]
    assert "internal_error" not in output, output[-3000:]
    assert (line["outcome"], line["reason"]) == ("invalid_credentials", "static.invalid_password")
    assert "do not read as argon2id" in output and "'carol'" in output, output[-3000:]
    assert gateway.auth("alice", "demo-password").status == 200


def test_a_hash_asking_for_minutes_of_work_does_not_stall_the_users_file_reload(conf_dir, start_gateway, demo_hash):
    """A users file edit adding one hash with absurd parameters (``t=100000``, a typo) had the
    reload make a dummy hash with them (minutes) while holding the lock every login waits on:
    the break-glass account's logins were all 503 ``deadline_exceeded`` until it ended. Such a
    hash is beyond what authgw verifies (unreadable, warned), and the reload goes on at once."""
    gateway, users = _serve(conf_dir, start_gateway, {"alice": demo_hash})
    assert gateway.auth("alice", "demo-password").status == 200
    replace_file(users, users_yaml({"alice": demo_hash, "dave": _hash("m=19456,t=100000,p=1")}))
    statuses = []

    def login() -> bool:
        statuses.append(gateway.auth("alice", "demo-password", timeout=30).status)
        return "reloaded: 2 users" in gateway.output()

    wait_for(login, 30, interval=0.1, what="the edit to be applied", log=gateway.output)
    assert set(statuses) == {200}, (statuses, gateway.output()[-3000:])
    assert "more work than authgw verifies" in gateway.output() and "'dave'" in gateway.output()
    assert gateway.auth("dave", "anything-at-all").status == 401
    assert gateway.auth("alice", "demo-password").status == 200


def test_other_logins_go_on_while_a_users_file_edit_is_being_read(conf_dir, start_gateway, demo_hash):
    """While one login re-reads an edited users file (a new parameter set costs one hashing for
    its dummy: here ~100 times a login's), the others waited for it on the plugin's lock; they
    go on with the users as they were."""
    gateway, users = _serve(conf_dir, start_gateway, {"alice": demo_hash}, gateway_extra="deadline: 120\n")
    assert gateway.auth("alice", "demo-password").status == 200
    replace_file(users, users_yaml({"alice": demo_hash, "erin": _hash("m=19456,t=200,p=1")}))
    time.sleep(0.2)  # past reload_interval since the last check: the next login checks the file
    reloader = threading.Thread(target=lambda: gateway.auth("nobody", "anything-at-all", timeout=120))
    reloader.start()  # finds the change: reads the file, then makes a dummy with erin's parameters
    try:
        wait_for(lambda: "different argon2 parameters" in gateway.output(), 30, interval=0.02,
                 what="the edit to be read", log=gateway.output)
        time.sleep(0.2)  # past reload_interval: this login checks the file too
        assert gateway.auth("alice", "demo-password", timeout=120).status == 200
        assert "reloaded: 2 users" not in gateway.output(), "alice's login waited for the reload"
    finally:
        reloader.join(130)
    wait_for(lambda: "reloaded: 2 users" in gateway.output(), 60, interval=0.1, what="the reload", log=gateway.output)


def test_a_hash_whose_memory_overflows_argon2_is_unreadable_not_a_start_failure(conf_dir, tmp_path, demo_hash):
    """``m=99999999999999999999``: making a dummy with it raised OverflowError, and the plugin
    failed to start (``failed to start: OverflowError: int too big to convert``, the user and
    the line unnamed); at a reload, a traceback."""
    write_conf(conf_dir, {"gateway.yaml": "chain: [static]\n",
                          "static.yaml": "static:\n  users_file: users/u.yaml\n",
                          "users/u.yaml": users_yaml({"alice": demo_hash,
                                                       "frank": _hash("m=99999999999999999999,t=2,p=1")})})
    result = authgw("config", "check", "--config", str(conf_dir), "--state-dir", str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OverflowError" not in result.stderr and "'frank'" in result.stderr, result.stderr[-3000:]


def _worker_connections(gateway, tries: int = 60) -> dict[str, http.client.HTTPConnection]:
    """A kept-alive connection to each of the gateway's workers, by the prefix of their request ids
    (one per process): which worker answers a request is then the test's choice."""
    found: dict[str, http.client.HTTPConnection] = {}
    for _ in range(tries):
        connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=15)
        prefix = _anonymous(connection)[:16]
        if prefix in found:
            connection.close()
        else:
            found[prefix] = connection
        if len(found) == gateway.workers:
            return found
    raise AssertionError(f"reached {len(found)} of {gateway.workers} workers")


def _anonymous(connection: http.client.HTTPConnection) -> str:
    """An attempt with no credentials (an audit line, no hashing); its request id."""
    connection.request("GET", "/auth")
    response = connection.getresponse()
    response.read()
    assert response.status == 401
    return response.getheader("X-Request-Id")


def test_a_line_the_full_disk_tore_is_not_glued_to_another_workers_line_after_it(conf_dir, start_gateway, demo_hash,
                                                                                  tmp_path):
    """The disk fills up mid-line (a short write): the worker kept the line's rest, and wrote it
    with its next line once the disk took writes again. Another worker writing first had its
    line appended to the torn start, and the rest came after it: two records that did not parse,
    one of them a line the other worker had kept whole. Now the start is blanked out where it is
    (a blank line) and the line waits whole, as one the disk refused; every answered attempt has
    one line that parses."""
    import resource

    audit = tmp_path / "audit.jsonl"
    write_conf(conf_dir, {"gateway.yaml": f"chain: [static]\nthrottle: {{enabled: false}}\naudit:\n  file: {audit}\n",
                          "static.yaml": "static:\n  users_file: users/u.yaml\n",
                          "users/u.yaml": users_yaml({"alice": demo_hash})})
    gateway = start_gateway(conf_dir, workers=2)
    torn, other = _worker_connections(gateway).values()
    workers = [int(pid) for pid in
               Path(f"/proc/{gateway.proc.pid}/task/{gateway.proc.pid}/children").read_text().split()]
    assert len(workers) == 2

    def disk_space(limit: int) -> None:  # a file size limit stands for a disk that fills up
        for pid in workers:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    answered = []
    try:
        disk_space(audit.stat().st_size + 100)  # room for the start of one line
        answered.append(_anonymous(torn))  # its line torn: written 100 bytes of it
        answered.append(_anonymous(other))  # refused whole: kept
        wait_for(lambda: "cannot write the audit log" in gateway.output(), 10, interval=0.05,
                 what="the refused write to be logged", log=gateway.output)
    finally:
        disk_space(resource.RLIM_INFINITY)
    answered.append(_anonymous(other))  # its kept line and this one
    answered.append(_anonymous(torn))  # its torn line and this one
    for connection in (torn, other):
        connection.close()
    parsed = {}
    for line in audit.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # (before: the torn start with another line glued to it, and the rest)
        parsed[record["request_id"]] = parsed.get(record["request_id"], 0) + 1
    assert {rid: parsed.get(rid, 0) for rid in answered} == dict.fromkeys(answered, 1), audit.read_text()
