"""Slow clients through a real ``authgw serve`` (issue 10 item 2): a slow-header flood of a few
thousand connections, with the gateway's descriptors limited to 1,024, leaves real logins
working; the header timeout closes what the flood holds; every limit hit is logged."""

from __future__ import annotations

import resource
import socket
import time

import pytest

from support.gateway import static_users, write_conf

PASSWORD = "Corr3ct-Horse-Battery"
FLOOD = 3000


@pytest.fixture(scope="module")
def alice_hash():
    from gateway.passwords import hash_password

    return hash_password(PASSWORD)


def open_slow(count: int, source: str, port: int) -> list[socket.socket]:
    """*count* connections from *source*, each with half a request line sent (bounded)."""
    held = []
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(2)
        try:
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /auth HTTP/1.1\r\nX-S")
        except OSError:
            sock.close()
            continue
        held.append(sock)
    return held


def trickle(held: list[socket.socket]) -> int:
    """One more header byte on each connection; how many the server still holds open."""
    alive = 0
    for sock in held:
        try:
            sock.sendall(b"l")
            alive += 1
        except OSError:
            pass
    return alive


def test_slow_header_flood_leaves_logins_working(conf_dir, alice_hash, start_gateway):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < FLOOD + 200:
        pytest.skip(f"needs {FLOOD + 200} descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, FLOOD + 200), hard))
    gw = start_gateway(write_conf(conf_dir, {
        "gateway.yaml": "chain: [static]\nthrottle:\n  enabled: false\nlimits:\n  header_timeout: 3\n",
        **static_users({"alice": alice_hash}),
    }))
    # The gateway gets the descriptors a small default system gives (without caps, 1,024 slow
    # connections are enough to refuse every real login).
    resource.prlimit(gw.proc.pid, resource.RLIMIT_NOFILE, (1024, 1024))
    held = open_slow(FLOOD, "127.0.0.2", gw.port)
    try:
        statuses = []
        for _ in range(10):
            trickle(held)
            statuses.append(gw.auth("alice", PASSWORD, timeout=10).status)
        assert statuses == [200] * 10
        # The header timeout: within bounded time every flood connection is closed by the
        # server, however regularly it sends.
        deadline = time.monotonic() + 30
        alive = trickle(held)
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = trickle(held)
        assert alive == 0
    finally:
        for sock in held:
            sock.close()
    log = gw.output()
    assert "127.0.0.2 has 256 connections open (limits.max_connections_per_client)" in log
    assert "no complete request headers within 3 s (limits.header_timeout)" in log
    assert gw.auth("alice", PASSWORD).status == 200


def test_an_idle_keep_alive_connection_is_not_a_slow_header(conf_dir, alice_hash, start_gateway):
    import http.client

    from support.http import basic

    gw = start_gateway(write_conf(conf_dir, {
        "gateway.yaml": "chain: [static]\nlimits:\n  header_timeout: 1\n",
        **static_users({"alice": alice_hash}),
    }))
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        for _ in range(2):  # the pause between the two is longer than the header timeout
            conn.request("GET", "/auth", headers={"Authorization": basic("alice", PASSWORD)})
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            time.sleep(2)
        assert conn.sock is not None  # the same connection served both
    finally:
        conn.close()
    assert "limits.header_timeout" not in gw.output()
