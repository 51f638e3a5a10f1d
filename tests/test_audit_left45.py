"""The audit line a full disk tore, with another worker appending to the same file at the worst
moment (left from the review of the audit and static users, said in ``gateway/audit.py``): a
real ``authgw serve`` with two workers, the disk's filling up stood for by one worker's file size
limit, and the order forced by holding that worker in a system call under ``strace`` (delay
injection) until the other worker's line is in the file."""

from __future__ import annotations

import http.client
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from support.gateway import users_yaml, write_conf
from support.net import wait_for

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to force the order")


def _connections(gateway, tries: int = 60) -> dict[int, http.client.HTTPConnection]:
    """A kept-alive connection to each worker, by the worker's pid (a connection stays with the
    worker that accepted it): which worker writes a line is then the test's choice."""
    workers = {int(pid) for pid in
               Path(f"/proc/{gateway.proc.pid}/task/{gateway.proc.pid}/children").read_text().split()}
    assert len(workers) == 2
    found: dict[int, http.client.HTTPConnection] = {}
    for _ in range(tries):
        connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
        _anonymous(connection)
        port = connection.sock.getsockname()[1]
        owner = next(pid for pid in workers if _holds_connection_from(pid, port))
        if owner in found:
            connection.close()
        else:
            found[owner] = connection
        if len(found) == len(workers):
            return found
    raise AssertionError(f"reached {len(found)} of {len(workers)} workers")


def _holds_connection_from(pid: int, port: int) -> bool:
    """Whether worker *pid* holds the accepted end of the connection from local *port*."""
    inodes = set()
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port and fields[9] in inodes:  # remote end: our client
            return True
    return False


def _anonymous(connection: http.client.HTTPConnection) -> str:
    """An attempt with no credentials (an audit line, no hashing); its request id."""
    connection.request("GET", "/auth")
    response = connection.getresponse()
    response.read()
    assert response.status == 401
    return response.getheader("X-Request-Id")


def _audit_fd(pid: int, audit: Path) -> int:
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(entry) == str(audit):
                return int(entry.name)
        except OSError:
            continue
    raise AssertionError(f"worker {pid} has no descriptor of {audit}")


def _traced(pid: int) -> bool:
    """Whether every thread of *pid* is under a tracer."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        if re.search(r"^TracerPid:\s+0$", status, re.M):
            return False
    return True


@pytest.mark.parametrize("held", [("lseek",), ("ftruncate", "pwrite64")],
                         ids=["right-after-the-short-write", "as-its-start-is-taken-back"])
def test_a_line_another_worker_appends_while_a_torn_one_is_taken_back_is_kept_whole(
        conf_dir, start_gateway, demo_hash, tmp_path, held):
    """Worker A's write of its line is short (the disk filled up mid-line); worker B, whose write
    the disk takes again, appends a whole line while A deals with its torn start. Before: held
    between A's ``fstat`` and its ``ftruncate``, B's line was cut off the file with A's start
    (an answered attempt with no audit line); held just after the short write, A left its start
    in the file and B's line was glued to it (a record that did not parse). Now every answered
    attempt, A's and B's, has exactly one line that parses, and no line is torn."""
    audit = tmp_path / "audit.jsonl"
    write_conf(conf_dir, {"gateway.yaml": f"chain: [static]\ndeadline: 120\nthrottle: {{enabled: false}}\naudit:\n  file: {audit}\n",
                          "static.yaml": "static:\n  users_file: users/u.yaml\n",
                          "users/u.yaml": users_yaml({"alice": demo_hash})})
    gateway = start_gateway(conf_dir, workers=2)
    connections = _connections(gateway)
    (a_pid, a), (b_pid, b) = connections.items()
    fd = _audit_fd(a_pid, audit)
    answered = [_anonymous(a), _anonymous(b)]

    trace = tmp_path / "strace.txt"
    inject = [arg for name in held for arg in ("-e", f"inject={name}:delay_enter=60000000")]
    strace = subprocess.Popen(["strace", "-f", "-qq", "-s", "0", "-o", str(trace), "-p", str(a_pid),
                               "-e", f"trace=write,{','.join(held)}", *inject],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    torn_answer: list[str] = []
    asking = threading.Thread(target=lambda: torn_answer.append(_anonymous(a)), daemon=True)
    try:
        wait_for(lambda: _traced(a_pid), 20, interval=0.05, what="strace to attach to every thread of worker A")
        resource.prlimit(a_pid, resource.RLIMIT_FSIZE, (audit.stat().st_size + 100, resource.RLIM_INFINITY))
        asking.start()  # A's line: 100 bytes of it written, then A is held
        short = re.compile(rf"write\({fd}, \"\"\.\.\., (\d+)\)\s+=\s+(\d+)(?:\n.*)*?\b({'|'.join(held)})\(")

        def held_after_a_short_write() -> bool:
            found = short.search(trace.read_text(errors="replace"))
            return found is not None and int(found[2]) < int(found[1])

        wait_for(held_after_a_short_write, 20, interval=0.05, what="worker A held after a short write",
                 log=lambda: trace.read_text(errors="replace"))
        answered.append(_anonymous(b))  # B's line, appended while A is held
    finally:
        strace.send_signal(signal.SIGINT)  # detaches: A goes on
        strace.wait(timeout=30)
        asking.join(timeout=30)
        resource.prlimit(a_pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert torn_answer, "A's attempt was never answered"
    answered.append(torn_answer[0])
    answered.append(_anonymous(a))  # A's kept line goes with this one
    answered.append(_anonymous(b))
    for connection in connections.values():
        connection.close()

    parsed: dict[str, int] = {}
    torn = []
    for line in audit.read_bytes().split(b"\n")[:-1]:
        if not line.strip():
            continue  # (JSON whitespace: a line reader's blank line)
        try:
            record = json.loads(line)
        except ValueError:
            torn.append(line)
            continue
        parsed[record["request_id"]] = parsed.get(record["request_id"], 0) + 1
    assert audit.read_bytes().endswith(b"\n")
    assert not torn, audit.read_text(errors="replace")
    assert {rid: parsed.get(rid, 0) for rid in answered} == dict.fromkeys(answered, 1), audit.read_text()
