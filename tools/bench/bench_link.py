"""Benchmark: password logins through relay -> link -> connector -> slapd, next to the same
logins made directly at the connector's ``/auth``, in one run; with one and two connectors.

Starts a throwaway slapd with 200 users, a relay (``chain: [relay]``, no cache) and connectors
(``chain: [ldap]``, ``plugins: [link]``), all ``authgw serve`` processes on loopback, enrols the
connectors from tickets, then drives ``GET /auth`` with distinct users' Basic credentials over
keep-alive connections: first at connector 1 directly (the reference), then at the relay with
one connector linked, then with two. Prints logins/s, p50/p99 and the latency the relay adds
(relay p50/p99 minus direct p50/p99 of the same run).

    python tools/bench/bench_link.py [--seconds 8] [--concurrency 16]

Everything runs on loopback and is stopped (by PID) at the end.
"""

from __future__ import annotations

import argparse
import base64
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # noqa: E402
from support.linkenv import Connector, Relay  # noqa: E402
from support.slapd import Slapd  # noqa: E402

USERS = 200


def _headers() -> list[dict[str, str]]:
    return [{"Authorization": "Basic " + base64.b64encode(f"user{i:03d}:pw-{i:03d}-secret".encode()).decode()}
            for i in range(USERS)]


def drive(label: str, port: int, seconds: float, concurrency: int, pids: list[int]) -> loadgen.LoadResult:
    headers = _headers()
    return loadgen.measure(label, f"http://127.0.0.1:{port}/auth", lambda n: headers[(n * 7) % USERS], pids,
                           concurrency=concurrency, seconds=seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-link-") as tmp:
        tmp_path = Path(tmp)
        slapd = Slapd(tmp_path / "ldap").start()
        relay = None
        connectors: list[Connector] = []
        try:
            slapd.add_users([(f"user{i:03d}", f"pw-{i:03d}-secret") for i in range(USERS)])
            relay = Relay(tmp_path / "relay", cache=False).setup().start()
            for name in ("c1", "c2"):
                connectors.append(Connector(tmp_path / name, slapd).enroll(relay.ticket(), relay.ca_file))
            connectors[0].start().wait_linked(relay)
            pids = [connectors[0].process.proc.pid]
            drive("warm-up (connector, direct)", connectors[0].process.port, 2, args.concurrency, pids)
            direct = drive("connector /auth, direct", connectors[0].process.port, args.seconds, args.concurrency,
                           pids)
            all_pids = [relay.process.proc.pid, *pids]
            one = drive("relay /auth, 1 connector", relay.process.port, args.seconds, args.concurrency, all_pids)
            connectors[1].start().wait_linked(relay)
            all_pids.append(connectors[1].process.proc.pid)
            two = drive("relay /auth, 2 connectors", relay.process.port, args.seconds, args.concurrency, all_pids)
            for label, result in (("1 connector", one), ("2 connectors", two)):
                print(f"relay adds ({label}): p50 {(result.percentile(0.5) - direct.percentile(0.5)) * 1000:+.2f} ms, "
                      f"p99 {(result.percentile(0.99) - direct.percentile(0.99)) * 1000:+.2f} ms; "
                      f"logins/s {result.rate / direct.rate:.2f}x direct")
        finally:
            for connector in connectors:
                connector.stop()
            if relay is not None:
                relay.stop()
            slapd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
