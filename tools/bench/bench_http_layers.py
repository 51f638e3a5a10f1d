#!/usr/bin/env python3
"""Is a faster HTTP layer worth it? aiohttp as authgw runs it, next to uvicorn and granian (issue 15).

One command starts one server process per candidate on a free 127.0.0.1 port, each answering the
same tiny endpoint (``GET /healthz``: 200, a short text body), pins each to the same CPU (as
``pin_workers`` pins authgw's first worker) and loads them with **wrk** (``loads.wrk``:
``-t2 -c16``, keep-alive) in ``--rounds`` interleaved rounds (the order rotates each round):

    authgw           the real ``authgw serve --workers 1`` /healthz (uvloop, GuardedSite, the app)
    aiohttp-guarded  a bare aiohttp app on authgw's connection layer (gateway/http/protocol.py)
    aiohttp          a bare aiohttp app, access log off, uvloop: aiohttp's own floor
    uvicorn          uvicorn, httptools + uvloop, a raw ASGI app
    granian-rsgi     granian, its native RSGI interface (its fast path), 1 runtime thread
    granian-asgi     granian, ASGI (what an ASGI application would run on)
    authgw-hot       the same authgw process, ``GET /auth`` with one user's Basic credentials:
                     hot-cache hits (``chain: [static]``, ``plugins: [cache]``, ``hot``),
                     throttling off, the audit log on, to a file (as ``compare.py`` runs it)

It prints, per candidate, the median req/s and server CPU µs per request (``loads.measure``:
utime+stime of the server's whole process tree from /proc, before and after each load) and the
median of the per-round ratios to ``authgw`` (same round); then how much of a hot hit is the HTTP
layer: the hot hit's CPU against ``authgw`` /healthz and against the best candidate's floor.

uvicorn, httptools and granian are benchmark-only (``pip install -e '.[bench]'``); a candidate
whose package is missing is skipped with that hint.

    python tools/bench/bench_http_layers.py [--rounds 3] [--duration 5] [--only authgw,uvicorn]

``--probe-tls`` instead checks the client-certificate constraint (does the verified peer
certificate reach the application?) and ``--probe-slow`` the slow-client guards, in each server
(``http_probes.py``).

Every process is started on 127.0.0.1 and stopped by its PID; the temporary directory is removed.
The default run takes about 2 minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "tests"))
import loads  # noqa: E402
from support.gateway import GatewayProcess, write_conf  # noqa: E402
from support.net import free_port, wait_for_port  # noqa: E402
from support.proc import stop  # noqa: E402

BODY = b"ok authgw 0.1.0\n"  # the length of authgw's /healthz answer
REFERENCE = "authgw"
CANDIDATES = {  # name -> the modules it needs beyond the project's own dependencies
    "authgw": (),
    "aiohttp-guarded": (),
    "aiohttp": (),
    "uvicorn": ("uvicorn", "httptools"),
    "granian-rsgi": ("granian",),
    "granian-asgi": ("granian",),
    "authgw-hot": (),
}
INSTALL_HINT = "pip install -e '.[bench]'  (uvicorn, httptools, granian: benchmark-only)"
USER, PASSWORD = "bench", "bench-password-1"


# -- the servers (run in their own process: ``--serve KIND --port N``) -----------------------------


async def asgi_app(scope, receive, send) -> None:
    """The smallest ASGI answer; with ``--probe`` it reports what the scope says about TLS."""
    if scope["type"] != "http":
        return
    body = BODY
    if os.environ.get("BENCH_PROBE"):
        body = json.dumps({"scope_keys": sorted(scope), "scheme": scope.get("scheme"),
                           "extensions": _printable(scope.get("extensions"))}).encode() + b"\n"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
    await send({"type": "http.response.body", "body": body})


async def rsgi_app(scope, proto) -> None:
    """The smallest RSGI answer (granian's native interface)."""
    body = BODY
    if os.environ.get("BENCH_PROBE"):
        body = json.dumps({"scope_attributes": {k: _printable(getattr(scope, k, None))
                                                for k in dir(scope) if not k.startswith("_") and k != "headers"},
                           "headers": dict(scope.headers.items())}).encode() + b"\n"
    proto.response_bytes(200, [("content-type", "text/plain; charset=utf-8")], body)


def _printable(value):
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, str) and len(value) > 60:
        return f"{value[:40]!r}... ({len(value)} characters)"
    if isinstance(value, dict):
        return {k: _printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_printable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def serve_aiohttp(port: int, guarded: bool) -> None:
    import asyncio

    import uvloop
    from aiohttp import web

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(body=BODY, content_type="text/plain")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        if guarded:  # authgw's connection layer: header timeout, connection caps, error answers
            from gateway.http.protocol import ConnectionGuard, GuardedSite
            from gateway.server import bind
            from gateway.settings import LimitsSettings

            limits = LimitsSettings(header_timeout=float(os.environ.get("BENCH_HEADER_TIMEOUT", "10")))
            await GuardedSite(runner, bind(f"127.0.0.1:{port}"), ConnectionGuard(limits)).start()
        else:
            await web.TCPSite(runner, "127.0.0.1", port, backlog=2048).start()
        await asyncio.Event().wait()  # until SIGTERM

    uvloop.run(main())


def tls_protocol():
    """What uvicorn would need for the peer certificate to reach the application: its httptools
    protocol with the ASGI ``tls`` extension added to each request's scope (uvicorn has none)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class TlsHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")  # after the handshake, verified
            der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            self.tls = {"client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
                        "tls_version": ssl_object.version() if ssl_object else None}

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope["extensions"] = {"tls": self.tls}

    return TlsHttpToolsProtocol


def serve_uvicorn(port: int, certs: dict | None, extension: bool = False) -> None:
    import uvicorn

    tls = {}
    if certs:
        tls = {"ssl_certfile": certs["server_crt"], "ssl_keyfile": certs["server_key"],
               "ssl_ca_certs": certs["ca"], "ssl_cert_reqs": ssl.CERT_REQUIRED}
    uvicorn.run(asgi_app, host="127.0.0.1", port=port, loop="uvloop", lifespan="off",
                http=tls_protocol() if extension else "httptools", access_log=False, log_level="warning",
                timeout_keep_alive=int(os.environ.get("BENCH_KEEPALIVE", "5")), **tls)


def granian_command(port: int, interface: str, certs: dict | None = None, header_timeout_ms: int = 0) -> list[str]:
    command = [sys.executable, "-m", "granian", "--interface", interface, "--workers", "1",
               "--runtime-threads", "1", "--loop", "uvloop", "--no-access-log", "--log-level", "warning",
               "--host", "127.0.0.1", "--port", str(port), "--no-ws",
               f"bench_http_layers:{'rsgi_app' if interface == 'rsgi' else 'asgi_app'}"]
    if header_timeout_ms:
        command[-1:-1] = ["--http1-header-read-timeout", str(header_timeout_ms)]
    if certs:
        command[-1:-1] = ["--ssl-certificate", certs["server_crt"], "--ssl-keyfile", certs["server_key"],
                          "--ssl-ca", certs["ca"], "--ssl-client-verify", "--ssl-protocol-min", "tls1.2"]
    return command


# -- the process tree, pinning --------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """*pid* and every process below it (granian forks its worker from a thread, so
    ``/proc/PID/task/PID/children`` alone misses it)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


def pin(pids: list[int], cpu: int) -> None:
    """Every thread of *pids* on *cpu*."""
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), {cpu})
        except OSError:
            pass


