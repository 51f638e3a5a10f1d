"""The front doors that read a request body, through a real ``authgw serve``: the login door
(TLS, anonymous), the JSON API and the console (a signed-in session).

A client that sends the headers and part of a body, then closes its connection, is a client
gone, not a failure of the gateway: aiohttp hands the reader a ``ConnectionResetError``, which
no door caught, so each such request was logged at ERROR as "a request handler raised
ConnectionResetError" with a traceback (the console: "console: POST ... raised"), one a request,
never rate-limited: any client of the public login door could fill the log with them (review of
the doors). Now the body is unreadable (the form doors' 400 and their usual line, the API's
400), and nothing of the body is logged."""

from __future__ import annotations

import hashlib
import socket
import ssl
from urllib.parse import urlencode

import pytest

from support.console import SessionClient, console_link
from support.login import LoginSite
from support.net import free_port, wait_for
from support.pki import CA
from support.slapd import Slapd

TOKEN = "stop46-doors-token"
SECRET = "Cut-Short-Secret-46"


@pytest.fixture(scope="module")
def doors(tmp_path_factory):
    base = tmp_path_factory.mktemp("doors46")
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1")
    console_port = free_port()
    core = {"plugins": ["login", "console"], "limits": {"body_timeout": 30},
            "api_tokens": [{"name": "t", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]}
    site = LoginSite(base / "idp", slapd, CA.create(), gateway=core,
                     extra={"console.yaml": f"console:\n  listen: 127.0.0.1:{console_port}\n"})
    try:
        site.gw = site.start()
        site.console = f"http://127.0.0.1:{console_port}"
        site.console_port = console_port
        yield site
    finally:
        site.stop()
        slapd.stop()


def _continue(sock) -> None:
    """Read up to the end of the interim ``100 Continue``: the door's handler is reading the body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed before 100 Continue: {data!r}"
        data += chunk
    assert data.startswith(b"HTTP/1.1 100 Continue"), data


def _cut_short(sock, path: str, headers: dict[str, str], part: bytes) -> None:
    """POST *path* declaring a body of 4 KiB, send *part* of it once invited, then close."""
    head = [f"POST {path} HTTP/1.1", "Expect: 100-continue", "Content-Length: 4096",
            *(f"{k}: {v}" for k, v in headers.items())]
    with sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        _continue(sock)
        sock.sendall(part)


def _tls(site) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(site.ca_file))
    return context.wrap_socket(socket.create_connection(("127.0.0.1", site.port), timeout=30),
                               server_hostname="localhost")


def test_a_client_gone_mid_body_is_no_server_error_on_any_door(doors):
    gw = doors.gw
    console = SessionClient(doors.console)
    console.sign_in(console_link(gw))
    form = urlencode({"csrf": console.csrf, "username": "alice", "password": SECRET}).encode()

    # the login door, anonymous (TLS)
    _cut_short(_tls(doors), "/login", {"Host": "localhost", "Content-Type": "application/x-www-form-urlencoded"},
               form)
    # the JSON API
    _cut_short(socket.create_connection(("127.0.0.1", gw.port), timeout=30), "/v1/authenticate",
               {"Host": "127.0.0.1", "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
               f'{{"username": "alice", "password": "{SECRET}'.encode())
    # the console, signed in
    _cut_short(socket.create_connection(("127.0.0.1", doors.console_port), timeout=30),
               f"{console.prefix}setup/directory",
               {"Host": "127.0.0.1", "Content-Type": "application/x-www-form-urlencoded",
                "Cookie": "; ".join(f"{k}={v}" for k, v in console.cookies.items())}, form)

    # Each door has seen its request end (a line from the login door and the console either way),
    # and the API has served a request since.
    wait_for(lambda: ("login.malformed" in gw.output() or "ConnectionResetError" in gw.output())
             and "console: " in gw.output() and "POST" in gw.output(), 30, what="both form doors' lines",
             log=gw.output)
    wait_for(lambda: "console: unreadable form" in gw.output() or "console: POST" in gw.output(), 30,
             what="the console's line", log=gw.output)
    assert gw.post("/v1/authenticate", b'{"username": "alice", "password": "Alice-pw-1"}',
                   {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}).status == 200

    output = gw.output()
    said = "\n".join(line for line in output.splitlines() if " ERROR " in line or " WARNING " in line)
    assert "Traceback" not in output, said
    assert "a request handler raised" not in output and "raised ConnectionResetError" not in output, said
    assert SECRET not in output
    assert "reason=login.malformed" in output and "console: unreadable form refused" in output, said


READER = """
    from aiohttp import web

    from gateway import Route, hookimpl


    class Reader:
        def __init__(self, settings, context):
            pass

        @hookimpl
        def gateway_http_routes(self, door):
            async def length(request):
                return web.Response(text=str(len(await request.read())))
            return [Route("POST", "/stop46/length", length)]
"""


def test_a_plugin_route_whose_client_goes_mid_body_is_said_briefly(tmp_path, demo_hash):
    """A third-party route reading its body itself: its client gone is one WARNING line at most
    every 10 s (the connection layer's), not an ERROR with a traceback a request."""
    from support.fakedist import make_dist
    from support.gateway import GatewayProcess, static_users, write_conf

    site = make_dist(tmp_path / "site", "stop46-reader", {"reader46": "reader46:Reader"}, {"reader46.py": READER})
    conf = write_conf(tmp_path / "conf.d", {"gateway.yaml": "chain: [static]\nplugins: [reader46]\n",
                                             **static_users({"alice": demo_hash})})
    gw = GatewayProcess(conf, tmp_path / "state", env={"PYTHONPATH": str(site)}).start()
    try:
        assert gw.post("/stop46/length", b"12345").text == "5"
        for _ in range(3):
            _cut_short(socket.create_connection(("127.0.0.1", gw.port), timeout=30), "/stop46/length",
                       {"Host": "127.0.0.1"}, SECRET.encode())
        wait_for(lambda: "closed its connection" in gw.output() or "Traceback" in gw.output(), 30,
                 what="the cut-short requests' line", log=gw.output)
        assert gw.post("/stop46/length", b"123").text == "3"
        output = gw.output()
        assert "Traceback" not in output and "a request handler raised" not in output, output[-3000:]
        assert output.count("a client closed its connection before its request was read") == 1, output[-3000:]
        assert SECRET not in output
    finally:
        gw.stop()
