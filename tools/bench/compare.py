#!/usr/bin/env python3
"""authgw next to Apache httpd, measured in one run with the same load generator (issue 15).

One command starts everything on loopback: a throwaway slapd (1,000 users in 10 groups), an MIT
KDC (a user, ``HTTP/localhost`` in a keytab), a test PKI, Apache httpd 2.4 (event MPM, 2
children: ``apache.py``; one instance with mod_ldap's caches off, serving the static file,
mod_auth_gssapi and mod_ssl client certificates too, and one with the caches on) and ``authgw
serve --workers 2`` (one gateway per row's configuration, all running, only one loaded at a
time). Then, in ``--rounds`` interleaved rounds (Apache first in rounds 1, 3, ..., authgw first
in rounds 2, 4, ...), each row loads Apache and authgw for ``--duration`` seconds each:

    bare        Apache static file / authgw /healthz                   wrk, no script
    ldap        Basic, 1,000 distinct users, every request searches and binds (no cache)
    hot1        Basic, one user's repeated credentials, cache on (mod_ldap's / authgw's hot cache)
    hot1000     Basic, 1,000 users cycling, cache on
    negotiate   Negotiate, a distinct Kerberos token per request (replay caches on), minted
                before each round's row and never timed
    cert        client certificate, a new TLS connection and full handshake per login

Load (``loads.py``): **wrk** (``-t2 -c16`` by default, keep-alive) with ``wrk_headers.lua``
feeding the Basic and Negotiate headers; wrk speaks no client-certificate TLS, so the ``cert``
row uses ``openssl s_time -new`` clients (C, like wrk), and counts the logins each server logged
as successful (the
Apache access log's 200s, authgw's audit ``success`` lines). A rate counts successes only (wrk's
non-4xx/5xx answers). Server CPU per request comes from /proc (``utime+stime`` of the parent and
its children, reaped ones included) before and after each load.

The table gives, per row, the median of the per-round rates, the median of the per-round ratios
(authgw / Apache, from the same round) and the median CPU µs per successful request.

    python tools/bench/compare.py [--rounds 3] [--duration 10] [--only ldap,hot1] [--json out.json]

Every process is started on 127.0.0.1 and stopped by its PID at the end; the temporary directory
is removed. With the default 3 x 10 s it runs 10-15 minutes (warm-up, learning and token minting
included).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "tests"))
import loadgen  # noqa: E402
from loads import Load, LogCounter, audit_success, measure, s_time, tree  # noqa: E402
import loads  # noqa: E402
from apache import Apache, GssapiAuth, LdapAuth, TlsClientAuth  # noqa: E402
from support.gateway import GatewayProcess, write_conf  # noqa: E402
from support.kdc import KDC  # noqa: E402
from support.net import free_port, wait_for_port  # noqa: E402
from support.pki import CA, write_bundle  # noqa: E402
from support.slapd import Slapd  # noqa: E402

USERS = 1000
GROUPS = 10
SPN = "HTTP/localhost"
ROWS = {
    "bare": "bare HTTP (Apache static file / authgw `/healthz`)",
    "ldap": "LDAP Basic, 1,000 distinct users, no cache",
    "hot1": "repeat credentials, cache on, one user",
    "hot1000": "repeat credentials, cache on, 1,000 users cycling",
    "negotiate": "Negotiate, distinct tokens, replay cache on",
    "cert": "client certificate, new TLS connection each",
}


def basic(i: int) -> str:
    return "Basic " + base64.b64encode(f"user{i:04d}:pw-{i:04d}-secret".encode()).decode()


# -- set-up --------------------------------------------------------------------------------------------


def make_pki(base: Path) -> dict[str, str]:
    """The client-certificate row's PKI: a root, an issuing CA, a server and a client certificate."""
    root = CA.create("bench root CA", days=30)
    issuing = root.issue("bench issuing CA", ca=True)
    server = root.issue("localhost", dns=["localhost"], ips=["127.0.0.1"], server=True)
    server_crt, server_key = server.write(base, "server")
    client_crt, client_key = issuing.issue("bench", client=True).write(base, "client")
    return {"root": str(write_bundle(base / "root.pem", root)),
            "issuing": str(write_bundle(base / "issuing.pem", issuing)),
            "trust": str(write_bundle(base / "trust.pem", root, issuing)),
            "server_crt": str(server_crt), "server_key": str(server_key),
            "client_crt": str(client_crt), "client_key": str(client_key)}


