#!/usr/bin/env python3
"""Certificate logins per second through the client_cert TLS listener, each on a new TLS
connection (a full handshake per login), against a minimal Python ``ssl`` server in the same run.

Both servers get the same server certificate, trust bundle (root + issuing CA) and client
certificate (EC P-256 keys, TLS 1.3 by default, no session tickets), ask for the certificate with CERT_REQUIRED
(the gateway's listener: CERT_OPTIONAL, the same handshake when a certificate comes) and answer
a ``GET /auth`` with 200. The gateway then also builds an attempt, verifies the path with
``cryptography``, maps the CN, writes an audit line. The load generator is the same for both:
``openssl s_time -new`` clients (C, so they cost less than the servers they measure; each login =
connect, full handshake with the client certificate, ``GET /auth``, read to close). The
gateway's rate counts only logins its audit log records as successful.

    python tools/bench/bench_client_cert.py [--seconds 8] [--clients 4] [--workers 1 2] [--no-header-path]

For scale it also measures the same login with the certificate in a header on a keep-alive
connection (the proxy-header setup: nginx terminates TLS, authgw pays no handshake).

Loopback only; every process it starts is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from support.net import free_port, wait_for_port  # noqa: E402
from support.pki import CA, write_bundle  # noqa: E402  (the tests' certificate generator)

REFERENCE_SERVER = r"""
import asyncio, os, ssl, socket, sys
certfile, keyfile, trust, fd = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(certfile, keyfile)
ctx.verify_mode = ssl.CERT_REQUIRED
ctx.load_verify_locations(trust)
ctx.num_tickets = 0  # as the gateway's listener by default (listener.session_tickets)

async def handle(reader, writer):
    try:
        await reader.readuntil(b"\r\n\r\n")
        peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        status = b"200 OK" if peer else b"401 Unauthorized"
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
    except Exception:
        pass
    finally:
        writer.close()

async def main():
    sock = socket.socket(fileno=fd)
    server = await asyncio.start_server(handle, sock=sock, ssl=ctx, backlog=1024)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# -- load generator ------------------------------------------------------------------------------


def measure(port: int, files: dict[str, str], seconds: int, clients: int) -> tuple[int, float, int]:
    """Run *clients* ``openssl s_time -new`` loops (C clients: connect, full handshake with the
    client certificate, ``GET /auth``, read to close) for *seconds*; return the connections
    made, the wall time, and the bytes read per connection (to see the answers were read)."""
    command = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-www", "/auth", "-time", str(seconds),
               "-cert", files["client_crt"], "-key", files["client_key"], "-CAfile", files["root"]]
    started = time.monotonic()
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(clients)]
    outputs = [proc.communicate(timeout=seconds + 60)[0] for proc in procs]
    elapsed = time.monotonic() - started
    connections, per = 0, 0
    for output in outputs:
        match = re.search(r"(\d+) connections in \d+ real seconds, (\d+) bytes read per connection", output)
        if match is None:
            raise RuntimeError(f"unexpected s_time output:\n{output}")
        connections += int(match.group(1))
        per = int(match.group(2))
    return connections, elapsed, per


# -- servers -------------------------------------------------------------------------------------------


def start_reference(files: dict[str, str], processes: int) -> tuple[int, list[subprocess.Popen]]:
    port = free_port()
    sock = socket.create_server(("127.0.0.1", port), backlog=1024)
    procs = [subprocess.Popen([sys.executable, "-c", REFERENCE_SERVER, files["server_crt"], files["server_key"],
                               files["trust"], str(sock.fileno())], pass_fds=[sock.fileno()])
             for _ in range(processes)]
    sock.close()
    wait_for_port("127.0.0.1", port, 30.0, procs[0])
    return port, procs


