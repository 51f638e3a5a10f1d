"""``reuse_port`` (the default): each worker slot listens on a socket of its own (SO_REUSEPORT), through a
real ``authgw serve --workers 2``: the kernel spreads a burst of connections over both workers, a
worker killed is replaced on its slot's socket without refusing the connections that queued for
it, and a port something already listens on is still refused at start-up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

from support.gateway import static_users, write_conf
from support.net import free_port, wait_for
from support.proc import children

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"


def conf(conf_dir, demo_hash, reuse_port: bool | None = None):
    setting = "" if reuse_port is None else f"reuse_port: {str(reuse_port).lower()}\n"
    return write_conf(conf_dir, {
        "gateway.yaml": f"chain: [static]\n{setting}",
        **static_users({"demo": demo_hash}),
    })


def workers_of(gw) -> list[int]:
    return children(gw.proc.pid)


def tcp_sockets(port: int) -> dict[int, str]:
    """inode -> state ('0A' listening, '01' established) of the local sockets on *port*."""
    found = {}
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            found[int(fields[9])] = fields[3]
    return found


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def healthz(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(REQUEST)
        return sock.recv(4096)


def test_a_burst_of_connections_is_spread_over_the_workers(conf_dir, demo_hash, start_gateway):
    gw = start_gateway(conf(conf_dir, demo_hash), workers=2)
    listening = [inode for inode, state in tcp_sockets(gw.port).items() if state == "0A"]
    assert len(listening) == 2  # one per worker slot (one shared socket without reuse_port)
    workers = workers_of(gw)
    assert len(workers) == 2
    # Each its own: a worker closes the other slots' sockets first thing after the fork, which
    # on a loaded machine can come after the gateway answers through the first worker (seen:
    # [1, 2] in a CI-like run). Waited for, bounded: one that keeps another's socket fails.
    wait_for(lambda: [len(socket_inodes(pid) & set(listening)) for pid in workers] == [1, 1], 30, interval=0.05,
             what="each worker holding its own listening socket alone")

    # 64 connections opened together (as wrk opens its connections), one request each, kept open
    # while the sockets are counted. Hashed over two sockets, the chance that either worker gets
    # fewer than 8 of them is about 1e-10; a shared socket gave one worker 90% of such bursts.
    conns = [socket.socket() for _ in range(64)]
    try:
        for sock in conns:
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", gw.port))
        for sock in conns:
            sock.setblocking(True)
            sock.settimeout(60)
            sock.sendall(REQUEST)
        assert all(sock.recv(4096).startswith(b"HTTP/1.1 200") for sock in conns)
        established = {inode for inode, state in tcp_sockets(gw.port).items() if state == "01"}
        shares = [len(socket_inodes(pid) & established) for pid in workers]
        assert sum(shares) == 64 and min(shares) >= 8, shares
    finally:
        for sock in conns:
            sock.close()


def test_reuse_port_false_shares_one_socket(conf_dir, demo_hash, start_gateway):
    gw = start_gateway(conf(conf_dir, demo_hash, reuse_port=False), workers=2)
    listening = [inode for inode, state in tcp_sockets(gw.port).items() if state == "0A"]
    assert len(listening) == 1
    assert all(listening[0] in socket_inodes(pid) for pid in workers_of(gw))


def test_a_killed_worker_is_replaced_on_its_socket_and_no_connection_is_refused(conf_dir, demo_hash, start_gateway):
    gw = start_gateway(conf(conf_dir, demo_hash, reuse_port=True), workers=2)
    victim, survivor = workers_of(gw)
    # Healthy means one worker answers; the victim must be serving too (the master told so), or
    # its death is a failed start, whose slot's socket the master closes (resetting its queue).
    wait_for(lambda: all(f"authgw worker {pid} serving" in gw.output() for pid in (victim, survivor)),
             30, what="both workers to serve", log=gw.output)
    os.kill(victim, signal.SIGKILL)
    # Until the master replaces it, the connections the kernel hashes to the dead worker's
    # socket wait in its queue (the master keeps the socket open), then are answered.
    answers: list[bytes | Exception] = []

    def one() -> None:
        try:
            answers.append(healthz(gw.port))
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            answers.append(exc)

    clients = [threading.Thread(target=one) for _ in range(40)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(90)
    assert len(answers) == 40
    assert [a for a in answers if not (isinstance(a, bytes) and a.startswith(b"HTTP/1.1 200"))] == []
    replaced = workers_of(gw)
    assert survivor in replaced and victim not in replaced and len(replaced) == 2
    assert f"worker {victim} exited" in gw.output()


def test_connections_inherit_tcp_keepalive_from_the_listening_socket(conf_dir, demo_hash, start_gateway):
    """TCP keepalive is set once on each listening socket, and every connection accepted from it
    has it (aiohttp is told not to set it on each one): the kernel's keepalive timer runs on the
    gateway's end of an open connection ("tr" 2 in /proc/net/tcp; 0 without keepalive)."""
    gw = start_gateway(conf(conf_dir, demo_hash), workers=2)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=60) as sock:
        sock.sendall(REQUEST)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        client_port = sock.getsockname()[1]

        def timers() -> dict[str, str]:
            found = {}
            for line in open("/proc/net/tcp").read().splitlines()[1:]:
                fields = line.split()
                local, remote = (int(f.split(":")[1], 16) for f in fields[1:3])
                if fields[3] == "01" and {local, remote} == {gw.port, client_port}:
                    found["gateway" if local == gw.port else "client"] = fields[5].split(":")[0]
            return found

        # Until the client's ACK of the answer arrives, the gateway's end shows its retransmission
        # timer (1) instead.
        expected = {"gateway": "02", "client": "00"}
        wait_for(lambda: timers() == expected, timeout=10, what=f"timers {expected}", log=lambda: f"seen: {timers()}")


def test_a_port_already_listened_on_is_refused(conf_dir, demo_hash, tmp_path):
    # Another SO_REUSEPORT listener of this user (a stale gateway, say): a plain SO_REUSEPORT
    # bind would join its group and the two would share the connections silently.
    port = free_port()
    stale = socket.socket()
    stale.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    stale.bind(("127.0.0.1", port))
    stale.listen()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--config", str(conf(conf_dir, demo_hash, reuse_port=True)),
             "--state-dir", str(tmp_path / "state"), "--workers", "2", "--listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60)
    finally:
        stale.close()
    assert result.returncode != 0
    assert "in use" in result.stdout + result.stderr, result.stdout + result.stderr
