#!/usr/bin/env python3
"""What the core costs per attempt, measured against the same server's plain endpoint.

Starts ``authgw serve`` on a free loopback port with the ``static`` plugin and drives, in one run:

1. ``GET /healthz``                       the reference: aiohttp with nothing behind it;
2. ``GET /auth`` without credentials      the whole core (attempt, thread hop, pluggy chain with one
                                          step, folding, audit line, metrics, challenges), 401;
3. ``GET /auth`` with Basic demo:demo     the same plus one argon2id verification, 200.

Prints requests per second, p50/p99 latency and the ratios to /healthz. Bounded by --seconds
per phase; stops the server it started.

    python tools/bench/bench_core.py [--workers 2] [--seconds 5] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import loadgen  # noqa: E402
from support.gateway import GatewayProcess, static_users, write_conf  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--threads", type=int, default=16, help="the gateway's `threads:` setting")
    args = parser.parse_args()

    from gateway.passwords import hash_password

    tmp = Path(tempfile.mkdtemp(prefix="authgw-bench-"))
    conf = write_conf(tmp / "conf.d", {
        "gateway.yaml": f"""\
            chain: [static]
            threads: {args.threads}
            throttle: {{enabled: false}}
            log_level: WARNING
            audit: {{file: /dev/null}}
            """,
        **static_users({"demo": hash_password("demo")}),
    })
    server = GatewayProcess(conf, tmp / "state", workers=args.workers).start()
    url = server.url
    try:
        pids = [server.proc.pid, *loadgen.children(server.proc.pid)]
        basic = {"Authorization": "Basic " + base64.b64encode(b"demo:demo").decode()}
        print(f"authgw core benchmark: workers={args.workers} concurrency={args.concurrency} "
              f"{args.seconds:.0f}s per phase, {os.cpu_count()} cores")
        results = {}
        for label, path, headers in (("reference: GET /healthz", "/healthz", {}),
                                     ("GET /auth, no credentials (401)", "/auth", {}),
                                     ("GET /auth, Basic + argon2id (200)", "/auth", basic)):
            results[label] = loadgen.measure(label, url + path, lambda i, h=headers: h, pids,
                                             concurrency=args.concurrency, seconds=args.seconds)
        reference = results["reference: GET /healthz"].rate
        for label, result in results.items():
            if not label.startswith("reference"):
                print(f"ratio {label} / healthz: {result.rate / reference:.3f}")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
