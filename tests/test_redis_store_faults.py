"""The stores on Redis when Redis misbehaves (review of the Redis-backed stores), through real
``authgw serve`` processes and a real redis-server whose settings are changed at run time.

A Redis that may evict keys is not used. With ``maxmemory`` and a ``maxmemory-policy`` other than
``noeviction`` (``volatile-lru`` is a common managed-Redis default), a full Redis deletes keys
with a time to live, which are exactly the gateway's: the reviewer saw 22 password guesses
answered past a lockout once the throttle's counts were evicted, and an AuthnRequest ID accepted
twice once its replay mark was. Each store's health probe reads ``INFO memory``; while the
policy may evict, the store is not used (503, as when Redis is down), ``/readyz`` says why and
what to set, and an ERROR line says it once.

A Redis full under ``noeviction`` refuses writes: a sign-out still ends the session (it was
refused, and the session lived on). A session record the store did not write is no session
(it was a 500 with a traceback).
"""

from __future__ import annotations

import contextlib
import json
from urllib.parse import urlencode

from support.gateway import static_users, write_conf
from support.net import wait_for
from support.redis import RedisServer

PASSWORD = "Corr3ct-Horse-Battery"


def _hash() -> str:
    from gateway.passwords import hash_password

    return hash_password(PASSWORD)


def _components(gw) -> dict[str, dict]:
    return {c["name"]: c for c in gw.get("/readyz").json()["components"]}


def _evicting(redis) -> None:
    client = redis.client()
    client.config_set("maxmemory", str(64 * 1024 * 1024))
    client.config_set("maxmemory-policy", "volatile-lru")


def _keeping(redis) -> None:
    redis.client().config_set("maxmemory-policy", "noeviction")


def test_a_throttle_store_on_an_evicting_redis_is_not_used(tmp_path, start_gateway):
    redis = RedisServer(tmp_path / "redis").start()
    try:
        core = {"chain": ["static"], "health": {"probe_interval": 1},
                "throttle": {"store": "redis", "redis": {"url": redis.url, "timeout": 0.5}}}
        gw = start_gateway(write_conf(tmp_path / "conf.d", {"gateway.yaml": json.dumps(core),
                                                            **static_users({"alice": _hash()})}))
        assert gw.auth("alice", PASSWORD).status == 200
        _evicting(redis)
        down = wait_for(lambda: (r := gw.get("/readyz")).status == 503 and r, log=gw.output)
        store = {c["name"]: c for c in down.json()["components"]}["gateway.throttle_store"]
        assert store["ready"] is False
        assert "maxmemory-policy volatile-lru" in store["detail"] and "set maxmemory-policy noeviction" in store["detail"]
        # fail closed: neither the right password nor a guess reaches the users file uncounted
        assert gw.auth("alice", PASSWORD).status == 503
        assert gw.auth("alice", "a-guess").status == 503
        wait_for(lambda: "is not used: maxmemory-policy volatile-lru" in gw.output())
        assert gw.output().count(" is not used: maxmemory-policy") == 1  # one ERROR line, not one per round
        assert "ERROR" in next(line for line in gw.output().splitlines() if "is not used: maxmemory" in line)

        _keeping(redis)
        wait_for(lambda: gw.get("/readyz").status == 200, log=gw.output)
        assert gw.auth("alice", PASSWORD).status == 200
        assert "its eviction policy keeps keys again" in gw.output()
    finally:
        redis.stop()


