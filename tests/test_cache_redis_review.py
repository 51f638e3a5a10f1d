"""Review of the Redis-backed stores, the credential cache's share: real ``authgw serve``
gateways sharing a real redis-server, ``chain: [ldap]`` on a real slapd.

A. A refusal the store did not take stayed usable offline elsewhere. The directory refused a
   user's old (cached) password on instance one while Redis was frozen (SIGSTOP) or full
   (``maxmemory`` with ``noeviction``): the cache's delete failed, only instance one remembered
   it (in memory, retried only at its next offline answer for that user, lost at a restart),
   and instance two answered the refused password with 200 from the cache once the directory
   went down. Now the refusal is kept in the state directory and retried in the background until
   Redis takes it, also after a restart; and the delete comes first in the Lua script, so a full
   Redis takes it at once.
B. A Redis that may evict keys (``maxmemory`` with a ``volatile-*`` or ``allkeys-*`` policy) may
   evict a "forgotten at" marker, and an older login's write then brings a refused password
   back. The cache's health probe now asks :func:`gateway.redis_eviction.eviction_problem`; while
   it answers, the store is not used (no offline answer), ``/readyz`` says why and the log says
   it once per change.

The last tests hold the same rules through the real plugin in-process (runtimes over one state
directory, as the workers of one instance), with a real redis-server and SQLite file.

Waits are bounded (:data:`HANG`) and wait for events, never for a time to pass.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import time

import pytest

from gateway import Outcome
from gateway.plugins.cache.store import Entry, SQLiteStore, StoreError
from support.cacheenv import runtime as cache_runtime, write_secrets
from support.chainhelp import attempt
from support.gateway import GatewayProcess
from support.net import wait_for
from support.redis import RedisServer
from test_cache_slapd import conf, directory, new_user, slapd, source  # noqa: F401 - fixtures

#: How long a test waits for something that should happen (a guard against a hang, never a
#: bound on how fast anything runs).
HANG = 60
OLD, NEW = "first-Passw0rd", "second-Passw0rd"
_ROW = re.compile(rb"^gw:[0-9a-f]{64}$")


def cache_yaml(tmp_path, redis) -> str:
    pepper, encryption = write_secrets(tmp_path)
    return f"""\
        cache:
          store: redis
          redis: {{url: "{redis.url}", key_prefix: "gw:", timeout: 0.5}}
          pepper: {{file: {pepper}}}
          encryption_key: {{file: {encryption}}}
    """


def rows(redis) -> list[bytes]:
    return [name for name in redis.client().keys("gw:*") if _ROW.match(name)]


def two_instances(tmp_path, directory, start_gateway, redis):
    """Two gateways sharing *redis*, and a user whose password one of them cached live and the
    directory then changed."""
    cache = cache_yaml(tmp_path, redis)
    one = start_gateway(conf(tmp_path, directory, cache, "conf-one"))
    two = start_gateway(conf(tmp_path, directory, cache, "conf-two"))
    uid, old = new_user(directory, OLD)
    assert source(one.auth(uid, old)) == "live"
    assert len(rows(redis)) == 1
    directory.set_password(uid, NEW)
    return one, two, uid


def refuse_while_frozen(one: GatewayProcess, redis: RedisServer, uid: str) -> None:
    """The directory refuses the cached password on *one* while Redis is frozen (SIGSTOP, by its
    PID); returns once the cache's delete has failed, Redis still frozen."""
    os.kill(redis.pid, signal.SIGSTOP)
    refused = one.auth(uid, OLD)
    assert refused.status == 401  # live: the directory answered
    wait_for(lambda: "deleting an entry the directory refused" in one.output(), HANG, interval=0.05,
             what="the cache's delete to fail", log=one.output)


def test_a_refusal_a_frozen_redis_did_not_take_lands_when_it_answers_again(tmp_path, directory, start_gateway):
    with RedisServer(tmp_path / "redis") as redis:
        one, two, uid = two_instances(tmp_path, directory, start_gateway, redis)
        try:
            refuse_while_frozen(one, redis, uid)
        finally:
            os.kill(redis.pid, signal.SIGCONT)
        # Before: the entry stayed until instance one's next offline answer for that user.
        wait_for(lambda: not rows(redis), HANG, interval=0.05, what="the refused entry deleted from Redis",
                 log=one.output)
        assert wait_for(lambda: "deletions of refused entries, which the store had not taken, landed" in one.output(),
                        HANG, interval=0.05)
        directory.stop()
        for gateway in (two, one):
            answer = gateway.auth(uid, OLD)
            assert answer.status == 503 and source(answer) is None  # before: 200 from the cache on two


