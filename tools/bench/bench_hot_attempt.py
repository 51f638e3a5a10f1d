#!/usr/bin/env python3
"""CPU per hot-cache hit in the core, in-process, each issue-15 change switched off in turn.

Builds the core in this process from the project's own plugins (``chain: [static]``,
``plugins: [cache]`` with the hot cache, the audit log to a file, throttling on unless
``--no-throttle``) and decides
``--attempts`` hot hits through ``Gateway.authenticate`` on one event loop, measuring CPU time
of the whole process (so the pool's threads and the audit writer count) per attempt. Variants,
interleaved over ``--rounds`` rounds, medians:

    now          the code as it is: a hit decided on the event loop
    pool         hits sent to the chain threads as before (``runs_on_loop`` answering False)

No HTTP (``profile_hot.py`` measures that, against ``/healthz``)::

    python tools/bench/bench_hot_attempt.py [--attempts 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from gateway.model import Attempt, PasswordCredential  # noqa: E402
from gateway.passwords import hash_password  # noqa: E402
from gateway.runtime import build_runtime  # noqa: E402

USER, PASSWORD = "alice", "correct horse battery"


def runtime(base: Path, throttle: bool = True):
    conf = base / "conf.d"
    (conf / "users").mkdir(parents=True)
    (conf / "gateway.yaml").write_text(f"chain: [static]\nplugins: [cache]\naudit: {{file: {base / 'audit.log'}}}\n"
                                       f"throttle: {{enabled: {str(throttle).lower()}}}\n")
    (conf / "static.yaml").write_text("static:\n  users_file: users/users.yaml\n")
    (conf / "cache.yaml").write_text("cache:\n  methods: [static]\n  hot: {enabled: true, ttl: 3600}\n")
    users = conf / "users" / "users.yaml"
    users.write_text(f'users:\n  {USER}:\n    password_hash: "{hash_password(PASSWORD)}"\n')
    users.chmod(0o600)
    return build_runtime(conf, state_dir=base / "state")


def attempt() -> Attempt:
    return Attempt(request_id=uuid.uuid4().hex, client=ipaddress.ip_address("192.0.2.10"), front_door="forward_auth",
                   deadline=time.monotonic() + 5, password=PasswordCredential(USER, PASSWORD))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attempts", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-throttle", action="store_true", help="throttling off, as compare.py runs it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="authgw-hot-") as tmp:
        rt = runtime(Path(tmp), throttle=not args.no_throttle)
        gw = rt.gateway
        on_loop = gw.runs_on_loop

        def variant(name: str) -> None:
            gw.runs_on_loop = (lambda *args: False) if name == "pool" else on_loop

        async def run(n: int) -> float:
            started = time.process_time()
            for _ in range(n):
                decision = await gw.authenticate(attempt())
            assert decision.reason == "cache.hot", decision
            return (time.process_time() - started) / n * 1e6

        async def rounds() -> dict[str, list[float]]:
            assert (await gw.authenticate(attempt())).from_cache is False  # learn (one argon2id)
            figures: dict[str, list[float]] = {k: [] for k in ("now", "pool")}
            for r in range(args.rounds):
                order = list(figures) if r % 2 == 0 else list(reversed(figures))
                for name in order:
                    variant(name)
                    await run(min(1000, args.attempts))  # warm
                    figures[name].append(await run(args.attempts))
            return figures

        figures = asyncio.run(rounds())
        variant("now")
        gw.shutdown()
    print(f"CPU µs per hot hit in the core ({args.rounds} rounds x {args.attempts:,} attempts, medians):")
    for name, values in figures.items():
        print(f"  {name:7} {statistics.median(values):6.1f}   (" + ", ".join(f"{v:.1f}" for v in values) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
