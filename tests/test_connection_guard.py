"""ConnectionGuard's bookkeeping, alone (the limits themselves are tested through a real server
in test_slow_clients.py and test_overload.py): when a burst of connections ends, freed memory is
given back once; the turns of held connections keep to limits.overload_refusals."""

from __future__ import annotations

import asyncio
import threading

from gateway.http import protocol
from gateway.http.protocol import ConnectionGuard
from gateway.settings import LimitsSettings


def test_the_end_of_a_burst_gives_freed_memory_back_once(monkeypatch):
    trims: list[str] = []
    monkeypatch.setattr(protocol, "trim_freed_memory", lambda: trims.append(threading.current_thread().name))
    monkeypatch.setattr(protocol, "_TRIM_AFTER", 0.05)

    async def connections_come_and_go() -> ConnectionGuard:  # on an event loop, as in a worker
        guard = ConnectionGuard(LimitsSettings(max_connections_per_client=10_000))
        for _ in range(100):  # a small crowd coming and going is no burst
            guard.admit("127.0.0.1")
        for _ in range(100):
            guard.release("127.0.0.1")
        await asyncio.sleep(0.2)
        assert trims == []
        for _ in range(protocol._BURST):
            guard.admit("127.0.0.1")
        for _ in range(protocol._BURST - protocol._BURST // 8):
            guard.release("127.0.0.1")
        for _ in range(200):
            if trims:
                break
            await asyncio.sleep(0.05)
        assert trims == ["authgw-trim"]  # on a thread of its own, not the event loop's
        for _ in range(protocol._BURST // 8):
            guard.release("127.0.0.1")
        await asyncio.sleep(0.2)
        return guard

    guard = asyncio.run(connections_come_and_go())
    assert guard.open == 0 and not guard.per_client and trims == ["authgw-trim"]


def test_held_connections_get_turns_at_the_refusal_rate_up_to_max_hold():
    guard = ConnectionGuard(LimitsSettings(retry_after=1, overload_refusals=2, max_hold=3))
    holds = [guard.hold_after_refusal(100.0) for _ in range(5)]
    # 1 s (retry_after), then one turn every 0.5 s, capped at 3 s.
    assert holds == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert guard.hold_after_refusal(100.0) == 3.0
    assert guard.hold_after_refusal(110.0) == 1.0  # the turns have passed: back to retry_after


def test_ipv6_clients_are_counted_by_their_network_as_the_throttle_counts_them():
    """A host is given a /64 and may connect from any address in it: counted address by address,
    one host could take every connection (review of the front door)."""
    guard = ConnectionGuard(LimitsSettings(max_connections_per_client=3), ipv6_prefix=64)
    assert [guard.admit(f"2001:db8:0:1::{i:x}") for i in range(1, 5)] == [True, True, True, False]
    assert guard.admit("2001:db8:0:2::1")  # another /64
    assert [guard.admit(h) for h in ("192.0.2.7", "::ffff:192.0.2.7", "192.0.2.7", "192.0.2.7")] \
        == [True, True, True, False]  # an IPv4-mapped address is that IPv4 client
    guard.release("2001:db8:0:1::2")  # any address of the network frees one of its slots
    assert guard.admit("2001:db8:0:1::ffff") and not guard.admit("2001:db8:0:1::abcd")
    wide = ConnectionGuard(LimitsSettings(max_connections_per_client=1), ipv6_prefix=128)
    assert wide.admit("2001:db8::1") and wide.admit("2001:db8::2")
    # A trusted proxy is exempt and counted by its own address: not in its neighbours' count.
    import ipaddress

    proxied = ConnectionGuard(LimitsSettings(max_connections_per_client=2),
                              [ipaddress.ip_network("2001:db8:0:9::5/128")], ipv6_prefix=64)
    assert all(proxied.admit("2001:db8:0:9::5") for _ in range(10))
    assert [proxied.admit(f"2001:db8:0:9::{i}") for i in (6, 7, 8)] == [True, True, False]
    # link-local addresses with their zone are counted by address, zone and all
    assert proxied.admit("fe80::1%eth0") and proxied.admit("fe80::1%eth1") and proxied.admit("fe80::2%eth0")
