#!/usr/bin/env python3
"""The ldap plugin's CPU per login in-process, on the event loop as the gateway runs it (issue 15).

A throwaway slapd (1,000 users in 10 groups, ``groups.source: memberof``) and the plugin in this
process; ``--concurrency`` tasks on uvloop each call ``gateway_authenticate`` through
:func:`gateway.aio.run` (the greenlet a chain on the loop uses) for distinct users, for
``--logins`` logins a batch, three batches a round, each round in a fresh process. Prints that
process's CPU µs per login (user + system) for each batch and the median: no HTTP, no core, so
the plugin's own cost with less noise than a load through the server. With ``--base DIR`` the
old files in *DIR* (as ``ldap_cpu.py --base``) are timed too, rounds alternating. ``--profile
FILE`` writes a cProfile of one more batch of the first round (the profiler's figures).

    python tools/bench/ldap_inproc.py [--base /tmp/ab/base] [--rounds 5] [--logins 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "tests"))
from support.slapd import Slapd  # noqa: E402

USERS = 1000
GROUPS = 10


async def logins(plugin, count: int, concurrency: int) -> int:
    from gateway import Attempt, PasswordCredential, aio

    client = ipaddress.ip_address("127.0.0.1")
    failures = 0
    counter = iter(range(count))

    async def one_task() -> None:
        nonlocal failures
        for i in counter:
            n = (i * 7) % USERS
            attempt = Attempt(request_id="b", client=client, front_door="bench", deadline=time.monotonic() + 5,
                              password=PasswordCredential(f"user{n:04d}", f"pw-{n:04d}-secret"))
            decision = await aio.run(plugin.gateway_authenticate, attempt)
            failures += not (decision is not None and decision.success)

    await asyncio.gather(*(one_task() for _ in range(concurrency)))
    return failures


def worker(settings: dict, rounds: int, count: int, concurrency: int, profile: Path | None) -> list[float]:
    """Build the plugin in this process and time *rounds* batches of *count* logins on uvloop."""
    import uvloop

    from gateway.plugins.ldap import LdapPlugin
    from gateway.registry import PluginContext
    from gateway.settings import GatewaySettings

    logging.disable(logging.WARNING)
    here = Path(tempfile.gettempdir())
    plugin = LdapPlugin(LdapPlugin.Settings.model_validate(settings),
                        PluginContext(name="ldap", config_dir=here, state_dir=here,
                                      gateway=GatewaySettings(chain=["ldap"]), hook=None,
                                      log=logging.getLogger("bench")))  # type: ignore[arg-type]
    loop = uvloop.new_event_loop()
    totals = []
    try:
        loop.run_until_complete(logins(plugin, 2000, concurrency))  # warm: pools filled
        for _ in range(rounds):
            before = time.process_time()  # user + system, finer than os.times()' clock ticks
            failed = loop.run_until_complete(logins(plugin, count, concurrency))
            spent = time.process_time() - before
            if failed:
                raise SystemExit(f"{failed} logins failed")
            totals.append(spent / count * 1e6)
        if profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
            loop.run_until_complete(logins(plugin, count, concurrency))
            profiler.disable()
            profiler.dump_stats(str(profile))
    finally:
        plugin.gateway_shutdown()
        loop.close()
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--logins", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--groups", default="memberof", choices=["memberof", "search", "none"])
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--base", type=Path, help="also time the old files in DIR (as ldap_cpu.py --base), "
                        "alternating with this tree's, each round in a fresh process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON settings: time in this process
    args = parser.parse_args(argv)
    if args.worker:
        totals = worker(json.loads(args.worker), args.rounds, args.logins, args.concurrency, args.profile)
        print(json.dumps(totals))
        return 0

    base = Path(tempfile.mkdtemp(prefix="authgw-ldapinproc-"))
    slapd = Slapd(base / "slapd", threads=4)
    try:
        slapd.start()
        slapd.add_users((f"user{i:04d}", f"pw-{i:04d}-secret") for i in range(USERS))
        for g in range(GROUPS):
            slapd.add_group(f"group{g}", [slapd.user_dn(f"user{i:04d}") for i in range(g, USERS, GROUPS)])
        settings = slapd.plugin_settings("plain", groups={"source": args.groups}, pool_size=args.concurrency)
        variants = {"new": None}
        if args.base:
            from ldap_cpu import SHIM

            shim = base / "shim"
            shim.mkdir()
            (shim / "sitecustomize.py").write_text(SHIM.format(base=str(args.base.resolve())))
            variants = {"old": {"PYTHONPATH": str(shim)}, "new": None}
        figures: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(args.rounds):
            names = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in names:
                command = [sys.executable, __file__, "--worker", json.dumps(settings), "--rounds", "3",
                           "--logins", str(args.logins), "--concurrency", str(args.concurrency)]
                if args.profile and r == 0 and name == "new":
                    command += ["--profile", str(args.profile)]
                out = subprocess.run(command, env={**os.environ, **(variants[name] or {})}, capture_output=True,
                                     text=True, timeout=600)
                if out.returncode:
                    raise SystemExit(out.stdout + out.stderr)
                totals = json.loads(out.stdout.strip().splitlines()[-1])
                figures[name].extend(totals)
                print(f"round {r + 1} {name:3}: " + ", ".join(f"{x:.1f}" for x in totals) + " µs CPU per login",
                      flush=True)
        print("median µs CPU per login: " + ", ".join(f"{name} {statistics.median(v):.1f} ({len(v)} batches)"
                                                       for name, v in figures.items()))
    finally:
        slapd.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
