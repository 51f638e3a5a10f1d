#!/usr/bin/env python3
"""Gateway CPU µs per LDAP login, A/B, in one session (issue 15).

The LDAP row of ``compare.py`` without Apache: a throwaway slapd with 1,000 users in 10 groups,
``groups.source: memberof``, no cache, throttling off, the audit log on, and **wrk** cycling
through the users' Basic headers. Two gateways run side by side: ``new`` (the code of this tree)
and, with ``--base DIR``, ``old``: the same tree with the modules under test taken from *DIR*
(a copy of the files before a change: ``gateway/aio.py``, ``gateway/audit.py``,
``gateway/metrics.py``, ``gateway/pool.py`` and ``plugins/ldap/``), through a ``sitecustomize``
that puts them first on the import path of that gateway's processes only. Loads alternate
(old first in odd rounds); each prints the gateway's CPU µs per successful request from /proc
(every process of its tree), then the medians.

    python tools/bench/ldap_cpu.py [--base /tmp/ab/base] [--rounds 5] [--seconds 6] [--workers 1]

Every process is started on 127.0.0.1 and stopped by its PID; the temporary directory goes.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "tests"))
import loads  # noqa: E402
from loads import measure, tree  # noqa: E402
from support.gateway import GatewayProcess, write_conf  # noqa: E402
from support.slapd import Slapd  # noqa: E402

USERS = 1000
GROUPS = 10

#: Modules taken from --base for the ``old`` gateway (the files this A/B is about).
SHIM = textwrap.dedent('''
    import importlib.util, sys
    from pathlib import Path
    BASE = Path({base!r})
    MODULES = {{"gateway.aio": BASE / "gateway/aio.py", "gateway.audit": BASE / "gateway/audit.py",
               "gateway.metrics": BASE / "gateway/metrics.py", "gateway.pool": BASE / "gateway/pool.py"}}
    class Old:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name in MODULES and MODULES[name].exists():
                return importlib.util.spec_from_file_location(name, MODULES[name])
            if name == "gateway.plugins.ldap":
                return importlib.util.spec_from_file_location(
                    name, BASE / "plugins/ldap/__init__.py",
                    submodule_search_locations=[str(BASE / "plugins/ldap")])
            return None
    sys.meta_path.insert(0, Old)
''')


def basic(i: int) -> str:
    return "Basic " + base64.b64encode(f"user{i:04d}:pw-{i:04d}-secret".encode()).decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="the old files (a copy of the tree's) for the 'old' gateway")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--groups", default="memberof", choices=["memberof", "search", "none"])
    parser.add_argument("--spy", type=Path, help="a py-spy profile (raw) of the new gateway's worker in round 1, "
                        "written here; --gil, though a lone thread stays the GIL's last holder in its system "
                        "calls, which are counted too (perf record -e cpu-clock shows the kernel's share)")
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="authgw-ldapcpu-"))
    started: list = []
    try:
        slapd = Slapd(base / "slapd", threads=4)
        started.append(slapd)
        slapd.start()
        slapd.add_users((f"user{i:04d}", f"pw-{i:04d}-secret") for i in range(USERS))
        for g in range(GROUPS):
            slapd.add_group(f"group{g}", [slapd.user_dn(f"user{i:04d}") for i in range(g, USERS, GROUPS)])
        users = base / "users.txt"
        users.write_text("".join(basic(i) + "\n" for i in range(USERS)))
        ldap = slapd.plugin_settings("plain", groups={"source": args.groups})
        gateways: dict[str, GatewayProcess] = {}
        for name in (["old"] if args.base else []) + ["new"]:
            env = None
            if name == "old":
                shim = base / "shim"
                shim.mkdir()
                (shim / "sitecustomize.py").write_text(SHIM.format(base=str(args.base.resolve())))
                env = {"PYTHONPATH": str(shim)}
            core = {"throttle": {"enabled": False}, "log_level": "WARNING", "chain": ["ldap"],
                    "audit": {"file": str(base / f"audit-{name}.log")}}
            texts = {"gateway.yaml": json.dumps(core), "ldap.yaml": json.dumps({"ldap": ldap})}
            gw = GatewayProcess(write_conf(base / f"conf-{name}", texts), base / f"state-{name}", env=env,
                                workers=args.workers)
            started.append(gw)
            gateways[name] = gw.start()
            assert gw.get("/auth", {"Authorization": basic(1)}).status == 200, gw.output()
            print(f"{name}: gateway pid {gw.proc.pid}", flush=True)
        headers = ("Authorization", users, "cycle")

        def load(gw: GatewayProcess, seconds: float):
            return loads.wrk(gw.url + "/auth", seconds, threads=2, connections=args.connections, headers=headers)

        for gw in gateways.values():  # untimed: pools filled, code paths warm
            load(gw, 2)
        figures: dict[str, list[float]] = {name: [] for name in gateways}
        for r in range(args.rounds):
            order = list(gateways) if r % 2 == 0 else list(reversed(gateways))
            for name in order:
                gw = gateways[name]
                spy = None
                if args.spy and name == "new" and r == 0:
                    pid = (tree(gw.proc.pid)[1:] or [gw.proc.pid])[0]
                    spy = subprocess.Popen(["py-spy", "record", "--gil", "--nonblocking", "--format", "raw",
                                            "--rate", "500", "--duration", str(max(1, int(args.seconds) - 1)),
                                            "--pid", str(pid), "-o", str(args.spy)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                result, cpu, _ = measure(lambda gw=gw: load(gw, args.seconds), lambda gw=gw: tree(gw.proc.pid))
                figures[name].append(cpu)
                if spy is not None:
                    spy.wait(timeout=args.seconds + 30)
                print(f"round {r + 1} {name:4} {result.rate:8,.0f} req/s {cpu:6.1f} µs CPU/req "
                      f"({result.ok} ok, {result.failed} failed)", flush=True)
        print("median gateway CPU µs per LDAP login: " + ", ".join(
            f"{name} {statistics.median(v):.1f} (runs {', '.join(f'{x:.0f}' for x in v)})"
            for name, v in figures.items()))
    finally:
        for thing in reversed(started):
            thing.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
