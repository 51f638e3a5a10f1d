"""The eviction watch against a real redis-server when ``INFO`` fails (review of the eviction watch).

A Redis that did not answer ``INFO memory`` (busy with a script, frozen, timing out) was taken as
one that cannot be told, so as one that keeps its keys: a probe whose PING passed and whose INFO
failed made a Redis known to evict used again until the next round, and said "keeps keys
again". An error now changes nothing (the last answer stands) and reaches the caller's probe.

A Redis that refuses ``INFO`` to the gateway's user (an ACL ``+@all -@dangerous``, a common
least-privilege rule) failed the credential cache's start-up probe (it read the server's version
with INFO), an ERROR at start-up and ``authgw check`` FAIL, for a store the health round then
used; and the policy was then not checked without a word above DEBUG. The probe now answers,
and one WARNING says the policy is not checked.

The credential cache watches through the same :class:`EvictionWatch` as the other stores, with
its own lines (fail closed while the policy evicts, used again once fixed).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import pytest
import redis as redis_py

from gateway.plugins.cache.redis_store import RedisStore
from gateway.plugins.cache.store import StoreError
from gateway.redis_eviction import EvictionWatch
from support.net import wait_for
from support.redis import RedisServer

HANG = 30


def _lines(caplog, name: str, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name and r.levelno == level]


def _busy(client) -> bool:
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001 - the BUSY answer is what is waited for
        return "BUSY" in str(exc)
    return False


def _evicting(client) -> None:
    client.config_set("maxmemory", str(64 * 1024 * 1024))
    client.config_set("maxmemory-policy", "volatile-lru")


@pytest.fixture
def redis(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        yield server


def test_info_not_answered_keeps_an_evicting_redis_refused(redis, caplog):
    caplog.set_level(logging.DEBUG, logger="authgw.redis")
    admin = redis.client()
    _evicting(admin)
    watch = EvictionWatch("throttle store")
    location = f"redis://127.0.0.1:{redis.port}"
    assert "maxmemory-policy volatile-lru" in watch.check(redis.client(), location)

    # Busy with a script: Redis answers BUSY to INFO (a ResponseError that is no refusal).
    admin.config_set("busy-reply-threshold", "10")
    runner = threading.Thread(target=lambda: pytest.raises(Exception, redis.client().eval, "while true do end", 0))
    runner.start()
    try:
        busy = redis.client()
        wait_for(lambda: _busy(busy), HANG, interval=0.05, what="the script holds Redis")
        with pytest.raises(Exception, match="BUSY"):  # before: None, the problem forgotten
            watch.check(busy, location)
    finally:
        redis.client().script_kill()
        runner.join(HANG)
    assert watch.problem is not None and "volatile-lru" in watch.problem

    # Frozen: INFO times out.
    frozen = redis_py.Redis.from_url(redis.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    frozen.ping()  # connected before the freeze
    os.kill(redis.pid, signal.SIGSTOP)
    try:
        with pytest.raises(Exception, match="(?i)timeout"):
            watch.check(frozen, location)
    finally:
        os.kill(redis.pid, signal.SIGCONT)
    assert watch.problem is not None and "volatile-lru" in watch.problem
    assert "keeps keys again" not in caplog.text  # before: said twice, and the store used

    admin.config_set("maxmemory-policy", "noeviction")
    assert watch.check(redis.client(), location) is None
    assert "throttle store redis://127.0.0.1" in caplog.text and "keeps keys again" in caplog.text


def _user_without_info(redis) -> str:
    redis.client().acl_setuser("gw", enabled=True, passwords=["+gw-secret-pw"], commands=["+@all", "-@dangerous"],
                               keys=["*"], channels=["*"])
    return redis.url.replace("redis://", "redis://gw:gw-secret-pw@")


def test_a_redis_refusing_info_to_the_cache_is_used_and_said_not_checked(redis, caplog):
    caplog.set_level(logging.DEBUG, logger="authgw.plugin.cache")
    store = RedisStore(_user_without_info(redis), max_age=3600, key_prefix="gw:", timeout=2.0)
    try:
        answer = store.probe()  # before: StoreError "INFO: NoPermissionError" (start-up ERROR, check FAIL)
        assert answer.startswith(f"redis://127.0.0.1:{redis.port}/0: writable, redis ?"), answer
        assert store.ping().endswith(": answers") and store.unusable is None
        warnings = _lines(caplog, "authgw.plugin.cache", logging.WARNING)
        assert len(warnings) == 1, warnings  # once, not per round
        assert "credential cache" in warnings[0] and "not checked" in warnings[0] and "+info" in warnings[0]
        assert "gw-secret-pw" not in caplog.text
    finally:
        store.close()


def test_the_cache_refuses_an_evicting_redis_then_a_refused_info_is_not_said_fixed(redis, caplog):
    caplog.set_level(logging.DEBUG, logger="authgw.plugin.cache")
    store = RedisStore(redis.url, max_age=3600, key_prefix="gw:", timeout=2.0)
    admin = redis.client()
    try:
        assert store.ping().endswith(": answers")
        _evicting(admin)
        with pytest.raises(StoreError, match="maxmemory-policy volatile-lru"):
            store.ping()
        with pytest.raises(StoreError, match="maxmemory-policy volatile-lru"):
            store.get("a" * 64)  # fail closed: no offline answer
        (error,) = _lines(caplog, "authgw.plugin.cache", logging.ERROR)
        assert "eviction policy" in error and "credential cache" in error and "no offline answers" in error

        # The policy fixed: used again, said once.
        admin.config_set("maxmemory-policy", "noeviction")
        assert store.ping().endswith(": answers") and store.get("a" * 64) is None
        assert caplog.text.count("no longer evicts keys") == 1

        # Evicting again, then INFO taken from the user (an ACL changed): used, as a Redis that
        # cannot be told is, but not said to keep its keys (before: "no longer evicts keys").
        admin.config_set("maxmemory-policy", "allkeys-lru")
        with pytest.raises(StoreError, match="maxmemory-policy allkeys-lru"):
            store.ping()
        admin.execute_command("ACL", "SETUSER", "default", "-info")
        assert store.ping().endswith(": answers")
        assert caplog.text.count("no longer evicts keys") == 1
        assert "not checked" in _lines(caplog, "authgw.plugin.cache", logging.WARNING)[-1]
    finally:
        store.close()
