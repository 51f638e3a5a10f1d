"""A flood of connections on one listener does not shut the others out, nor the gateway's own
proxy (review of hostile clients, finding 1: 17 addresses x 256 idle connections to the relay's
public port held a worker at ``max_connections``, and /healthz on the forward-auth listener was
reset 15 times out of 19; with ``trusted_proxies`` the proxy's connections were refused too)."""

from __future__ import annotations

import asyncio
import socket
import time

from gateway.http.protocol import ConnectionGuard
from gateway.settings import LimitsSettings
from support.console import console_conf
from support.http import request
from support.net import free_port


def test_each_listener_keeps_a_share_and_trusted_proxies_a_margin():
    asyncio.run(_shares())  # on an event loop, as in a worker (the end of a burst schedules a trim)


async def _shares() -> None:
    import ipaddress

    guard = ConnectionGuard(LimitsSettings(max_connections=80, max_connections_per_client=1000),
                            [ipaddress.ip_network("10.0.0.1/32")])
    guard.serve(None)
    assert all(guard.admit("192.0.2.1") for _ in range(80))  # one listener: the whole cap
    assert not guard.admit("192.0.2.1")
    for _ in range(80):
        guard.release("192.0.2.1")

    guard.serve("relay.link")  # two listeners: each keeps 80 / (4 x 2) = 10 for itself
    flooded = 0
    while guard.admit("192.0.2.1", "relay.link"):
        flooded += 1
    assert flooded == 70
    assert all(guard.admit("192.0.2.2") for _ in range(10))  # the main listener's share
    assert not guard.admit("192.0.2.2")  # the cap, all told
    assert guard.open == 80
    # The trusted proxy may go a client's worth beyond the cap, on any listener; no further.
    assert all(guard.admit("10.0.0.1") for _ in range(1000))
    assert not guard.admit("10.0.0.1")
    assert guard.listeners == {None: 1010, "relay.link": 70}
    for _ in range(1000):
        guard.release("10.0.0.1")
    for _ in range(10):
        guard.release("192.0.2.2")
    for _ in range(70):
        guard.release("192.0.2.1", "relay.link")
    assert guard.open == 0 and not guard.per_client and set(guard.listeners.values()) == {0}


def _flood(port: int, count: int, sources: int) -> list[socket.socket]:
    """*count* idle connections to *port*, spread over *sources* addresses 127.0.0.2 ... (bounded)."""
    held = []
    for i in range(count):
        sock = socket.socket()
        sock.settimeout(2)
        try:
            sock.bind((f"127.0.0.{2 + i % sources}", 0))
            sock.connect(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        held.append(sock)
    return held


def test_a_flood_on_another_listener_leaves_the_forward_auth_listener_served(conf_dir, start_gateway):
    from gateway.passwords import hash_password

    console = free_port()
    console_conf(conf_dir, console, hash_password("alice-pw-1"))
    gateway_yaml = conf_dir / "gateway.yaml"
    gateway_yaml.write_text(gateway_yaml.read_text() + "limits:\n  max_connections: 64\n"
                            "  max_connections_per_client: 1000\n  header_timeout: 30\ntrusted_proxies: [127.0.0.1/32]\n")
    gw = start_gateway(conf_dir)
    held = _flood(console, 200, 4)  # idle connections to the console's listener, until refused
    try:
        deadline = time.monotonic() + 10
        while "closing its new ones" not in gw.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "(limits.max_connections)" in gw.output() and "on listener console" in gw.output()
        # Another address on the main listener: its share (64 / 8 = 8) is there.
        for _ in range(5):
            answer = _healthz(gw.port, "127.0.0.9")
            assert answer == 200
        # The trusted proxy (127.0.0.1), with the main listener's share used up as well.
        more = _flood(gw.port, 40, 4)
        held += more
        assert 0 < len([s for s in more if _alive(s)]) <= 8 + 2  # the share; the rest refused
        assert request(gw.url, "GET", "/healthz", {}).status == 200
    finally:
        for sock in held:
            sock.close()
    assert request(gw.url, "GET", "/healthz", {}).status == 200


def _healthz(port: int, source: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return int(data.split(b" ", 2)[1]) if data else 0


def _alive(sock: socket.socket) -> bool:
    """Whether the server kept *sock* (a refused one is reset or closed at once)."""
    sock.settimeout(0.3)
    try:
        return sock.recv(1) != b""
    except socket.timeout:
        return True
    except OSError:
        return False
