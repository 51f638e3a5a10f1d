"""Review of the core's front door: failure timing and connection caps, against a real
``authgw serve`` (and a real slapd for the directory's timing)."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from support.gateway import static_users, write_conf
from support.net import wait_for
from support.slapd import Slapd


@pytest.fixture(scope="module")
def slow_bind_directory(tmp_path_factory):
    """A directory whose binds as ``bob`` take a second and fail (a wrong password costing a
    directory's strong hash, or Active Directory's bad-password bookkeeping)."""
    slapd = Slapd(tmp_path_factory.mktemp("slapd"), retcode=True).start()
    try:
        slapd.add_user("bob", "bob-Passw0rd", bind_error=(49, ""), bind_delay=1)
        yield slapd
    finally:
        slapd.stop()


def test_instant_refusals_of_a_step_do_not_pull_the_failure_floor_down(slow_bind_directory, conf_dir, start_gateway):
    """``ldap`` refuses a password holding a NUL at once, with the outcome a wrong password gets
    after its bind. Counted as one kind, seventy such refusals diluted the wrong passwords'
    samples: an unknown user was then answered in a search's time (5 ms), a known user's wrong
    password in a bind's (1 s), and anyone could tell which names exist."""
    conf = write_conf(conf_dir, {
        "gateway.yaml": json.dumps({"chain": ["ldap"], "throttle": {"enabled": False},  # (several addresses)
                                    "failure_timing": {"max_floor": 4.0}}),
        "ldap.yaml": "ldap: " + json.dumps(slow_bind_directory.plugin_settings("plain", backoff=0)),
    })
    gw = start_gateway(conf)

    def timed(username: str, password: str) -> float:
        started = time.perf_counter()
        assert gw.auth(username, password).status == 401
        return time.perf_counter() - started

    for _ in range(6):  # the floor: a wrong password's time
        timed("bob", "not-the-password")
    with ThreadPoolExecutor(14) as pool:  # the attacker's instant refusals (padded once fixed: 14 at a time)
        list(pool.map(lambda i: timed(f"poison-{i}", "a\x00b"), range(70)))
    wrong, unknown = [], []
    for i in range(3):
        wrong.append(timed("bob", "not-the-password"))
        unknown.append(timed(f"nobody-{i}", "not-the-password"))
    reasons = [(a["username"], a["reason"]) for a in gw.audit()[-2:]]
    assert reasons == [("bob", "ldap.invalid_password"), ("nobody-2", "ldap.user_not_found")], reasons
    assert gw.audit()[-7]["reason"] == "ldap.nul_in_password"
    m_wrong, m_unknown = statistics.median(wrong), statistics.median(unknown)
    # Before the fix: 1.0 s against 0.005 s. Padded alike, the two are about equal.
    assert m_unknown > m_wrong / 2, f"wrong password {m_wrong:.3f} s, unknown user {m_unknown:.3f} s"


def _served(gw, count: int) -> tuple[list[socket.socket], int]:
    """*count* connections from ::1, each sending one request: they stay open (keep-alive);
    how many got an answer."""
    socks = [socket.create_connection(("::1", gw.port), timeout=10) for _ in range(count)]
    answered = 0
    for sock in socks:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        try:
            answered += sock.recv(100).startswith(b"HTTP/1.1 200")
        except OSError:
            pass
    return socks, answered


def _reload(gw, conf, gateway_yaml: str) -> None:
    (conf / "gateway.yaml").write_text(gateway_yaml)
    done = gw.output().count(" reloaded ")
    os.kill(gw.proc.pid, signal.SIGHUP)
    wait_for(lambda: gw.output().count(" reloaded ") > done, 30, what="the reload", log=gw.output)


def test_a_reload_that_changes_who_is_a_proxy_leaves_no_connection_counted(conf_dir, demo_hash, start_gateway):
    """An IPv6 peer is counted by its /64, a trusted proxy by its address. The count was worked
    out again when a connection closed: connections open while a reload made their peer a
    proxy were counted off its address and stayed on its /64 for good, whose clients were then
    refused short of ``max_connections_per_client``."""
    def gateway_yaml(trusted: list[str]) -> str:
        return json.dumps({"chain": ["static"], "trusted_proxies": trusted,
                           "limits": {"max_connections_per_client": 4}})

    conf = write_conf(conf_dir, {"gateway.yaml": gateway_yaml([]), **static_users({"demo": demo_hash})})
    gw = start_gateway(conf, host="::1")
    socks, answered = _served(gw, 3)
    assert answered == 3
    _reload(gw, conf, gateway_yaml(["::1/128"]))  # the retiring generation closes them
    for sock in socks:
        sock.close()
    _reload(gw, conf, gateway_yaml([]))
    socks, answered = _served(gw, 4)
    try:
        assert answered == 4, gw.output()[-1500:]  # before the fix: 1 ("::/64 has 4 connections open")
    finally:
        for sock in socks:
            sock.close()
