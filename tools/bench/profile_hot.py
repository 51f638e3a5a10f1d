#!/usr/bin/env python3
"""Gateway CPU per request on the hot path, and where it goes (issue 15).

Starts a throwaway slapd (``--users`` users) and ``authgw serve`` (``--workers``, default 1, so
one process holds the whole profile), then for each row runs **wrk** for ``--seconds`` and
prints the gateway's CPU µs per successful request (``utime + stime`` of its process tree from
/proc, before and after) next to ``/healthz`` measured in the same run:

    healthz     GET /healthz                                      (the HTTP floor, reference)
    hot1        GET /auth, one user's Basic credentials, hot cache hits
    ldap        GET /auth, --users distinct users, search + bind, no cache

With ``--py-spy`` (``pip install py-spy``; needs ptrace of the worker, as the same user) each
row is also sampled by py-spy (``--nonblocking``: the worker is never paused) and the functions
with the most samples, inclusive and self, are printed: the profile summaries of
docs/performance.md come from here. Every process is started on 127.0.0.1 and stopped by PID.

    python tools/bench/profile_hot.py [--seconds 5] [--rounds 2] [--only hot1,ldap] [--py-spy]
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "tests"))
import loads  # noqa: E402
from loads import measure, tree  # noqa: E402
from support.gateway import GatewayProcess, write_conf  # noqa: E402
from support.slapd import Slapd  # noqa: E402


def basic(i: int) -> str:
    return "Basic " + base64.b64encode(f"user{i:04d}:pw-{i:04d}-secret".encode()).decode()


def usage(pid: int) -> tuple[float, float, int, int]:
    """utime and stime seconds of every thread of *pid*, and its context switches (voluntary,
    involuntary): where the CPU goes (Python or the kernel) and how often the worker sleeps."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    switches = [0, 0]
    for task in os.listdir(f"/proc/{pid}/task"):
        for line in open(f"/proc/{pid}/task/{task}/status"):
            if line.startswith("voluntary_ctxt_switches"):
                switches[0] += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                switches[1] += int(line.split()[1])
    return int(fields[11]) / tick, int(fields[12]) / tick, switches[0], switches[1]


def spy(pid: int, seconds: float, out: Path, native: bool = False) -> subprocess.Popen:
    # --native needs the process paused for each sample: the row's rate then means nothing, the
    # shares of the samples still do (a native profile of certificate logins showed the cost of OpenSSL session tickets).
    mode = ["--native"] if native else ["--nonblocking"]
    return subprocess.Popen(["py-spy", "record", *mode, "--threads", "--format", "raw", "--rate", "250",
                             "--duration", str(max(1, int(seconds) - 1)), "--pid", str(pid), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summary(raw: Path, top: int) -> str:
    """The functions with the most samples (inclusive and self) from py-spy's collapsed stacks."""
    inclusive: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        names = stack.split(";")
        if names[0].startswith("thread ("):  # --threads: "thread (tid): name", counted by its frames
            names = names[1:]
        frames = [f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].split(":")[0].rstrip(")") for f in names]
        if not frames:  # a thread sampled with no Python frame: idle in C
            frames = ["(no Python frame)"]
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    if not total:
        return "  (no samples)"
    lines = [f"  {total} samples; inclusive:"]
    lines += [f"    {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    lines.append("  self:")
    lines += [f"    {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--only", default="healthz,hot1,ldap")
    parser.add_argument("--py-spy", action="store_true", help="also sample each row with py-spy")
    parser.add_argument("--native", action="store_true", help="with --py-spy: C frames too (OpenSSL, uvloop, "
                        "libldap...); pauses the worker at each sample, so that round's figures are not rates")
    parser.add_argument("--keep-raw", type=Path, help="with --py-spy: copy py-spy's collapsed stacks here")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    only = args.only.split(",")

    base = Path(tempfile.mkdtemp(prefix="authgw-profile-"))
    started: list = []
    try:
        slapd = Slapd(base / "slapd", threads=2)
        started.append(slapd)
        slapd.start()
        slapd.add_users((f"user{i:04d}", f"pw-{i:04d}-secret") for i in range(args.users))
        users, one = base / "users.txt", base / "one.txt"
        users.write_text("".join(basic(i) + "\n" for i in range(args.users)))
        one.write_text(basic(0) + "\n")
        core = {"throttle": {"enabled": False}, "log_level": "WARNING", "audit": {"file": str(base / "audit.log")},
                "chain": ["ldap"], "plugins": ["cache"]}
        ldap = slapd.plugin_settings("plain", groups={"source": "memberof"})
        # hot cache on for hot1; ldap rows use distinct users, each seen once per pass: a hot entry
        # would still answer a repeat, so the ldap row runs against a gateway without the cache
        gateways = {}
        for name, plugins in (("cache", ["cache"]), ("plain", [])):
            texts = {"gateway.yaml": json.dumps({**core, "plugins": plugins}), "ldap.yaml": json.dumps({"ldap": ldap}),
                     "cache.yaml": json.dumps({"cache": {"hot": {"enabled": True, "ttl": 3600}}})}
            gw = GatewayProcess(write_conf(base / f"conf-{name}", texts), base / f"state-{name}",
                                workers=args.workers)
            started.append(gw)
            gateways[name] = gw.start()
        gateways["cache"].get("/auth", {"Authorization": basic(0)})  # learn the one user
        rows = {"healthz": (gateways["cache"], "/healthz", None),
                "hot1": (gateways["cache"], "/auth", ("Authorization", one, "cycle")),
                "ldap": (gateways["plain"], "/auth", ("Authorization", users, "cycle"))}
        figures: dict[str, list[float]] = collections.defaultdict(list)
        for r in range(args.rounds):
            for key in only:
                gw, path, headers = rows[key]
                load = lambda: loads.wrk(gw.url + path, args.seconds, threads=2,  # noqa: E731
                                         connections=args.connections, headers=headers)
                workers = tree(gw.proc.pid)[1:] or [gw.proc.pid]  # one worker: no fork
                sampler = (spy(workers[0], args.seconds, base / f"{key}.raw", args.native)
                           if args.py_spy and r == 0 else None)
                before = usage(workers[0])
                result, cpu, shares = measure(load, lambda gw=gw: tree(gw.proc.pid))
                after = usage(workers[0])
                if sampler is not None:
                    sampler.wait(timeout=args.seconds + 30)
                figures[key].append(cpu)
                per = [(b - a) / max(result.ok, 1) for a, b in zip(before, after)]
                print(f"round {r + 1} {key:8} {result.rate:9,.0f} req/s {cpu:7.0f} us CPU/req "
                      f"({result.ok} ok, {result.failed} failed; worker 1: user {per[0] * 1e6:.0f} "
                      f"sys {per[1] * 1e6:.0f} us, {per[2]:.2f} voluntary + {per[3]:.2f} involuntary "
                      f"context switches per request)", flush=True)
        print("\nmedian gateway CPU µs per request: " + ", ".join(
            f"{k} {statistics.median(v):.0f}" for k, v in figures.items()))
        if args.py_spy:
            for key in only:
                raw = base / f"{key}.raw"
                if raw.exists():
                    print(f"\n{key} (py-spy, first round, worker 1):\n{summary(raw, args.top)}")
                    if args.keep_raw:
                        args.keep_raw.mkdir(parents=True, exist_ok=True)
                        shutil.copy(raw, args.keep_raw / raw.name)
    finally:
        for thing in reversed(started):
            thing.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
