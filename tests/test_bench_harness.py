"""The benchmark harness itself works (tools/bench/apache.py, loads.py, compare.py, the wrk scripts):
Apache httpd from a private config authenticates against the test slapd through
mod_authnz_ldap, its LDAP cache is really off or on, wrk's successes and failures are counted,
and Apache stops by PID. Behaviour only: nothing here is timed."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from support.http import basic, request
from support.slapd import Slapd

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench"


def _load(name: str):
    if name not in sys.modules:
        sys.path.insert(0, str(BENCH))  # the bench modules import their neighbours (loadgen)
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def slapd(tmp_path: Path):
    server = Slapd(tmp_path / "ldap").start()
    server.add_user("alice", "alice-secret", groups=["staff"])
    yield server
    server.stop()


def _ldap(slapd: Slapd, cache: bool):
    apache = _load("apache")
    return apache.LdapAuth(slapd.url, slapd.base_dn, slapd.service_dn, slapd.service_password, cache=cache)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"  # exited, not yet reaped by its new parent (TESTING-NOTES)


def test_apache_basic_login_through_mod_authnz_ldap_and_stop_by_pid(slapd: Slapd, tmp_path: Path) -> None:
    apache = _load("apache").Apache(tmp_path / "apache", ldap=_ldap(slapd, cache=False)).start()
    try:
        pids = apache.pids()
        assert len(pids) == 3, pids  # the parent and its 2 children, as authgw's 2 workers

        ok = request(apache.url, "GET", "/ldap/ok", {"Authorization": basic("alice", "alice-secret")})
        assert ok.status == 200 and ok.body == b'{"status": "ok"}\n'
        wrong = request(apache.url, "GET", "/ldap/ok", {"Authorization": basic("alice", "wrong")})
        assert wrong.status == 401
        anonymous = request(apache.url, "GET", "/ldap/ok")
        assert anonymous.status == 401 and anonymous.header("WWW-Authenticate").startswith("Basic")
        assert request(apache.url, "GET", "/static").status == 200
        assert slapd.bind_count() >= 2  # the service account and alice: it did talk to slapd

        log = apache.access_log_path.read_text()
        assert '"GET /ldap/ok HTTP/1.1" 200' in log and "alice" in log
        assert '"GET /ldap/ok HTTP/1.1" 401' in log
        assert "/static" not in log  # the bare floor logs nothing, as authgw's /healthz
        assert int((apache.directory / "httpd.pid").read_text()) == apache.pid  # its files are its own
    finally:
        apache.stop()
    assert not apache.running
    assert all(_gone(pid) for pid in pids)


def test_apache_ldap_cache_is_off_or_on(slapd: Slapd, tmp_path: Path) -> None:
    """With mod_ldap's cache on, a password changed in the directory still logs in with the old
    one (answered from the cache); with it off, the directory answers every time."""
    apache = _load("apache")
    uncached = apache.Apache(tmp_path / "off", ldap=_ldap(slapd, cache=False)).start()
    cached = apache.Apache(tmp_path / "on", ldap=_ldap(slapd, cache=True)).start()
    try:
        old = {"Authorization": basic("alice", "alice-secret")}
        # A new connection each: both children answer some (their cache is shared memory anyway).
        for server in (uncached, cached):
            for _ in range(6):
                assert request(server.url, "GET", "/ldap/ok", old).status == 200
        slapd.set_password("alice", "changed-secret")
        assert request(uncached.url, "GET", "/ldap/ok", old).status == 401
        assert request(cached.url, "GET", "/ldap/ok", old).status == 200
        new = {"Authorization": basic("alice", "changed-secret")}
        assert request(uncached.url, "GET", "/ldap/ok", new).status == 200
    finally:
        cached.stop()
        uncached.stop()


def test_wrk_counts_successes_and_refusals(slapd: Slapd, tmp_path: Path) -> None:
    """loads.wrk: each request carries the next header value of a file; answers above 399 are
    not successes; single-use values report reuse once they run out."""
    loads = _load("loads")
    apache = _load("apache").Apache(tmp_path / "apache", ldap=_ldap(slapd, cache=False)).start()
    try:
        def wrk(path: str, headers=None):
            return loads.wrk(apache.url + path, 1, threads=1, connections=2, headers=headers)

        good = tmp_path / "good.txt"
        good.write_text(basic("alice", "alice-secret") + "\n")
        load = wrk("/ldap/ok", ("Authorization", good, "cycle"))
        assert load.ok > 0 and load.failed == 0 and load.exhausted == 0

        mixed = tmp_path / "mixed.txt"
        mixed.write_text(basic("alice", "alice-secret") + "\n" + basic("alice", "wrong") + "\n")
        load = wrk("/ldap/ok", ("Authorization", mixed, "cycle"))
        assert load.ok > 0 and load.failed > 0
        assert abs(load.ok - load.failed) <= 2  # one request in two is refused (2 connections in flight)

        load = wrk("/ldap/ok", ("Authorization", good, "once"))
        # All but the first were reuses, give or take the requests in flight when wrk stopped (one
        # per connection) and the one wrk's start-up check takes from the script.
        answered = load.ok + load.failed
        assert load.ok > 1 and answered - 1 <= load.exhausted <= answered + 2

        bare = wrk("/static")
        assert bare.ok > 0 and bare.failed == 0
    finally:
        apache.stop()


@pytest.mark.slow
def test_compare_prints_the_same_run_table() -> None:
    """One command: starts slapd, Apache and authgw, loads both, prints the issue's table rows
    with a ratio, and leaves no Apache behind."""
    mark = f"AUTHGW_COMPARE_TEST={uuid.uuid4().hex}"  # inherited by everything this run starts
    proc = subprocess.run([sys.executable, str(BENCH / "compare.py"), "--rounds", "1", "--duration", "1",
                           "--warmup", "1", "--only", "bare,ldap"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, mark.split("=")[0]: mark.split("=")[1]})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split(" | ")[0]: line for line in proc.stdout.splitlines() if line.startswith("| ")}
    for label in ("| bare HTTP (Apache static file / authgw `/healthz`)", "| LDAP Basic, 1,000 distinct users, no cache"):
        assert re.fullmatch(r"\| .+ \| [\d,]+ \| [\d,]+ \| \d+\.\d\d \| [\d,]+ / [\d,]+ \|", rows[label]), rows
    assert len(re.findall(r"^round 1 (bare|ldap) +(apache|authgw) ", proc.stdout, re.M)) == 4
    assert not _processes_with(mark.encode()), "compare.py left processes running"


def _processes_with(marker: bytes) -> list[int]:
    """Live processes whose environment holds *marker* (this test's run only, not another's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0") and \
                        (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
            except OSError:
                pass
    return found
