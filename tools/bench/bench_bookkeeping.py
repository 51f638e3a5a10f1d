#!/usr/bin/env python3
"""CPU per attempt of the audit line and the metrics (issue 15), before and after, in one run.

In-process, no server: for each implementation, ``gateway_auth_finished`` of ``core.audit`` (to
a file) and ``core.metrics`` plus the ``in_flight`` inc/dec the HTTP layer does around each
attempt, called --attempts times; CPU is the whole process's (``process_time``), so the audit
writer thread and the metrics publisher thread are counted. Metrics run in prometheus_client's
multi-process mode, as under ``serve --workers N``. "before" is loaded from a git revision
(default: the commit this change started from), "after" from the working tree; rounds are
interleaved and the medians printed.

    python tools/bench/bench_bookkeeping.py [--attempts 20000] [--rounds 5] [--before 8dc703b]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _multiprocess_metrics(directory: str) -> None:
    """What ``serve`` does before forking its workers (gateway/server.py)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    from prometheus_client import values

    values.ValueClass = values.get_value_class()


def _module_at(revision: str, path: str, name: str) -> types.ModuleType:
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{path}"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(name)
    module.__file__ = f"{revision}:{path}"
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 - our own history
    return module


def _run(audit, metrics, attempts: int) -> float:
    from gateway.model import Attempt, Decision, Identity, PasswordCredential

    identity = Identity(subject="uid=alice,ou=people,dc=example,dc=org", username="alice", method="ldap")
    decision = Decision.allow(identity, step="cache", reason="cache.hot", from_cache=True)
    client = ipaddress.ip_address("127.0.0.1")
    credential = PasswordCredential("alice", "Corr3ct-Horse-Battery")
    made = [Attempt(request_id=f"{i:032x}", client=client, front_door="forward_auth",
                    deadline=time.monotonic() + 5, password=credential) for i in range(attempts)]
    audit_hook, metrics_hook, in_flight = audit.gateway_auth_finished, metrics.gateway_auth_finished, metrics.in_flight
    start = time.process_time_ns()
    for attempt in made:
        in_flight.inc()
        audit_hook(attempt=attempt, decision=decision)
        metrics_hook(attempt=attempt, decision=decision)
        in_flight.dec()
    close = getattr(audit, "flush", None)
    if close:  # the batched writer's work belongs to these attempts
        close()
    return (time.process_time_ns() - start) / attempts / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attempts", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", default="8dc703b", help="git revision of the 'before' implementation")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="authgw-bench-") as tmp:
        os.mkdir(f"{tmp}/metrics")
        _multiprocess_metrics(f"{tmp}/metrics")
        import gateway.audit
        import gateway.metrics

        implementations = {
            "before": (_module_at(args.before, "gateway/audit.py", "audit_before"),
                       _module_at(args.before, "gateway/metrics.py", "metrics_before")),
            "after": (gateway.audit, gateway.metrics),
        }
        figures: dict[str, list[float]] = {name: [] for name in implementations}
        for round_ in range(args.rounds):
            for name, (audit_module, metrics_module) in implementations.items():
                audit = audit_module.AuditLog(f"{tmp}/audit-{name}-{round_}.jsonl")
                metrics = metrics_module.Metrics()
                figures[name].append(_run(audit, metrics, args.attempts))
                audit.close()
                if hasattr(metrics, "gateway_shutdown"):
                    metrics.gateway_shutdown()
        load = os.getloadavg()[0]
        print(f"audit + metrics per attempt, CPU µs (median of {args.rounds} interleaved rounds of "
              f"{args.attempts}; load average {load:.1f}):")
        for name, values in figures.items():
            print(f"  {name:7s} {statistics.median(values):7.1f}   rounds: " + " ".join(f"{v:.1f}" for v in values))
        before, after = (statistics.median(figures[n]) for n in ("before", "after"))
        print(f"  saved   {before - after:7.1f} µs per attempt ({before / after:.1f}x less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
