"""The loads of the same-run comparison (tools/bench/compare.py) and what they cost the server.

``wrk(url, seconds, threads=, connections=, headers=)`` runs **wrk** (keep-alive) with
``wrk_report.lua`` (wrk's own static request) or ``wrk_headers.lua`` (one header per request from
a file of values: ``cycle`` them, or use each ``once``); ``s_time(...)`` runs ``openssl s_time
-new`` clients (a new TLS connection per request, with a client certificate: what wrk cannot
do) and counts the successes the server logged (``LogCounter``). Both return a :class:`Load`:
successes, seconds, failures. ``measure(load, pids)`` adds the server's CPU per success from
/proc and how it was split between the server's processes.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import loadgen

__all__ = ["Load", "LogCounter", "audit_success", "measure", "s_time", "tree", "wrk"]

HERE = Path(__file__).resolve().parent


@dataclass
class Load:
    """One load's outcome: successes, the seconds it ran, and what went wrong."""

    ok: int
    seconds: float
    failed: int = 0
    exhausted: int = 0
    detail: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def wrk(url: str, seconds: float, *, threads: int, connections: int,
        headers: tuple[str, Path, str] | None = None) -> Load:
    """``wrk`` against *url*; *headers* = (header name, file of values, ``cycle``/``once``)."""
    script = HERE / ("wrk_headers.lua" if headers else "wrk_report.lua")
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s",
               "-s", str(script), url]
    if headers:
        name, values, mode = headers
        command += ["--", name, str(values), mode, str(threads)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    match = re.search(r"^WRK_JSON (\{.*\})$", proc.stdout, re.M)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    report = json.loads(match.group(1))
    errors = report["read_errors"] + report["write_errors"] + report["timeouts"] + report["connect_errors"]
    return Load(ok=report["requests"] - report["status_errors"], seconds=report["duration_us"] / 1e6,
                failed=report["status_errors"] + errors, exhausted=report["exhausted"], detail=report)


def s_time(port: int, path: str, pki: dict[str, str], seconds: float, clients: int,
           successes) -> Load:
    """*clients* ``openssl s_time -new`` loops (connect, full TLS handshake with the client
    certificate, ``GET path``, read to close); *successes()* counts the server's logged logins."""
    command = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-www", path,
               "-time", str(max(1, round(seconds))), "-cert", pki["client_crt"], "-key", pki["client_key"],
               "-CAfile", pki["root"]]
    before = successes()
    started = time.monotonic()
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(clients)]
    outputs = [proc.communicate(timeout=seconds + 60)[0] for proc in procs]
    elapsed = time.monotonic() - started
    connections = 0
    for output in outputs:
        found = re.search(r"(\d+) connections in \d+ real seconds", output)
        if found is None:
            raise RuntimeError(f"unexpected openssl s_time output:\n{output}")
        connections += int(found.group(1))
    ok, settle = successes() - before, time.monotonic() + 3
    while time.monotonic() < settle:  # log lines may be written in batches: wait until they stop coming
        time.sleep(0.3)
        now = successes() - before
        if now == ok and ok >= connections:
            break
        ok = now
    return Load(ok=ok, seconds=elapsed, failed=max(connections - ok, 0), detail={"connections": connections})


class LogCounter:
    """Counts the lines of a growing log that *matches* accepts, reading only what is new."""

    def __init__(self, path: Path, matches) -> None:
        self.path, self.matches, self.offset, self.count = path, matches, 0, 0

    def __call__(self) -> int:
        if self.path.exists():
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
            end = data.rfind(b"\n") + 1
            self.count += sum(1 for line in data[:end].splitlines() if self.matches(line))
            self.offset += end
        return self.count


def audit_success(line: bytes) -> bool:
    try:
        return json.loads(line).get("outcome") == "success"
    except ValueError:
        return False


def tree(pid: int) -> list[int]:
    return [pid, *loadgen.children(pid)]


def measure(load, pids) -> tuple[Load, float, list[float]]:
    """Run *load*, return it with the server's CPU µs per success (from /proc, whole process tree)
    and each child's share of the children's CPU (is the load spread over the processes?)."""
    started = pids()
    before = {pid: loadgen.cpu_seconds([pid]) for pid in started}
    total = loadgen.cpu_seconds(started)
    result = load()
    cpu = loadgen.cpu_seconds(pids()) - total
    spent = [loadgen.cpu_seconds([pid]) - before[pid] for pid in started[1:]]
    shares = [x / sum(spent) for x in spent] if sum(spent) > 0 else []
    return result, cpu / max(result.ok, 1) * 1e6, shares
