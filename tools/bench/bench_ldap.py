"""Benchmark: LDAP logins per second through ``authgw serve`` against a direct ldap3 loop.

Starts a throwaway slapd with 1,000 users (in 10 groups), runs the gateway with the ``ldap``
plugin (``--workers 2`` by default) and drives ``GET /auth`` with the Basic credentials of
distinct users over keep-alive connections (concurrency 32, ~10 s). Then, against the same
slapd in the same run, the reference: a direct ldap3 search-then-bind loop (service account
search, user rebind on a second connection: the least work a login can be), in one process and
in as many processes as the gateway has workers. Prints logins/s, p50/p99 latency, CPU per login
of the gateway processes (from /proc/PID/stat) and of slapd, and the ratios. A third line calls
the ldap plugin in-process (no HTTP, no chain), to show what the front door and core add.

    python tools/bench/bench_ldap.py [--seconds 10] [--concurrency 32] [--workers 2] [--tls]

Everything runs on loopback and is stopped (by PID) at the end.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import loadgen  # noqa: E402
from support.gateway import GatewayProcess, write_conf  # noqa: E402
from support.pki import CA  # noqa: E402
from support.slapd import Slapd  # noqa: E402

USERS = 1000
GROUPS = 10


def password(i: int) -> str:
    return f"pw-{i:04d}-secret"


def username(i: int) -> str:
    return f"user{i:04d}"


# -- load: distinct users, a different one each request (7 is coprime with 1000) -------------------


def drive(port: int, seconds: float, concurrency: int) -> loadgen.LoadResult:
    headers = [{"Authorization": "Basic " + base64.b64encode(f"{username(i)}:{password(i)}".encode()).decode()}
               for i in range(USERS)]
    return loadgen.run(f"http://127.0.0.1:{port}/auth", lambda n: headers[(n * 7) % USERS],
                       concurrency=concurrency, seconds=seconds)


# -- reference: direct ldap3 search-then-bind ------------------------------------------------------


def direct_loop(args: tuple[str, str, str, str, float, int, object]) -> tuple[int, list[float], int]:
    url, base_dn, service_dn, service_password, seconds, offset, ca_file = args
    import ssl

    import ldap3

    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_file) if ca_file else None
    server = ldap3.Server(url, get_info=ldap3.NONE, tls=tls)
    service = ldap3.Connection(server, service_dn, service_password, client_strategy=ldap3.SAFE_SYNC,
                               auto_bind=True, check_names=False)
    binder = ldap3.Connection(server, client_strategy=ldap3.SAFE_SYNC, check_names=False)
    binder.open()
    latencies: list[float] = []
    failures = 0
    i = offset
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        n = i % USERS
        i += 7
        began = time.perf_counter()
        _, _, entries, _ = service.search(base_dn, f"(&(objectClass=inetOrgPerson)(uid={username(n)}))",
                                          attributes=["uid", "displayName", "cn", "mail", "entryUUID"])
        ok = len(entries) == 1 and binder.rebind(entries[0]["dn"], password(n))[0]
        latencies.append(time.perf_counter() - began)
        failures += not ok
    return len(latencies), latencies, failures


def plugin_loop(args: tuple[dict, float, int]) -> tuple[int, list[float], int]:
    """The ldap plugin itself, called in-process (no HTTP, no chain): what the gateway adds on top
    of it is the core's cost."""
    import ipaddress
    import logging
    import tempfile

    from gateway import Attempt, PasswordCredential
    from gateway.plugins.ldap import LdapPlugin
    from gateway.registry import PluginContext
    from gateway.settings import GatewaySettings

    settings, seconds, offset = args
    logging.disable(logging.WARNING)
    here = Path(tempfile.gettempdir())
    plugin = LdapPlugin(LdapPlugin.Settings.model_validate(settings),
                        PluginContext(name="ldap", config_dir=here, state_dir=here, gateway=GatewaySettings(chain=["ldap"]),
                                      hook=None, log=logging.getLogger("bench")))  # type: ignore[arg-type]
    client = ipaddress.ip_address("127.0.0.1")
    latencies: list[float] = []
    failures = 0
    i = offset
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        n = i % USERS
        i += 7
        began = time.perf_counter()
        attempt = Attempt(request_id="b", client=client, front_door="bench", deadline=time.monotonic() + 5,
                          password=PasswordCredential(username(n), password(n)))
        decision = plugin.gateway_authenticate(attempt)
        latencies.append(time.perf_counter() - began)
        failures += not (decision is not None and decision.success)
    plugin.gateway_shutdown()
    return len(latencies), latencies, failures


def run_direct(slapd: Slapd, seconds: float, processes: int, tls: bool,
               plugin_settings: dict | None = None) -> tuple[float, list[float], int, float]:
    if plugin_settings is not None:
        function, jobs = plugin_loop, [(plugin_settings, seconds, k * 131) for k in range(processes)]
    else:
        url = slapd.ldaps_url if tls else slapd.url
        ca = str(slapd.ca_file) if tls else None
        function = direct_loop
        jobs = [(url, slapd.base_dn, slapd.service_dn, slapd.service_password, seconds, k * 131, ca)
                for k in range(processes)]
    slapd_cpu = loadgen.cpu_seconds([slapd.pid])
    began = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        results = pool.map(function, jobs)
    elapsed = time.perf_counter() - began
    slapd_cpu = loadgen.cpu_seconds([slapd.pid]) - slapd_cpu
    count = sum(r[0] for r in results)
    latencies = [x for r in results for x in r[1]]
    failures = sum(r[2] for r in results)
    return count / min(elapsed, seconds + 0.5), latencies, failures, slapd_cpu / max(count, 1)


