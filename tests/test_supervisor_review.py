"""Review of the supervisor, the worker life cycle and the HTTP connection layer, through real
``authgw serve`` processes (and a worker's own reload in-process where the order of events must
be exact): what each worker serves after reloads that overtake each other, keep-alive
connections across a reload, workers that die while the master reads a long conf.d, the
connection cap's IPv6 network after a reload, and HTTP/1.0 framing."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket

import pytest

from support.gateway import static_users, write_conf
from support.http import basic
from support.net import free_port, wait_for
from support.proc import children
from support.supervisorenv import (PASSWORD, alice_hash, conf, gateway_yaml, master_pid, plugins_env,  # noqa: F401
                                   realm, realms, serving)


_SLOW_START = '''
import time

from gateway import PluginSettings, hookimpl


class SlowStartSettings(PluginSettings):
    seconds: float = 5.0


class SlowStart:
    """A plugin whose start-up (in each worker, not in the master's validation) takes a while
    and succeeds: a backend slow to answer its first probe."""

    Settings = SlowStartSettings

    def __init__(self, settings, context):
        self.seconds = settings.seconds

    @hookimpl
    def gateway_startup(self):
        time.sleep(self.seconds)
'''


@pytest.fixture
def plugin_env(tmp_path):
    return plugins_env(tmp_path / "site", "supervisor-review-plugins", {
        "slowstart": "review_slow_start:SlowStart", "failsin": "support.testplugins:StartupFailsIn"},
        {"review_slow_start.py": _SLOW_START})


# -- reloads that overtake each other ---------------------------------------------------------------

def test_a_reload_overtaken_by_one_every_worker_refuses_is_what_the_workers_and_replacements_serve(
        conf_dir, alice_hash, start_gateway, plugin_env, tmp_path):
    """Two SIGHUPs in a row: the workers apply the first (slowly) and refuse the second. The
    master had taken "the configuration before both" for what the workers fell back to: it said
    "the running configuration stays", logged no MIXED CONFIGURATION, and made the start's
    configuration the accepted one, so a replacement worker served r0 beside workers serving r1
    (review of the supervisor)."""
    failing = tmp_path / "failing"
    gw = start_gateway(conf(conf_dir, alice_hash, "r0"), workers=2, env=plugin_env)
    wait_for(lambda: len(serving(gw)) == 2, what="two workers serving", log=gw.output)
    (conf_dir / "slowstart.yaml").write_text("slowstart:\n  seconds: 5\n")
    (conf_dir / "gateway.yaml").write_text(gateway_yaml("r1", "plugins: [slowstart]\n"))
    os.kill(master_pid(gw), signal.SIGHUP)
    wait_for(lambda: "workers reload it" in gw.output(), timeout=60, what="the first reload sent", log=gw.output)
    failing.write_text("all")
    (conf_dir / "failsin.yaml").write_text(f"failsin:\n  pid_file: {failing}\n")
    (conf_dir / "gateway.yaml").write_text(gateway_yaml("r2", "plugins: [failsin]\n"))
    os.kill(master_pid(gw), signal.SIGHUP)  # while the workers still start the first one's plugins
    wait_for(lambda: gw.output().count("workers reload it") == 2, timeout=60, what="the second reload sent",
             log=gw.output)
    wait_for(lambda: gw.output().count("backend unreachable at start-up") >= 2, timeout=60,
             what="both workers' refusals", log=gw.output)
    wait_for(lambda: "reload refused by every worker" in gw.output() or "MIXED" in gw.output(), timeout=30,
             what="the master's word on the reload", log=gw.output)
    assert gw.output().count(" reloaded ") == 2  # each worker applied the first
    assert realms(gw) == {realm("r1")}
    failing.unlink()
    victim = children(gw.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(serving(gw)) == 3, timeout=60, what="the replacement serving", log=gw.output)
    assert realms(gw) == {realm("r1")}  # the replacement serves what the others serve


def test_workers_left_on_different_configurations_by_overtaking_reloads_are_a_mixed_configuration(
        conf_dir, alice_hash, start_gateway, plugin_env, tmp_path):
    """Two SIGHUPs in a row, the first applied by one worker only, the second refused by both:
    the workers serve different configurations, and the master says so."""
    failing = tmp_path / "failing"
    gw = start_gateway(conf(conf_dir, alice_hash, "r0"), workers=2, env=plugin_env)
    wait_for(lambda: len(serving(gw)) == 2, what="two workers serving", log=gw.output)
    refusing, applying = serving(gw)
    failing.write_text(str(refusing))
    (conf_dir / "slowstart.yaml").write_text("slowstart:\n  seconds: 5\n")
    (conf_dir / "failsin.yaml").write_text(f"failsin:\n  pid_file: {failing}\n")
    (conf_dir / "gateway.yaml").write_text(gateway_yaml("r1", "plugins: [slowstart, failsin]\n"))
    os.kill(master_pid(gw), signal.SIGHUP)
    wait_for(lambda: "workers reload it" in gw.output(), timeout=60, what="the first reload sent", log=gw.output)
    (conf_dir / "gateway.yaml").write_text(gateway_yaml("r2", "plugins: [failsin]\n"))
    (conf_dir / "failsin.yaml").write_text(f"failsin:\n  pid_file: {tmp_path / 'all'}\n")
    (tmp_path / "all").write_text("all")
    os.kill(master_pid(gw), signal.SIGHUP)
    line = wait_for(lambda: re.search(r"MIXED CONFIGURATION: .*", gw.output()), timeout=60,
                    what="the mixed configuration", log=gw.output).group(0)
    assert f"worker(s) {applying} serve the configuration of reload 1" in line, line
    assert f"worker(s) {refusing} serve the configuration of the start" in line, line
    assert realms(gw) == {realm("r0"), realm("r1")}


# -- the connection cap after a reload ------------------------------------------------------------------

def test_a_reload_changes_the_network_the_connection_cap_counts_an_ipv6_client_by(conf_dir, alice_hash, tmp_path):
    """``throttle.ipv6_prefix`` at a reload reached the throttle and not the per-client
    connection cap, which went on counting by the prefix of the start until a restart."""
    import gateway.server as server

    conf(conf_dir, alice_hash, "r0")
    (conf_dir / "gateway.yaml").write_text(gateway_yaml("r0").replace("enabled: false\n",
                                                                      "enabled: false\n  ipv6_prefix: 64\n"))

    async def main() -> tuple[str, str]:
        worker = server._Worker(conf_dir, tmp_path / "state", [server.bind(f"127.0.0.1:{free_port()}")], {})
        await worker.start(server.build_runtime(conf_dir, state_dir=tmp_path / "state"))
        before = worker.guard.client("2001:db8:0:1:2::3")
        (conf_dir / "gateway.yaml").write_text(gateway_yaml("r1").replace("enabled: false\n",
                                                                          "enabled: false\n  ipv6_prefix: 48\n"))
        assert await worker.reload()
        after = worker.guard.client("2001:db8:0:1:2::3")
        assert worker.current.runtime.config.core.throttle.ipv6_prefix == 48
        await worker.stop()
        return before, after

    assert asyncio.run(main()) == ("2001:db8:0:1::/64", "2001:db8::/48")


# -- HTTP/1.0 framing ---------------------------------------------------------------------------------

def _exchange(port: int, raw: bytes) -> bytes:
    """Send *raw* on a new connection; everything the gateway answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_an_http_1_0_request_with_transfer_encoding_is_refused_and_closed(conf_dir, alice_hash, start_gateway):
    """RFC 9112 section 6.1: an HTTP/1.0 message with ``Transfer-Encoding`` has faulty framing;
    the connection is closed. aiohttp read it as chunked and kept the connection open
    (``Connection: keep-alive``) for the bytes after the chunks, which a proxy reading HTTP/1.0
    framing by the RFC takes for the body: a request smuggled to the gateway, answered in the
    place of the next one (review of the HTTP layer)."""
    import hashlib

    gw = start_gateway(conf(conf_dir, alice_hash, "r0",
                            f"api_tokens:\n  - name: t\n    sha256: {hashlib.sha256(b'tok').hexdigest()}\n"))
    body = json.dumps({"username": "alice", "password": PASSWORD}).encode()
    smuggled = f"GET /auth HTTP/1.1\r\nHost: t\r\nAuthorization: {basic('alice', PASSWORD)}\r\n\r\n".encode()
    for head in (b"POST /v1/authenticate HTTP/1.0\r\nHost: t\r\nAuthorization: Bearer tok\r\n"
                 b"Content-Type: application/json\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n",
                 b"GET /auth HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                 b"GET /auth HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\nContent-Length: 0\r\n"
                 b"Transfer-Encoding: identity\r\n\r\n"):
        answer = _exchange(gw.port, head + smuggled)
        assert answer.startswith(b"HTTP/1.0 400 Bad Request\r\n"), answer
        assert answer.count(b"HTTP/1.") == 1, answer  # closed: nothing after it is answered
        assert b"Remote-User" not in answer and b"success" not in answer
    # HTTP/1.0 framed by Content-Length keeps working, keep-alive included
    plain = (f"GET /auth HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n"
             f"Authorization: {basic('alice', PASSWORD)}\r\n\r\n").encode()
    answer = _exchange(gw.port, plain + b"GET /auth HTTP/1.0\r\nHost: t\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 200 OK\r\n") and answer.count(b"HTTP/1.0 401 Unauthorized") == 1, answer
    assert gw.proc.poll() is None and "Traceback" not in gw.output()


# -- keep-alive connections at a reload ----------------------------------------------------------------

def _answer(sock: socket.socket) -> bytes:
    """One answer read from *sock* (headers, then Content-Length bytes); what came before the
    connection closed, if it closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


@pytest.mark.parametrize("workers", [1, 2])
def test_a_keep_alive_connection_goes_on_with_the_new_configuration_after_a_reload(
        conf_dir, alice_hash, start_gateway, workers):
    """An idle keep-alive connection was closed by the retiring generation, under a request its
    client may be sending: that request got no answer (4 of 5 reloads lost one, four clients
    each sending a request every 10 ms), and a proxy resends only idempotent requests, so a POST
    was a 502. It now goes on with the new generation, which answers its next request."""
    gw = start_gateway(conf(conf_dir, alice_hash, "r0"), workers=workers)
    wait_for(lambda: len(serving(gw)) == workers, what="the workers serving", log=gw.output)
    wrong = f"GET /auth HTTP/1.1\r\nHost: t\r\nAuthorization: {basic('alice', 'wrong')}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as sock:
        sock.sendall(wrong)
        assert realm("r0").encode() in _answer(sock)
        for number in (1, 2):
            (conf_dir / "gateway.yaml").write_text(gateway_yaml(f"r{number}"))
            os.kill(gw.proc.pid, signal.SIGHUP)
            wait_for(lambda: gw.output().count(" reloaded ") == number * workers, timeout=60,
                     what=f"reload {number}", log=gw.output)
            sock.sendall(wrong)
            answer = _answer(sock)
            assert realm(f"r{number}").encode() in answer, answer
            assert b"Connection: close" not in answer
    assert "Traceback" not in gw.output()


def test_a_handed_over_connection_is_served_after_the_old_generation_is_gone(conf_dir, alice_hash, tmp_path):
    """In-process, the worker's own reload, waiting for the old generation's retirement to end
    (its plugins shut down): the keep-alive connection it had is still served, by the new one,
    and the connection caps count it once."""
    import gateway.server as server

    conf(conf_dir, alice_hash, "r0")
    port = free_port()
    wrong = f"GET /auth HTTP/1.1\r\nHost: t\r\nAuthorization: {basic('alice', 'wrong')}\r\n\r\n".encode()

    async def answer(reader: asyncio.StreamReader) -> bytes:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial
        length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
        return head + await reader.readexactly(length)

    async def main() -> tuple[bytes, bytes, int, int]:
        worker = server._Worker(conf_dir, tmp_path / "state", [server.bind(f"127.0.0.1:{port}")], {})
        await worker.start(server.build_runtime(conf_dir, state_dir=tmp_path / "state"))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(wrong)
        first = await asyncio.wait_for(answer(reader), 30)
        (conf_dir / "gateway.yaml").write_text(gateway_yaml("r1"))
        assert await worker.reload()
        await asyncio.wait(list(worker.retiring), timeout=60)
        assert not worker.retiring
        writer.write(wrong)
        second = await asyncio.wait_for(answer(reader), 30)
        counted = worker.guard.open
        writer.close()
        for _ in range(600):  # until the close reaches the worker (bounded)
            if not worker.guard.open:
                break
            await asyncio.sleep(0.05)
        left = worker.guard.open
        await worker.stop()
        return first, second, counted, left

    first, second, counted, left = asyncio.run(main())
    assert realm("r0").encode() in first
    assert realm("r1").encode() in second, second
    assert (counted, left) == (1, 0)


# -- a long reload build --------------------------------------------------------------------------------

def test_a_worker_that_dies_while_the_master_reads_a_long_conf_d_is_replaced_meanwhile(
        conf_dir, alice_hash, start_gateway):
    """The master read conf.d for a reload in its own loop (20-40 s for a large file): a worker
    that died meanwhile stayed a zombie, was replaced only once the reading ended, and its
    slot's socket queued a share of the new connections for no one (4 of 10 logins timed out).
    The reading now has a process of its own."""
    gw = start_gateway(conf(conf_dir, alice_hash, "r0"), workers=2)
    wait_for(lambda: len(serving(gw)) == 2, what="two workers serving", log=gw.output)
    (conf_dir / "zz-long.yaml").write_text("x:\n" + "- 1\n" * 1_000_000)  # tens of seconds to read
    os.kill(master_pid(gw), signal.SIGHUP)
    wait_for(lambda: "reload: reading" in gw.output(), timeout=30, what="the reading to start", log=gw.output)
    victim = children(gw.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(serving(gw)) == 3 or "reload refused" in gw.output(), timeout=120,
             what="the replacement serving", log=gw.output)
    assert "reload refused" not in gw.output(), "replaced only once conf.d was read"
    assert [gw.auth("alice", PASSWORD, timeout=30).status for _ in range(10)] == [200] * 10
    line = wait_for(lambda: re.search(r"reload refused, the running configuration stays: \n.*", gw.output()),
                    timeout=300, what="the refusal of the long file", log=gw.output).group(0)
    assert "zz-long.yaml:1: x: unknown key" in gw.output().split("reload refused")[1], line
    assert realms(gw) == {realm("r0")} and "Traceback" not in gw.output()


def test_a_stop_that_arrives_while_the_builder_is_forked_does_not_wait_for_the_read(tmp_path, demo_hash):
    """Signals are blocked around the builder's fork; a SIGTERM held there ran its handler before
    the master knew the builder, which was then left to read the whole of conf.d: the stop took
    a minute for a large file (review of this stop's diff). The master kills a builder it forks
    once a stop was asked for; the stop ends within a bounded wait that the read alone exceeds."""
    import subprocess
    import sys
    from pathlib import Path

    from support.net import wait_for_port

    conf = write_conf(tmp_path / "conf.d", {"gateway.yaml": "chain: [static]\nthrottle:\n  enabled: false\n",
                                            **static_users({"alice": demo_hash})})
    port = free_port()
    tests = str(Path(__file__).parent)
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "support.sigterm_at_build_fork", "serve", "--config", str(conf),
                                 "--state-dir", str(tmp_path / "state"), "--workers", "2",
                                 "--listen", f"127.0.0.1:{port}"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": tests})
    try:
        wait_for_port("127.0.0.1", port, timeout=30, proc=proc)
        output = lambda: (tmp_path / "log").read_text()  # noqa: E731
        wait_for(lambda: output().count("serving on") >= 2, 30, what="two workers serving", log=output)
        (conf / "zz-long.yaml").write_text("x:\n" + "- 1\n" * 3_000_000)  # a minute or more of YAML to read
        os.kill(proc.pid, signal.SIGHUP)
        assert proc.wait(timeout=30) == 0, output()[-3000:]
        assert "reload abandoned: the gateway is stopping" in output()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
