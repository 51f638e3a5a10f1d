"""The probes of ``bench_http_layers.py`` (issue 15): what uvicorn and granian give in place of two
things authgw's aiohttp layer has, checked with real clients rather than read from their docs.

``probe_tls``: each server with TLS requiring a client certificate (a throwaway PKI from
tests/support/pki.py); curl logs in with ``--cert`` and the application prints what it was handed
about that certificate (ASGI scope and extensions, RSGI scope attributes). ``probe_slow``: each
server with a 2 s header (or keep-alive) timeout where it has one; a client that trickles header
lines and one that sends nothing; when did the server close them?

Run through ``bench_http_layers.py --probe-tls`` / ``--probe-slow``; every server on 127.0.0.1,
stopped by its PID, the temporary directory removed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_http_layers import HERE, INSTALL_HINT, granian_command
from support.net import free_port, wait_for_port
from support.proc import stop

SCRIPT = str(HERE / "bench_http_layers.py")

def each_server(cases: list, base: Path, env: dict, check) -> None:
    """For each ``(label, command(port))`` in *cases*: start the server on a free loopback port
    (its output to a log in *base*), wait until it listens, ``check(label, port)``, stop it by
    PID, whatever happens."""
    for label, command in cases:
        port = free_port()
        with open(base / f"server-{port}.log", "wb") as log:
            proc = subprocess.Popen(command(port), stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                wait_for_port("127.0.0.1", port, timeout=30, proc=proc)
                check(label, port)
            finally:
                stop(proc)


# -- the client-certificate probe ---------------------------------------------------------------------


def probe_tls(args) -> int:
    from support.pki import CA, write_bundle

    base = Path(tempfile.mkdtemp(prefix="authgw-http-probe-"))
    try:
        root = CA.create("probe root CA", days=2)
        server_crt, server_key = root.issue("localhost", dns=["localhost"], ips=["127.0.0.1"], server=True) \
            .write(base, "server")
        client_crt, client_key = root.issue("probe-client", client=True).write(base, "client")
        certs = {"server_crt": str(server_crt), "server_key": str(server_key),
                 "ca": str(write_bundle(base / "ca.pem", root))}
        env = {**os.environ, "BENCH_PROBE": "1",
               "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        cases = []
        if importlib.util.find_spec("uvicorn"):
            for kind, label in (("uvicorn-tls", "uvicorn (ASGI, httptools)"),
                                ("uvicorn-tls-extension", "uvicorn, its httptools protocol subclassed (tls_protocol)")):
                cases.append((label, lambda port, kind=kind: [sys.executable, SCRIPT,
                              "--serve", kind, "--port", str(port), "--certs", json.dumps(certs)]))
        for interface in ("rsgi", "asgi"):
            if importlib.util.find_spec("granian"):
                cases.append((f"granian ({interface.upper()})",
                              lambda port, i=interface: granian_command(port, i, certs)))
        if not cases:
            print(f"nothing to probe: {INSTALL_HINT}")

        def check(label: str, port: int) -> None:
            curl = ["curl", "-sS", "--max-time", "10", "--cacert", certs["ca"], f"https://localhost:{port}/healthz",
                    "--resolve", f"localhost:{port}:127.0.0.1"]
            with_cert = subprocess.run(curl + ["--cert", str(client_crt), "--key", str(client_key)],
                                       capture_output=True, text=True, timeout=20)
            without = subprocess.run(curl, capture_output=True, text=True, timeout=20)
            print(f"== {label}\n  with a client certificate: {with_cert.stdout.strip() or with_cert.stderr.strip()}"
                  f"\n  without one: {'answered ' + without.stdout.strip()[:60] if without.returncode == 0 else 'refused (curl ' + str(without.returncode) + ')'}")

        each_server(cases, base, env, check)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


# -- the slow-client probe ------------------------------------------------------------------------------


def slow_client(port: int, seconds: float, trickle: bool) -> str:
    """Send a request line, then (with *trickle*) one header line a second, never ending the
    headers; or, without, nothing at all. When did the server close the connection?"""
    import socket

    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
        if trickle:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: probe\r\n")
        n = 0
        while time.monotonic() - started < seconds:
            try:
                if sock.recv(4096) == b"":
                    return f"closed after {time.monotonic() - started:.1f} s"
            except socket.timeout:
                pass
            except OSError as exc:
                return f"closed after {time.monotonic() - started:.1f} s ({exc.__class__.__name__})"
            if trickle:
                try:
                    sock.sendall(f"X-Slow-{n}: x\r\n".encode())
                except OSError:
                    return f"closed after {time.monotonic() - started:.1f} s"
                n += 1
    return f"still open after {seconds:.0f} s"


def probe_slow(args) -> int:
    """Each server configured with a 2 s header (or keep-alive) timeout where it has one; a client
    that trickles header lines, and one that sends nothing."""
    import concurrent.futures

    base = Path(tempfile.mkdtemp(prefix="authgw-http-slow-"))
    env = {**os.environ, "BENCH_HEADER_TIMEOUT": "2", "BENCH_KEEPALIVE": "2",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    me = [sys.executable, SCRIPT, "--serve"]
    cases = [("aiohttp + authgw's GuardedSite (limits.header_timeout 2 s)", lambda p: me + ["aiohttp-guarded", "--port", str(p)]),
             ("aiohttp alone", lambda p: me + ["aiohttp", "--port", str(p)])]
    if importlib.util.find_spec("uvicorn"):
        cases.append(("uvicorn (timeout_keep_alive 2 s)", lambda p: me + ["uvicorn", "--port", str(p)]))
    if importlib.util.find_spec("granian"):
        cases.append(("granian RSGI (--http1-header-read-timeout 2000)",
                      lambda p: granian_command(p, "rsgi", header_timeout_ms=2000)))

    def check(label: str, port: int) -> None:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            trickle, idle = pool.map(lambda t: slow_client(port, args.slow_seconds, t), (True, False))
        print(f"== {label}\n  header lines trickled, one a second: {trickle}\n  nothing sent: {idle}", flush=True)

    try:
        each_server(cases, base, env, check)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0
