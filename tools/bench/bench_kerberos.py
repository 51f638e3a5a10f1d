#!/usr/bin/env python3
"""Negotiate (Kerberos) logins per second through ``GET /auth``, next to a raw python-gssapi
accept loop measured in the same run, and the ratio.

Starts a throwaway MIT realm (tests/support/kdc.py: ``krb5kdc`` on a free loopback port, temp
``KRB5_CONFIG``) with a user and ``HTTP/localhost``, and ``authgw serve`` with ``chain:
[kerberos]`` (``throttle`` off). Tokens are minted before anything is timed, in a subprocess with
the client's environment; every one is distinct (the replay cache would refuse a repeat), so
each request is a complete AP-REQ decryption, replay-cache insert and AP-REP, as in real logins.

  1. reference: raw ``gssapi.raw.accept_sec_context`` over the same tokens, one process, one
     thread, its own ``file2`` replay cache (so the tokens are fresh for it too)
  2. ``GET /auth`` with ``Authorization: Negotiate``: keep-alive connections (tools/bench/loadgen.py)
  3. reference: ``GET /auth`` without credentials on the same gateway (the chain runs, kerberos
     abstains, 401 with the Negotiate challenge): the HTTP and core cost without any GSSAPI work

Prints logins per second, p50/p99, the server's CPU per login, and the ratios 2/1 and 2/3. Bounded by --seconds per
measurement and by the number of tokens; loopback only; stops what it starts.

    python tools/bench/bench_kerberos.py [--workers 2] [--seconds 10] [--tokens 30000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
import loadgen  # noqa: E402
from support.gateway import GatewayProcess  # noqa: E402
from support.kdc import KDC  # noqa: E402

SPN = "HTTP/localhost@EXAMPLE.TEST"

RAW_LOOP = textwrap.dedent("""
    import base64, json, sys, time
    import gssapi
    import gssapi.raw as gss
    from gssapi.raw import ext_cred_store
    keytab, rcache, tokens_file, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    tokens = [base64.b64decode(line) for line in open(tokens_file)]
    creds = ext_cred_store.acquire_cred_from({b"keytab": keytab.encode(), b"rcache": ("file2:" + rcache).encode()},
                                             usage="accept").creds
    ok = 0
    started = time.perf_counter()
    stop_at = started + seconds
    cpu = time.process_time()
    for token in tokens:
        if time.perf_counter() >= stop_at:
            break
        result = gss.accept_sec_context(token, acceptor_creds=creds)
        ok += (not result.more_steps) and result.initiator_name is not None
    elapsed = time.perf_counter() - started
    json.dump({"count": ok, "seconds": elapsed, "cpu": time.process_time() - cpu}, sys.stdout)
""")


def mint(kdc: KDC, ccache: Path, count: int, out: Path) -> float:
    started = time.perf_counter()
    with out.open("w") as f:
        remaining = count
        while remaining:
            batch = min(remaining, 10_000)
            for token in kdc.mint(ccache, [(SPN, batch)])[0]:
                f.write(base64.b64encode(token).decode() + "\n")
            remaining -= batch
    return time.perf_counter() - started


def raw_reference(kdc: KDC, keytab: Path, tmp: Path, tokens_file: Path, seconds: float) -> dict:
    proc = subprocess.run([sys.executable, "-c", RAW_LOOP, str(keytab), str(tmp / "raw.rcache2"), str(tokens_file),
                           str(seconds)], capture_output=True, text=True, timeout=seconds + 120,
                          env={**os.environ, **kdc.env})
    if proc.returncode != 0:
        raise SystemExit(f"raw accept loop failed: {proc.stderr}")
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads", type=int, default=8, help="gateway threads per worker")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=30_000, help="pre-minted distinct tokens (upper bound)")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="authgw-bench-krb-") as tmp_name:
        tmp = Path(tmp_name)
        kdc = KDC(tmp / "kdc", "EXAMPLE.TEST").start()
        gateway = None
        try:
            kdc.add_principal("alice", "alice-password")
            keytab = kdc.add_service("HTTP/localhost", tmp / "http.keytab")
            ccache = kdc.kinit("alice", "alice-password", tmp / "alice.cc")
            tokens_file = tmp / "tokens.b64"
            minted = mint(kdc, ccache, args.tokens, tokens_file)
            print(f"minted {args.tokens} distinct SPNEGO tokens in {minted:.1f} s (not timed below)")

            raw = raw_reference(kdc, keytab, tmp, tokens_file, args.seconds)
            raw_rate = raw["count"] / raw["seconds"]
            print(f"{'1. raw accept_sec_context loop':<34} {raw_rate:>9.0f} logins/s  "
                  f"({raw['count']} in {raw['seconds']:.1f} s, {raw['cpu'] / max(raw['count'], 1) * 1e6:.0f} us CPU each)")

            conf = tmp / "conf.d"
            conf.mkdir()
            (conf / "gateway.yaml").write_text(f"chain: [kerberos]\nthreads: {args.threads}\nthrottle: {{enabled: false}}\n"
                                               "log_level: WARNING\n")
            (conf / "kerberos.yaml").write_text(textwrap.dedent(f"""\
                kerberos:
                  allowed_networks: [127.0.0.0/8]
                  keytab: {keytab}
                  service_principal: {SPN}
                  realms: [EXAMPLE.TEST]
                """))
            gateway = GatewayProcess(conf, tmp / "state", env=kdc.env, workers=args.workers).start()
            headers = [{"Authorization": "Negotiate " + line.strip()} for line in tokens_file.open()]
            warm = loadgen.run(gateway.url + "/auth", lambda i: headers[i], concurrency=4, seconds=1, max_requests=200)
            rest = headers[warm.count:]
            pids = [gateway.proc.pid, *loadgen.children(gateway.proc.pid)]
            cpu_before = loadgen.cpu_seconds(pids)
            result = loadgen.run(gateway.url + "/auth", lambda i: rest[i], concurrency=args.concurrency,
                                 seconds=args.seconds, max_requests=len(rest))
            cpu = loadgen.cpu_seconds(pids) - cpu_before
            print(result.summary(f"2. GET /auth Negotiate ({args.workers}w)").replace("req/s", "logins/s"))
            print(f"   server CPU per login: {cpu / max(result.count, 1) * 1e6:.0f} us "
                  f"({result.count} logins in {result.seconds:.1f} s"
                  + (", tokens ran out" if result.count >= len(rest) else "") + ")")
            if set(result.statuses) != {200}:
                print(f"   WARNING: not every login succeeded: {result.statuses}")
            floor = loadgen.run(gateway.url + "/auth", concurrency=args.concurrency, seconds=args.seconds)
            print(floor.summary("3. GET /auth, no credentials"))
            print(f"ratio 2/1 (gateway / raw one-thread accept loop): {result.rate / raw_rate:.2f}")
            print(f"ratio 2/3 (Negotiate logins / the same chain with nothing to check): {result.rate / floor.rate:.2f}")
            print("   target from the issue: Apache httpd + mod_auth_gssapi, ~10,000 logins/s on 2 cores: "
                  f"{result.rate / 10_000:.2f} of it")
        finally:
            if gateway is not None:
                gateway.stop()
            kdc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