def start_gateway(base: Path, files: dict[str, str], workers: int) -> tuple[int, int, list[subprocess.Popen], Path]:
    conf = base / f"conf-{workers}"
    conf.mkdir()
    tls_port, http_port = free_port(), free_port()
    (conf / "gateway.yaml").write_text(json.dumps({
        "chain": ["client_cert"], "throttle": {"enabled": False}, "log_level": "WARNING",
        "trusted_proxies": ["127.0.0.1/32"],
        "audit": {"file": str(base / f"audit-{workers}.log")}}))
    (conf / "client_cert.yaml").write_text(json.dumps({"client_cert": {
        "ca_bundle": files["root"], "intermediates": files["issuing"],
        "listener": {"address": f"127.0.0.1:{tls_port}", "certificate": files["server_crt"],
                     "key": files["server_key"]},
        "headers": [{"name": "X-SSL-Client-Cert", "format": "pem"}],
        "revocation": "off", "mapping": {"rules": ["cn"], "lookup": False}}}))
    log = open(base / f"gateway-{workers}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(conf), "--state-dir",
                             str(base / f"state-{workers}"), "--workers", str(workers),
                             "--listen", f"127.0.0.1:{http_port}"], stdout=log, stderr=subprocess.STDOUT)
    wait_for_port("127.0.0.1", tls_port, 30.0, proc)
    time.sleep(0.5 if workers == 1 else 1.5)  # the workers build their SSL contexts after the bind
    return tls_port, http_port, [proc], base / f"audit-{workers}.log"


def make_pki(base: Path) -> dict[str, str]:
    root = CA.create("bench root CA", days=30)
    issuing = root.issue("bench issuing CA", ca=True)
    server_crt, server_key = root.issue("localhost", dns=["localhost"], ips=["127.0.0.1"], server=True).write(base, "server")
    client_crt, client_key = issuing.issue("bench", client=True).write(base, "client")
    return {
        "root": str(write_bundle(base / "root.pem", root)),
        "issuing": str(write_bundle(base / "issuing.pem", issuing)),
        "trust": str(write_bundle(base / "trust.pem", root, issuing)),
        "server_crt": str(server_crt), "server_key": str(server_key),
        "client_crt": str(client_crt), "client_key": str(client_key),
    }


def _audit_successes(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if json.loads(line).get("outcome") == "success")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8, help="length of each measurement")
    parser.add_argument("--clients", type=int, default=4, help="concurrent `openssl s_time` clients")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    parser.add_argument("--no-header-path", dest="header_path", action="store_false",
                        help="skip the measurement of the proxy-header path (no TLS in authgw)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="authgw-bench-cert-") as tmp:
        base = Path(tmp)
        files = make_pki(base)
        print(f"client-certificate logins, one new TLS connection (full handshake) per login: EC P-256 keys, "
              f"{ssl.OPENSSL_VERSION}, {os.cpu_count()} CPUs, {args.clients} openssl s_time clients, "
              f"{args.seconds} s per measurement, load average before: {os.getloadavg()[0]:.2f}")
        for count in args.workers:
            port, procs = start_reference(files, count)
            try:
                measure(port, files, 1, args.clients)  # warm-up
                connections, elapsed, per = measure(port, files, args.seconds, args.clients)
            finally:
                stop(procs)
            reference = connections / elapsed
            print(f"  minimal Python ssl server, {count} process(es): {reference:6.0f} handshakes/s "
                  f"({connections} in {elapsed:.1f} s, {per} bytes answered per connection)")
            port, http_port, procs, audit = start_gateway(base, files, count)
            try:
                measure(port, files, 1, args.clients)
                before = _audit_successes(audit)
                connections, elapsed, per = measure(port, files, args.seconds, args.clients)
                time.sleep(0.3)  # let the last audit lines reach the file
                logins = _audit_successes(audit) - before
                if args.header_path:
                    escaped = quote(Path(files["client_crt"]).read_text(), safe="")
                    proxied = loadgen.run(f"http://127.0.0.1:{http_port}/auth", lambda i: {"X-SSL-Client-Cert": escaped},
                                          concurrency=16, seconds=args.seconds)
            finally:
                stop(procs)
            rate = logins / elapsed
            print(f"  authgw client_cert,        {count} worker(s):  {rate:6.0f} logins/s     "
                  f"({logins} successful logins in the audit log, {connections} connections, "
                  f"{per} bytes answered per connection)  ratio {rate / reference:.2f}")
            if args.header_path:
                print(f"  authgw, certificate in a header (keep-alive, as behind nginx), {count} worker(s): "
                      f"{proxied.rate:6.0f} logins/s, p50 {proxied.percentile(0.5) * 1000:.1f} ms, "
                      f"statuses {dict(sorted(proxied.statuses.items()))}")
        print("  for scale: the issue quotes Apache httpd at ~430 client-certificate handshakes/s on 2 cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