class Server:
    """One candidate: a process tree on a port, stopped by its PID."""

    def __init__(self, name: str, base: Path) -> None:
        self.name, self.base = name, base
        self.gateway: GatewayProcess | None = None
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.path = "/auth" if name == "authgw-hot" else "/healthz"
        self.headers: tuple[str, Path, str] | None = None

    def start(self, shared_gateway: GatewayProcess | None) -> Server:
        if self.name in ("authgw", "authgw-hot"):
            self.gateway = shared_gateway
            self.port = shared_gateway.port
            if self.name == "authgw-hot":
                import base64

                values = self.base / "basic.txt"
                values.write_text("Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() + "\n")
                self.headers = ("Authorization", values, "cycle")
                learnt = shared_gateway.auth(USER, PASSWORD)  # the one live login (argon2id), then hits
                assert learnt.status == 200, learnt
            return self
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        if self.name.startswith("granian"):
            command = granian_command(self.port, self.name.split("-")[1])
        else:
            command = [sys.executable, str(Path(__file__).resolve()), "--serve", self.name, "--port", str(self.port)]
        self.log = open(self.base / f"{self.name}.log", "wb")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        wait_for_port("127.0.0.1", self.port, timeout=30, proc=self.proc)
        return self

    def pids(self) -> list[int]:
        return descendants((self.gateway.proc if self.gateway else self.proc).pid)

    def load(self, seconds: float, args) -> loads.Load:
        return loads.wrk(f"http://127.0.0.1:{self.port}{self.path}", seconds, threads=args.threads,
                         connections=args.connections, headers=self.headers)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.log.close()
            self.proc = None


def authgw_gateway(base: Path) -> GatewayProcess:
    """``authgw serve --workers 1`` (not started): /healthz, and /auth answered by hot-cache hits."""
    from gateway.passwords import hash_password

    conf = write_conf(base / "conf.d", {
        "gateway.yaml": json.dumps({"chain": ["static"], "plugins": ["cache"], "log_level": "WARNING",
                                    "throttle": {"enabled": False}, "audit": {"file": str(base / "audit.log")}}),
        "static.yaml": "static:\n  users_file: users/users.yaml\n",
        "cache.yaml": "cache:\n  methods: [static]\n  hot: {enabled: true, ttl: 3600}\n",
        "users/users.yaml": f'users:\n  {USER}:\n    password_hash: "{hash_password(PASSWORD)}"\n',
    })
    return GatewayProcess(conf, base / "state", workers=1)  # the caller starts it (and stops it)


# -- the comparison ------------------------------------------------------------------------------------


def run(args) -> int:
    chosen = [name for name in CANDIDATES if name in args.only]
    missing = {name: [m for m in CANDIDATES[name] if importlib.util.find_spec(m) is None] for name in chosen}
    missing = {name: modules for name, modules in missing.items() if modules}
    for name, modules in missing.items():
        print(f"skipping {name}: {', '.join(modules)} not installed; {INSTALL_HINT}")
    chosen = [name for name in chosen if name not in missing]
    if not chosen:
        return 1
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found (Debian package wrk)")
    cpu = sorted(os.sched_getaffinity(0))[0]
    base = Path(tempfile.mkdtemp(prefix="authgw-http-layers-"))
    servers: list[Server] = []
    gateway = None
    try:
        if {"authgw", "authgw-hot"} & set(chosen):
            gateway = authgw_gateway(base)
            gateway.start()
        for name in chosen:
            servers.append(Server(name, base))  # listed first: stopped even if it fails to start
            servers[-1].start(gateway)
        print(f"HTTP layers, same run: {args.rounds} round(s) x {args.duration:g} s, wrk -t{args.threads} "
              f"-c{args.connections}, every server pinned to CPU {cpu} (of {os.cpu_count()}), "
              f"load average {os.getloadavg()[0]:.2f} at the start", flush=True)
        for server in servers:  # untimed: connections, caches, the first hot hit
            pin(server.pids(), cpu)
            server.load(args.warmup, args)
        figures: dict[str, list[dict]] = {s.name: [] for s in servers}
        for r in range(args.rounds):
            order = servers[r % len(servers):] + servers[:r % len(servers)]
            for server in order:
                pin(server.pids(), cpu)  # again: anything started since by an unpinned thread
                load, cpu_us, _ = loads.measure(lambda: server.load(args.duration, args), server.pids)
                figures[server.name].append({"rate": load.rate, "cpu_us": cpu_us, "failed": load.failed})
                warn = f"  WARNING {load.failed} failed" if load.failed else ""
                print(f"round {r + 1} {server.name:<16} {load.rate:>9,.0f} req/s {cpu_us:>6.1f} us CPU/req{warn}",
                      flush=True)
        load_end = os.getloadavg()[0]
        print()
        print(table(figures, args, load_end))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
    finally:
        for server in servers:
            server.stop()
        if gateway is not None:
            gateway.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


def table(figures: dict[str, list[dict]], args, load_end: float) -> str:
    med = {name: {k: statistics.median(f[k] for f in rounds) for k in ("rate", "cpu_us")}
           for name, rounds in figures.items()}
    ref = figures.get(REFERENCE)

    def ratio(name: str, key: str) -> str:
        if ref is None:
            return "-"
        return f"{statistics.median(f[key] / max(g[key], 1e-9) for f, g in zip(figures[name], ref)):.2f}"

    lines = [f"Medians of {args.rounds} round(s) x {args.duration:g} s (load average {load_end:.2f} at the end); "
             f"ratios are medians of per-round ratios to `{REFERENCE}` /healthz:", "",
             "| candidate | req/s | server CPU µs/req | req/s / authgw | CPU / authgw |",
             "| --- | --- | --- | --- | --- |"]
    for name, m in med.items():
        lines.append(f"| {name} | {m['rate']:,.0f} | {m['cpu_us']:.0f} | {ratio(name, 'rate')} | "
                     f"{ratio(name, 'cpu_us')} |")
    floors = {n: m["cpu_us"] for n, m in med.items() if n not in ("authgw", "authgw-hot")}
    if "authgw-hot" in med and "authgw" in med and floors:
        best = min(floors, key=floors.get)
        hot, own = med["authgw-hot"]["cpu_us"], med["authgw"]["cpu_us"]
        lines += ["", f"A hot-cache /auth hit: {hot:.0f} µs of CPU; authgw's own /healthz {own:.0f} µs "
                  f"({own / hot:.0%} of the hit); the best bare floor, {best}, {floors[best]:.0f} µs "
                  f"({floors[best] / hot:.0%} of the hit). Swapping the HTTP layer alone could save at most "
                  f"{own - floors[best]:.0f} µs a hit (to ~{hot - own + floors[best]:.0f} µs), the authgw "
                  f"app's share of /healthz included."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of untimed load per candidate first")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--only", default=",".join(CANDIDATES), help="candidates, comma-separated: "
                        + ",".join(CANDIDATES))
    parser.add_argument("--json", type=Path, help="also write every round's figures here")
    parser.add_argument("--probe-tls", action="store_true", help="the client-certificate probe instead")
    parser.add_argument("--probe-slow", action="store_true", help="the slow-client probe instead")
    parser.add_argument("--slow-seconds", type=float, default=8.0, help="how long the slow clients keep trying")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run one candidate server
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--certs", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        if args.serve in ("aiohttp", "aiohttp-guarded"):
            serve_aiohttp(args.port, guarded=args.serve == "aiohttp-guarded")
        elif args.serve in ("uvicorn", "uvicorn-tls", "uvicorn-tls-extension"):
            serve_uvicorn(args.port, json.loads(args.certs) if args.certs else None,
                          extension=args.serve.endswith("extension"))
        return 0
    if args.probe_tls or args.probe_slow:
        import http_probes

        return http_probes.probe_tls(args) if args.probe_tls else http_probes.probe_slow(args)
    args.only = [k for k in args.only.split(",") if k]
    if set(args.only) - set(CANDIDATES) or not args.only:
        parser.error(f"--only: choose from {','.join(CANDIDATES)}")
    if not 1 <= args.rounds <= 10 or not 1 <= args.duration <= 30:
        parser.error("--rounds 1..10 and --duration 1..30 (the loads are bounded on a shared machine)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
