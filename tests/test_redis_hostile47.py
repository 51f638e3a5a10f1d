"""The credential cache's Redis store against a Redis that answers what no Redis
answers (stop 47; the throttle's and the login door's stores: ``test_core_review47.py``), with
real ``authgw serve`` processes, slapd and redis-server.

A "Redis" whose answer is an array nested 200,000 deep (``RecursionError`` in redis-py's parser)
or ``+PONG`` to the connection's handshake (``AttributeError``) got past both stores' error
handling, which takes ``redis.RedisError``:

* the credential cache: no worker started with it at start-up (``gateway_startup`` takes a
  ``StoreError`` only), and later every login and health probe logged a traceback (~150 KB each
  for the nested arrays) while ``/readyz`` said the store was ok;
* (the relay's store has the same, left: see the note of stop 47).

Now it is a store outage (``StoreError``, its store shown down), and each command is bounded whole, in time and in bytes
(:mod:`gateway.redis_deadline`): a 64 MiB answer is refused past 16 MiB, an answer dribbled a
byte at a time ends at ``redis.timeout``.

Waits are bounded and wait for events; no time is asserted.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading

import pytest
import redis

from gateway.plugins.cache.redis_store import RedisStore as CacheRedisStore
from gateway.plugins.cache.store import StoreError
from support.cacheenv import directory, slapd_fixture, source, write_secrets  # noqa: F401 - fixtures
from support.gateway import write_conf
from support.net import wait_for
from support.redis import RedisServer
from test_core_review47 import NESTED, HostileRedis, _huge_bulk
from test_throttle_redis_outage import LaggyProxy

slapd = slapd_fixture()

PASSWORD = "first-Passw0rd"
HOSTILE = pytest.mark.parametrize("answer", [NESTED, b"+PONG\r\n"], ids=["nested-array", "pong-to-everything"])


class TurningRedis:
    """A TCP proxy on 127.0.0.1 to a real redis-server until :meth:`turn`; from then on the
    connections open are closed (as by a server replaced at that address) and every new one is
    answered with *answer*, as :class:`test_core_review47.HostileRedis` answers."""

    def __init__(self, upstream: RedisServer) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        self.answer: bytes | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    def __enter__(self) -> TurningRedis:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.listener.close()
        self._close_open()

    def turn(self, answer: bytes) -> None:
        self.answer = answer
        self._close_open()

    def _close_open(self) -> None:
        with self._lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._open.clear()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            serve = self._forward if self.answer is None else self._hostile
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    def _hostile(self, conn: socket.socket) -> None:
        with conn:
            try:
                while conn.recv(65536):
                    conn.sendall(self.answer)
            except OSError:
                pass

    def _forward(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream.port), timeout=5)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._open += [conn, upstream]
        threading.Thread(target=_pump, args=(upstream, conn), daemon=True).start()
        _pump(conn, upstream)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    for sock in (source, sink):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@pytest.fixture
def turning(tmp_path):
    with RedisServer(tmp_path / "redis") as real, TurningRedis(real) as proxy:
        yield proxy


def _quiet(output: str) -> None:
    """No traceback, no unhandled error of the plugins or handlers: a store outage said in a line."""
    for said in ("Traceback", "credential cache failed on attempt", "gateway_probe of plugin",
                 "a request handler raised", "RecursionError: maximum recursion"):
        assert said not in output, (said, output[-3000:])


# -- the credential cache ---------------------------------------------------------------------------------


def _cache_conf(tmp_path, slapd, url: str):
    """``chain: [ldap]`` with ``plugins: [cache]`` on the Redis at *url*, health probed every second."""
    pepper, encryption = write_secrets(tmp_path)
    cache = {"store": "redis", "redis": {"url": url, "key_prefix": "gw:", "timeout": 0.5},
             "pepper": {"file": str(pepper)}, "encryption_key": {"file": str(encryption)}}
    return write_conf(tmp_path / "conf.d", {
        "gateway.yaml": json.dumps({"chain": ["ldap"], "plugins": ["cache"], "throttle": {"enabled": False},
                                    "health": {"probe_interval": 1}, "workers": 1, "deadline": 5}),
        "ldap.yaml": "ldap: " + json.dumps(slapd.plugin_settings("plain", backoff=0)),
        "cache.yaml": "cache: " + json.dumps(cache)})


def _user(slapd, name: str) -> str:
    """A new account of *slapd* with :data:`PASSWORD`; its uid."""
    uid = f"{name}-{secrets.token_hex(4)}"
    slapd.add_user(uid, PASSWORD, cn=uid, mail=f"{uid}@example.com", groups=["staff"])
    return uid


def _cache_store_down(gw) -> dict:
    def down():
        store = {c["name"]: c for c in gw.get("/readyz").json()["components"]}["cache.store"]
        return store if not store["ready"] else None

    return wait_for(down, 20, what="cache.store to be seen down", log=gw.output)


@HOSTILE
def test_a_cache_store_whose_redis_answers_what_no_redis_answers_is_down_not_a_traceback(
        tmp_path, directory, start_gateway, turning, answer):
    """Live logins are answered by the directory (the cache's failure never turns them into an
    error), the store is shown down (it said ok), no offline answer is given, and the log says
    it in lines: before, each login and each health probe logged a traceback."""
    uid = _user(directory, "hostile")
    gw = start_gateway(_cache_conf(tmp_path, directory, turning.url))
    assert source(gw.auth(uid, PASSWORD)) == "live"
    turning.turn(answer)
    for _ in range(3):
        response = gw.auth(uid, PASSWORD, timeout=30)
        assert (response.status, source(response)) == (200, "live")
    store = _cache_store_down(gw)
    assert "not a Redis answer" in store["detail"], store
    directory.stop()  # the directory away: the entry cannot be read, so nothing is answered offline
    assert gw.auth(uid, PASSWORD, timeout=30).status == 503
    output = gw.output()
    assert "credential cache: storing a live login failed" in output
    _quiet(output)


@HOSTILE
def test_a_gateway_whose_cache_redis_answers_what_no_redis_answers_at_start_serves(
        tmp_path, directory, start_gateway, turning, answer):
    """As with Redis down at start-up: the gateway serves live logins and says the store is
    unavailable. Before, ``gateway_startup`` raised and no worker ever served."""
    uid = _user(directory, "atstart")
    turning.turn(answer)
    gw = start_gateway(_cache_conf(tmp_path, directory, turning.url))
    response = gw.auth(uid, PASSWORD, timeout=30)
    assert (response.status, source(response)) == (200, "live")
    assert "not a Redis answer" in _cache_store_down(gw)["detail"]
    output = gw.output()
    assert "credential cache store unavailable at start-up" in output
    _quiet(output)


# -- each command bounded, in bytes and in time (the stores alone, on real sockets) -----------------------


def _cache_store(url: str, timeout: float) -> CacheRedisStore:
    return CacheRedisStore(url, max_age=3600, key_prefix="gw:", timeout=timeout)


def test_a_huge_answer_is_refused_by_size():
    """A bulk string of 64 MiB sent as fast as it is read, within a generous timeout: refused
    past 16 MiB, the connection dropped (it was read whole, then raised AttributeError)."""
    with HostileRedis(_huge_bulk) as server:
        client = _cache_store(server.url, 30)
        try:
            with pytest.raises(StoreError, match="over"):
                client.get("0" * 64)
        finally:
            client.close()
    assert server.sent < 64 * 1024 * 1024, "the answer was read whole"


@pytest.fixture
def dribbling(tmp_path):
    """A real redis-server behind a proxy that sends every answer a byte every 50 ms."""
    with RedisServer(tmp_path / "redis") as real:
        proxy = LaggyProxy(real.port, interval=0.05)
        try:
            yield proxy
        finally:
            proxy.close()


def test_each_cache_store_command_is_bounded_whole_not_each_read(dribbling):
    """``timeout: 0.5`` against an answer dribbled a byte every 50 ms: each read is within the
    socket timeout, so the call succeeded after seconds (the handshake's answer, then the
    command's). Bounded whole, it fails: that it fails at all is the proof. Then it works."""
    store = _cache_store(dribbling.url, 0.5)
    try:
        dribbling.mode = "dribble"
        with pytest.raises(StoreError, match="Timeout"):
            store.ping()
        dribbling.mode = "pass"
        assert store.ping().endswith("answers")
        assert list(store.scan()) == []  # SCAN a command at a time (the store's walk, cursor to cursor)
    finally:
        store.close()