def _sign_in(gw):
    """The sign-in form, then alice's password posted with its CSRF pair (no redirect followed)."""
    from support.login import hidden

    page = gw.get("/login")
    cookie = "; ".join(c.split(";", 1)[0] for c in page.headers.get_all("Set-Cookie") or [])
    body = urlencode({"csrf": hidden(page.text, "csrf"), "username": "alice", "password": PASSWORD}).encode()
    return gw.post("/login", body, {"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie})


def test_a_login_session_store_on_an_evicting_redis_is_not_used(tmp_path, start_gateway):
    redis = RedisServer(tmp_path / "redis").start()
    try:
        gw = _login_gateway(tmp_path, start_gateway, redis)
        assert "Sign out" in _sign_in(gw).text  # signed in: the session is in Redis
        _evicting(redis)
        sessions = wait_for(lambda: (c := _components(gw)["login.sessions"])["ready"] is False and c,
                            log=gw.output)
        assert sessions["detail"] == (f"redis://127.0.0.1:{redis.port}: maxmemory-policy volatile-lru with "
                                      f"maxmemory {64 * 1024 * 1024}: Redis evicts keys when full, and an evicted "
                                      "count or mark is a check that no longer holds; set maxmemory-policy "
                                      "noeviction (and give this Redis its own memory)")
        refused = _sign_in(gw)  # a session, a replay mark, a code: nothing is asked of that Redis
        assert refused.status == 503 and "Sign-in is not available right now" in refused.text
        _keeping(redis)
        wait_for(lambda: _components(gw)["login.sessions"]["ready"], log=gw.output)
        assert "Sign out" in _sign_in(gw).text
    finally:
        redis.stop()


def test_the_relay_store_reports_an_evicting_redis_as_not_ready(tmp_path):
    from gateway.plugins.relay.settings import RedisSettings
    from gateway.plugins.relay.store import RedisStore

    redis = RedisServer(tmp_path / "redis").start()
    try:
        store = RedisStore(RedisSettings(url=redis.url, key_prefix="t:"))
        assert store.ping().endswith(": answers")
        _evicting(redis)
        try:
            store.ping()
        except ConnectionError as exc:
            assert "maxmemory-policy volatile-lru" in str(exc)
        else:
            raise AssertionError("an evicting Redis answered as ready")
        redis.client().config_set("maxmemory", "0")  # no limit: nothing is evicted, whatever the policy
        assert store.ping().endswith(": answers")
    finally:
        redis.stop()


def _login_gateway(tmp_path, start_gateway, redis):
    core = {"chain": ["static"], "plugins": ["login"], "throttle": {"enabled": False},
            "health": {"probe_interval": 1}}
    login = {"base_url": "https://login.example.test", "sessions": {"store": "redis", "redis_url": redis.url}}
    return start_gateway(write_conf(tmp_path / "conf.d", {"gateway.yaml": json.dumps(core),
                                                          "login.yaml": "login: " + json.dumps(login),
                                                          **static_users({"alice": _hash()})}))


def _cookies(response) -> str:
    return "; ".join(c.split(";", 1)[0] for c in response.headers.get_all("Set-Cookie") or [])


def test_a_sign_out_ends_the_session_while_redis_refuses_writes(tmp_path, start_gateway):
    from support.login import hidden

    redis = RedisServer(tmp_path / "redis").start()
    client = redis.client()
    try:
        gw = _login_gateway(tmp_path, start_gateway, redis)
        signed_in = _sign_in(gw)
        assert "Sign out" in signed_in.text
        (name,) = client.keys("authgw:login:s:*")
        cookie = _cookies(signed_in)
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", str(used + 256 * 1024))  # full, and nothing may be evicted
        with contextlib.suppress(Exception):
            for n in range(10_000):
                client.set(f"filler:{n}", b"x" * 4096)
        assert client.exists(name)
        body = urlencode({"csrf": hidden(signed_in.text, "csrf")}).encode()
        out = gw.post("/logout", body, {"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie})
        assert out.status == 200 and "You are signed out." in out.text, out.text[:300]
        assert not client.exists(name)
        client.config_set("maxmemory", "0")
        assert "Sign out" not in gw.get("/login", {"Cookie": cookie}).text  # the old cookie names nothing
    finally:
        redis.stop()


def test_a_session_record_the_store_did_not_write_is_no_session_and_no_500(tmp_path, start_gateway):
    redis = RedisServer(tmp_path / "redis").start()
    client = redis.client()
    try:
        gw = _login_gateway(tmp_path, start_gateway, redis)
        for planted, deleted in ((b"\xff\xfe not utf-8", False), (b"{}", False), (b"[1]", True), (b"[{}, 1, 2]", True),
                                 (b'[{"identity": 7, "index": 1}, 1, 2]', True)):
            signed_in = _sign_in(gw)
            (name,) = client.keys("authgw:login:s:*")
            client.set(name, planted)
            page = gw.get("/login", {"Cookie": _cookies(signed_in)})
            assert page.status == 200 and "Sign out" not in page.text, (planted, page.status)
            # taken as absent; one read as a session record but not one is deleted too
            assert client.exists(name) != deleted, planted
            client.delete(name)
        assert "Traceback" not in gw.output() and "a request handler raised" not in gw.output()
        assert "a session record that cannot be read is deleted" in gw.output()
    finally:
        redis.stop()
