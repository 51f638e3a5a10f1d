"""Review of the core's reliability modules (stop 47): a Redis that answers what no Redis answers,
and a metrics directory on a full disk, against real processes.

* ``gateway/redis_deadline.py``: an answer nested 200,000 arrays deep raised ``RecursionError`` in
  redis-py's parser, a handshake answered ``+PONG`` raised ``AttributeError``: both passed the
  stores' ``except RedisError``, and every ``/auth`` was a 500 with a traceback. A bulk string
  announced at 1 GB and sent fast was read into memory until the call's deadline (~500 MB in
  0.5 s, per chain thread).
* ``gateway/metrics.py``: prometheus_client writes into a mapping of a sparse file; with the
  metrics directory's disk full every worker died of SIGBUS at its start, and so did each
  replacement: the gateway answered nothing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis
from support.gateway import static_users, write_conf
from support.net import wait_for

from gateway.redis_deadline import MAX_ANSWER_BYTES, CallDeadline, bounded_connection_class


class HostileRedis:
    """A TCP server on 127.0.0.1 that answers every command it reads with *answer* (bytes, or a
    callable given the socket), in a thread; ``with HostileRedis(...) as server: server.url``."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.sent = 0  # bytes the answers put on the wire, in all
        self._closed = threading.Event()

    def __enter__(self) -> HostileRedis:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._closed.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while conn.recv(65536):
                    if callable(self.answer):
                        self.answer(self, conn)
                    else:
                        conn.sendall(self.answer)
            except OSError:
                pass


NESTED = b"*1\r\n" * 200_000 + b":1\r\n"