def test_a_refusal_kept_across_a_restart_lands_after_it(tmp_path, directory, start_gateway):
    with RedisServer(tmp_path / "redis") as redis:
        one, two, uid = two_instances(tmp_path, directory, start_gateway, redis)
        restarted = GatewayProcess(one.conf_dir, one.state_dir)
        try:
            try:
                refuse_while_frozen(one, redis, uid)
                one.stop()
                restarted.start()  # Redis still frozen: only the state directory knows of the refusal
            finally:
                os.kill(redis.pid, signal.SIGCONT)
            wait_for(lambda: not rows(redis), HANG, interval=0.05, what="the refused entry deleted after the restart",
                     log=restarted.output)
            assert "refusals the store had not taken before this start are retried" in restarted.output()
            with sqlite3.connect(one.state_dir / "cache-forgets.sqlite3") as db:
                assert wait_for(lambda: db.execute("SELECT count(*) FROM pending").fetchone()[0] == 0, HANG,
                                interval=0.05)
            directory.stop()
            for gateway in (two, restarted):
                assert gateway.auth(uid, OLD).status == 503
        finally:
            restarted.stop()


def test_a_full_redis_still_takes_a_refusal(tmp_path, directory, start_gateway):
    with RedisServer(tmp_path / "redis") as redis:
        one, two, uid = two_instances(tmp_path, directory, start_gateway, redis)
        client = redis.client()
        client.config_set("maxmemory", str(client.info("memory")["used_memory"] + 100_000))
        client.config_set("maxmemory-policy", "noeviction")
        filler = 0
        with pytest.raises(Exception, match="maxmemory"):
            for filler in range(100_000):  # until Redis refuses writes (OOM)
                client.set(f"filler:{filler}", b"x" * 1000)
        assert one.auth(uid, OLD).status == 401  # refused live
        # Before: the Lua script wrote the marker first, which a full Redis refuses, and nothing
        # was deleted; once memory was free again, instance two answered the password offline.
        wait_for(lambda: not rows(redis), HANG, interval=0.05, what="the refused entry deleted from a full Redis",
                 log=one.output)
        assert len(client.keys("gw:forgotten:*")) == 1  # and the marker written
        client.config_set("maxmemory", "0")
        client.delete(*(f"filler:{n}" for n in range(filler + 1)))
        directory.stop()
        assert two.auth(uid, OLD).status == 503


def _cache_component(gateway: GatewayProcess) -> dict:
    (component,) = [c for c in gateway.get("/readyz").json()["components"] if c["name"] == "cache.store"]
    return component


def _eviction_lines(gateway: GatewayProcess) -> list[str]:
    return [line for line in gateway.output().splitlines()
            if " ERROR " in line and "eviction policy" in line and "credential cache" in line]


