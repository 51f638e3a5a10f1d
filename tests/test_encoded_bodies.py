"""Request bodies with a ``Content-Encoding`` are never inflated.

aiohttp inflates a gzip or deflate body on the event loop, and when a handler does not read the
body (``/auth``, ``/healthz``, a refusal) it reads it after the answer, inflating it, without
yielding while the inflater has output: 2 MB of gzip (2 GiB of zeros inflated) held a worker's
event loop about two seconds, every login on it waiting, and a few dozen such requests held every
worker past the watchdog (review of the front door). With ``auto_decompress`` off the body is
skipped as the bytes it is, and the handlers that read bodies refuse an encoded one.

Real ``authgw serve`` processes, raw sockets. The CPU the gateway spends on the encoded body is
compared with what the same bytes sent plain cost, in the same run.
"""

from __future__ import annotations

import gzip
import json
import socket

import pytest

from support.gateway import static_users, write_conf
from support.proc import children

TOKEN = "agw_encoded-bodies-test-token-0123456789"


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return gzip.compress(bytes(256 * 1024 * 1024), compresslevel=9)  # 256 MiB of zeros, ~250 kB


@pytest.fixture
def gateway(start_gateway, conf_dir, demo_hash):
    import hashlib

    write_conf(conf_dir, {
        "gateway.yaml": f"chain: [static]\nthrottle: {{enabled: false}}\n"
                        f"api_tokens:\n  - name: tests\n    sha256: {hashlib.sha256(TOKEN.encode()).hexdigest()}\n",
        **static_users({"demo": demo_hash}),
    })
    return start_gateway(conf_dir)


def cpu_seconds(gateway) -> float:
    total = 0.0
    for pid in [gateway.proc.pid, *children(gateway.proc.pid)]:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks
    return total


def exchange(gateway, head: str, body: bytes) -> bytes:
    """Send *head* with *body* and read until the gateway closes the connection: the status
    line. A body the handler did not read is read by the server (lingering) before it closes."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=60) as sock:
        sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("path", ["/healthz", "/auth"])
def test_an_encoded_body_nobody_reads_is_skipped_not_inflated(gateway, bomb, path):
    def cost(encoding: str) -> float:
        before = cpu_seconds(gateway)
        status = exchange(gateway, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n{encoding}", bomb)
        assert status.startswith(b"HTTP/1.1 4"), status
        return cpu_seconds(gateway) - before

    plain = min(cost("") for _ in range(2))
    encoded = min(cost("Content-Encoding: gzip\r\n") for _ in range(2))
    # Inflating 256 MiB costs far more than reading 250 kB; skipping it, about the same.
    assert encoded < 3 * plain + 0.15, (encoded, plain)
    assert "Traceback" not in gateway.output()


def test_the_api_refuses_an_encoded_body_and_does_not_wait_for_the_rest(gateway, bomb):
    head = (f"POST /v1/authenticate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Encoding: gzip\r\n")
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        # The head and a little of the body: the refusal comes without the rest, and the
        # connection is closed (not kept to read what is left).
        sock.sendall(head.encode() + b"Content-Length: 4000\r\n\r\n" + bomb[:1000])
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status, _, rest = data.partition(b"\r\n")
    assert status == b"HTTP/1.1 400 Bad Request", data
    assert json.loads(rest.split(b"\r\n\r\n", 1)[1]) == {
        "error": "bad_request", "detail": "a body with a Content-Encoding, or a Transfer-Encoding other than chunked, "
                  "is not accepted"}


def test_a_valid_gzip_json_body_is_refused_too(gateway):
    """Not read as if it were plain, and not inflated: refused, whatever it holds."""
    body = gzip.compress(json.dumps({"username": "demo", "password": "demo"}).encode())
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", "Content-Encoding": "gzip"}
    response = gateway.post("/v1/authenticate", body, headers)
    assert response.status == 400 and json.loads(response.body)["error"] == "bad_request"
    plain = gateway.post("/v1/authenticate", json.dumps({"username": "demo", "password": "demo"}).encode(),
                         {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert plain.status == 200, plain.body


@pytest.mark.parametrize("coding", ["gzip, chunked", "deflate,chunked", "foo, chunked"])
def test_a_transfer_coding_other_than_chunked_is_refused_not_read_as_plain(gateway, coding):
    """aiohttp reads ``Transfer-Encoding: gzip, chunked`` as chunked and hands the gzip bytes on
    as they are: a plain JSON body under it signed in, where a proxy in front that decodes it
    would have read another body (review of the front doors). Refused as a Content-Encoding is."""
    body = json.dumps({"username": "demo", "password": "demo"}).encode()
    head = (f"POST /v1/authenticate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: {coding}\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        sock.sendall(head.encode() + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert b"Transfer-Encoding other than chunked" in data
    plain = head.replace(f"Transfer-Encoding: {coding}", "Transfer-Encoding: chunked")
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:  # chunked alone: read
        sock.sendall(plain.encode() + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