def _huge_bulk(server: HostileRedis, conn: socket.socket) -> None:
    """A bulk string of 64 MiB, sent as fast as it is read."""
    size = 64 * 1024 * 1024
    conn.sendall(b"$%d\r\n" % size)
    chunk = b"x" * (1 << 20)
    for _ in range(size // len(chunk)):
        conn.sendall(chunk)
        server.sent += len(chunk)
    conn.sendall(b"\r\n")


def _throttled_gateway(tmp_path: Path, url: str, demo_hash: str, start_gateway):
    directory = write_conf(tmp_path / "c", {
        "gateway.yaml": json.dumps({"chain": ["static"], "health": {"probe_interval": 3600},
                                    "throttle": {"store": "redis", "redis": {"url": url, "timeout": 0.5}}}),
        **static_users({"alice": demo_hash})})
    return start_gateway(directory)


@pytest.mark.parametrize("answer", [NESTED, b"+PONG\r\n"], ids=["nested-array", "pong-to-everything"])
def test_a_redis_answering_what_no_redis_answers_is_a_store_outage_not_a_server_error(
        tmp_path, demo_hash, start_gateway, answer):
    """The throttle store (and the login door's, on the same connection class) on a peer whose
    answers redis-py's parser or handshake cannot take: 503 (fail closed), never a 500, and no
    traceback in the log per request."""
    with HostileRedis(answer) as server:
        gw = _throttled_gateway(tmp_path, server.url, demo_hash, start_gateway)
        statuses = [gw.auth("alice", "demo-password", timeout=30).status for _ in range(3)]
        assert statuses == [503] * 3, (statuses, gw.output()[-3000:])
        ready = gw.get("/readyz")
        assert ready.status == 503
        assert b"ConnectionError" in ready.body, ready.body
    output = gw.output()
    assert "RecursionError" not in output and "AttributeError" not in output and "Traceback" not in output, \
        output[-3000:]


def test_a_huge_bulk_answer_is_refused_by_size_not_read_until_the_deadline():
    """A bulk string of 64 MiB sent at once, within a generous deadline: the call is refused past
    :data:`MAX_ANSWER_BYTES` (a ``ConnectionError``, the connection dropped), not read whole into
    memory (it was: the value came back)."""
    deadline = CallDeadline()
    with HostileRedis(_huge_bulk) as server:
        client = redis.Redis.from_url(server.url, socket_timeout=30, protocol=2)
        pool = client.connection_pool
        pool.connection_class = bounded_connection_class(pool.connection_class, deadline)
        try:
            with deadline.within(30):
                with pytest.raises(redis.ConnectionError, match="over"):
                    client.get("k")
            assert not pool._available_connections or all(
                c._sock is None for c in pool._available_connections), "the connection is dropped"
        finally:
            client.close()
    assert server.sent < 64 * 1024 * 1024, "the answer was not read whole"
    assert MAX_ANSWER_BYTES < 64 * 1024 * 1024


def test_calls_against_hostile_redis_leak_no_descriptor_or_thread(tmp_path):
    """Many calls against each kind of hostile peer: every connection is closed when its call
    fails, and no thread is left behind."""
    from gateway.throttle_stores import RedisStore, StoreUnavailable

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    for answer in (NESTED, b"+PONG\r\n", b"*3\r\n:1\r\n"):
        with HostileRedis(answer) as server:
            store = RedisStore(server.url, prefix="t:", password=None, timeout=0.5, window=60)
            before, threads = fds(), threading.active_count()
            for i in range(30):
                with pytest.raises(StoreUnavailable):
                    store.reserve([("u:x", 5)], f"t{i}", 0, 60)
            # The hostile server's side of each connection is this process's too, closed by its
            # thread once it reads the client's close: a leak is what is still open once those
            # threads have caught up (a loaded machine showed 2 descriptors in between).
            settled = time.monotonic() + 10
            while (fds() > before + 1 or threading.active_count() > threads + 1) and time.monotonic() < settled:
                time.sleep(0.05)
            assert fds() <= before + 1 and threading.active_count() <= threads + 1, (fds(), before)
            store.close()


# -- metrics on a full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs of 16 MiB at ``tmp_path/tmpfs`` (root only: skipped elsewhere), unmounted after."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(directory: Path) -> Path:
    """Fill *directory*'s file system; returns the filler (remove it to free the space)."""
    filler = directory / "filler"
    chunk = b"\0" * (1 << 16)
    with open(filler, "wb", buffering=0) as out:
        while True:
            try:
                out.write(chunk)
            except OSError:
                break
    for size in (4096, 512, 1):  # down to the last block
        with open(filler, "ab", buffering=0) as out:
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError:
                pass
    return filler


def _workers(gw) -> set[int]:
    return {int(line.split("authgw worker ")[1].split()[0]) for line in gw.output().splitlines()
            if "authgw worker " in line and " serving on " in line}


def test_workers_serve_when_the_metrics_directorys_disk_fills_and_count_once_it_frees(
        tmp_path, demo_hash, start_gateway, small_tmpfs):
    """The disk of the metrics directory (made in ``TMPDIR``) fills while the gateway runs: every
    worker died of SIGBUS at its first attempt (a new value file, sparse), and so did each
    replacement (exit -7, a crash loop; nothing answered). Now the attempts are answered, a worker
    whose file has no room says so once, and its counts reach /metrics when the disk frees."""
    directory = write_conf(tmp_path / "c", {"gateway.yaml": json.dumps({"chain": ["static"]}),
                                            **static_users({"alice": demo_hash})})
    gw = start_gateway(directory, workers=2, env={"TMPDIR": str(small_tmpfs)})
    assert any(small_tmpfs.glob("authgw-metrics-*")), "the metrics directory is on the small disk"
    first = _workers(gw)
    os.kill(min(first), 9)  # its replacement starts on the disk, as after a crash or the watchdog
    wait_for(lambda: len(_workers(gw) - first) >= 1, 20, interval=0.1, what="a replacement worker",
             log=gw.output)
    filler = _fill(small_tmpfs)
    attempts = 20  # over both workers (reuse_port spreads connections by their ports)
    statuses = [gw.auth("alice", "demo-password" if i % 2 else "wrong", timeout=10).status for i in range(attempts)]
    assert sorted(statuses) == [200] * (attempts // 2) + [401] * (attempts // 2)
    time.sleep(1.0)  # a publish or two
    output = gw.output()
    assert "exited (-7)" not in output and "failed to start" not in output, output[-3000:]
    assert "cannot allocate this worker's metric files" in output

    filler.unlink()

    def counted() -> float:
        total = 0.0
        for line in gw.get("/metrics").body.decode().splitlines():
            if line.startswith("authgw_attempts_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    wait_for(lambda: counted() == attempts, 20, interval=0.2, what="every attempt in /metrics", log=gw.output)
    assert "metric files are allocated now" in gw.output()
