"""Requests the HTTP library cannot parse, and bodies the API cannot read (a 400, never a 500 or a hang), through a real
``authgw serve`` and raw sockets (issue 9 item 7, issue 10 item 5).

aiohttp logged a traceback holding the raw request bytes (base64 credentials, API tokens, JSON
passwords) and echoed them in the 400 body; each case greps every log line and response for the
secret.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket

import pytest

from support.gateway import static_users, write_conf

PASSWORD = "Corr3ct-Horse-Battery"
SECRET = "Sup3r-Secret-Passw0rd-XYZ"
TOKEN = "tok-" + "7f3a9c" * 8


@pytest.fixture(scope="module")
def alice_hash():
    from gateway.passwords import hash_password

    return hash_password(PASSWORD)


@pytest.fixture
def gw(conf_dir, alice_hash, start_gateway):
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    return start_gateway(write_conf(conf_dir, {
        "gateway.yaml": f"chain: [static]\nthrottle:\n  enabled: false\napi_tokens:\n  - name: svc\n    sha256: {digest}\n",
        **static_users({"alice": alice_hash}),
    }))


def raw(gw, data: bytes, timeout: float = 10.0) -> bytes:
    """Send *data* on a new connection; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=timeout) as sock:
        sock.sendall(data)  # no half-close: aiohttp closes a connection at the client's EOF
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


CASES = {
    "basic with NUL": (f"GET /auth HTTP/1.1\r\nHost: gw\r\nAuthorization: Basic {b64('alice:' + SECRET)}\x00\r\n\r\n",
                       [SECRET, b64("alice:" + SECRET)[:12]]),
    "bearer with DEL": (f"POST /v1/authenticate HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TOKEN}\x7f\r\n"
                        "Content-Length: 2\r\n\r\n{}", [TOKEN, TOKEN[:12]]),
    "body without length": ("POST /v1/authenticate HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
                            f"Authorization: Bearer {TOKEN}\r\n\r\n"
                            + json.dumps({"username": "alice", "password": SECRET}), [SECRET, TOKEN]),
    "header over 8190 bytes": (f"GET /auth HTTP/1.1\r\nHost: gw\r\nAuthorization: Basic {b64('alice:' + SECRET) * 400}\r\n\r\n",
                               [SECRET, b64("alice:" + SECRET)[:12]]),
    "request line garbage": (f"{SECRET} /auth HTTP/1.1\r\nHost: gw\r\n\r\n", [SECRET]),
}


def test_malformed_requests_leak_nothing_to_logs_or_responses(gw):
    answers = {}
    for name, (data, secrets) in CASES.items():
        answers[name] = raw(gw, data.encode("latin-1"))
    assert gw.auth("alice", PASSWORD).status == 200  # the server is fine afterwards
    log = gw.output()
    for name, (data, secrets) in CASES.items():
        answer = answers[name]
        assert answer.startswith((b"HTTP/1.1 4", b"HTTP/1.0 4")), (name, answer[:200])
        for secret in secrets:
            assert secret.encode() not in answer, (name, answer)
            assert secret not in log, (name, log)
        assert b"aiohttp" not in answer and b"Python/" not in answer, name
    assert "Traceback" not in log and "Error handling request" not in log
    assert "refused a malformed request from 127.0.0.1" in log


@pytest.mark.parametrize("line", ["GET /auth", "GET /auth HTTP/0.9", "GET /auth HTTP/2.0"])
def test_a_request_in_another_http_version_is_505_in_http_1(gw, line):
    """aiohttp answers in the version the request line names: ``HTTP/0.9 200 OK`` (or 2.0) with
    HTTP/1 headers, which no client or proxy reads right. Only 1.0 and 1.1 are answered."""
    basic = f"Authorization: Basic {b64('alice:' + PASSWORD)}\r\n"
    answer = raw(gw, f"{line}\r\n{basic}\r\n".encode())
    assert answer.startswith(b"HTTP/1.0 505 HTTP Version Not Supported\r\n"), answer[:200]
    assert raw(gw, f"GET /auth HTTP/1.0\r\n{basic}\r\n".encode()).startswith(b"HTTP/1.0 200 ")
    assert "refused a malformed request from 127.0.0.1: error (505)" in gw.output()
    assert gw.auth("alice", PASSWORD).status == 200


def test_no_server_versions_in_any_response(gw):
    for r in (gw.auth("alice", PASSWORD), gw.auth("alice", "wrong"), gw.get("/nowhere"), gw.get("/healthz")):
        assert r.header("Server") == "authgw", r.header("Server")
    assert b"Server: authgw\r\n" in raw(gw, b"GET /auth HTTP/1.1\r\nHost: gw\r\nX-Bad: a\x00b\r\n\r\n")


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,            # RecursionError in json.loads: was a 500
    b'{"username": ' + b"[" * 2000 + b"]" * 2000 + b', "password": "x"}',
    b"{" * 5000,
    b'{"username": "alice", "password": "' + b"[" * 40 + b'"}',  # brackets in a string: not nesting
], ids=["deep-array", "deep-username", "deep-objects", "brackets-in-a-string"])
# Short ids: pytest puts the test id in PYTEST_CURRENT_TEST, and an environment string over
# 128 KiB makes every process the test starts fail with E2BIG.
def test_deep_or_oversized_json_is_a_400(gw, body):
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    r = gw.post("/v1/authenticate", body, headers)
    if b'"password": "[' in body:
        assert r.status == 200 and r.json()["outcome"] == "invalid_credentials"
    else:
        assert r.status == 400 and r.json()["error"] == "bad_request"
    assert "Traceback" not in gw.output()


def test_a_body_that_never_arrives_times_out(conf_dir, alice_hash, start_gateway):
    gw = start_gateway(write_conf(conf_dir, {
        "gateway.yaml": f"chain: [static]\nlimits:\n  body_timeout: 0.5\napi_tokens:\n  - name: svc\n"
                        f"    sha256: {hashlib.sha256(TOKEN.encode()).hexdigest()}\n",
        **static_users({"alice": alice_hash}),
    }))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as sock:
        sock.sendall(f"POST /v1/authenticate HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Content-Length: 100\r\n\r\n{\"user".encode())
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b'"error": "bad_request"' in answer and b"did not arrive in time" in answer


def test_refused_api_tokens_are_said_once_a_minute_never_the_token(gw):
    """Requests without a valid token left no trace at all (review of the endpoints)."""
    wrong = "tok-" + "0" * 48
    for headers in ({"Authorization": f"Bearer {wrong}"}, {}, {"Authorization": f"Bearer {wrong}"}):
        answer = gw.post("/v1/authenticate", b'{"username": "alice", "password": "x"}',
                         {"Content-Type": "application/json", **headers})
        assert answer.status == 401
    log = gw.output()
    assert log.count("refused /v1/authenticate requests without a valid API token (last from 127.0.0.1)") == 1
    assert wrong not in log and TOKEN not in log


def test_an_api_attempt_is_audited_with_the_name_of_its_token(gw):
    """The audit could not say which service made an API call: the token's name was worked out
    and dropped (review of the endpoints)."""
    answer = gw.post("/v1/authenticate", json.dumps({"username": "alice", "password": PASSWORD}).encode(),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    assert answer.status == 200 and answer.json()["outcome"] == "success"
    line = gw.audit_for(answer.json()["request_id"])
    assert line["api_client"] == "svc" and line["front_door"] == "api"
    assert TOKEN not in gw.output()
    forward = gw.auth("alice", PASSWORD)
    assert "api_client" not in gw.audit_for(forward.header("X-Request-Id"))