def mint(kdc: KDC, ccache: Path, count: int, out: Path) -> Path:
    """*count* distinct SPNEGO tokens, one ``Negotiate ...`` header value a line (two minting
    processes in parallel: minting is the slow part of the run, never timed)."""
    halves = [count // 2, count - count // 2]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        batches = list(pool.map(lambda n: kdc.mint(ccache, [(SPN, n)])[0] if n else [], halves))
    with out.open("w") as f:
        for batch in batches:
            f.writelines(f"Negotiate {base64.b64encode(t).decode()}\n" for t in batch)
    return out


def gateway(base: Path, name: str, files: dict[str, dict], workers: int, env: dict | None = None,
            reuse_port: bool = True, pin_workers: bool = True) -> GatewayProcess:
    """``authgw serve`` with *files* (conf.d name -> settings) and the benchmark's common settings:
    throttling off (Apache has none), the audit log on, to a file (Apache logs every request)."""
    core = {"throttle": {"enabled": False}, "log_level": "WARNING", "reuse_port": reuse_port, "pin_workers": pin_workers,
            "audit": {"file": str(base / f"audit-{name}.log")}}
    core.update(files.pop("gateway.yaml"))
    texts = {"gateway.yaml": json.dumps(core), **{k: json.dumps(v) for k, v in files.items()}}
    return GatewayProcess(write_conf(base / f"conf-{name}", texts), base / f"state-{name}", env=env,
                          workers=workers).start()


@dataclass
class Row:
    key: str
    apache: object  # (seconds) -> Load: one load of this row on each server
    authgw: object
    apache_pids: object  # () -> the server's process tree now
    authgw_pids: object
    prepare: object = None  # (round, peak) -> None, before a round's loads (minting tokens)
    prime: object = None  # () -> None, once before the warm-up
    peak: float = 0.0  # the highest rate either server reached on this row so far (req/s)
    short: int = 0  # measured loads that ran out of prepared input (their rate is a floor)
    rounds: list[dict] = field(default_factory=list)


def warm(key: str, server: str, load, seconds: float, steady: bool):
    """Untimed load first. With *steady* (the cache rows) it goes on in chunks until two in a row
    agree within 15% (every user in every worker's cache: while a worker still learns, the rate
    jumps with the share of connections it took); at most 120 s. Returns the first load."""
    first = load(seconds)
    rate = first.rate
    if not steady:
        return first
    deadline, chunks = time.monotonic() + 120, [rate]
    while time.monotonic() < deadline:
        chunks.append(load(max(seconds, 2.0)).rate)
        if abs(chunks[-1] - chunks[-2]) <= 0.15 * chunks[-2]:
            break
    print(f"warm-up {key} {server}: " + ", ".join(f"{r:,.0f}" for r in chunks) + " req/s", flush=True)
    return first


def learn(gw: GatewayProcess, values: Path) -> None:
    """Log each user in, pass after pass, before the cache rows' warm-up: a worker's first live
    login of a user also stores an argon2id hash for offline logins (tens of ms of CPU each, by
    design; each worker remembers what it stored itself), a one-time cost that a rate-based
    warm-up would take minutes to see through. Done after two passes in a row that hash (almost)
    nothing (a second or two each) while both workers took a fair share of each (the kernel does
    not spread a burst of connections evenly: a worker that took none learnt nothing; one such
    pass still left a round at a tenth of the steady rate). Bounded: 300 s."""
    headers = [{"Authorization": line} for line in values.read_text().splitlines()]
    began, passes, quiet = time.monotonic(), [], 0
    while time.monotonic() - began < 300:
        def one_pass() -> Load:
            # as many connections as wrk opens, like the load to come
            result = loadgen.run(gw.url + "/auth", lambda i: headers[i], concurrency=16,
                                 seconds=max(1.0, 300 - (time.monotonic() - began)), max_requests=len(headers))
            ok = result.statuses.get(200, 0)
            return Load(ok=ok, seconds=result.seconds, failed=result.count - ok)

        result, _, shares = measure(one_pass, lambda: tree(gw.proc.pid))
        passes.append(f"{result.seconds:.1f} s, {result.ok} ok, CPU " + "/".join(f"{x:.0%}" for x in shares))
        quiet = quiet + 1 if result.seconds < 3 and min(shares, default=1) >= 0.25 else 0
        if quiet == 2:
            break
    print(f"authgw logged {len(headers)} users in, {len(passes)} pass(es) (offline hashes stored): "
          + ", ".join(passes), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load (each server, each row)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of untimed load per row and server first")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--workers", type=int, default=2, help="authgw workers and Apache child processes")
    parser.add_argument("--cert-clients", type=int, default=4, help="openssl s_time clients for the cert row")
    parser.add_argument("--token-rate", type=float, default=6000.0,
                        help="Negotiate tokens minted per second of load at least (per round; both servers use "
                             "them; raised to 1.5x the fastest load seen)")
    parser.add_argument("--groups", default="memberof", choices=["memberof", "search", "none"],
                        help="authgw's groups.source: memberof reads them in the user search, as Apache "
                             "fetches memberOf in its one search")
    parser.add_argument("--shared-socket", action="store_true",
                        help="authgw's workers share one listening socket (reuse_port: false)")
    parser.add_argument("--unpinned", action="store_true", help="authgw's workers not pinned to CPUs (pin_workers: false)")
    parser.add_argument("--only", default=",".join(ROWS), help="rows to run, comma-separated: " + ",".join(ROWS))
    parser.add_argument("--json", type=Path, help="also write every round's figures here")
    args = parser.parse_args(argv)
    only = [k for k in args.only.split(",") if k]
    unknown = set(only) - set(ROWS)
    if unknown or not only:
        parser.error(f"--only: unknown rows {sorted(unknown)}; choose from {','.join(ROWS)}")
    if not 1 <= args.rounds <= 10 or not 1 <= args.duration <= 60:
        parser.error("--rounds 1..10 and --duration 1..60 (the loads are bounded on a shared machine)")
    for tool in ("wrk", "openssl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (Debian packages wrk and openssl)")

    base = Path(tempfile.mkdtemp(prefix="authgw-compare-"))
    started: list = []  # everything with a stop(), stopped in reverse order
    try:
        rows = setup(base, args, only, started)
        print(f"authgw vs Apache httpd, same run: {args.rounds} round(s) x {args.duration:g} s per load, "
              f"wrk -t{args.threads} -c{args.connections}, {args.workers} authgw workers / Apache children, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        for row in rows:  # untimed: connection pools, caches, TLS contexts
            if row.prime:
                row.prime()
            for _ in range(4):  # prepared input (tokens) sized from the rates seen so far
                if row.prepare:
                    row.prepare(-1, row.peak)
                warmed = [warm(row.key, server, getattr(row, server), args.warmup, steady=row.key.startswith("hot"))
                          for server in ("apache", "authgw")]
                row.peak = max([row.peak, *(x.rate for x in warmed)])
                if not any(x.exhausted for x in warmed):
                    break
                # A server used up its input: its rate was a floor. Twice that, and warm up again.
                row.peak *= 2
                print(f"warm-up {row.key}: input ran out, preparing for {row.peak:,.0f} req/s", flush=True)
        for r in range(args.rounds):
            for row in rows:
                if row.prepare:
                    row.prepare(r, row.peak)
                figures = {}
                order = ("apache", "authgw") if r % 2 == 0 else ("authgw", "apache")
                for server in order:
                    load, cpu, shares = measure(lambda: getattr(row, server)(args.duration),
                                                getattr(row, f"{server}_pids"))
                    row.peak = max(row.peak, load.rate)
                    row.short += bool(load.exhausted)
                    figures[server] = {"rate": load.rate, "cpu_us": cpu, "ok": load.ok, "failed": load.failed,
                                       "exhausted": load.exhausted, "seconds": load.seconds, "cpu_shares": shares}
                    warn = (f"  WARNING {load.failed} failed" if load.failed else "") + \
                           (f", tokens ran out ({load.exhausted} reused)" if load.exhausted else "")
                    print(f"round {r + 1} {row.key:<9} {server:<6} {load.rate:>9,.0f} req/s "
                          f"{cpu:>6,.0f} us CPU/req  ({load.ok} ok in {load.seconds:.1f} s; CPU by process "
                          + "/".join(f"{x:.0%}" for x in shares) + f"){warn}", flush=True)
                figures["ratio"] = figures["authgw"]["rate"] / max(figures["apache"]["rate"], 1e-9)
                row.rounds.append(figures)
        print()
        print(table(rows, args))
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                             "rows": {row.key: row.rounds for row in rows}}, indent=2))
    finally:
        for thing in reversed(started):
            try:
                thing.stop()
            except Exception as exc:  # noqa: BLE001 - stop the rest regardless
                print(f"stopping {thing!r}: {exc}", file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)
    return 0


