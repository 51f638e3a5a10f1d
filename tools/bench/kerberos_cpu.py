#!/usr/bin/env python3
"""Gateway CPU µs per Negotiate login, A/B, in one session (issue 15).

The Negotiate row of ``compare.py`` without Apache: a throwaway MIT KDC (a user, ``HTTP/localhost``
in a keytab), ``authgw serve`` with ``chain: [kerberos]`` (throttling off, the audit log on) and
**wrk** sending each distinct token once. Two gateways run side by side: ``new`` (the code of this
tree) and, with ``--base DIR``, ``old``: the same tree with the Kerberos plugin taken from
``DIR/plugins/kerberos/`` (a copy of the files before a change) through a ``sitecustomize`` that
puts it first on the import path of that gateway's processes only. Each round mints fresh tokens
(an authenticator older than the clock skew is refused), used once by each gateway (each has its
own replay cache); loads alternate (old first in odd rounds); each prints the gateway's CPU µs
per successful request from /proc (every process of its tree), then the medians and the paired
differences. compare.py's Negotiate row swings by ±20 µs between runs of one session; pairs of
loads a few seconds apart, on the same tokens, are what can tell a 10 µs change.

    python tools/bench/kerberos_cpu.py [--base /tmp/ab/base] [--rounds 6] [--seconds 6] [--workers 2]

Every process is started on 127.0.0.1 and stopped by its PID; the temporary directory goes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "tests"))
import loads  # noqa: E402
from compare import SPN, mint  # noqa: E402
from loads import measure, tree  # noqa: E402
from support.gateway import GatewayProcess, write_conf  # noqa: E402
from support.kdc import KDC  # noqa: E402

#: The Kerberos plugin from --base for the ``old`` gateway.
SHIM = textwrap.dedent('''
    import importlib.util, sys
    from pathlib import Path
    BASE = Path({base!r}) / "plugins" / "kerberos"
    class Old:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "gateway.plugins.kerberos":
                return importlib.util.spec_from_file_location(name, BASE / "__init__.py",
                                                              submodule_search_locations=[str(BASE)])
            return None
    sys.meta_path.insert(0, Old)
''')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="a directory holding the old plugins/kerberos/ for the 'old' gateway")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rate", type=float, default=6000.0,
                        help="tokens minted per second of load (per round; more than either gateway reaches)")
    args = parser.parse_args(argv)
    if args.base and not (args.base / "plugins" / "kerberos" / "__init__.py").exists():
        parser.error(f"{args.base}/plugins/kerberos/__init__.py does not exist")

    base = Path(tempfile.mkdtemp(prefix="authgw-krbcpu-"))
    started: list = []
    try:
        kdc = KDC(base / "kdc", "EXAMPLE.TEST")
        started.append(kdc)
        kdc.start()
        kdc.add_principal("alice", "alice-password")
        keytab = kdc.add_service(SPN, base / "http.keytab")
        ccache = kdc.kinit("alice", "alice-password", base / "alice.cc")
        kerberos = {"allowed_networks": ["127.0.0.0/8"], "keytab": str(keytab),
                    "service_principal": f"{SPN}@EXAMPLE.TEST", "realms": ["EXAMPLE.TEST"]}
        gateways: dict[str, GatewayProcess] = {}
        for name in (["old"] if args.base else []) + ["new"]:
            env = dict(kdc.env)
            if name == "old":
                shim = base / "shim"
                shim.mkdir()
                (shim / "sitecustomize.py").write_text(SHIM.format(base=str(args.base.resolve())))
                env["PYTHONPATH"] = str(shim)
            core = {"throttle": {"enabled": False}, "log_level": "WARNING", "chain": ["kerberos"],
                    "reuse_port": True, "pin_workers": True,  # as compare.py
                    "audit": {"file": str(base / f"audit-{name}.log")}}
            texts = {"gateway.yaml": json.dumps(core), "kerberos.yaml": json.dumps({"kerberos": kerberos})}
            gw = GatewayProcess(write_conf(base / f"conf-{name}", texts), base / f"state-{name}", env=env,
                                workers=args.workers)
            started.append(gw)
            gateways[name] = gw.start()
            print(f"{name}: gateway pid {gw.proc.pid}", flush=True)
        tokens = base / "tokens.txt"
        headers = ("Authorization", tokens, "once")

        def load(gw: GatewayProcess, seconds: float):
            return loads.wrk(gw.url + "/auth", seconds, threads=2, connections=args.connections, headers=headers)

        mint(kdc, ccache, int(args.rate * 2) + 100, tokens)
        for gw in gateways.values():  # untimed: code paths warm, replay caches made
            warm = load(gw, 2)
            assert warm.ok > 0, f"no login succeeded in the warm-up: {warm}"
        figures: dict[str, list[float]] = {name: [] for name in gateways}
        for r in range(args.rounds):
            mint(kdc, ccache, int(args.rate * args.seconds) + 100, tokens)
            order = list(gateways) if r % 2 == 0 else list(reversed(gateways))
            for name in order:
                gw = gateways[name]
                result, cpu, _ = measure(lambda gw=gw: load(gw, args.seconds), lambda gw=gw: tree(gw.proc.pid))
                figures[name].append(cpu)
                print(f"round {r + 1} {name:4} {result.rate:8,.0f} req/s {cpu:6.1f} µs CPU/req "
                      f"({result.ok} ok, {result.failed} failed{', tokens ran out' if result.exhausted else ''})",
                      flush=True)
        print("median gateway CPU µs per Negotiate login: " + ", ".join(
            f"{name} {statistics.median(v):.1f} (runs {', '.join(f'{x:.0f}' for x in v)})"
            for name, v in figures.items()))
        if args.base:
            differences = [new - old for old, new in zip(figures["old"], figures["new"])]
            print(f"new - old per round: {', '.join(f'{d:+.1f}' for d in differences)}; "
                  f"median {statistics.median(differences):+.1f} µs, "
                  f"{sum(d < 0 for d in differences)} of {len(differences)} rounds in favour of new")
    finally:
        for thing in reversed(started):
            thing.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
