#!/usr/bin/env python3
"""The credential cache's two paths, each next to a reference measured in the same run.

Starts a throwaway slapd (tests/support/slapd.py) with --users users, and ``authgw serve`` with
``chain: [ldap]`` and ``plugins: [cache]`` on free loopback ports, then measures:

Hot path (forward-auth repeats; ``hot: {enabled: true}``)
  1. reference: ``GET /healthz``                       aiohttp with nothing behind it
  2. ``GET /auth``, repeat credentials, hot hits        precheck answers, no directory
  3. ``GET /auth``, same credentials, hot cache off     live search + bind on every request
     (a second gateway; its offline cache is on, with the default refresh_after)
Offline path (slapd stopped; hot cache off)
  4. reference: a raw argon2id verify loop, same parameters, one thread per CPU
  5. ``GET /auth`` answered from the offline cache      one argon2id verify per request

Prints requests per second, p50/p99 and the ratios (2/1, 3/1, 5/4), with the server's CPU per
request. Bounded by --seconds per phase; loopback only; stops what it starts.

    python tools/bench/bench_cache.py [--workers 1] [--seconds 5] [--concurrency 32] [--users 20]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
import loadgen  # noqa: E402
from support.gateway import GatewayProcess, write_conf  # noqa: E402
from support.slapd import Slapd  # noqa: E402


class Gateway(GatewayProcess):
    """``authgw serve`` with ``chain: [ldap]``, ``plugins: [cache]`` and *cache* as cache.yaml."""

    def __init__(self, tmp: Path, name: str, slapd: Slapd, cache: str, workers: int, threads: int) -> None:
        conf = write_conf(tmp / name, {
            "gateway.yaml": f"""\
                chain: [ldap]
                plugins: [cache]
                threads: {threads}
                throttle: {{enabled: false}}
                log_level: ERROR
                audit: {{file: /dev/null}}
                """,
            "ldap.yaml": "ldap: " + json.dumps(slapd.plugin_settings("plain", backoff=0)),
            "cache.yaml": cache,
        })
        super().__init__(conf, tmp / f"state-{name}", workers=workers)
        self.start()

    def pids(self) -> list[int]:
        return [self.proc.pid, *loadgen.children(self.proc.pid)]


def measure(label: str, gateway: Gateway, path: str, headers_fn, args) -> loadgen.LoadResult:
    return loadgen.measure(label, gateway.url + path, headers_fn, gateway.pids(),
                           concurrency=args.concurrency, seconds=args.seconds)


def argon2_loop(seconds: float, threads: int) -> float:
    """Verifications per second of a peppered-password hash, with the cache's parameters."""
    from gateway.plugins.cache.keys import CacheKeys
    from gateway.plugins.cache.settings import CacheSettings
    from gateway.plugins.cache.offline import OfflineCache

    cache = OfflineCache(CacheSettings(), Path(tempfile.mkdtemp()))
    keys = CacheKeys.derive(os.urandom(32), os.urandom(32))
    encoded = cache.hasher.hash(keys.peppered("user", "password"))
    counts = [0] * threads
    stop_at = time.perf_counter() + seconds

    def loop(slot: int) -> None:
        while time.perf_counter() < stop_at:
            peppered = keys.peppered("user", "password")
            assert cache.hasher.verify(encoded, peppered)
            counts[slot] += 1

    started = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--threads", type=int, default=16, help="the gateway's `threads:` setting")
    parser.add_argument("--users", type=int, default=20)
    args = parser.parse_args()
    if not 0 < args.seconds <= 10:
        raise SystemExit("--seconds must be in (0, 10]")

    tmp = Path(tempfile.mkdtemp(prefix="authgw-bench-cache-"))
    users = [(f"bench{n}", f"Passw0rd-{n}") for n in range(args.users)]
    headers = [{"Authorization": "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()} for u, p in users]
    rotate = lambda i: headers[i % len(headers)]  # noqa: E731
    slapd = Slapd(tmp / "ldap").start()
    gateways: list[Gateway] = []
    try:
        slapd.add_users(users)
        hot = Gateway(tmp, "hot", slapd, "cache: {hot: {enabled: true, ttl: 300}}\n", args.workers, args.threads)
        gateways.append(hot)
        plain = Gateway(tmp, "plain", slapd, "cache: {}\n", args.workers, args.threads)
        gateways.append(plain)
        for gateway in gateways:  # warm: every user logged in live once per worker at least
            warm = loadgen.run(gateway.url + "/auth", rotate, concurrency=4, seconds=10,
                               max_requests=len(users) * 2 * args.workers)
            assert set(warm.statuses) == {200}, warm.statuses

        print(f"authgw cache benchmark: workers={args.workers} concurrency={args.concurrency} users={args.users} "
              f"{args.seconds:.0f}s per phase, {os.cpu_count()} cores")
        print("-- hot path (slapd up)")
        healthz = measure("reference: GET /healthz", hot, "/healthz", lambda i: {}, args)
        hits = measure("GET /auth, hot cache hits", hot, "/auth", rotate, args)
        live = measure("GET /auth, hot off (live LDAP)", plain, "/auth", rotate, args)
        assert set(hits.statuses) == {200} and set(live.statuses) == {200}

        print("-- offline path (slapd stopped, hot cache off)")
        slapd.stop()
        threads = os.cpu_count() or 1
        raw = argon2_loop(args.seconds, threads)
        print(f"{'reference: raw argon2id verify':<34} {raw:>9.0f} verify/s ({threads} threads, "
              f"m=19456 KiB t=2 p=1)")
        offline = measure("GET /auth, offline cache (200)", plain, "/auth", rotate, args)
        assert set(offline.statuses) == {200}, offline.statuses

        print(f"ratio hot hits / healthz: {hits.rate / healthz.rate:.3f}")
        print(f"ratio live LDAP / healthz: {live.rate / healthz.rate:.3f}  (hot hits / live: "
              f"{hits.rate / live.rate:.1f}x)")
        print(f"ratio offline logins / raw argon2id verify: {offline.rate / raw:.3f}")
    finally:
        for gateway in gateways:
            gateway.stop()
        slapd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
