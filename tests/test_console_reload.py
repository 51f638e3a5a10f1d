"""The reload the console triggers (SIGHUP once a configuration log has run) loses no request
sent on a fresh connection: a connection the retiring generation accepted before its first
request arrived used to be closed with the idle keep-alive ones, and its client saw the
connection drop (``RemoteDisconnected`` in test_console_setup.py, once in a while). Here that
moment is made exact: connect, reload, and only then send the request."""

from __future__ import annotations

import http.client
import os
import signal
import socket

import pytest

from support.console import console_conf
from support.net import free_port, wait_for


def _reloads(gw) -> int:
    return gw.output().count(" reloaded ")


def _send_after_reload(gw, port: int, path: str) -> http.client.HTTPResponse:
    """Open a connection, let the running generation accept it, reload, then send *path* on it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.connect()
    # A request answered on a second connection to the same listener: the running generation
    # accepted that one, so ours too (a listening socket's queue is taken in order). A request to
    # another listener (the main port, for a connection to the console's) proved nothing of the
    # sort: under load that accept came after the reload, by the new generation, once in a while.
    probe = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        probe.request("GET", path)
        assert probe.getresponse().status == 200
    finally:
        probe.close()
    before = _reloads(gw)
    os.kill(int((gw.state_dir / "authgw.pid").read_text()), signal.SIGHUP)
    wait_for(lambda: _reloads(gw) > before, 60, interval=0.02, what="the reload", log=gw.output)
    conn.request("GET", path)
    return conn.getresponse()


@pytest.mark.parametrize("listener", ["main", "console"])
def test_a_request_on_a_connection_opened_before_the_reload_is_answered(listener, conf_dir, demo_hash,
                                                                       start_gateway):
    port = free_port()
    console_conf(conf_dir, port, demo_hash)
    gw = start_gateway(conf_dir)
    target, path = (gw.port, "/healthz") if listener == "main" else (port, "/static/console.css")
    response = _send_after_reload(gw, target, path)
    assert response.status == 200
    assert response.read()
    # the old generation closes it after this answer, and says so
    assert response.getheader("Connection") == "close"
    # and the new generation serves what comes next
    assert gw.get("/healthz").status == 200


def test_a_connection_that_never_sends_is_closed_at_the_reload(conf_dir, demo_hash, start_gateway):
    """A silent connection (a browser's preconnect) does not hold the old generation: it is
    closed once the retiring generation stops waiting for its first request."""
    console_conf(conf_dir, free_port(), demo_hash)
    gw = start_gateway(conf_dir)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as silent:
        assert gw.get("/healthz").status == 200
        before = _reloads(gw)
        os.kill(int((gw.state_dir / "authgw.pid").read_text()), signal.SIGHUP)
        assert silent.recv(1) == b""  # closed by the server, not left open
        assert _reloads(gw) > before