def test_a_redis_that_may_evict_keys_is_not_used_and_readyz_says_why(tmp_path, directory, start_gateway):
    with RedisServer(tmp_path / "redis") as redis:
        conf_dir = conf(tmp_path, directory, cache_yaml(tmp_path, redis))
        gateway_yaml = conf_dir / "gateway.yaml"
        gateway_yaml.write_text(gateway_yaml.read_text().replace("probe_interval: 3600", "probe_interval: 1"))
        gateway = start_gateway(conf_dir)
        uid, password = new_user(directory)
        assert source(gateway.auth(uid, password)) == "live"
        client = redis.client()

        client.config_set("maxmemory", "64mb")
        client.config_set("maxmemory-policy", "volatile-lru")
        component = wait_for(lambda: (c := _cache_component(gateway))["ready"] is False and c, HANG, interval=0.05,
                             what="cache.store not ready", log=gateway.output)
        assert "maxmemory-policy volatile-lru" in component["detail"], component
        assert "noeviction" in component["detail"]  # what to set

        # Three more probe rounds (each asks INFO memory; this test's own INFO calls are subtracted):
        # the ERROR line is written once per change, not per round.
        def info_calls() -> int:
            return client.info("commandstats")["cmdstat_info"]["calls"]
        start, mine = info_calls(), 0

        def rounds() -> int:
            nonlocal mine
            mine += 1
            return info_calls() - start - mine
        wait_for(lambda: rounds() >= 3, HANG, interval=0.2, what="three more health rounds", log=gateway.output)
        assert len(_eviction_lines(gateway)) == 1, _eviction_lines(gateway)

        directory.stop()
        try:
            refused = gateway.auth(uid, password)
            assert refused.status == 503 and source(refused) is None  # no offline answer; before: 200 from the cache
            assert "an offline lookup failed" not in gateway.output()  # said once, above

            client.config_set("maxmemory-policy", "noeviction")
            wait_for(lambda: _cache_component(gateway)["ready"], HANG, interval=0.05, what="cache.store ready again",
                     log=gateway.output)
            assert "no longer evicts keys" in gateway.output()
            cached = gateway.auth(uid, password)
            assert cached.status == 200 and source(cached) == "cache"
            assert len(_eviction_lines(gateway)) == 1
        finally:
            directory.start()


# -- the same rules through the real plugin in-process (a real redis-server and SQLite file) ------



def runtime(tmp_path, action: str, cache: dict):
    return cache_runtime(tmp_path, {"action": action}, cache=cache)


def decide(rt, username: str, password: str):
    return asyncio.run(rt.gateway.authenticate(attempt(username, password, deadline=HANG)))


def test_a_refusal_kept_by_one_worker_stops_the_others_offline_answers(tmp_path, redis_server, monkeypatch):
    cache = {"store": "redis", "redis": {"url": redis_server.url, "key_prefix": "w:"}}
    live = runtime(tmp_path, "success", cache)
    assert decide(live, "alice", OLD).success
    refusing = runtime(tmp_path, "account_state", cache)  # this worker's store does not take deletes
    store = refusing.gateway.plugins["cache"].offline.store

    def fail(*args, **kwargs):
        raise StoreError("frozen, as far as this worker can tell")
    monkeypatch.setattr(store, "forget", fail)
    monkeypatch.setattr("gateway.plugins.cache.offline.RETRY_EVERY", HANG, raising=False)  # no background retry
    assert decide(refusing, "alice", OLD).outcome is Outcome.ACCOUNT_STATE
    other = runtime(tmp_path, "unavailable", cache)
    # Before: only the refusing worker knew (in its memory); the other answered offline.
    decision = decide(other, "alice", OLD)
    assert (decision.outcome, decision.from_cache) == (Outcome.UNAVAILABLE, False)
    # ... and its own retry, which Redis took, deleted the entry for everyone.
    assert redis_server.client().keys("w:" + "?" * 64) == []
    assert decide(other, "alice", OLD).outcome is Outcome.UNAVAILABLE


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_retried_refusal_keeps_an_entry_a_later_live_login_stored(tmp_path, redis_server, kind):
    if kind == "sqlite":
        store = SQLiteStore(tmp_path / "cache.sqlite3")
    else:
        from gateway.plugins.cache.redis_store import RedisStore

        store = RedisStore(redis_server.url, max_age=3600, key_prefix=f"k{os.getpid()}:")
    refused_at = time.time()  # Redis expires an entry max_age after its time
    older, newer = "a" * 64, "b" * 64
    store.put(Entry(older, "kid", "hash", b"sealed", refused_at - 10))
    store.put(Entry(newer, "kid", "hash", b"sealed", refused_at + 10))
    assert store.forget(older, refused_at, older_only=True) is True
    assert store.forget(newer, refused_at, older_only=True) is False  # stored after the refusal: kept
    assert store.get(older) is None and store.get(newer) is not None
    # the marker is left all the same: a write stamped before the refusal is refused
    assert store.put(Entry(newer, "kid", "hash", b"sealed", refused_at - 1)) is False
    assert store.forget(newer, refused_at) is True  # a first (not retried) forget deletes whatever is there