def table(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [f"Same run, wrk -t{args.threads} -c{args.connections} ({args.cert_clients} openssl s_time clients "
             f"for client certificates), {args.rounds} round(s) x {args.duration:g} s, medians:", "",
             "| scenario | Apache req/s | authgw req/s | authgw / Apache | server CPU µs/req (Apache / authgw) |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        med = lambda server, key: statistics.median(f[server][key] for f in row.rounds)  # noqa: E731
        ratio = statistics.median(f["ratio"] for f in row.rounds)
        lines.append(f"| {ROWS[row.key]} | {med('apache', 'rate'):,.0f} | {med('authgw', 'rate'):,.0f} | "
                     f"{ratio:.2f} | {med('apache', 'cpu_us'):,.0f} / {med('authgw', 'cpu_us'):,.0f} |")
        if row.short:
            lines.append(f"| (not valid: {row.short} load(s) of the row above ran out of prepared input; "
                         "raise --token-rate) | | | | |")
    return "\n".join(lines)


def setup(base: Path, args: argparse.Namespace, only: list[str], started: list) -> list[Row]:
    """Start what the chosen rows need; return the rows in the issue's order."""
    need_ldap = bool({"bare", "ldap", "hot1", "hot1000"} & set(only))  # bare: /healthz of the LDAP gateway
    slapd = kdc = pki = None
    if need_ldap:
        slapd = Slapd(base / "slapd", threads=4)
        started.append(slapd)
        slapd.start()
        slapd.add_users((f"user{i:04d}", f"pw-{i:04d}-secret") for i in range(USERS))
        for g in range(GROUPS):
            slapd.add_group(f"group{g}", [slapd.user_dn(f"user{i:04d}") for i in range(g, USERS, GROUPS)])
        users = base / "users.txt"
        users.write_text("".join(basic(i) + "\n" for i in range(USERS)))
        one = base / "one-user.txt"
        one.write_text(basic(0) + "\n")
    if "negotiate" in only:
        kdc = KDC(base / "kdc", "EXAMPLE.TEST")
        started.append(kdc)
        kdc.start()
        kdc.add_principal("alice", "alice-password")
        keytab = kdc.add_service(SPN, base / "http.keytab")
        ccache = kdc.kinit("alice", "alice-password", base / "alice.cc")
    if "cert" in only:
        (base / "pki").mkdir()
        pki = make_pki(base / "pki")

    def ldap_auth(cache: bool) -> LdapAuth:
        return LdapAuth(slapd.url, slapd.base_dn, slapd.service_dn, slapd.service_password, cache=cache)

    apache = Apache(base / "apache", ldap=ldap_auth(False) if need_ldap else None,
                    gssapi=GssapiAuth(keytab, kdc.krb5_conf) if kdc else None,
                    # Like for like: no session tickets, as authgw's listener by default (each costs
                    # either server a copy of the session with the client certificate in it).
                    tls=TlsClientAuth(Path(pki["server_crt"]), Path(pki["server_key"]), Path(pki["trust"]),
                                      session_tickets=0)
                    if pki else None, servers=args.workers)
    started.append(apache)
    apache.start()
    apache_cached = None
    if {"hot1", "hot1000"} & set(only):
        apache_cached = Apache(base / "apache-cache", ldap=ldap_auth(True), servers=args.workers)
        started.append(apache_cached)
        apache_cached.start()

    ldap_settings = slapd.plugin_settings("plain", groups={"source": args.groups}) if slapd else None
    gateways: dict[str, GatewayProcess] = {}

    def start(name: str, files: dict, env: dict | None = None) -> GatewayProcess:
        gw = gateway(base, name, files, args.workers, env, reuse_port=not args.shared_socket,
                     pin_workers=not args.unpinned)
        started.append(gw)
        gateways[name] = gw
        return gw

    if need_ldap:
        start("ldap", {"gateway.yaml": {"chain": ["ldap"]}, "ldap.yaml": {"ldap": ldap_settings}})
    if {"hot1", "hot1000"} & set(only):
        # the same TTL as Apache's cache, longer than the run: the rows measure hits, not expiry
        start("cache", {"gateway.yaml": {"chain": ["ldap"], "plugins": ["cache"]},
                        "ldap.yaml": {"ldap": ldap_settings},
                        "cache.yaml": {"cache": {"hot": {"enabled": True, "ttl": 3600}}}})
    if kdc:
        start("kerberos", {"gateway.yaml": {"chain": ["kerberos"]},
                           "kerberos.yaml": {"kerberos": {"allowed_networks": ["127.0.0.0/8"], "keytab": str(keytab),
                                                          "service_principal": f"{SPN}@EXAMPLE.TEST",
                                                          "realms": ["EXAMPLE.TEST"]}}}, env=kdc.env)
    cert_port = None
    if pki:
        cert_port = free_port()
        start("cert", {"gateway.yaml": {"chain": ["client_cert"]},
                       "client_cert.yaml": {"client_cert": {
                           "ca_bundle": pki["root"], "intermediates": pki["issuing"],
                           "listener": {"address": f"127.0.0.1:{cert_port}", "certificate": pki["server_crt"],
                                        "key": pki["server_key"]},
                           "revocation": "off", "mapping": {"rules": ["cn"], "lookup": False}}}})
        wait_for_port("127.0.0.1", cert_port)

    def wrk(url: str, headers: tuple[str, Path, str] | None = None):
        return lambda seconds: loads.wrk(url, seconds, threads=args.threads, connections=args.connections,
                                         headers=headers)

    def pids(server):
        return lambda: server.pids() if isinstance(server, Apache) else tree(server.proc.pid)

    rows: list[Row] = []
    for key in (k for k in ROWS if k in only):
        if key == "bare":
            gw = gateways["ldap"]
            rows.append(Row(key, wrk(apache.url + "/static"), wrk(gw.url + "/healthz"), pids(apache), pids(gw)))
        elif key == "ldap":
            gw, h = gateways["ldap"], ("Authorization", users, "cycle")
            rows.append(Row(key, wrk(apache.url + "/ldap/ok", h), wrk(gw.url + "/auth", h), pids(apache), pids(gw)))
        elif key in ("hot1", "hot1000"):
            gw, h = gateways["cache"], ("Authorization", one if key == "hot1" else users, "cycle")
            rows.append(Row(key, wrk(apache_cached.url + "/ldap/ok", h), wrk(gw.url + "/auth", h),
                            pids(apache_cached), pids(gw), prime=lambda gw=gw, h=h: learn(gw, h[1])))
        elif key == "negotiate":
            gw, tokens = gateways["kerberos"], base / "tokens.txt"
            h = ("Authorization", tokens, "once")

            def prepare(r: int, peak: float, tokens=tokens) -> None:
                # Fresh for each round (a replay cache refuses a token twice; each server has its
                # own), minted just before use (an authenticator older than the 5-minute clock
                # skew is refused), enough for half as much again as the fastest load so far.
                seconds = args.warmup if r < 0 else args.duration
                mint(kdc, ccache, int(max(args.token_rate, 1.5 * peak) * seconds) + 100, tokens)

            rows.append(Row(key, wrk(apache.url + "/negotiate/ok", h), wrk(gw.url + "/auth", h), pids(apache),
                            pids(gw), prepare=prepare))
        elif key == "cert":
            gw = gateways["cert"]
            apache_ok = LogCounter(apache.access_log_path, lambda line: b'"GET /cert/ok HTTP/1.0" 200 ' in line)
            authgw_ok = LogCounter(base / "audit-cert.log", audit_success)
            rows.append(Row(key, lambda s: s_time(apache.tls_port, "/cert/ok", pki, s, args.cert_clients, apache_ok),
                            lambda s: s_time(cert_port, "/auth", pki, s, args.cert_clients, authgw_ok),
                            pids(apache), pids(gw)))
    return rows


if __name__ == "__main__":
    sys.exit(main())