# -- report -----------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    return loadgen.LoadResult(seconds=0.0, latencies=values).percentile(q) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16, help="gateway threads per worker")
    parser.add_argument("--tls", action="store_true", help="LDAPS for the gateway and the reference")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="the gateway's pin_workers setting (one CPU per worker)")
    parser.add_argument("--groups", default="search", choices=["search", "memberof", "none"],
                        help="the plugin's groups.source (search = the openldap preset's default)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-ldap-") as tmp:
        base = Path(tmp)
        slapd = Slapd(base / "slapd", tls=CA.create() if args.tls else None, threads=4).start()
        gateway = None
        try:
            slapd.add_users((username(i), password(i)) for i in range(USERS))
            for g in range(GROUPS):
                slapd.add_group(f"group{g}", [slapd.user_dn(username(i)) for i in range(g, USERS, GROUPS)])
            ldap = slapd.plugin_settings("ldaps" if args.tls else "plain", groups={"source": args.groups})
            conf = write_conf(base / "conf.d", {
                "gateway.yaml": json.dumps({"chain": ["ldap"], "throttle": {"enabled": False},
                                            "threads": args.threads, "log_level": "WARNING",
                                            "pin_workers": args.pin,
                                            "audit": {"file": str(base / "audit.log")}}),
                "ldap.yaml": "ldap: " + json.dumps(ldap)})
            gateway = GatewayProcess(conf, base / "state", workers=args.workers).start()

            print(f"authgw LDAP benchmark: {USERS} users, slapd (mdb, {'LDAPS' if args.tls else 'plain LDAP'}) "
                  f"on loopback, {os.cpu_count()} CPUs")
            print(f"gateway: authgw serve --workers {args.workers}, threads {args.threads}, "
                  f"pin_workers {args.pin}, groups.source "
                  f"{args.groups}; load: GET /auth, Basic, keep-alive, concurrency {args.concurrency}, "
                  f"{args.seconds:.0f} s")
            drive(gateway.port, 1.0, args.concurrency)  # warm pools and caches
            tree = [gateway.proc.pid, *loadgen.children(gateway.proc.pid)]
            gw_cpu, sl_cpu = loadgen.cpu_seconds(tree), loadgen.cpu_seconds([slapd.pid])
            result = drive(gateway.port, args.seconds, args.concurrency)
            gw_cpu, sl_cpu = loadgen.cpu_seconds(tree) - gw_cpu, loadgen.cpu_seconds([slapd.pid]) - sl_cpu
            latencies, statuses = result.latencies, result.statuses
            ok = statuses.get(200, 0)
            rate = ok / result.seconds
            print()
            print(f"gateway   {rate:8.0f} logins/s   p50 {pct(latencies, .5):6.2f} ms   p99 {pct(latencies, .99):6.2f} ms"
                  f"   gateway CPU {gw_cpu / max(ok, 1) * 1e6:5.0f} us/login   slapd CPU {sl_cpu / max(ok, 1) * 1e6:4.0f} us/login"
                  f"   statuses {dict(sorted(statuses.items()))}")
            gateway.stop()
            gateway = None

            one, lat1, fail1, sl1 = run_direct(slapd, args.seconds, 1, args.tls)
            print(f"direct x1 {one:8.0f} logins/s   p50 {pct(lat1, .5):6.2f} ms   p99 {pct(lat1, .99):6.2f} ms"
                  f"   (ldap3 search+rebind loop, 1 process)   slapd CPU {sl1 * 1e6:4.0f} us/login   failures {fail1}")
            many, latn, failn, sln = run_direct(slapd, args.seconds, args.workers, args.tls)
            print(f"direct x{args.workers} {many:8.0f} logins/s   p50 {pct(latn, .5):6.2f} ms   p99 {pct(latn, .99):6.2f} ms"
                  f"   (same loop, {args.workers} processes)      slapd CPU {sln * 1e6:4.0f} us/login   failures {failn}")
            plug, latp, failp, slp = run_direct(slapd, args.seconds, args.workers, args.tls, ldap)
            print(f"plugin x{args.workers} {plug:8.0f} logins/s   p50 {pct(latp, .5):6.2f} ms   p99 {pct(latp, .99):6.2f} ms"
                  f"   (the ldap plugin in-process, no HTTP, {args.workers} processes)   slapd CPU {slp * 1e6:4.0f} us/login"
                  f"   failures {failp}")
            print()
            print(f"ratio gateway / direct x{args.workers}: {rate / many:.2f}")
            print(f"ratio gateway / direct x1: {rate / one:.2f}")
            print(f"ratio gateway / plugin x{args.workers} (the HTTP front door and core's share): {rate / plug:.2f}")
            print(f"ratio gateway / 7,500 logins/s (mod_authnz_ldap, cache off, 2 cores): {rate / 7500:.2f}")
            if statuses.get(200, 0) != sum(statuses.values()):
                print("WARNING: not every request succeeded; see the statuses above")
        finally:
            if gateway is not None:
                gateway.stop()
            slapd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
